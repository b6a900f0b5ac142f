"""The training loop: AdamW with expert groups, warmup + cosine, clipping, accumulation, exact resume.

A run directory holds

    config.json        the resolved RunConfig: model, train, and the data it was trained on
    tokenizer.json     copied from the data directory, so eval and generate need nothing else
    metrics.jsonl      one JSON record per logged step and per validation, appended line by line
    checkpoints/       step-numbered checkpoints (``peerlm.checkpoint``)
    tb/                TensorBoard events, with ``train.tensorboard`` (needs the tensorboard package)

Reproducibility: batches are a pure function of (seed, step) (``TokenDataset.train_batch``: windows
drawn without replacement within an epoch, ``epochs`` in the logs counts the passes), the LR is
a function of the step, and a checkpoint carries weights, buffers (BatchNorm statistics), optimizer
state and RNG states. Resuming from step k therefore gives bit-identical losses and parameters to an
uninterrupted run on the same machine (tested); on CPU ``torch.use_deterministic_algorithms`` is on
during training. The run length is the first reached of ``max_steps``, ``max_tokens`` and a FLOP
budget (``flops``, at ``peerlm.flops``' training FLOPs per token, 3 x forward); the cosine horizon is
that step count.

``sparse_optimizer`` switches PEER layers to row-sparse table gradients (``sparse_grad=True``) and
their tables to ``RowSparseAdamW``, whose cost per step follows the rows the batch retrieved, not the
number of experts.
Validation runs in eval mode over the first ``eval_batches`` x ``batch_size`` windows of the val
split and records loss, perplexity, and usage / unevenness of every PEER and PKM layer.

A call goes in three phases, so that a refused run changes nothing on disk:
1. checks that need no run directory: the data (its tokenizer, token ids, enough tokens for one
   window), the device, the run length;
2. under the run directory's lock (``peerlm.fileio.DirLock``: one writer per run directory, a second
   process is refused naming the holder): the checkpoint to resume from, verified and loaded into
   the model and optimizer, the run's tokenizer fingerprint against the data's, and a probe that the
   directory takes writes and has room for a checkpoint;
3. only then the first write (config.json, tokenizer.json, metrics.jsonl), and the steps.
SIGTERM or SIGINT during the steps (what schedulers send before they preempt) lets the current step
finish (with its validation, if due), writes a checkpoint and raises ``TrainInterrupted``; a second
signal stops at once (every write is atomic, so that is safe too).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm import tqdm

from peerlm.checkpoint import latest_checkpoint, load_checkpoint, read_config, save_checkpoint, verify_checkpoint
from peerlm.config import ModelConfig, check_types, from_dict, to_dict
from peerlm.data import TokenDataset
from peerlm.evaluate import check_same_tokenizer, evaluate_tokens, memory_usage, tracking_usage
from peerlm.fileio import DirLock, atomic_write_bytes, atomic_write_text, probe_writable, sha256_file
from peerlm.flops import model_cost
from peerlm.model import Transformer, build_model
from peerlm.optim import build_optimizer, clip_grad_norm, lr_factor, set_lr

__all__ = ["TrainConfig", "RunConfig", "TrainError", "TrainInterrupted", "resolve_device", "plan_steps",
           "build_for_training", "train"]

DTYPES = ("auto", "float32", "bfloat16")


class TrainError(Exception):
    """A problem with a run a user can fix (its directory, budget or resume state)."""


class TrainInterrupted(KeyboardInterrupt):
    """Training stopped on a signal after writing a checkpoint. A KeyboardInterrupt, so that code
    around ``train`` that catches Exception does not carry on as if the run were complete."""

    def __init__(self, signame: str, step: int, total: int, out: Path) -> None:
        super().__init__(f"stopped by {signame} after step {step}/{total}; checkpoint written in {out}")
        self.signame, self.step, self.total, self.out = signame, step, total, out
        self.signum = int(getattr(signal, signame))


@dataclass
class TrainConfig:
    """Optimisation and run-length settings; see the module docstring.

    Learning rates: ``lr`` is the trunk's peak; the expert tables (PEER ``w_down``/``w_up``, PKM
    ``values``) train at ``expert_lr_ratio * lr`` and the routing (query projections, query norms,
    sub-keys) at ``routing_lr_ratio * lr`` (``peerlm.optim``). Warmup is ``warmup`` steps when set,
    else ``warmup_frac`` of the run. Run length: exactly one of ``max_steps``, ``max_tokens`` and
    ``flops``; none has a default, so a budget is never cut short by a limit nobody set.
    """

    lr: float = 1e-3
    expert_lr_ratio: float = 1.0
    routing_lr_ratio: float = 1.0
    weight_decay: float = 0.1
    expert_weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    warmup: int | None = None
    warmup_frac: float = 0.05
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None
    flops: float | None = None
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep: int = 2
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    sparse_optimizer: bool = False
    log_every: int = 1
    tensorboard: bool = False

    LIMITS: ClassVar[tuple[str, ...]] = ("max_steps", "max_tokens", "flops")

    def __post_init__(self) -> None:
        check_types(self)
        self.betas = tuple(float(b) for b in self.betas)

        def bad(name: str, rule: str) -> None:
            raise ValueError(f"TrainConfig.{name} must be {rule}, got {getattr(self, name)!r}")

        for name in ("lr", "eps", "expert_lr_ratio", "routing_lr_ratio"):
            if not getattr(self, name) > 0:
                bad(name, "> 0")
        for name in ("weight_decay", "expert_weight_decay", "grad_clip", "ckpt_every"):
            if getattr(self, name) < 0:
                bad(name, ">= 0")
        if self.warmup is not None and self.warmup < 0:
            bad("warmup", ">= 0 steps or None (use warmup_frac)")
        if not 0 <= self.warmup_frac < 1:
            bad("warmup_frac", "in [0, 1)")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", "two numbers in [0, 1)")
        if not 0 <= self.min_lr_ratio <= 1:
            bad("min_lr_ratio", "in [0, 1]")
        for name in ("batch_size", "grad_accum", "eval_every", "eval_batches", "keep", "log_every"):
            if getattr(self, name) < 1:
                bad(name, ">= 1")
        for name in ("max_steps", "max_tokens"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                bad(name, ">= 1 or None")
        if self.flops is not None and not self.flops > 0:
            bad("flops", "> 0 or None")
        given = [n for n in self.LIMITS if getattr(self, n) is not None]
        if len(given) > 1:
            raise ValueError(f"TrainConfig sets {' and '.join(given)}: give exactly one run length "
                             "(max_steps, max_tokens or flops), set the others to none")
        if self.dtype not in DTYPES:
            bad("dtype", f"one of {DTYPES}")
        if self.device != "auto" and self.device.split(":")[0] not in ("cpu", "cuda", "mps"):
            bad("device", "'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")

    def limit(self) -> tuple[str, float]:
        """(name, value) of the run length; TrainError when none is set."""
        for name in self.LIMITS:
            if getattr(self, name) is not None:
                return name, getattr(self, name)
        raise TrainError("no run length: set one of --max-steps, --max-tokens or --flops "
                         "(or train.max_steps / train.max_tokens / train.flops)")

    def warmup_steps(self, total: int) -> int:
        return self.warmup if self.warmup is not None else round(self.warmup_frac * total)


@dataclass
class RunConfig:
    """What ``config.json`` of a run holds. ``data`` describes the prepared directory: its path,
    vocabulary and per-split token and UTF-8 byte counts (for bits per byte)."""

    model: ModelConfig
    train: TrainConfig
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"model": to_dict(self.model), "train": to_dict(self.train), "data": self.data}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        if not isinstance(d, dict) or "model" not in d or "train" not in d:
            raise ValueError("a run config needs 'model' and 'train' sections")
        return cls(from_dict(ModelConfig, d["model"]), from_dict(TrainConfig, d["train"]), d.get("data", {}))


def data_info(data_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``data`` section of a RunConfig for a prepared directory."""
    ds = TokenDataset(data_dir)
    return {"dir": str(Path(data_dir).resolve()), "vocab_size": ds.vocab_size, "eot_id": ds.eot_id,
            "tokenizer_sha256": ds.tokenizer_sha256,
            "splits": {n: {"tokens": ds.num_tokens(n), "bytes": ds.num_bytes(n),
                           "eval": bool(ds.meta["splits"][n].get("eval", False))} for n in ds.splits}}


