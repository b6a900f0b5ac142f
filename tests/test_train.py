"""The training loop: loss drops, exact resume (in process and after a real SIGKILL), budgets, config."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peerlm.config import apply_overrides, get_preset
from peerlm.data import prepare
from peerlm.flops import model_cost
from peerlm.runconfig import RunConfig, TrainConfig, TrainError, autocast_dtype, data_info, plan_steps, resolve_device
from peerlm.train import train

WORDS = ("the cat sat on a mat and then it ran to the dog who was big or small but never late for "
         "tea while birds sang songs of old kings").split()


def write_text(path: Path, paragraphs: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        start = rng.randrange(len(WORDS))  # runs of the word list: learnable structure
        paras.append(" ".join(WORDS[(start + i + rng.randrange(2)) % len(WORDS)] for i in range(60)) + ".")
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([write_text(root / "text.txt")], root / "d", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "d"


def make_run(data_dir: Path, preset: str = "tiny-peer", **train) -> RunConfig:
    info = data_info(data_dir)
    model = apply_overrides(get_preset(preset), [f"vocab_size={info['vocab_size']}"])
    defaults = {"lr": 3e-3, "warmup": 2, "batch_size": 4, "max_steps": 10, "eval_every": 5, "eval_batches": 2,
                "ckpt_every": 5, "seed": 0, "device": "cpu"}
    return RunConfig(model, TrainConfig(**{**defaults, **train}), info)


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            assert rec["step"] not in out, f"step {rec['step']} logged twice"
            out[rec["step"]] = rec["loss"]
    return out


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_tiny_run_loss_drops_and_writes_the_run_dir(data_dir, tmp_path):
    run = make_run(data_dir, max_steps=30, eval_every=10, ckpt_every=10, keep=2)
    summary = train(run, tmp_path / "r", progress=False, log=lambda s: None)
    assert summary["step"] == 30 and summary["done"]
    ls = losses(tmp_path / "r")
    assert sum(list(ls.values())[-5:]) / 5 < sum(list(ls.values())[:5]) / 5 - 0.5
    vals = summary["validations"]
    assert [v["step"] for v in vals] == [10, 20, 30] and vals[-1]["val_loss"] < vals[0]["val_loss"]
    assert 0 < vals[-1]["usage"]["blocks.0.ffn"]["usage"] <= 1  # usage logged for the PEER layer
    for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
        assert (tmp_path / "r" / name).is_file()
    saved = RunConfig.from_dict(json.loads((tmp_path / "r" / "config.json").read_text()))
    assert saved == run
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").glob("step_*")) == [
        "step_00000020", "step_00000030"]


@pytest.mark.parametrize("preset,extra", [
    ("tiny-peer", {}),
    ("tiny-peer", {"sparse_optimizer": True, "grad_accum": 2}),
    ("tiny-pkm", {"grad_clip": 0.05}),
    ("tiny-peer", {"sparse_optimizer": True, "expert_update": "backward"}),
])
def test_resume_equals_uninterrupted_run(data_dir, tmp_path, preset, extra):
    N = 6
    run = make_run(data_dir, preset, max_steps=2 * N, eval_every=4, ckpt_every=3, **extra)
    quiet = {"progress": False, "log": lambda s: None}
    train(run, tmp_path / "a", **quiet)
    first = train(run, tmp_path / "b", stop_at=N, **quiet)
    assert first["step"] == N and not first["done"]
    second = train(run, tmp_path / "b", resume=True, **quiet)
    assert second["step"] == 2 * N and second["steps_this_call"] == N
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert list(la) == list(range(1, 2 * N + 1)) and la == lb  # exact float equality, every step
    wa, wb = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_drops_metrics_logged_after_the_checkpoint(data_dir, tmp_path):
    run = make_run(data_dir, max_steps=8, ckpt_every=4, eval_every=100)
    quiet = {"progress": False, "log": lambda s: None}
    train(run, tmp_path / "r", stop_at=6, **quiet)  # checkpoints at 4 and 6
    ckpts = tmp_path / "r" / "checkpoints"
    # as if killed after step 6's log lines but before its checkpoint
    (ckpts / "latest").write_text("step_00000004\n")
    train(run, tmp_path / "r", resume=True, **quiet)
    assert list(losses(tmp_path / "r")) == list(range(1, 9))


def test_existing_run_needs_resume(data_dir, tmp_path):
    run = make_run(data_dir, max_steps=2)
    train(run, tmp_path / "r", progress=False, log=lambda s: None)
    with pytest.raises(TrainError, match="--resume"):
        train(run, tmp_path / "r", progress=False, log=lambda s: None)


def test_run_length_is_the_one_limit_given(data_dir):
    run = make_run(data_dir, max_steps=1000)
    T = run.model.context_length
    assert plan_steps(run) == (1000, "max_steps")
    run.train = dataclasses.replace(run.train, max_steps=None, max_tokens=7 * 4 * T + 5)
    assert plan_steps(run) == (7, "max_tokens")
    per_step = model_cost(run.model, T)["flops_train"] * 4 * T
    run.train = dataclasses.replace(run.train, max_tokens=None, flops=3.5 * per_step)
    assert plan_steps(run) == (3, "flops")
    run.train = dataclasses.replace(run.train, flops=0.5 * per_step)
    with pytest.raises(TrainError, match="less than one step"):
        plan_steps(run)


def test_a_budget_is_never_cut_by_a_default(data_dir):
    """A FLOP budget or token limit set through the config alone trains to its end: no default step cap."""
    T = 32
    per_step = model_cost(make_run(data_dir).model, T)["flops_train"] * 4 * T
    run = make_run(data_dir, max_steps=None, flops=1500.5 * per_step)
    assert plan_steps(run) == (1500, "flops")
    run = make_run(data_dir, max_steps=None, max_tokens=2000 * 4 * T)
    assert plan_steps(run) == (2000, "max_tokens")
    via_set = apply_overrides(TrainConfig(), [f"flops={1500.5 * per_step}"])
    assert plan_steps(dataclasses.replace(run, train=dataclasses.replace(via_set, batch_size=4))) == (1500, "flops")
    with pytest.raises(ValueError, match="exactly one run length"):
        TrainConfig(max_steps=10, flops=1e12)
    with pytest.raises(TrainError, match="no run length"):
        plan_steps(dataclasses.replace(run, train=TrainConfig()))


def test_train_config_validates():
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="betas"):
        TrainConfig(betas=(0.9, 1.5))
    with pytest.raises(ValueError, match="warmup_frac"):
        TrainConfig(warmup_frac=1.5)
    with pytest.raises(ValueError, match="dtype"):
        TrainConfig(dtype="fp8")
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size="8")
    with pytest.raises(ValueError, match="cannot parse"):
        apply_overrides(TrainConfig(), ["lr=fast"])
    assert apply_overrides(TrainConfig(), ["betas=0.8,0.9", "warmup=none"]).betas == (0.8, 0.9)
    with pytest.raises(ValueError, match="expert_update"):
        TrainConfig(expert_update="later")
    for bad, match in (({}, "sparse_optimizer=true"), ({"grad_accum": 2}, "grad_accum=1"),
                       ({"parallel": "ddp"}, "parallel=none")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(expert_update="backward", **({"sparse_optimizer": True, **bad} if bad else {}))


def test_device_decided_in_one_place():
    dev, amp, why = resolve_device("cpu", "auto")
    assert dev.type == "cpu" and amp is None and "fp32" in why
    with pytest.raises(TrainError, match="CUDA only"):
        resolve_device("cpu", "bfloat16")
    # the autocast rule alone, also for a CUDA run's record read on a machine without CUDA
    assert autocast_dtype("cuda", "auto") is autocast_dtype("cuda", "bfloat16") is torch.bfloat16
    assert autocast_dtype("cuda", "float32") is None and autocast_dtype("cpu", "auto") is None


def _cli_train(data_dir: Path, out: Path, steps: int, resume: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "peerlm.cli", "train", "--preset", "tiny-peer", "--data", str(data_dir),
           "--out", str(out), "--max-steps", str(steps), "--quiet", "--set", "train.ckpt_every=10",
           "--set", "train.eval_every=1000", "--set", "train.warmup=2", "--set", "train.batch_size=2",
           "--set", "train.device=cpu"]
    return cmd + (["--resume"] if resume else [])


def test_sigkill_during_training_then_resume(data_dir, tmp_path):
    """A real kill -9 of `peerlm train` (possibly mid-checkpoint), then `--resume`: the losses and final
    weights equal those of an uninterrupted run of the same config."""
    steps = 200
    # The reference runs through the same CLI with the same thread count: bit-equality across a resume is
    # the claim, not across processes with different intra-op parallelism (which reorders float sums).
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(_cli_train(data_dir, tmp_path / "k", steps), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    latest = tmp_path / "k" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() >= "step_00000030":
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"ended before the kill: {proc.stderr.read().decode()[-500:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = int(latest.read_text().strip().split("_")[1])
    assert 30 <= killed_at < steps
    done = subprocess.run(_cli_train(data_dir, tmp_path / "k", steps, resume=True), env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-800:]
    assert "resumed from" in done.stdout and f"step {steps}/{steps}" in done.stdout
    ref = subprocess.run(_cli_train(data_dir, tmp_path / "ref", steps), env=env,
                         capture_output=True, text=True, timeout=300)
    assert ref.returncode == 0, ref.stderr[-800:]
    assert losses(tmp_path / "k") == losses(tmp_path / "ref")
    wa, wb = final_weights(tmp_path / "k"), final_weights(tmp_path / "ref")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_tensorboard_is_optional(data_dir, tmp_path):
    logged = []
    run = make_run(data_dir, max_steps=2, tensorboard=True)
    train(run, tmp_path / "r", progress=False, log=logged.append)
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        assert any("tensorboard is not installed" in line for line in logged)
    else:
        assert any((tmp_path / "r" / "tb").iterdir())


def test_metrics_record_epochs_and_the_cross_entropy_apart_from_router_losses(data_dir, tmp_path):
    run = make_run(data_dir, "tiny-moe", max_steps=6, eval_every=100, ckpt_every=0)
    run = dataclasses.replace(run, model=apply_overrides(run.model, ["ffn.routing=token", "ffn.topk=2"]))
    train(run, tmp_path / "r", progress=False, log=lambda s: None)
    recs = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    from peerlm.data import TokenDataset

    ds = TokenDataset(data_dir)
    T = run.model.context_length
    for r in steps:
        assert r["loss"] > r["ce"] > 0  # token choice adds its load-balancing and z-losses
        assert r["epochs"] == pytest.approx(r["tokens"] / (ds.windows_per_epoch(T) * T))


def test_warmup_is_a_fraction_of_the_run_and_ratios_set_group_lrs(data_dir):
    from peerlm.optim import lr_factor

    t = TrainConfig(max_steps=400, warmup_frac=0.05)
    assert t.warmup_steps(400) == 20 and TrainConfig(max_steps=400, warmup=7).warmup_steps(400) == 7
    assert lr_factor(0, 400, t.warmup_steps(400), 0.1) == pytest.approx(1 / 20)
    run = make_run(data_dir, "tiny-peer", lr=1e-3, expert_lr_ratio=3.0, routing_lr_ratio=0.1)
    from peerlm.train import build_for_training

    _, opt = build_for_training(run.model, run.train)
    lrs = {g["name"]: g["base_lr"] for g in opt.param_groups}
    assert lrs["decay"] == 1e-3 and lrs["experts"] == pytest.approx(3e-3)
    assert lrs["routing"] == lrs["routing_no_decay"] == pytest.approx(1e-4)


def _wait_for_steps(proc: subprocess.Popen, metrics: Path, n: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"training did not get going: {proc.poll()}")


def _latest_step(out: Path) -> int:
    """The step a resume starts from: a kill between publishing a checkpoint and pointing ``latest`` at
    it leaves the newest complete checkpoint without the pointer, and resuming uses that one."""
    from peerlm.checkpoint import checkpoint_step, latest_checkpoint

    ckpt = latest_checkpoint(out / "checkpoints") if (out / "checkpoints").is_dir() else None
    return checkpoint_step(ckpt) if ckpt is not None else 0


def test_a_run_directory_has_one_writer(data_dir, tmp_path, capsys):
    """A second `peerlm train` on a run directory that another process is writing is refused, naming
    that process; the lock dies with its holder, so after a SIGKILL the run resumes at once."""
    from peerlm.cli import main

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "r"
    proc = subprocess.Popen(_cli_train(data_dir, out, 100_000), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        _wait_for_steps(proc, out / "metrics.jsonl", 2)
        second = _cli_train(data_dir, out, 3, resume=True)[3:]  # the same command, in this process
        assert main(second) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "is in use" in err and f"pid {proc.pid}" in err, err
    finally:
        proc.kill()
        proc.wait()
    steps = _latest_step(out) + 2
    assert main(_cli_train(data_dir, out, steps, resume=True)[3:]) == 0
    assert f"step {steps}/{steps}" in capsys.readouterr().out
    assert not (out / ".peerlm.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_training_with_a_checkpoint_and_the_resume_command(data_dir, tmp_path, capsys, sig):
    """What a scheduler sends before it preempts (and Ctrl-C): the step finishes, a checkpoint of that
    step is written, the process says how to resume and exits with 128 + the signal; resuming goes on
    from there."""
    import re

    from peerlm.cli import main

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = tmp_path / "r"
    proc = subprocess.Popen(_cli_train(data_dir, out, 100_000), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        _wait_for_steps(proc, out / "metrics.jsonl", 3)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 128 + sig, err[-800:]
    m = re.search(rf"stopped by {sig.name} after step (\d+)/100000", err)
    assert m and f"`peerlm train --out {out} --resume`" in err and "Traceback" not in err, err[-800:]
    step = int(m.group(1))
    assert _latest_step(out) == step and list(losses(out)) == list(range(1, step + 1))
    assert main(_cli_train(data_dir, out, step + 2, resume=True)[3:]) == 0
    assert f"resumed from {out / 'checkpoints' / f'step_{step:08d}'}" in capsys.readouterr().out
    assert list(losses(out)) == list(range(1, step + 3))


def test_parallel_settings_are_checked(data_dir, tmp_path):
    with pytest.raises(ValueError, match="parallel"):
        TrainConfig(parallel="tp")
    with pytest.raises(ValueError, match="train.parallel=ddp"):
        TrainConfig(shard_experts=True)
    with pytest.raises(ValueError, match="has none"):
        make_run(data_dir, "tiny", parallel="ddp", shard_experts=True)
    with pytest.raises(TrainError, match="torchrun"):  # one process, no process group
        train(make_run(data_dir, parallel="ddp"), tmp_path / "r", progress=False, log=lambda s: None)
    assert not (tmp_path / "r").exists()


def test_python_dash_m_peerlm_runs():
    res = subprocess.run([sys.executable, "-m", "peerlm", "train", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0 and "--preset" in res.stdout


def test_expert_update_in_the_backward_trains_as_at_step(data_dir, tmp_path):
    """With clipping off (it cannot see the tables' gradients once they are applied in the backward),
    the tables' update in the backward trains the same model as the update at the step."""
    quiet = {"progress": False, "log": lambda s: None}
    for update in ("step", "backward"):
        run = make_run(data_dir, "tiny-peer", sparse_optimizer=True, expert_update=update, grad_clip=0.0, max_steps=6)
        train(run, tmp_path / update, **quiet)
    assert losses(tmp_path / "step") == losses(tmp_path / "backward")
    a, b = final_weights(tmp_path / "step"), final_weights(tmp_path / "backward")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
