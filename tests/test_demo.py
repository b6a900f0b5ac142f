"""The demo's plan and calibration (its end-to-end run is in test_cli.py)."""

from __future__ import annotations

import peerlm.demo as demo
from peerlm.flops import model_cost


def test_the_demo_plan_is_each_preset_at_one_budget_with_the_shared_recipe():
    runs = demo.plan(demo.DEFAULT_FLOPS)
    assert [r.preset for r in runs] == list(demo.PRESETS) == ["dense-small", "peer-small"]
    assert [r.run_id for r in runs] == ["dense-small_2.5e+13", "peer-small_2.5e+13"]  # the run directories
    dense, peer = (r.train() for r in runs)
    assert dense.flops == peer.flops == demo.DEFAULT_FLOPS and (dense.sparse_optimizer, peer.sparse_optimizer) == (
        False, True)
    assert {k: v for k, v in vars(dense).items() if k != "sparse_optimizer"} == {
        k: v for k, v in vars(peer).items() if k != "sparse_optimizer"}
    assert all(r.model().vocab_size == demo.VOCAB for r in runs)


def test_calibration_sizes_the_budget_from_step_times_and_the_steps_a_budget_buys(monkeypatch):
    per_step = {"dense-small": 0.031, "peer-small": 0.047}
    timed = []

    def fake_time(models, steps):  # the real timing is tested with the study's
        models = list(models)
        timed.extend((key, steps) for key, _, _ in models)
        return {key: per_step[key] for key, _, _ in models}

    monkeypatch.setattr(demo, "time_models", fake_time)
    per_flop = sum(per_step[p] / (model_cost(demo._model(p))["flops_train"] * 8 * demo._model(p).context_length)
                   for p in demo.PRESETS)  # seconds per FLOP of budget: each run's step time over its step's FLOPs
    for minutes in (3, 10, 60):
        assert demo.calibrate(minutes) == float(f"{(minutes * 60 - demo.OVERHEAD_S) / per_flop:.2g}")
    assert timed[:2] == [("dense-small", 3), ("peer-small", 3)]
