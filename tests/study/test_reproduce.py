"""Recorded runs trained again from their records: the comparison rows, and refusals before any work."""

from __future__ import annotations

import json

import pytest

from peerlm.cli import main
from peerlm.study import isoflop_study
from peerlm.study.design import RunSpec
from peerlm.study.reproduce import format_rows, reproduce


def _study(tmp_path, tiny_data):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(3e10,), methods=("peer",),
                          log=lambda s: None)
    study.data_dir = lambda: tiny_data
    return study


def test_a_recorded_run_comes_out_bit_for_bit_the_same_on_its_machine(tmp_path, tiny_data):
    study = _study(tmp_path, tiny_data)
    spec = RunSpec("ladder", 3e10, "peer", "L1d48")
    rec = study.run_one(spec)
    on_disk = (study.runs_dir / f"{spec.run_id}.json").read_text()
    rows = reproduce(study, [spec.run_id])
    (row,) = rows
    assert row["same_bits"] and row["val_perplexity_ratio"] == 1.0 and row["method"] == "peer"
    assert row["recorded"]["val_loss"] == row["again"]["val_loss"] == rec["eval"]["val"]["loss"]
    assert row["again"]["last_train_loss"] == rec["last_train_loss"] is not None
    assert "cpu tag" in row["again"]["machine"]
    assert (study.runs_dir / f"{spec.run_id}.json").read_text() == on_disk  # the record is left as it was
    assert list(study.runs_dir.iterdir()) == [study.runs_dir / f"{spec.run_id}.json"]
    assert not (tmp_path / "reproduce" / spec.run_id).exists()  # its checkpoints are removed
    assert json.loads((study.results / "reproduced.json").read_text()) == rows
    assert "the same bits" in format_rows(rows) and "x1.0000" in format_rows(rows)
    # a shortened run (the smoke path) is a different run: its row says so, and rows accumulate
    rows = reproduce(study, [spec.run_id], tokens=2 * 16 * 128)
    assert len(rows) == 2 and not rows[1]["same_bits"] and rows[1]["tokens"] == 2 * 16 * 128
    assert "not the same bits" in format_rows(rows[1:])


def test_refusals_come_before_any_training(tmp_path, tiny_data, capsys):
    study = _study(tmp_path, tiny_data)
    spec = RunSpec("ladder", 3e10, "peer", "L1d48")
    with pytest.raises(ValueError, match=f"no record named {spec.run_id} in"):
        reproduce(study, [spec.run_id])
    rec = study.run_one(spec)
    path = study.runs_dir / f"{spec.run_id}.json"
    path.write_text(json.dumps(rec | {"data": {**rec["data"], "tokenizer_sha256": "0" * 64}}))
    with pytest.raises(ValueError, match="trained on other data"):
        reproduce(study, [spec.run_id])
    path.write_text(json.dumps(rec | {"diverged": "nan at step 3"}))
    with pytest.raises(ValueError, match="diverged"):
        reproduce(study, [spec.run_id])
    assert not (tmp_path / "reproduce").exists() and not (study.results / "reproduced.json").exists()
    assert main(["study", "isoflop", "--results", str(tmp_path / "res"), "--work", str(tmp_path / "w"),
                 "--reproduce", "2e12_dense_L9d9_s0"]) == 2
    assert "no record named 2e12_dense_L9d9_s0" in capsys.readouterr().err
