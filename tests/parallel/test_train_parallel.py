"""Data-parallel training through ``peerlm.train``: 2 gloo ranks train like one process on the same
global batch (DDP; the expert tables sharded, under DDP and FSDP2), a 2-rank checkpoint resumes on one
process, and a killed rank fails the run within a bounded time. FSDP2 + sharded-table runs write
distributed checkpoints that resume 2 -> 1, 1 -> 2 and 2 -> 2 ranks with the losses of an uninterrupted
run, load in ``peerlm eval`` in one process, and are found damaged when a shard is.

Tolerance: losses agree to 1e-5 and parameters to 1e-4 (the ranks' sums are split in two halves, so
rounding differs from one process; the loss itself is computed in fp32).
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from peerlm.checkpoint import load
from peerlm.data import TokenDataset, prepare
from peerlm.parallel.launch import spawn
from peerlm.parallel.runtime import Parallel
from peerlm.train import _train_step, build_for_training, train

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import final_weights, losses, make_run, write_text  # noqa: E402

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([write_text(root / "text.txt")], root / "d", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "d"


def _train_worker(rank: int, ranks: int, data: str, preset: str, out: str, stop_at: int | None) -> dict:
    run = make_run(Path(data), preset, parallel="ddp", max_steps=6, eval_every=3, ckpt_every=3)
    return train(run, out, stop_at=stop_at, progress=False, log=lambda s: None)


@pytest.mark.parametrize("preset", ["tiny", "tiny-peer"])
def test_two_ddp_ranks_train_like_one_process(data_dir, tmp_path, preset):
    one = tmp_path / "one"
    train(make_run(data_dir, preset, max_steps=6, eval_every=3, ckpt_every=3), one, progress=False,
          log=lambda s: None)
    summaries = spawn(_train_worker, 2, args=(str(data_dir), preset, str(tmp_path / "two"), None))
    two = losses(tmp_path / "two")
    assert list(two) == list(range(1, 7))  # rank 0 alone wrote metrics, once per step
    assert list(two.values()) == pytest.approx(list(losses(one).values()), abs=1e-5)
    for a, b in zip(summaries[0]["validations"], summaries[1]["validations"]):
        assert a["val_loss"] == b["val_loss"]
    assert summaries[0]["val_loss"] == pytest.approx(json.loads(
        (one / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"], abs=1e-5)
    w1, w2 = final_weights(one), final_weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    for k in w1:
        assert torch.allclose(w1[k], w2[k], atol=1e-4), k


def test_a_two_rank_checkpoint_resumes_on_one_process(data_dir, tmp_path):
    run = make_run(data_dir, "tiny-peer", max_steps=6, eval_every=3, ckpt_every=3)
    train(run, tmp_path / "one", progress=False, log=lambda s: None)
    spawn(_train_worker, 2, args=(str(data_dir), "tiny-peer", str(tmp_path / "two"), 3))
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == "step_00000003"
    train(run, tmp_path / "two", resume=True, progress=False, log=lambda s: None)  # one process now
    assert list(losses(tmp_path / "two").values()) == pytest.approx(list(losses(tmp_path / "one").values()),
                                                                    abs=1e-5)


def _step_worker(rank: int, ranks: int, data: str, mode: str, steps: int) -> dict:
    run = make_run(Path(data), "tiny-peer", parallel=mode, shard_experts=True, max_steps=steps)
    par = Parallel.setup(mode)
    torch.manual_seed(0)
    model, opt = build_for_training(run.model, run.train, "cpu", par)
    module = model
    if mode == "ddp":
        from peerlm.parallel.runtime import ddp

        module = ddp(model, par, torch.device("cpu"))
    params = [p for g in opt.param_groups for p in g["params"]]
    ds = TokenDataset(data)
    out = [_train_step(model, opt, params, ds, run, s, steps, torch.device("cpu"), contextlib.nullcontext,
                       par, module)[:3] for s in range(steps)]
    ffn = model.blocks[0].ffn
    return {"steps": out, "table": tuple(ffn.w_down.shape), "full": (ffn.usage_slots, ffn.dim),
            "trunk": type(model.blocks[0].attn.qkv.weight).__name__}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_sharded_experts_train_like_one_process(data_dir, mode):
    steps = 4
    run = make_run(data_dir, "tiny-peer", max_steps=steps)
    torch.manual_seed(0)
    model, opt = build_for_training(run.model, run.train, "cpu")
    params = [p for g in opt.param_groups for p in g["params"]]
    ds = TokenDataset(data_dir)
    ref = [_train_step(model, opt, params, ds, run, s, steps, torch.device("cpu"), contextlib.nullcontext)[:3]
           for s in range(steps)]
    for r in spawn(_step_worker, 2, args=(str(data_dir), mode, steps)):
        N, D = r["full"]
        assert r["table"] == (N, D // 2)  # each rank holds half the columns of the table
        assert r["trunk"] == ("DTensor" if mode == "fsdp" else "Parameter")
        for (loss, _, norm), (loss_ref, _, norm_ref) in zip(r["steps"], ref):
            assert loss == pytest.approx(loss_ref, abs=1e-5)
            assert norm == pytest.approx(norm_ref, rel=1e-4)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_killed_rank_fails_the_run_promptly(data_dir, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()),
           "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}
    cmd = [sys.executable, "-m", "peerlm", "train", "--preset", "tiny", "--data", str(data_dir), "--out", str(out),
           "--max-steps", "100000", "--quiet", "--set", "train.parallel=ddp", "--set", "train.device=cpu",
           "--set", "train.batch_size=2", "--set", "train.ckpt_every=5", "--set", "train.eval_every=100000",
           "--set", "train.dist_timeout=20"]
    procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    try:
        deadline = time.time() + 60
        while time.time() < deadline and not (out / "checkpoints" / "latest").is_file():
            assert procs[0].poll() is None, procs[0].communicate()
            time.sleep(0.1)
        assert (out / "checkpoints" / "latest").is_file()
        procs[1].send_signal(signal.SIGKILL)
        killed = time.time()
        _, err = procs[0].communicate(timeout=45)
        assert time.time() - killed < 30
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert procs[0].returncode == 2, err
    assert "another rank died" in err and "--resume" in err, err
    latest = (out / "checkpoints" / "latest").read_text().strip()
    assert (out / "checkpoints" / latest / "manifest.json").is_file()  # the last checkpoint is intact
    json.loads((out / "checkpoints" / latest / "manifest.json").read_text())


# ---------------------------------------------------------------- distributed checkpoints (FSDP2, sharded tables)


def _sharded_worker(rank: int, ranks: int, data: str, out: str, stop_at: int | None, resume: bool,
                    sparse: bool) -> dict:
    run = make_run(Path(data), "tiny-peer", parallel="fsdp", shard_experts=True, sparse_optimizer=sparse,
                   max_steps=6, eval_every=3, ckpt_every=3)
    return train(run, out, resume=resume, stop_at=stop_at, progress=False, log=lambda s: None)


def _one_process(data_dir: Path, sparse: bool, **kw):
    return make_run(data_dir, "tiny-peer", sparse_optimizer=sparse, max_steps=6, eval_every=3, ckpt_every=3, **kw)


@pytest.mark.parametrize("sparse", [False, True])
def test_a_sharded_two_rank_checkpoint_resumes_on_one_process(data_dir, tmp_path, sparse):
    spawn(_sharded_worker, 2, args=(str(data_dir), str(tmp_path / "full"), None, False, sparse))
    spawn(_sharded_worker, 2, args=(str(data_dir), str(tmp_path / "two"), 3, False, sparse))
    ckpt = tmp_path / "two" / "checkpoints" / "step_00000003"
    assert (tmp_path / "two" / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert json.loads((ckpt / "manifest.json").read_text())["format"] == "dcp"
    assert (ckpt / "model" / ".metadata").is_file() and (ckpt / "state" / ".metadata").is_file()
    assert not list((tmp_path / "two" / "checkpoints").glob(".*.tmp"))
    # the moments of both column halves of a table, resharded into one whole table
    run = _one_process(data_dir, sparse)
    model, opt = build_for_training(run.model, run.train)
    load(ckpt, model, opt)
    table = model.blocks[0].ffn.w_down
    state = next(o.state[table] for o in opt.optimizers if table in o.state)
    half = table.shape[1] // 2
    assert state["exp_avg"].shape == table.shape
    assert state["exp_avg"][:, :half].abs().sum() > 0 and state["exp_avg"][:, half:].abs().sum() > 0
    if sparse:  # per-row step counts
        assert state["step"].shape == (table.shape[0],) and int(state["step"].max()) == 3
    train(run, tmp_path / "two", resume=True, progress=False, log=lambda s: None)
    assert list(losses(tmp_path / "two").values()) == pytest.approx(list(losses(tmp_path / "full").values()),
                                                                    abs=1e-5)


def test_a_one_process_checkpoint_resumes_on_two_sharded_ranks(data_dir, tmp_path):
    train(_one_process(data_dir, False), tmp_path / "one", progress=False, log=lambda s: None)
    train(_one_process(data_dir, False), tmp_path / "two", stop_at=2, progress=False, log=lambda s: None)
    spawn(_sharded_worker, 2, args=(str(data_dir), str(tmp_path / "two"), 4, True, False))  # 1 -> 2 ranks
    spawn(_sharded_worker, 2, args=(str(data_dir), str(tmp_path / "two"), None, True, False))  # 2 -> 2
    assert list(losses(tmp_path / "two").values()) == pytest.approx(list(losses(tmp_path / "one").values()),
                                                                    abs=1e-5)
    final = tmp_path / "two" / "checkpoints" / "step_00000006"
    assert (final / "model" / ".metadata").is_file()  # the ranks wrote a distributed checkpoint


def test_a_distributed_checkpoint_loads_in_one_process_and_damage_is_detected(data_dir, tmp_path):
    from peerlm.checkpoint import CheckpointDamaged, verify_checkpoint
    from peerlm.rundir import load_run

    train(_one_process(data_dir, False), tmp_path / "one", progress=False, log=lambda s: None)
    spawn(_sharded_worker, 2, args=(str(data_dir), str(tmp_path / "two"), None, False, False))
    model, config = load_run(tmp_path / "two")  # one process, no process group
    assert config["checkpoint_step"] == 6
    own = model.state_dict()
    ref = final_weights(tmp_path / "one")
    assert own.keys() == ref.keys()
    for k in ref:
        assert torch.allclose(own[k], ref[k], atol=1e-4), k
    # the CLI reads it too
    done = subprocess.run([sys.executable, "-m", "peerlm", "eval", str(tmp_path / "two"), "--data", str(data_dir)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    shard = next((tmp_path / "two" / "checkpoints" / "step_00000006" / "model").glob("__1_*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointDamaged, match="step_00000003 is intact") as e:
        verify_checkpoint(tmp_path / "two" / "checkpoints" / "step_00000006")
    assert "__1_" in str(e.value)
    with pytest.raises(CheckpointDamaged):
        load_run(tmp_path / "two")
    verify_checkpoint(tmp_path / "two" / "checkpoints" / "step_00000003")


def test_the_readme_recipe_resumes_a_sharded_fsdp_run_in_one_process(data_dir, tmp_path, capsys):
    """`peerlm train --out RUN --resume --set train.parallel=none` on a 2-rank FSDP + sharded-tables
    run: shard_experts goes off with it (one process has no ranks to shard over)."""
    from peerlm.cli import main

    spawn(_sharded_worker, 2, args=(str(data_dir), str(tmp_path / "two"), 3, False, False))
    assert main(["train", "--out", str(tmp_path / "two"), "--resume", "--set", "train.parallel=none",
                 "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "step 6/6" in out and "train.shard_experts set to false" in err + out
    assert json.loads((tmp_path / "two" / "config.json").read_text())["train"]["shard_experts"] is False
