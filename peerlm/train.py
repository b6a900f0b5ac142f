"""The training loop: AdamW with expert groups, warmup + cosine, clipping, accumulation, exact resume.

A run trains into a run directory (``peerlm.rundir``: config.json, tokenizer.json, metrics.jsonl,
checkpoints/, tb/ with ``train.tensorboard``) and checkpoints through ``peerlm.checkpoint``.

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
number of experts; ``expert_update="backward"`` moves that update into the backward.
Validation runs in eval mode over the first ``eval_batches`` x ``batch_size`` windows of the val
split and records loss, perplexity, and usage / unevenness of every PEER and PKM layer.

A run that starts from a prepared model (a finetune, ``peerlm.continual``) passes ``build`` (its model
and optimizer: loaded weights, frozen parameters, its own optimizer) and ``StepHooks`` (what it does
inside each step, e.g. keep the query norms in eval mode, drop gradient rows); everything else, the
guarantees included, is this loop's. A run of a transformers model (``model_kind`` "hf",
``peerlm.hf.training``) passes ``build`` too. The loop asks of a model what peerlm's ``Transformer``
offers: ``model(idx, targets)`` -> ``(logits, loss)``, ``last_losses["ce"]``, ``memory_layers()`` and
``num_params()``; the FLOPs per token come from ``RunConfig.flops_per_token`` (None: not counted).

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

Several processes (``torchrun --nproc_per_node=P -m peerlm train ...``; ``peerlm.parallel.runtime``):
``parallel`` "ddp" or "fsdp" trains one model on P ranks. ``batch_size`` stays the global batch: rank r
takes rows r::P of every micro-batch, gradients are averaged over ranks, the logged loss and the
gradient norm (clipping included) are those of the whole batch, and query-norm statistics are the whole
batch's, so a run's losses do not depend on P (to rounding; MoE capacity and expert-choice routing still
act within a rank's rows). ``shard_experts`` column-shards the PEER / PKM tables over the ranks
(``peerlm.parallel.shard``). Rank 0 alone takes the run-directory lock, logs and writes (but for the
shards of a distributed checkpoint); a check that fails on one rank fails the run on all; every rank
runs the same validation windows (a sharded layer's forward needs every rank). A dead rank makes the
others' next collective fail (within ``dist_timeout`` seconds at worst); the run then stops with
``TrainError`` and the last checkpoint stays as it was. DDP runs write the one-process checkpoint (every
rank holds the same weights); FSDP and sharded tables write distributed checkpoints
(``peerlm.checkpoint.distributed``, every rank its part; ``peerlm.checkpoint.save`` decides which).
Either kind resumes on any number of ranks and loads in ``peerlm eval`` / ``generate``.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from peerlm import checkpoint
from peerlm.checkpoint import checkpoint_step, read_config, verify_checkpoint
from peerlm.config import ModelConfig, to_dict
from peerlm.data import TokenDataset
from peerlm.evaluate import evaluate_tokens, memory_usage, tracking_usage
from peerlm.ffn import memory_layers
from peerlm.fileio import DirLock, probe_writable, sha256_file
from peerlm.model import Transformer, build_model
from peerlm.optim import build_optimizer, clip_grad_norm, lr_factor, set_lr
from peerlm.parallel import runtime
from peerlm.parallel.runtime import Parallel
from peerlm.runconfig import (
    RunConfig,
    TrainConfig,
    TrainDiverged,
    TrainError,
    TrainInterrupted,
    plan_steps,
    resolve_device,
)
from peerlm.rundir import RunDir, check_same_tokenizer

__all__ = ["StepHooks", "build_for_training", "run_optimizer", "time_train_steps", "validate", "train"]


class StepHooks:
    """Extension points of a training step, for runs that train part of a model in their own way
    (``peerlm.continual``): ``begin_step`` runs after the model is put in training mode and before the
    first micro-batch (e.g. to keep some modules in eval mode), ``before_update`` after the last
    backward and before clipping and the optimizer step (e.g. to drop gradient rows). The base class
    does nothing."""

    def begin_step(self, model: Transformer, step: int) -> None:
        """Before the step's first forward (0-based ``step``)."""

    def before_update(self, model: Transformer, step: int) -> None:
        """After the step's gradients are complete, before clipping and the optimizer step."""

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


