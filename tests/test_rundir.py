"""The run directory: each step logged once however a run was restarted, the layout in one place,
``load_run`` on a run or a checkpoint directory, and data prepare refusing a run directory."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import peerlm.checkpoint.local as local
from peerlm.checkpoint import CheckpointDamaged, CheckpointError, CheckpointWriteError
from peerlm.cli import main
from peerlm.data import DataError, prepare
from peerlm.rundir import RunDir, is_run_dir, load_run
from peerlm.train import train

sys.path.insert(0, str(Path(__file__).parent))
from test_train import make_run, write_text  # noqa: E402


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([write_text(root / "text.txt")], root / "d", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "d"


def _steps(run: RunDir) -> list[int]:
    return [r["step"] for r in run.metric_records() if "loss" in r]


def _quiet(s: str) -> None:
    pass


def test_restart_after_a_failed_first_checkpoint_logs_each_step_once(data_dir, tmp_path, monkeypatch):
    """The first checkpoint write fails after steps 1-5 were logged: the restarted run (the advice the
    error gives is --resume) starts from scratch, and its log holds steps 1..10 once each, with the
    same losses as a run that never failed."""
    run = make_run(data_dir, max_steps=10, ckpt_every=5, eval_every=100)
    clean = RunDir(tmp_path / "clean")
    train(run, clean.path, progress=False, log=_quiet)

    def disk_full(tensors, path):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(local, "save_file", disk_full)
    failed = RunDir(tmp_path / "failed")
    with pytest.raises(CheckpointWriteError):
        train(run, failed.path, progress=False, log=_quiet)
    assert _steps(failed) == [1, 2, 3, 4, 5] and failed.latest_checkpoint() is None
    monkeypatch.undo()
    train(run, failed.path, resume=True, progress=False, log=_quiet)
    assert _steps(failed) == list(range(1, 11))
    losses = {r["step"]: r["loss"] for r in failed.metric_records() if "loss" in r}
    assert losses == {r["step"]: r["loss"] for r in clean.metric_records() if "loss" in r}


def test_resume_cuts_the_log_back_to_the_checkpoint(data_dir, tmp_path):
    """Lines logged after the checkpoint resumed from (a kill between checkpoints) are dropped."""
    run = make_run(data_dir, max_steps=10, ckpt_every=5, eval_every=100)
    rd = RunDir(tmp_path / "r")
    train(run, rd.path, stop_at=5, progress=False, log=_quiet)
    with open(rd.metrics, "a", encoding="utf-8") as f:  # what a killed attempt wrote past step 5
        f.write(json.dumps({"step": 6, "loss": 9.9}) + "\n")
    train(run, rd.path, resume=True, progress=False, log=_quiet)
    assert _steps(rd) == list(range(1, 11))
    assert all(r["loss"] != 9.9 for r in rd.metric_records() if "loss" in r)


def test_layout_and_load_run(data_dir, tmp_path):
    run = make_run(data_dir, max_steps=4, ckpt_every=2, eval_every=100)
    rd = RunDir(tmp_path / "r")
    assert not is_run_dir(rd.path)
    train(run, rd.path, progress=False, log=_quiet)
    assert is_run_dir(rd.path)
    assert rd.config.is_file() and rd.tokenizer.is_file() and rd.metrics.is_file()
    assert rd.read_config()["model"] == json.loads(rd.config.read_text())["model"]
    latest = rd.latest_checkpoint()
    assert latest is not None and latest.parent == rd.checkpoints and latest.name == "step_00000004"
    model, config = load_run(rd.path)
    assert config["checkpoint_step"] == 4 and not model.training
    older, older_config = load_run(rd.checkpoints / "step_00000002")  # a checkpoint directory itself
    assert older_config["checkpoint_step"] == 2
    differs = [k for k, v in model.state_dict().items() if not torch.equal(v, older.state_dict()[k])]
    assert differs  # two more steps changed weights


def test_data_prepare_refuses_a_run_directory(data_dir, tmp_path, capsys):
    run = make_run(data_dir, max_steps=2, ckpt_every=2, eval_every=100)
    rd = RunDir(tmp_path / "r")
    train(run, rd.path, progress=False, log=_quiet)
    before = rd.tokenizer.read_bytes()
    text = write_text(tmp_path / "t.txt")
    assert main(["data", "prepare", "--text", str(text), "--out", str(rd.path), "--vocab-size", "300"]) != 0
    assert "holds a training run" in capsys.readouterr().err
    with pytest.raises(DataError, match="not a prepared directory"):  # the library refuses it too
        prepare([text], rd.path, vocab_size=300, progress=False)
    assert rd.tokenizer.read_bytes() == before and not (rd.path / "meta.json").exists()


def test_load_run_of_a_checkpoint_that_never_existed_names_the_intact_one(data_dir, tmp_path):
    run = make_run(data_dir, max_steps=4, ckpt_every=2, eval_every=100)
    rd = RunDir(tmp_path / "r")
    train(run, rd.path, progress=False, log=_quiet)
    with pytest.raises(CheckpointDamaged, match="step_00000002 is intact"):
        load_run(rd.checkpoints / "step_00000003")


def test_load_run_reads_the_newest_checkpoint_when_training_deletes_the_one_it_reads(data_dir, tmp_path,
                                                                                      monkeypatch):
    """A run still training writes step 6 and deletes step 4 while eval is reading step 4."""
    import peerlm.rundir as rundir

    run = make_run(data_dir, max_steps=4, ckpt_every=2, eval_every=100)
    rd = RunDir(tmp_path / "r")
    train(run, rd.path, progress=False, log=_quiet)
    real = rundir.verify_checkpoint
    calls = []

    def rotate_then_verify(ckpt, files):
        if not calls:  # the trainer's next save and prune, between finding step 4 and reading it
            (rd.checkpoints / "step_00000004").rename(rd.checkpoints / "step_00000006")
            (rd.checkpoints / "latest").write_text("step_00000006\n")
        calls.append(Path(ckpt).name)
        return real(ckpt, files)

    monkeypatch.setattr(rundir, "verify_checkpoint", rotate_then_verify)
    _, config = load_run(rd.path)
    assert calls == ["step_00000004", "step_00000006"] and config["checkpoint"].endswith("step_00000006")
    calls.clear()  # a checkpoint directory named by the user is not swapped for another
    (rd.checkpoints / "step_00000006").rename(rd.checkpoints / "step_00000004")
    with pytest.raises(CheckpointError, match="deleted while it was read"):
        load_run(rd.checkpoints / "step_00000004")
