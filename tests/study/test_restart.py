"""A study run killed before its first checkpoint and started again: only the new attempt's steps
are in metrics.jsonl and in the record's training seconds, each step once."""

from __future__ import annotations

import json

import pytest

from peerlm.rundir import RunDir
from peerlm.study import isoflop_study


@pytest.mark.parametrize("empty_checkpoints", [False, True])
def test_a_restart_counts_only_the_new_attempts_steps(tmp_path, tiny_data, empty_checkpoints):  # noqa: F811
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(3e10,), methods=("dense",),
                          log=lambda s: None)
    study.data_dir = lambda: tiny_data
    spec = study.pending()[0]
    out = study.work / spec.run_id
    out.mkdir(parents=True)
    if empty_checkpoints:  # killed after the folder was made, before a checkpoint was in it
        (out / "checkpoints").mkdir()
    stale = [{"step": i, "loss": 9.0, "ce": 9.0, "dt": 1000.0, "tokens": 2048 * i} for i in (1, 2, 3)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in stale))
    rec = study.run_one(spec)
    steps = [r for r in RunDir(out).metric_records() if "dt" in r]
    assert [r["step"] for r in steps] == list(range(1, rec["steps"] + 1))  # each step once, the new ones
    assert all(r["dt"] < 1000.0 for r in steps)
    assert rec["train_seconds"] == pytest.approx(sum(r["dt"] for r in steps))