def _tensorboard(rd: RunDir, purge_step: int | None, log: Callable[[str], None]) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        log("note: tensorboard is not installed (pip install 'peerlm[tensorboard]'); logging to "
            "metrics.jsonl only")
        return None
    return SummaryWriter(str(rd.tensorboard), purge_step=purge_step)


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
        fix = (f"set model.vocab_size={ds.vocab_size}" if run.model_kind == "peerlm" else
               "train a model with a vocabulary at least that large, or prepare the data with a smaller --vocab-size")
        raise TrainError(f"the data has {ds.vocab_size} token ids but model.vocab_size is "
                         f"{run.model.vocab_size}; {fix}")
    ds.windows_per_epoch(run.model.context_length)  # at least one training window
    for split in ("train", "val"):
        if split in ds.splits:
            ds.tokens(split)  # opening checks every id against the vocabulary
    return ds


def _check_out(out: Path, ds: TokenDataset) -> None:
    if out.exists() and not out.is_dir():
        raise TrainError(f"{out} is a file, not a run directory; choose another --out")
    if out.resolve() == ds.dir.resolve() or ((out / "meta.json").is_file() and not RunDir(out).config.is_file()):
        raise TrainError(f"{out} is a prepared data directory, not a run directory; choose another --out")


def _resume_point(run: RunConfig, out: Path, resume: bool, ds: TokenDataset, total: int,
                  notes: list[str]) -> Path | None:
    """Phase 2: the checkpoint to resume from (None: a fresh start), verified, with the run's tokenizer
    checked against the data's; what the user should know goes to ``notes``."""
    rd = RunDir(out)
    ckpt = rd.latest_checkpoint(notes)
    if ckpt is not None and not resume:
        raise TrainError(f"{out} already holds a run (checkpoint {ckpt.name}); pass --resume to continue "
                         "it or choose another --out")
    if resume and ckpt is None:
        notes.append(f"note: no checkpoint in {out}; starting from scratch")
    if ckpt is None:
        return None
    at = checkpoint_step(ckpt)
    if at is not None and at > total:
        raise TrainError(f"{out} is at step {at}, past the {total} steps this run length gives; resume with a "
                         "longer one (--max-steps, --max-tokens or --flops), or evaluate the run as it is")
    verify_checkpoint(ckpt)
    saved = read_config(ckpt).get("data", {})
    run_fp = saved.get("tokenizer_sha256")
    if not run_fp and rd.tokenizer.is_file():  # runs from before the fingerprint was recorded
        run_fp = sha256_file(rd.tokenizer)
    trained_on = saved.get("dir")
    if trained_on and Path(trained_on).resolve() != ds.dir.resolve():
        fix = f"resume with the data the run was trained on (--data {trained_on}) or start a new run in another --out"
    else:
        fix = ("it was prepared again since the run began: prepare the run's text again (the same text and "
               "options give identical files) and resume with --data DIR, or start a new run in another --out")
    check_same_tokenizer(run_fp, ds.tokenizer_sha256, str(ds.dir), fix)
    if rd.config.is_file():
        try:
            old = rd.read_config().get("train", {})
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
    ckpts = RunDir(out).checkpoints
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
    rd = RunDir(out)
    rd.write_config(run.to_dict())
    rd.keep_tokenizer(ds.dir)


