"""The demo's plan and calibration (its end-to-end run is in test_cli.py)."""

from __future__ import annotations

from pathlib import Path

import peerlm.demo as demo
from peerlm.flops import model_cost
from peerlm.study import isoflop_study
from peerlm.study.design import Size, recipe

ROOT = Path(__file__).resolve().parents[1]


def test_the_demo_plan_is_each_preset_at_one_budget_with_the_studys_recipe():
    runs = demo.plan(demo.DEFAULT_FLOPS)
    assert [r.preset for r in runs] == list(demo.PRESETS) == ["dense-small", "peer-small"]
    assert [r.run_id for r in runs] == ["dense-small_2.5e+13", "peer-small_2.5e+13"]  # the run directories
    dense, peer = (r.train() for r in runs)
    assert dense.flops == peer.flops == demo.DEFAULT_FLOPS and not dense.sparse_optimizer and not peer.sparse_optimizer
    ratios = ("expert_lr_ratio", "routing_lr_ratio")
    assert {k: v for k, v in vars(dense).items() if k not in ratios} == {
        k: v for k, v in vars(peer).items() if k not in ratios}
    assert all(r.model().vocab_size == demo.VOCAB for r in runs)
    # the study's recipe, with its choices as the committed records make them
    committed = isoflop_study(ROOT / "results" / "isoflop", log=lambda s: None)
    choices = committed.plan.choices(committed.records())
    assert (demo.STUDY_LR_MULT, demo.STUDY_TABLE_LR_RATIO) == (choices["lr_mult"], choices["expert_ratio"]["peer"])
    cfg = runs[1].model()
    study = recipe("peer", Size("peer-small", cfg.n_layers, cfg.dim), demo.DEFAULT_FLOPS, choices["lr_mult"],
                   choices["expert_ratio"]["peer"], seed=0)
    same = ("lr", "betas", "weight_decay", "warmup_frac", "min_lr_ratio", "grad_clip", *ratios)
    assert {k: getattr(peer, k) for k in same} == {k: getattr(study, k) for k in same}
    assert (peer.routing_lr_ratio, dense.routing_lr_ratio, peer.expert_lr_ratio) == (0.1, 1.0, 3.0)


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
