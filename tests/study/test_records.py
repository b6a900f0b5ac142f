"""A file under a study's runs/ that is not a record it can read, or a results folder that is not
one, is one error naming the file and what to do, before any work."""

from __future__ import annotations

import json

import pytest
from test_isoflop import B0, fake_record, finish_pending

from peerlm.cli import main
from peerlm.study import isoflop_study
from peerlm.study.ablations import ablation_study
from peerlm.study.design import RunSpec
from peerlm.study.records import RecordError, RecordStore, read_record

SPEC = RunSpec("lr", B0, "dense", "L2d64", lr_mult=0.5)
GOOD = fake_record(SPEC, 3.0)


def broken(rec: dict, path: str, value) -> dict:
    """``rec`` with the field at the dotted ``path`` set to ``value`` (``...``: removed)."""
    rec = json.loads(json.dumps(rec))
    *parents, last = path.split(".")
    d = rec
    for p in parents:
        d = d[p]
    if value is ...:
        del d[last]
    else:
        d[last] = value
    return rec


CASES = {  # file text -> what the error says of it
    "": "an empty file",
    "  \n": "an empty file",
    '{"run_id": "2e12_dense': "not JSON",
    "not json at all": "not JSON",
    "[1, 2]": "a JSON list, not an object",
    json.dumps(broken(GOOD, "eval", ...)): "no 'eval' field",
    json.dumps(broken(GOOD, "eval.val", ...)): "no eval.val",
    json.dumps(broken(GOOD, "eval.val.loss", "low")): "eval.val.loss is 'low', not a number",
    json.dumps(broken(GOOD, "spec.seed", "0")): "spec.seed is '0', not a number",
    json.dumps(broken(GOOD, "spec.budget", ...)): "no spec.budget field",
    json.dumps(broken(GOOD, "spec.method", "mlp")): "not a study model",
    json.dumps(broken(GOOD, "params", None)): "'params' is None, not a number",
    json.dumps(broken(GOOD, "model.dim", "wide")): "'model' is not a model config",
    json.dumps(broken(GOOD, "run_id", "other")): "its run_id 'other' is not its file name's",
}


@pytest.mark.parametrize("text", list(CASES), ids=range(len(CASES)))
def test_a_bad_record_names_its_file_and_the_way_out(tmp_path, capsys, text):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "w", budgets=(B0,), methods=("dense",))
    study.store.write(fake_record(SPEC.with_(lr_mult=1.0), 3.0))
    bad = study.runs_dir / f"{SPEC.run_id}.json"
    bad.write_text(text)
    with pytest.raises(RecordError) as e:
        study.records()
    msg = str(e.value)
    assert str(bad) in msg and CASES[text] in msg and "move it out of" in msg and "\n" not in msg
    for flags in (["--plan", "--no-calibrate"], ["--report"], []):  # the CLI: one line, before any work
        assert main(["study", "isoflop", "--results", str(study.results), "--work", str(tmp_path / "w"),
                     "--budget", "2e12", "--method", "dense", *flags]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"peerlm: error: {bad} is not a study record") and err.count("\n") == 1
    assert bad.read_text() == text and not (tmp_path / "w").exists()


def test_a_bad_record_of_a_neighbouring_ablation_names_its_file(tmp_path):
    iso = isoflop_study(tmp_path / "iso", work=tmp_path / "work" / "isoflop", budgets=(B0,), methods=("peer",),
                        log=lambda s: None)
    finish_pending(iso, lambda s: 3.0 + 0.05 * abs(["L1d32", "L1d48", "L2d64"].index(s.size) - 1
                                                   if s.size in ("L1d32", "L1d48", "L2d64") else 9))
    experts = ablation_study("experts", tmp_path / "experts", iso)
    shared = experts.pending()[0]
    (tmp_path / "querynorm" / "runs").mkdir(parents=True)
    bad = tmp_path / "querynorm" / "runs" / f"{shared.run_id}.json"
    bad.write_text("{")  # truncated as a crash mid-copy leaves it
    with pytest.raises(RecordError, match=f"{bad} is not a study record"):
        experts.pending()


def test_a_bad_timing_file_names_itself(tmp_path):
    store = RecordStore(tmp_path)
    store.timing_path.write_text('{"meta": {}}')
    with pytest.raises(RecordError, match="timing.json is not a step timing .*run `--time-steps` again"):
        store.timing()
    store.timing_path.write_text("")
    with pytest.raises(RecordError, match="not JSON"):
        store.timing()


def test_a_record_with_a_nan_loss_is_read_and_written_back_as_strict_json(tmp_path):
    store = RecordStore(tmp_path)
    rec = fake_record(SPEC, 3.0)
    rec["eval"]["val"]["loss"] = float("nan")
    path = store.write(rec)
    assert json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{c} in a record"))
    assert read_record(path)["eval"]["val"]["loss"] is None


def test_results_that_are_not_a_folder_are_refused_up_front(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    assert main(["study", "isoflop", "--results", str(f), "--work", str(tmp_path / "w"), "--method", "dense"]) == 2
    assert f"peerlm: error: {f} is a file, not a study's results folder" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "runs").write_text("")
    assert main(["study", "isoflop", "--results", str(tmp_path / "r"), "--plan", "--no-calibrate"]) == 2
    assert "runs is a file, not a study's results folder" in capsys.readouterr().err
    (tmp_path / "iso").mkdir()
    assert main(["study", "experts", "--results", str(f), "--isoflop-results", str(tmp_path / "iso"), "--plan"]) == 2
    assert f"{f} is a file" in capsys.readouterr().err
    assert f.read_text() == "mine" and not (tmp_path / "w").exists()