def _lost_rank(e: BaseException) -> bool:
    """Whether a collective's error says a peer went away or did not answer in time."""
    text = str(e).lower()
    return isinstance(e, torch.distributed.DistError) or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return (lines[0] if lines else type(e).__name__)[:300]


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
                step: int, total: int, device: torch.device, autocast: Callable,
                par: Parallel | None = None, module: torch.nn.Module | None = None,
                stop: bool = False,
                hooks: StepHooks | None = None) -> tuple[float, float, float, float, bool]:
    """One optimizer step (0-based ``step``), with accumulation and clipping.

    Data parallel (``par``): this rank's rows of each micro-batch through ``module`` (the DDP / FSDP
    wrapper of ``model``), the losses averaged over ranks, the global gradient norm. ``stop``: this
    rank received a stop signal; what is returned is whether any rank did, so that all stop at
    the same step. ``hooks``: see ``StepHooks``. Returns (mean loss over micro-batches, its
    cross-entropy part (the loss less auxiliary router losses), gradient norm before clipping, LR
    factor, stop)."""
    t, T = run.train, run.model.context_length
    par = par or Parallel()
    module = module or model
    model.train()
    hooks = hooks or StepHooks()
    hooks.begin_step(model, step)
    factor = lr_factor(step, total, t.warmup_steps(total), t.min_lr_ratio)
    set_lr(opt, factor)
    loss_sum = ce_sum = 0.0
    for micro in range(t.grad_accum):  # the batch is a function of (seed, step, micro): resumable
        x, y = ds.train_batch(t.batch_size, T, step * t.grad_accum + micro, t.seed, device)
        rows = par.rows()
        with par.no_sync(module, last=micro == t.grad_accum - 1):
            with autocast():
                _, loss = module(x[rows], y[rows])
            (loss / t.grad_accum).backward()
        loss_sum += loss.item()
        ce_sum += model.last_losses["ce"].item()
    hooks.before_update(model, step)
    sharded = runtime.sharded_parameters(model)
    norm = clip_grad_norm(params, t.grad_clip, par.stats_group if par.active else None, sharded)
    opt.step()
    opt.zero_grad(set_to_none=True)
    # each rank's loss is the mean over its rows, and every rank has as many rows
    loss_sum, ce_sum, stops = par.sum([loss_sum / par.ranks, ce_sum / par.ranks, float(stop)])
    return loss_sum / t.grad_accum, ce_sum / t.grad_accum, norm, factor, stops > 0


def build_for_training(cfg: ModelConfig, t: TrainConfig, device: torch.device | str = "cpu",
                       par: Parallel | None = None) -> tuple[Transformer, Any]:
    """The model and optimizer of a run. With ``sparse_optimizer`` every PEER/PKM layer gets row-sparse
    table gradients, and so its tables get ``RowSparseAdamW``. With ``par`` (data parallel), the
    tables sharded when ``t.shard_experts`` and, for FSDP, the trunk sharded in place before the
    optimizer sees it (DDP wraps afterwards without changing the parameters: ``runtime.ddp``)."""
    if par is not None and par.active:
        model = runtime.build_model(cfg, device, par, t.shard_experts)
        if par.mode == "fsdp":
            runtime.fully_shard_model(model)
    else:
        model = build_model(cfg, device)
    return model, run_optimizer(model, t)


def run_optimizer(model: torch.nn.Module, t: TrainConfig) -> Any:
    """The optimizer ``train`` gives ``model`` (peerlm's or any module with PEER / PKM layers): AdamW with
    the tables at ``expert_lr_ratio`` x the LR and the routing at ``routing_lr_ratio`` x
    (``peerlm.optim.param_groups``); with ``sparse_optimizer``, row-sparse table gradients and
    ``RowSparseAdamW`` for the tables."""
    if t.sparse_optimizer:
        for _, m in memory_layers(model):
            m.sparse_grad = True
    return build_optimizer(model, t.lr, t.weight_decay, t.betas, t.eps, t.lr * t.expert_lr_ratio,
                           t.expert_weight_decay, sparse_experts=t.sparse_optimizer,
                           routing_lr=t.lr * t.routing_lr_ratio, in_backward=t.expert_update == "backward")


