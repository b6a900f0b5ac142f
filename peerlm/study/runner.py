"""The one runner of every study: given a plan (``Plan``: which runs, derived from the records) and a
record store (``RecordStore``), it trains, evaluates and records the pending runs, one claimed run at
a time, and times, calibrates and prints plans.

A run is identified by its ``run_id``; a finished run leaves ``runs/<run_id>.json`` under the
results directory, and the runner skips runs that have one. Checkpoints live in the work directory
(by default the user cache, ``$PEERLM_CACHE/study/<study>/<run_id>``), so an interrupted run resumes
from its last checkpoint with the exact losses of an uninterrupted one. Plans are deterministic, so
two machines working from the same records agree on the next run.

Every run is evaluated on the whole validation split (it picks the compute-optimal models) and on
the first ``EVAL_TOKENS`` tokens of each held-out set. A run whose training loss becomes NaN or inf
(training stops with TrainDiverged), or whose validation loss is not finite, is recorded as diverged
(``peerlm.study.records``), so that the plan neither trains it again nor chooses it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Protocol

import torch

from peerlm.config import ModelConfig, to_dict
from peerlm.data import EVAL_CORPORA, TRAIN_CORPORA, Corpus, TokenDataset, prepare
from peerlm.evaluate import evaluate_run
from peerlm.flops import model_cost
from peerlm.kernels.cpu import cpu_model, machine_tag
from peerlm.runconfig import RunConfig, TrainConfig, TrainDiverged, data_info, plan_steps, resolve_device
from peerlm.rundir import RunDir
from peerlm.study.claims import RunClaimed, claim
from peerlm.study.design import BATCH, CONTEXT, VOCAB, RunSpec
from peerlm.study.records import Records, RecordStore, spec_of
from peerlm.train import build_for_training, time_train_steps, train

__all__ = ["Plan", "Runner", "EVAL_TOKENS", "timing_key", "machine", "main_log", "steps_of", "tokens_of",
           "time_models", "train_run"]

EVAL_TOKENS = 65536


class Plan(Protocol):
    """What a study runs, as data the runner reads: its runs in order, as far as the records decide."""

    name: str

    def records(self, own: Records) -> Records:
        """The study's own records plus those of runs it reads from elsewhere (another study's)."""

    def runs(self, recs: Records) -> Iterator[RunSpec]:
        """Every run the study needs as far as ``recs`` decide, in the order they will run."""


def git_revision() -> str:
    """The short git revision of the code that runs (``"unknown"`` outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(device: torch.device | None = None) -> str:
    """The machine a run used, in words (with the GPU's name for a CUDA device): the CPU's model and a
    tag of its model and instruction-set flags (``machine_tag``), which tells two machines of one kind
    apart where their CPUs differ; records written before the tag say "x86_64 2 cores, Linux, ..."."""
    gpu = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return (f"{platform.machine()} {os.cpu_count()} cores ({cpu_model()}, cpu tag {machine_tag()}){gpu}, "
            f"{platform.system()}, torch {torch.__version__}")


def timing_key(spec: RunSpec) -> str:
    """What a training step's time depends on: the model and the optimizer mode (not LR or seed)."""
    return " ".join((spec.method, spec.size, *spec.overrides, *(["sparse"] if spec.sparse_optimizer else [])))


def main_log(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)


def steps_of(model: ModelConfig, t: TrainConfig) -> int:
    """The optimizer steps the budget of ``t`` buys ``model``: what training will run."""
    return plan_steps(RunConfig(model, t))[0]


def tokens_of(model: ModelConfig, t: TrainConfig) -> int:
    """The training tokens of those steps."""
    return steps_of(model, t) * t.batch_size * t.grad_accum * model.context_length


def train_run(run: RunConfig, out: Path, progress: bool,
              log: Callable[[str], None] | None = None) -> tuple[dict[str, Any], float]:
    """Train ``run`` into ``out``, resuming from its checkpoints where it has some; the training
    summary and the wall seconds of this call."""
    t0 = time.time()
    summary = train(run, out, resume=RunDir(out).checkpoints.is_dir(), progress=progress, log=log)
    return summary, time.time() - t0


def time_models(models: Iterable[tuple[str, ModelConfig, TrainConfig]], steps: int,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """Median seconds per training step (after one untimed step, on random tokens) of every distinct
    key among ``models`` (key, model, recipe), one model after another in this process."""
    out: dict[str, float] = {}
    for key, cfg, t in models:
        if key in out:
            continue
        model, opt = build_for_training(cfg, t, device=device)
        x = torch.randint(0, cfg.vocab_size, (t.batch_size, cfg.context_length), device=device)
        out[key] = statistics.median(time_train_steps(model, opt, [(x, x)] * (steps + 1))[1:])
    return out


class Runner:
    """Executes ``plan`` over the records of ``store``; ``work`` holds checkpoints (``work/<run_id>``),
    and beside it the prepared data and the claims that every study sharing that folder shares."""

    def __init__(self, plan: Plan, store: RecordStore, work: str | os.PathLike[str], threads: int = 1,
                 log: Callable[[str], None] = print, device: str = "cpu"):
        self.plan, self.store, self.work = plan, store, Path(work)
        self.threads, self.log = threads, log
        self.device = resolve_device(device, "float32")[0]  # an unusable device fails here, before any work

    @property
    def results(self) -> Path:
        return self.store.results

    @property
    def runs_dir(self) -> Path:
        return self.store.runs_dir

    def records(self) -> Records:
        """The records the plan reads: the store's and those it reuses from elsewhere."""
        return self.plan.records(self.store.records())

    def planned(self, recs: Records | None = None) -> Iterator[RunSpec]:
        """The plan's runs as far as the records decide."""
        return self.plan.runs(self.records() if recs is None else recs)

    def pending(self) -> list[RunSpec]:
        """The planned runs without a record, in plan order, each once."""
        recs = self.records()
        seen, out = set(), []
        for spec in self.plan.runs(recs):
            if spec.run_id not in recs and spec.run_id not in seen:
                seen.add(spec.run_id)
                out.append(spec)
        return out

    def timing(self) -> dict[str, Any] | None:
        return self.store.timing()

    # ---------------------------------------------------------------------------------- running

    def data_dir(self) -> Path:
        """The studies' prepared data (default training text, 1024-token BPE), prepared once."""
        d = self.work.parent / f"data-v{VOCAB}"
        if not (d / "meta.json").is_file():
            self.log(f"study: preparing {'+'.join(TRAIN_CORPORA)} with a {VOCAB}-token BPE into {d}")
            prepare([Corpus(n) for n in TRAIN_CORPORA], d, vocab_size=VOCAB, eval_sets=list(EVAL_CORPORA),
                    progress=False)
        return d

    @staticmethod
    def data_fingerprint(data: Path) -> dict[str, Any]:
        """What identifies the prepared data across machines: the tokenizer's sha256 and every split's
        token count (the directory is left out: it differs between machines, the text does not)."""
        info = data_info(data)
        return {"tokenizer_sha256": info["tokenizer_sha256"],
                "tokens": {n: v["tokens"] for n, v in sorted(info["splits"].items())}}

    def check_data(self, data: Path) -> dict[str, Any]:
        """The fingerprint of ``data``, after checking that every record that carries one (records
        written before fingerprints were kept carry none) was trained and evaluated on the same data:
        records from other data would be compared as if they were not."""
        fp = self.data_fingerprint(data)
        for run_id, rec in self.records().items():
            if rec.get("data") not in (None, fp):
                raise ValueError(
                    f"the prepared data in {data} differs from the data of the record {run_id} in "
                    f"{self.runs_dir} (tokenizer sha256 {fp['tokenizer_sha256'][:12]} against "
                    f"{rec['data']['tokenizer_sha256'][:12]}; tokens {fp['tokens']} against "
                    f"{rec['data']['tokens']}); prepare the data again into a new directory with the "
                    "study's settings, or start the study in a new --results directory")
        return fp

    def run_config(self, spec: RunSpec, data: Path) -> RunConfig:
        return RunConfig(spec.model(), dataclasses.replace(spec.train(), device=str(self.device)), data_info(data))

    def run_one(self, spec: RunSpec, progress: bool = False) -> dict[str, Any]:
        """Train (or resume) and evaluate one run, write its record atomically, and return it. The run
        is claimed meanwhile (``peerlm.study.claims``; claims of every study beside this one's work
        directory, so a run two ablations share is claimed once): ``RunClaimed`` if another process
        holds it. A run that has a record once its claim is taken (another process has just finished
        it) is not trained again: that record is returned."""
        return self._claimed(spec, progress)[0]

    def _claimed(self, spec: RunSpec, progress: bool) -> tuple[dict[str, Any], bool]:
        """``run_one``, and whether it trained (False: the record was there)."""
        with claim(self.work.parent / "claims" / f"{spec.run_id}.claim", spec.run_id):
            rec = self.records().get(spec.run_id)
            if rec is not None:
                self.log(f"study: {spec.run_id} has a record (from another process meanwhile); not run again")
                return rec, False
            return self._run_one(spec, progress), True

    def _run_one(self, spec: RunSpec, progress: bool) -> dict[str, Any]:
        torch.set_num_threads(self.threads)
        revision = git_revision()  # of the code that runs, read before a long run lets the tree move on
        data = self.data_dir()
        fingerprint = self.check_data(data)
        run = self.run_config(spec, data)
        out = self.work / spec.run_id
        steps, _ = plan_steps(run)
        self.log(f"study: {spec.phase} {spec.run_id}: {steps} steps")
        try:
            summary, wall = train_run(run, out, progress,
                                       log=lambda s: None if s.startswith("step ") and "val" not in s else self.log(s))
        except TrainDiverged as e:
            # what the last logged step reached; the step that failed is not in the log
            last = ([r for r in RunDir(out).metric_records() if "tokens" in r] or [{}])[-1]
            summary = {"step": last.get("step", 0), "tokens": last.get("tokens", 0), "flops": last.get("flops", 0),
                       "epochs": last.get("epochs", 0.0)}
            return self._record(spec, run, out, summary, None, fingerprint, revision, diverged=" ".join(str(e).split()))
        t1 = time.time()
        results = evaluate_run(out, splits=["val"], batch_size=16, device=self.device)
        held = [n for n in TokenDataset(data).splits if n in EVAL_CORPORA]
        results.update(evaluate_run(out, splits=held, batch_size=16, max_tokens=EVAL_TOKENS, device=self.device))
        evaluation = {"results": results, "seconds": time.time() - t1}
        loss = results["val"]["loss"]
        why = None if math.isfinite(loss) else f"the validation loss is {loss} after {summary['step']} steps"
        rec = self._record(spec, run, out, summary | {"wall": wall}, evaluation, fingerprint, revision, diverged=why)
        return rec

    def _record(self, spec: RunSpec, run: RunConfig, out: Path, summary: dict[str, Any],
                evaluation: dict[str, Any] | None, fingerprint: dict[str, Any], revision: str,
                diverged: str | None = None) -> dict[str, Any]:
        """Write the record of ``spec`` (trained into ``out``; ``evaluation`` None: not evaluated, as a
        run that diverged in training is not) and log it."""
        wall_total = self._step_seconds(out)
        cost = model_cost(run.model)
        results = evaluation["results"] if evaluation else {}
        rec = {
            "run_id": spec.run_id, "phase": spec.phase,
            "spec": {"budget": spec.budget, "method": spec.method, "size": spec.size, "lr_mult": spec.lr_mult,
                     "expert_ratio": spec.expert_ratio, "seed": spec.seed,
                     "sparse_optimizer": spec.sparse_optimizer}
            | ({"overrides": list(spec.overrides)} if spec.overrides else {})
            | ({"tokens": spec.tokens} if spec.tokens is not None else {})
            | ({"routing_ratio": spec.routing_ratio} if spec.routing_ratio is not None else {}),
            **({"diverged": diverged} if diverged else {}),
            "model": to_dict(run.model), "train": to_dict(run.train), "data": fingerprint,
            "params": cost["params"], "active_params": cost["active_params"],
            "expert_params": cost["expert_params"], "flops_train_per_token": cost["flops_train"],
            "steps": summary["step"], "train_tokens": summary["tokens"], "flops": summary["flops"],
            "epochs": summary["epochs"], "train_seconds": wall_total,
            **({"wall_seconds_last_call": summary["wall"]} if "wall" in summary else {}),
            "tokens_per_second": summary["tokens"] / max(wall_total, 1e-9),
            **({"eval_seconds": evaluation["seconds"], "eval_tokens_heldout": EVAL_TOKENS} if evaluation else {}),
            "eval": {k: {f: v[f] for f in ("loss", "perplexity", "bits_per_byte", "tokens") if f in v}
                     | ({"usage": v["usage"]} if v.get("usage") else {}) for k, v in results.items()},
            "last_train_loss": self._last_loss(out),
            "git_revision": revision, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(self.device), "threads": self.threads,
        }
        path = self.store.write(rec)
        if diverged:
            self.log(f"study: {spec.run_id} diverged ({diverged}); recorded as diverged in {path}: the plan counts "
                     f"it as worse than any run that did not diverge and does not train it again (to train it "
                     f"again, move the record aside and delete {out})")
        else:
            self.log(f"study: done {spec.run_id}: val ppl {rec['eval']['val']['perplexity']:.2f}, "
                     f"{rec['train_tokens']:,} tokens ({rec['epochs']:.2f} epochs) in {wall_total / 60:.1f} min")
        return rec

    @staticmethod
    def _step_seconds(out: Path) -> float:
        """Seconds spent in training steps over the whole run, interrupted calls included: the sum of
        the per-step times in metrics.jsonl (truncated to the checkpoint on resume, so each step counts
        once; validation and checkpoint writes are left out)."""
        return sum(r["dt"] for r in RunDir(out).metric_records() if "dt" in r)

    @staticmethod
    def _last_loss(out: Path) -> float | None:
        ce = [r["ce"] for r in RunDir(out).metric_records() if "ce" in r]
        return ce[-1] if ce else None

    def run(self, max_runs: int | None = None, progress: bool = False) -> int:
        """Run pending runs in plan order (at most ``max_runs``), skipping those another process holds;
        returns how many were run."""
        count = 0
        while max_runs is None or count < max_runs:
            pending = self.pending()
            if not pending:
                self.log("study: every planned run has a record")
                break
            for spec in pending:
                try:
                    _, trained = self._claimed(spec, progress)
                except RunClaimed as e:
                    self.log(f"study: skipped: {e}")
                    continue
                count += trained
                break
            else:
                self.log("study: every pending run is being run by another process")
                break
        return count

    # -------------------------------------------------------------------------------- estimates

    def time_specs(self, specs: list[RunSpec], steps: int) -> dict[str, float]:
        """Median seconds per training step of every distinct ``timing_key`` among ``specs``."""
        torch.set_num_threads(self.threads)
        return time_models(((timing_key(s), s.model(), s.train()) for s in specs), steps, self.device)

    def calibrate(self, steps: int = 3) -> dict[str, float]:
        """Seconds per training step of every model the plan uses, from ``steps`` timed steps."""
        return self.time_specs(self.pending(), steps)

    def time_steps(self, steps: int = 10) -> Path:
        """Time the training step of every model that has a record, back to back in one process, and
        write ``timing.json``. The runs' own step times depend on what else the machine ran meanwhile
        (the study runs for hours, beside other work); the report's comparison at equal wall time
        multiplies these timings by each run's steps instead, so that it compares models under one
        load. Run it on an otherwise idle machine."""
        recs = self.records()
        if not recs:
            raise ValueError(f"{self.runs_dir} holds no run records yet; run `peerlm study isoflop` first")
        specs = sorted({spec_of(r) for r in recs.values()}, key=timing_key)
        self.log(f"study: timing {len({timing_key(s) for s in specs})} models, {steps} steps each")
        t0 = time.time()
        seconds = self.time_specs(specs, steps)
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(self.device),
                "threads": self.threads, "steps": steps, "git_revision": git_revision(),
                "seconds": round(time.time() - t0, 1), "batch": [BATCH, CONTEXT]}
        return self.store.write_timing(meta, seconds)

    def format_plan(self, calibrate: bool = True) -> str:
        """The pending runs as a table (each column as wide as its widest cell, so that the columns stay
        apart at any budget) and the estimated hours of training."""
        pending = self.pending()
        per_step = self.calibrate() if calibrate and pending else {}
        head = ("phase", "run", "params", "tokens", "steps", "est. min")
        rows, total = [], 0.0
        for spec in pending:
            cfg, t = spec.model(), spec.train()
            steps = steps_of(cfg, t)
            est = steps * per_step[timing_key(spec)] / 60 if timing_key(spec) in per_step else None
            total += est or 0.0
            rows.append((spec.phase, spec.run_id, f"{model_cost(cfg)['params'] / 1e6:.2f}M",
                         f"{tokens_of(cfg, t):,}", f"{steps:,}", "-" if est is None else f"{est:,.1f}"))
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
                 for r in [head, *rows]]
        done = len(self.records())
        lines.append(f"{len(pending)} runs to go ({done} recorded); estimated {total / 60:,.1f} h of training "
                     f"at {self.threads} thread(s){'' if per_step else ' (not calibrated)'}; later phases "
                     "(ladder extensions, seeds) appear as the records decide them")
        return "\n".join(lines)