def resolve_device(device: str, dtype: str) -> tuple[torch.device, torch.dtype | None, str]:
    """(device, autocast dtype or None, the reason), decided in this one place."""
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        why = "CUDA is available" if dev.type == "cuda" else "no CUDA device"
    else:
        try:
            dev = torch.device(device)
        except RuntimeError:
            raise TrainError(f"device {device!r} is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
        why = "as configured"
        if dev.type == "cuda":
            if not torch.cuda.is_available():
                raise TrainError(f"device {device!r} requested but CUDA is not available; use device=cpu")
            n = torch.cuda.device_count()
            if dev.index is not None and dev.index >= n:
                raise TrainError(f"device {device!r} requested but this machine has {n} CUDA device(s), "
                                 f"cuda:0..cuda:{n - 1}")
        elif dev.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                raise TrainError(f"device {device!r} requested but this torch build or machine has no MPS "
                                 "(Apple GPU) device; use device=cpu")
        elif dev.type != "cpu":
            raise TrainError(f"device {device!r} is not supported; use auto, cpu, cuda, cuda:N or mps")
    if dtype == "bfloat16" and dev.type != "cuda":
        raise TrainError("dtype=bfloat16 autocast is for CUDA only; use dtype=float32 or auto on CPU")
    amp = torch.bfloat16 if dev.type == "cuda" and dtype in ("auto", "bfloat16") else None
    prec = "bf16 autocast (fp32 weights, fp32 routing)" if amp else "fp32"
    return dev, amp, f"{dev} ({why}), {prec}"


def plan_steps(run: RunConfig) -> tuple[int, str]:
    """Number of optimizer steps and the limit that sets it (``TrainConfig.limit``)."""
    t, T = run.train, run.model.context_length
    tokens_per_step = t.batch_size * t.grad_accum * T
    name, value = t.limit()
    if name == "max_steps":
        steps = int(value)
    elif name == "max_tokens":
        steps = int(value // tokens_per_step)
    else:
        steps = int(value // (model_cost(run.model, T)["flops_train"] * tokens_per_step))
    if steps < 1:
        raise TrainError(f"the {name} budget buys less than one step of {tokens_per_step:,} tokens; "
                         "raise it or lower batch_size / grad_accum / context_length")
    return steps, name


class MetricsLog:
    """metrics.jsonl, appended one whole line per write (O_APPEND) and flushed by the OS write."""

    def __init__(self, path: Path, truncate_to: int | None = None):
        self.path = path
        if truncate_to is not None and path.exists() and path.stat().st_size > truncate_to:
            with open(path, "r+b") as f:  # drop records written after the checkpoint we resume from
                f.truncate(truncate_to)
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def write(self, record: dict[str, Any]) -> None:
        os.write(self.fd, (json.dumps(record) + "\n").encode("utf-8"))

    def offset(self) -> int:
        os.fsync(self.fd)
        return os.fstat(self.fd).st_size

    def close(self) -> None:
        os.close(self.fd)


def _fmt_time(seconds: float) -> str:
    seconds = max(int(seconds), 0)
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


@contextlib.contextmanager
def _deterministic(device: torch.device) -> Iterator[None]:
    if device.type != "cpu":
        yield
        return
    before = torch.are_deterministic_algorithms_enabled()
    warn = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)


def _tensorboard(out: Path, purge_step: int | None, log: Callable[[str], None]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("note: tensorboard is not installed (pip install 'peerlm[tensorboard]'); logging to "
            "metrics.jsonl only")
        return None
    return SummaryWriter(str(out / "tb"), purge_step=purge_step)


@torch.no_grad()
def validate(model: Transformer, ds: TokenDataset, run: RunConfig, device: torch.device,
             amp: torch.dtype | None) -> dict[str, Any]:
    """Loss and perplexity on the first eval_batches x batch_size windows of val, with expert usage."""
    t = run.train
    n = min(ds.num_tokens("val"), t.eval_batches * t.batch_size * run.model.context_length + 1)
    with tracking_usage(model):
        res = evaluate_tokens(model, np.asarray(ds.tokens("val")[:n]), batch_size=t.batch_size,
                              device=device, amp=amp, eot_id=ds.eot_id)
        usage = memory_usage(model)
    out = {"val_loss": res["loss"], "val_ppl": res["perplexity"], "val_tokens": res["tokens"]}
    if usage:
        out["usage"] = usage
    return out


def _check_data(run: RunConfig) -> TokenDataset:
    """Phase 1: the data directory a run trains on, opened and checked (nothing is written)."""
    if not run.data.get("dir"):
        raise TrainError("the run config names no data directory")
    ds = TokenDataset(run.data["dir"])
    if not ds.has_tokenizer:
        raise TrainError(f"{ds.dir} has no tokenizer.json, so a run trained on it could not encode text to "
                         "evaluate or generate; prepare the directory again with `peerlm data prepare`")
    check_same_tokenizer(run.data.get("tokenizer_sha256"), ds.tokenizer_sha256, str(ds.dir),
                         "rebuild the run config from the directory as it is now (data_info)")
    if ds.vocab_size > run.model.vocab_size:
        raise TrainError(f"the data has {ds.vocab_size} token ids but model.vocab_size is "
                         f"{run.model.vocab_size}; set model.vocab_size={ds.vocab_size}")
    ds.windows_per_epoch(run.model.context_length)  # at least one training window
    for split in ("train", "val"):
        if split in ds.splits:
            ds.tokens(split)  # opening checks every id against the vocabulary
    return ds


def _check_out(out: Path, ds: TokenDataset) -> None:
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out} is a file, not a run directory; choose another --out")
    if out.resolve() == ds.dir.resolve() or ((out / "meta.json").is_file() and not (out / "config.json").is_file()):
        raise TrainError(f"{out} is a prepared data directory, not a run directory; choose another --out")


def _resume_point(run: RunConfig, out: Path, resume: bool, ds: TokenDataset,
                  notes: list[str]) -> Path | None:
    """Phase 2: the checkpoint to resume from (None: a fresh start), verified, with the run's tokenizer
    checked against the data's; what the user should know goes to ``notes``."""
    root = out / "checkpoints"
    ckpt = latest_checkpoint(root, notes) if root.is_dir() else None
    if ckpt is not None and not resume:
        raise TrainError(f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue "
                         "it or choose another --out")
    if resume and ckpt is None:
        notes.append(f"note: no checkpoint in {out}; starting from scratch")
    if ckpt is None:
        return None
    verify_checkpoint(ckpt)
    saved = read_config(ckpt).get("data", {})
    run_fp = saved.get("tokenizer_sha256")
    if not run_fp and (out / "tokenizer.json").is_file():  # runs from before the fingerprint was recorded
        run_fp = sha256_file(out / "tokenizer.json")
    trained_on = saved.get("dir")
    if trained_on and Path(trained_on).resolve() != ds.dir.resolve():
        fix = f"resume with the data the run was trained on (--data {trained_on}) or start a new run in another --out"
    else:
        fix = ("it was prepared again since the run began: prepare the run's text again (the same text and "
               "options give identical files) and resume with --data DIR, or start a new run in another --out")
    check_same_tokenizer(run_fp, ds.tokenizer_sha256, str(ds.dir), fix)
    stored = out / "config.json"
    if stored.is_file():
        try:
            old = json.loads(stored.read_text("utf-8")).get("train", {})
        except (ValueError, AttributeError):
            old = {}  # unreadable: nothing to compare with (it is rewritten from the resolved config)
        changed = sorted(k for k, v in to_dict(run.train).items() if k in old and old[k] != v)
        if changed:
            notes.append(f"note: resuming with changed train settings: {', '.join(changed)} (losses will "
                         "differ from an uninterrupted run where they matter)")
    return ckpt


def _check_room(out: Path, model: Transformer) -> None:
    """Phase 2: the run directory takes writes and has room for a checkpoint, before the first step
    rather than at the first checkpoint."""
    ckpts = out / "checkpoints"
    if ckpts.exists() and not ckpts.is_dir():
        raise TrainError(f"{ckpts} is not a directory, so no checkpoint could be written; move it away")
    for d in (out, ckpts) if ckpts.is_dir() else (out,):
        try:
            probe_writable(d)
        except OSError as e:
            raise TrainError(f"{d} is not writable ({e.strerror or e}); fix its permissions or choose another "
                             "--out") from None
    # weights and buffers, plus AdamW's two moments per parameter
    need = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    need += 2 * sum(p.numel() * p.element_size() for p in model.parameters())
    free = shutil.disk_usage(out).free
    if free < need:
        raise TrainError(f"{out} has {free / 1e6:,.0f} MB free but a checkpoint of this run takes about "
                         f"{need / 1e6:,.0f} MB; free space or choose another --out")


def _commit_run_dir(run: RunConfig, out: Path, ds: TokenDataset) -> None:
    """Phase 3: the run's first writes."""
    atomic_write_text(out / "config.json", json.dumps(run.to_dict(), indent=2) + "\n")
    if not (out / "tokenizer.json").is_file():
        atomic_write_bytes(out / "tokenizer.json", (ds.dir / "tokenizer.json").read_bytes())


class _StopSignals:
    """Within the block, SIGTERM and SIGINT only set ``received`` (the signal's name); the loop ends
    at the next step boundary. A second signal raises KeyboardInterrupt at once. Outside the main
    thread, where Python cannot install handlers, signals keep their usual effect."""

    SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGINT") if hasattr(signal, n))

    def __init__(self) -> None:
        self.received: str | None = None
        self.previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def _train_step(model: Transformer, opt: Any, params: list[torch.Tensor], ds: TokenDataset, run: RunConfig,
                step: int, total: int, device: torch.device,
                autocast: Callable) -> tuple[float, float, float, float]:
    """One optimizer step (0-based ``step``), with accumulation and clipping.

    Returns (mean loss over micro-batches, its cross-entropy part (the loss less auxiliary router
    losses), gradient norm before clipping, LR factor)."""
    t, T = run.train, run.model.context_length
    model.train()
    factor = lr_factor(step, total, t.warmup_steps(total), t.min_lr_ratio)
    set_lr(opt, factor)
    loss_sum = ce_sum = 0.0
    for micro in range(t.grad_accum):  # the batch is a function of (seed, step, micro): resumable
        x, y = ds.train_batch(t.batch_size, T, step * t.grad_accum + micro, t.seed, device)
        with autocast():
            _, loss = model(x, y)
        (loss / t.grad_accum).backward()
        loss_sum += loss.item()
        ce_sum += model.last_losses["ce"].item()
    norm = clip_grad_norm(params, t.grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss_sum / t.grad_accum, ce_sum / t.grad_accum, norm, factor


def build_for_training(cfg: ModelConfig, t: TrainConfig, device: torch.device | str = "cpu") -> tuple[Transformer, Any]:
    """The model and optimizer of a run. With ``sparse_optimizer`` every PEER/PKM layer gets row-sparse
    table gradients, and so its tables get ``RowSparseAdamW``."""
    model = build_model(cfg, device)
    if t.sparse_optimizer:
        for _, m in model.memory_layers():
            m.sparse_grad = True
    opt = build_optimizer(model, t.lr, t.weight_decay, t.betas, t.eps, t.lr * t.expert_lr_ratio,
                          t.expert_weight_decay, sparse_experts=t.sparse_optimizer,
                          routing_lr=t.lr * t.routing_lr_ratio)
    return model, opt


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train(run: RunConfig, out_dir: str | os.PathLike[str], resume: bool = False, stop_at: int | None = None,
          progress: bool = True, log: Callable[[str], None] | None = None,
          notes: Sequence[str] = ()) -> dict[str, Any]:
    """Train ``run`` into ``out_dir``; returns a summary (steps, tokens, FLOPs, last validation, time).

    ``resume`` continues from the newest checkpoint. ``stop_at`` ends (with a checkpoint) after that
    many total steps without changing the schedule, as an interruption would. ``notes`` are logged
    once the run directory is accepted. Nothing is written unless every check passes (see the module
    docstring); SIGTERM / SIGINT end the run with a checkpoint and ``TrainInterrupted``.
    """
    log = log or (lambda s: tqdm.write(s, file=sys.stdout))
    out, t = Path(out_dir), run.train
    ds = _check_data(run)
    device, amp, why = resolve_device(t.device, t.dtype)
    total, limit = plan_steps(run)
    _check_out(out, ds)
    with DirLock(out, "run directory"):
        return _train_locked(run, out, ds, device, amp, why, total, limit, resume, stop_at, progress, log, notes)


def _train_locked(run: RunConfig, out: Path, ds: TokenDataset, device: torch.device, amp: torch.dtype | None,
                  why: str, total: int, limit: str, resume: bool, stop_at: int | None, progress: bool,
                  log: Callable[[str], None], notes: Sequence[str]) -> dict[str, Any]:
    t, cfg = run.train, run.model
    found: list[str] = []
    ckpt = _resume_point(run, out, resume, ds, found)
    T = cfg.context_length
    flops_per_token = model_cost(cfg, T)["flops_train"]
    tokens_per_step = t.batch_size * t.grad_accum * T

    _seed_everything(t.seed)
    model, opt = build_for_training(cfg, t, device)
    step, history, offset = 0, [], None
    if ckpt is not None:
        configured = [(g["base_lr"], g["weight_decay"]) for g in opt.param_groups]
        state = load_checkpoint(ckpt, model, opt, expected_model=to_dict(cfg), verify=False)
        for g, (base_lr, wd) in zip(opt.param_groups, configured):  # this run's settings, not the saved ones
            g["base_lr"], g["weight_decay"] = base_lr, wd
        step, offset = state["step"], state["train"]["metrics_offset"]
        history = state["train"].get("validations", [])
    _check_room(out, model)
    _commit_run_dir(run, out, ds)
    for note in [*found, *notes]:
        log(note)
    if ckpt is not None:
        log(f"resumed from {ckpt} at step {step}")
    metrics = MetricsLog(out / "metrics.jsonl", truncate_to=offset)
    tb = _tensorboard(out, step + 1 if ckpt is not None else None, log) if t.tensorboard else None
    end = total if stop_at is None else min(total, stop_at)
    log(f"device {why}; {model.num_params():,} params; {total} steps ({limit}) of {tokens_per_step:,} tokens "
        f"= {total * tokens_per_step:,} tokens, {total * tokens_per_step * flops_per_token:.3g} FLOPs")
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    params = [p for g in opt.param_groups for p in g["params"]]

    def checkpoint(at: int) -> None:
        state = {"validations": history, "metrics_offset": metrics.offset(), "data_step": at,
                 "tokens": at * tokens_per_step}
        save_checkpoint(out / "checkpoints", at, model, run.to_dict(), opt, state, keep=t.keep)

    def run_validation(at: int) -> None:
        if ds.num_tokens("val") < 2:
            return
        rec = {"step": at, **validate(model, ds, run, device, amp)}
        history.append(rec)
        metrics.write(rec)
        usage = "".join(f" | {name} usage {u['usage']:.1%} unev {u['unevenness']:.2f}"
                        for name, u in rec.get("usage", {}).items())
        log(f"step {at:>6} | val loss {rec['val_loss']:.4f} | val ppl {rec['val_ppl']:.2f}{usage}")
        if tb is not None:
            tb.add_scalar("val/loss", rec["val_loss"], at)
            for name, u in rec.get("usage", {}).items():
                tb.add_scalar(f"usage/{name}", u["usage"], at)
                tb.add_scalar(f"unevenness/{name}", u["unevenness"], at)

    start_time, start_step, times = time.time(), step, []
    bar = tqdm(total=end, initial=step, desc="train", unit="step", leave=False, dynamic_ncols=True,
               disable=not progress or not sys.stderr.isatty())  # a log file gets the step lines only
    try:
        with _deterministic(device), _StopSignals() as stop:
            while step < end:
                t0 = time.time()
                loss_val, ce_val, norm, factor = _train_step(model, opt, params, ds, run, step, total, device,
                                                     autocast)
                step += 1
                if not math.isfinite(loss_val):
                    raise TrainError(f"loss is {loss_val} at step {step}; lower train.lr or raise warmup")
                dt = time.time() - t0
                times.append(dt)
                bar.update(1)
                if step % t.log_every == 0 or step == end:
                    recent = times[-20:]
                    eta = (end - step) * sum(recent) / len(recent)
                    lr = t.lr * factor
                    rec = {"step": step, "loss": loss_val, "ce": ce_val, "lr": lr, "grad_norm": norm, "dt": dt,
                           "tok_s": tokens_per_step / dt, "tokens": step * tokens_per_step,
                           "epochs": ds.epochs_seen(step * tokens_per_step, T),
                           "flops": step * tokens_per_step * flops_per_token}
                    metrics.write(rec)
                    aux = f" (ce {ce_val:.4f})" if abs(loss_val - ce_val) > 1e-12 else ""
                    log(f"step {step:>6}/{total} | loss {loss_val:.4f}{aux} | lr {lr:.2e} | dt {dt * 1000:.0f}ms "
                        f"| tok/s {rec['tok_s']:,.0f} | ep {rec['epochs']:.2f} | eta {_fmt_time(eta)}")
                    if tb is not None:
                        for k in ("loss", "ce", "lr", "grad_norm", "tok_s"):
                            tb.add_scalar(f"train/{k}", rec[k], step)
                if step % t.eval_every == 0 or step == total:
                    run_validation(step)
                if (t.ckpt_every and step % t.ckpt_every == 0) or step == end or stop.received:
                    checkpoint(step)
                if stop.received and step < end:
                    log(f"{stop.received}: stopped after step {step}/{total} with a checkpoint")
                    raise TrainInterrupted(stop.received, step, total, out)
    finally:
        bar.close()
        metrics.close()
        if tb is not None:
            tb.close()
    elapsed = time.time() - start_time
    last = history[-1] if history else {}
    return {"step": step, "total_steps": total, "limit": limit, "tokens": step * tokens_per_step,
            "epochs": ds.epochs_seen(step * tokens_per_step, T),
            "flops": step * tokens_per_step * flops_per_token, "seconds": elapsed,
            "steps_this_call": step - start_step, "val_loss": last.get("val_loss"),
            "val_ppl": last.get("val_ppl"), "validations": history, "done": step >= total}
