"""Recorded runs trained again from their records: the comparison rows, resuming only what this
machine and revision left, and refusals before any work."""

from __future__ import annotations

import json

import pytest

from peerlm.cli import main
from peerlm.study import isoflop_study
from peerlm.study.design import RunSpec
from peerlm.study.reproduce import format_rows, reproduce, reproduced_lines
from peerlm.study.runner import git_revision, machine
from peerlm.train import train


def _study(tmp_path, tiny_data, log=None):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(3e10,), methods=("peer",),
                          log=log if log is not None else (lambda s: None))
    study.data_dir = lambda: tiny_data
    return study


def _tree(path):
    return sorted((str(p.relative_to(path)), p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_a_recorded_run_comes_out_bit_for_bit_the_same_on_its_machine(tmp_path, tiny_data):
    logged = []
    study = _study(tmp_path, tiny_data, logged.append)
    spec = RunSpec("ladder", 3e10, "peer", "L1d48")
    rec = study.run_one(spec)
    on_disk = (study.runs_dir / f"{spec.run_id}.json").read_text()
    before = _tree(study.work)
    logged.clear()
    rows = reproduce(study, [spec.run_id])
    (row,) = rows
    assert not any("resumed from" in m for m in logged)  # trained from step 0, not from the study's checkpoint
    assert _tree(study.work) == before  # whose directory is left alone
    assert row["same_bits"] and row["val_perplexity_ratio"] == 1.0 and row["method"] == "peer"
    assert row["recorded"]["val_loss"] == row["again"]["val_loss"] == rec["eval"]["val"]["loss"]
    assert row["again"]["last_train_loss"] == rec["last_train_loss"] is not None
    assert "cpu tag" in row["again"]["machine"] and row["data_checked"] and not row["resumed"]
    assert row["again"]["device"] == "cpu" and row["again"]["precision"] == row["recorded"]["precision"] == "fp32"
    assert (study.runs_dir / f"{spec.run_id}.json").read_text() == on_disk  # the record is left as it was
    assert list(study.runs_dir.iterdir()) == [study.runs_dir / f"{spec.run_id}.json"]
    assert not (tmp_path / "reproduce" / spec.run_id).exists()  # its checkpoints are removed
    assert json.loads((study.results / "reproduced.json").read_text()) == rows
    assert "the same bits" in format_rows(rows) and "x1.0000" in format_rows(rows)
    section = "\n".join(reproduced_lines(study.results))  # the reports' section
    assert f"| {spec.run_id} |" in section and "| 1.0000 | yes |" in section and ", fp32 |" in section
    assert reproduced_lines(tmp_path / "elsewhere") == []
    # a shortened run (the smoke path) is a different run: its row says so, and rows accumulate
    with pytest.raises(ValueError, match="needs|compares nothing"):  # not into the file the reports show
        reproduce(study, [spec.run_id], tokens=2 * 16 * 128)
    (short,) = reproduce(study, [spec.run_id], tokens=2 * 16 * 128, out=tmp_path / "smoke.json")
    assert not short["same_bits"] and short["tokens"] == 2 * 16 * 128
    assert "not the same bits" in format_rows([short])
    assert json.loads((tmp_path / "smoke.json").read_text()) == [short]
    assert len(json.loads((study.results / "reproduced.json").read_text())) == 1


def test_an_interrupted_call_resumes_only_what_this_machine_left(tmp_path, tiny_data):
    logged = []
    study = _study(tmp_path, tiny_data, logged.append)
    spec = RunSpec("ladder", 3e10, "peer", "L1d48")
    study.run_one(spec)
    work = tmp_path / "reproduce"
    run = study.run_config(spec, tiny_data)
    who = {"machine": machine(study.device), "git_revision": git_revision(), "device": str(study.device),
           "threads": study.threads}
    for note, resumed in ((who, True), ({**who, "machine": "another CPU"}, False)):
        train(run, work / spec.run_id, stop_at=3, progress=False, log=lambda s: None)  # an interrupted call
        (work / f"{spec.run_id}.who.json").write_text(json.dumps(note))
        logged.clear()
        (row,) = reproduce(study, [spec.run_id])
        assert row["resumed"] is resumed and any("resumed from" in m for m in logged) is resumed
        assert row["same_bits"]  # resuming is exact, and so is starting afresh
        assert not (work / spec.run_id).exists() and not (work / f"{spec.run_id}.who.json").exists()


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
    path.write_text(json.dumps(rec | {"train": {**rec["train"], "lr": rec["train"]["lr"] * 2}}))
    with pytest.raises(ValueError, match="derives other configs"):
        reproduce(study, [spec.run_id])
    assert not (tmp_path / "reproduce").exists() and not (study.results / "reproduced.json").exists()
    assert main(["study", "isoflop", "--results", str(tmp_path / "res"), "--work", str(tmp_path / "w"),
                 "--reproduce", "2e12_dense_L9d9_s0"]) == 2
    assert "no record named 2e12_dense_L9d9_s0" in capsys.readouterr().err
    assert main(["study", "isoflop", "--reproduce", "2e12_dense_L9d9_s0", "--plan"]) == 2
    assert "--reproduce trains recorded runs again and does nothing else: drop --plan" in capsys.readouterr().err