def time_train_steps(model: Transformer, opt: Any, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
    """Seconds of each plain training step (forward, backward, optimizer step) over ``batches``, for
    calibrations that size budgets or estimate run times."""
    times = []
    for x, y in batches:
        t0 = time.time()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if x.is_cuda:
            torch.cuda.synchronize(x.device)  # the step's kernels, not their launches
        times.append(time.time() - t0)
    return times


def _flops(tokens: int, per_token: float | None) -> float | None:
    return None if per_token is None else tokens * per_token


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def train(run: RunConfig, out_dir: str | os.PathLike[str], resume: bool = False, stop_at: int | None = None,
          progress: bool = True, log: Callable[[str], None] | None = None,
          notes: Sequence[str] = (), build: Callable[..., tuple[Transformer, Any]] | None = None,
          hooks: StepHooks | None = None) -> dict[str, Any]:
    """Train ``run`` into ``out_dir``; returns a summary (steps, tokens, FLOPs, last validation, time).

    ``resume`` continues from the newest checkpoint. ``stop_at`` ends (with a checkpoint) after that
    many total steps without changing the schedule, as an interruption would. ``notes`` are logged
    once the run directory is accepted. Nothing is written unless every check passes (see the module
    docstring); SIGTERM / SIGINT end the run with a checkpoint and ``TrainInterrupted``.

    ``build(cfg, train_config, device, resuming)`` replaces ``build_for_training`` for a run that
    starts from a prepared model (a finetune: weights loaded, some parameters frozen, its own
    optimizer); ``resuming`` says a checkpoint will overwrite the weights. One process only.
    ``hooks`` (``StepHooks``) run inside every training step.
    """
    log = log or (lambda s: tqdm.write(s, file=sys.stdout))
    out, t = Path(out_dir), run.train
    ds = _check_data(run)
    device, amp, why = resolve_device(t.device, t.dtype)
    joined = runtime.init_from_env(device.type, t.dist_timeout) if t.parallel != "none" else False
    try:
        par = Parallel.setup(t.parallel)
        _check_parallel(run, par)
        if build is not None and par.active:
            raise TrainError("a run built from a prepared model trains in one process; set train.parallel=none")
        if build is None and run.model_kind != "peerlm":
            raise TrainError(f"a run of a {run.model_kind} model needs its builder: train it with `peerlm train "
                             "--hf-model DIR` (peerlm.hf.training.train_hf)")
        if device.type == "cuda" and par.ranks > 1:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            why = why.replace("cuda ", f"{device} ", 1)
        if not par.is_main:  # one voice: rank 0 logs, shows progress and writes
            log, progress = (lambda s: None), False
        total, limit = plan_steps(run)
        _check_out(out, ds)
        with contextlib.ExitStack() as held:
            failed = None
            try:
                if par.is_main:
                    held.enter_context(DirLock(out, "run directory"))
            except Exception as e:  # noqa: BLE001 (re-raised by agree, here and on the other ranks)
                failed = e
            par.agree(failed, TrainError)
            return _train_locked(run, out, ds, device, amp, why, total, limit, resume, stop_at, progress, log,
                                 notes, par, build, hooks)
    finally:
        if joined:
            torch.distributed.destroy_process_group()


def _check_parallel(run: RunConfig, par: Parallel) -> None:
    """Phase 1: the launch fits ``train.parallel``, and the batch and tables divide over the ranks."""
    t, ranks = run.train, par.ranks
    launched = runtime.world_size_from_env()
    if t.parallel == "none" and launched > 1:
        raise TrainError(f"launched on {launched} ranks with train.parallel=none: every rank would train its own "
                         "copy into the same run directory; add --set train.parallel=ddp (or fsdp)")
    if t.parallel != "none" and not torch.distributed.is_initialized():
        raise TrainError(f"train.parallel={t.parallel} needs a process group: launch with `torchrun "
                         "--nproc_per_node=P -m peerlm train ...`, or set train.parallel=none (and "
                         "train.shard_experts=false) for one process")
    if t.batch_size % ranks:
        raise TrainError(f"train.batch_size {t.batch_size} is the global batch and must be a multiple of the "
                         f"{ranks} ranks (each takes batch_size / ranks rows); change one of them")
    if t.shard_experts and run.model.dim % ranks:
        raise TrainError(f"train.shard_experts gives every rank model.dim / ranks columns of each table, but "
                         f"dim {run.model.dim} is not a multiple of {ranks} ranks")


def _train_locked(run: RunConfig, out: Path, ds: TokenDataset, device: torch.device, amp: torch.dtype | None,
                  why: str, total: int, limit: str, resume: bool, stop_at: int | None, progress: bool,
                  log: Callable[[str], None], notes: Sequence[str], par: Parallel | None = None,
                  build: Callable[..., tuple[Transformer, Any]] | None = None,
                  hooks: StepHooks | None = None) -> dict[str, Any]:
    t, cfg = run.train, run.model
    par = par or Parallel()
    found: list[str] = []
    ckpt = _resume_point(run, out, resume, ds, total, found)
    T = cfg.context_length
    flops_per_token = run.flops_per_token()  # None: no FLOP model for this model
    tokens_per_step = t.batch_size * t.grad_accum * T

    _seed_everything(t.seed)
    if build is not None:
        model, opt = build(cfg, t, device, ckpt is not None)
    else:
        model, opt = build_for_training(cfg, t, device, par)
    step, history, offset = 0, [], None
    if ckpt is not None:
        configured = [(g["base_lr"], g["weight_decay"]) for g in opt.param_groups]
        state = checkpoint.load(ckpt, model, opt, expected_model=run.model_dict(), verify=False)
        for g, (base_lr, wd) in zip(opt.param_groups, configured):  # this run's settings, not the saved ones
            g["base_lr"], g["weight_decay"] = base_lr, wd
        step, offset = state["step"], state["train"]["metrics_offset"]
        history = state["train"].get("validations", [])
    failed = None
    try:
        if par.is_main:
            _check_room(out, model)
            _commit_run_dir(run, out, ds)
    except Exception as e:  # noqa: BLE001 (re-raised by agree, here and on the other ranks)
        failed = e
    par.agree(failed, TrainError)
    module = runtime.ddp(model, par, device) if par.mode == "ddp" else model
    for note in [*found, *notes]:
        log(note)
    if ckpt is not None:
        log(f"resumed from {ckpt} at step {step}")
    rd = RunDir(out)
    metrics = rd.open_metrics(offset) if par.is_main else None
    tb = _tensorboard(rd, step + 1 if ckpt is not None else None, log) if t.tensorboard and par.is_main else None
    end = total if stop_at is None else min(total, stop_at)
    ranks = f" x {par.ranks} ranks ({par.mode}{', experts sharded' if t.shard_experts else ''})" if par.active else ""
    flops = (f"{total * tokens_per_step * flops_per_token:.3g} FLOPs" if flops_per_token is not None else
             "FLOPs not counted (no FLOP model for this model)")
    log(f"device {why}{ranks}; {model.num_params():,} params; {total} steps ({limit}) of {tokens_per_step:,} tokens "
        f"= {total * tokens_per_step:,} tokens, {flops}")
    autocast = (lambda: torch.autocast(device.type, dtype=amp)) if amp else contextlib.nullcontext
    params = [p for g in opt.param_groups for p in g["params"]]

    def save(at: int) -> None:
        state = None if metrics is None else {"validations": history, "metrics_offset": metrics.offset(),
                                              "data_step": at, "tokens": at * tokens_per_step}
        checkpoint.save(rd.checkpoints, at, model, run.to_dict(), opt, state, t.keep,
                        group=par.stats_group if par.active else None, main=par.is_main)

    def run_validation(at: int) -> None:
        if ds.num_tokens("val") < 2:
            return
        rec = {"step": at, **validate(model, ds, run, device, amp)}
        history.append(rec)
        if metrics is None:
            return
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
                try:
                    loss_val, ce_val, norm, factor, stopping = _train_step(
                        model, opt, params, ds, run, step, total, device, autocast, par, module,
                        stop.received is not None, hooks)
                except (torch.distributed.DistError, RuntimeError) as e:
                    if not par.active or not _lost_rank(e):
                        raise
                    kept = rd.latest_checkpoint()
                    where = f"; the last checkpoint {kept} is intact, continue with --resume" if kept else ""
                    raise TrainError(f"rank {par.rank}: a collective failed at step {step + 1}, most likely "
                                     f"because another rank died (see its log): {_one_line(e)}{where}") from None
                if stopping and stop.received is None:
                    stop.received = "SIGTERM"  # another rank was signalled: stop with it, at this step
                step += 1
                if not math.isfinite(loss_val):
                    raise TrainDiverged(f"loss is {loss_val} at step {step}; lower train.lr or raise warmup")
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
                           "flops": _flops(step * tokens_per_step, flops_per_token)}
                    if metrics is not None:
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
                    save(step)
                if stop.received and step < end:
                    log(f"{stop.received}: stopped after step {step}/{total} with a checkpoint")
                    raise TrainInterrupted(stop.received, step, total, out)
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
        if tb is not None:
            tb.close()
    elapsed = time.time() - start_time
    last = history[-1] if history else {}
    return {"step": step, "total_steps": total, "limit": limit, "tokens": step * tokens_per_step,
            "epochs": ds.epochs_seen(step * tokens_per_step, T),
            "flops": _flops(step * tokens_per_step, flops_per_token), "seconds": elapsed,
            "steps_this_call": step - start_step, "val_loss": last.get("val_loss"),
            "val_ppl": last.get("val_ppl"), "validations": history, "done": step >= total}
