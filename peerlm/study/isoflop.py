"""The isoFLOP study driver: decide the next run from the records present, train it, evaluate it, record it.

Phases, in order; each later phase reads the choices of the earlier ones from the records:

1. ``lr``: the dense model at the smaller budget on the second rung of its window, LR multiplier in
   ``LR_MULTIPLIERS``, extended along ``LR_GRID`` while the best (lowest full-val loss) is at an end;
   that best multiplier is used for every run after.
2. ``expert-lr``: PEER and PKM at the same point, expert-table LR ratio in ``EXPERT_LR_RATIOS``
   (extended along ``RATIO_GRID`` likewise); each method keeps its best ratio.
3. ``ladder``: every method at every budget over the initial window of sizes; while the best size of
   a (budget, method) is at an end of what was run and a further size exists, the ladder grows.
4. ``seed``: the compute-optimal model of every (budget, method) again with seed 1.
5. ``optimizer``: the compute-optimal PEER model of the smaller budget with the row-sparse AdamW.

A run is identified by ``RunSpec.run_id``; a finished run leaves ``runs/<run_id>.json`` (small,
committed) under the results directory, and the driver skips runs that have one. Checkpoints live in
the user cache (``$PEERLM_CACHE/study/isoflop/<run_id>``), so an interrupted run resumes from its last
checkpoint with the exact losses of an uninterrupted one. Runs are chosen deterministically, so two
machines working from the same records agree on the next one.

Every run is evaluated on the whole validation split (it picks the compute-optimal models) and on
the first ``EVAL_TOKENS`` tokens of each held-out set.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from peerlm.config import to_dict
from peerlm.data import EVAL_CORPORA, TRAIN_CORPORA, Corpus, TokenDataset, cache_dir, prepare
from peerlm.evaluate import evaluate_run
from peerlm.fileio import atomic_write_text
from peerlm.flops import model_cost
from peerlm.runconfig import RunConfig, data_info, plan_steps, resolve_device
from peerlm.study.claims import RunClaimed, claim
from peerlm.study.design import (
    BATCH,
    BUDGETS,
    CONTEXT,
    EXPERT_LR_RATIOS,
    LR_GRID,
    LR_MULTIPLIERS,
    METHODS,
    RATIO_GRID,
    SIZES,
    VOCAB,
    RunSpec,
    initial_window,
)
from peerlm.train import build_for_training, time_train_steps, train

__all__ = ["Study", "EVAL_TOKENS", "timing_key", "spec_of"]

EVAL_TOKENS = 65536


def _git_revision() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine(device: torch.device | None = None) -> str:
    """The machine a run used, in words (with the GPU's name for a CUDA device)."""
    gpu = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return f"{platform.machine()} {os.cpu_count()} cores{gpu}, {platform.system()}, torch {torch.__version__}"


class Study:
    """The isoFLOP study over ``results`` (records, reports) and ``work`` (data, checkpoints)."""

    def __init__(self, results: str | os.PathLike[str], work: str | os.PathLike[str] | None = None,
                 budgets: tuple[float, ...] = BUDGETS, methods: tuple[str, ...] = METHODS, threads: int = 1,
                 log: Callable[[str], None] = print, device: str = "cpu"):
        self.results = Path(results)
        self.work = Path(work) if work is not None else cache_dir() / "study" / "isoflop"
        self.budgets, self.methods, self.threads, self.log = tuple(sorted(budgets)), tuple(methods), threads, log
        self.device = resolve_device(device, "fp32")[0]  # an unusable device fails here, before any work
        if len(self.budgets) < 1 or any(not b > 0 for b in self.budgets):
            raise ValueError(f"budgets must be positive FLOP counts, got {budgets}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown methods {bad}; choose among {', '.join(METHODS)}")

    # ------------------------------------------------------------------------------------- records

    @property
    def runs_dir(self) -> Path:
        return self.results / "runs"

    def records(self) -> dict[str, dict[str, Any]]:
        out = {}
        if self.runs_dir.is_dir():
            for f in sorted(self.runs_dir.glob("*.json")):
                out[f.stem] = json.loads(f.read_text("utf-8"))
        return out

    @staticmethod
    def val_loss(rec: dict[str, Any]) -> float:
        return rec["eval"]["val"]["loss"]

    # ---------------------------------------------------------------------------------- the plan

    def _bracket(self, grid: tuple, first: tuple, make: Callable[[Any], RunSpec],
                 recs: dict[str, dict[str, Any]]) -> tuple[list[RunSpec], Any]:
        """Runs of a 1-D sweep over ``grid`` that starts at the values ``first`` and grows by one value
        at the end where its best run lies, until the best has a neighbour on both sides (or the grid
        ends). Returns the runs so far and the best value once that holds (None before)."""
        lo, hi = grid.index(first[0]), grid.index(first[-1])
        while True:
            specs = [make(grid[i]) for i in range(lo, hi + 1)]
            done = [recs.get(s.run_id) for s in specs]
            if not all(done):
                return specs, None
            best = min(range(len(done)), key=lambda i: self.val_loss(done[i]))
            if best == 0 and lo > 0:
                lo -= 1
            elif best == len(done) - 1 and hi < len(grid) - 1:
                hi += 1
            else:
                return specs, grid[lo + best]

    def choices(self, recs: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """The sweeps' runs and their choices: the LR multiplier and each memory method's expert-table
        LR ratio (1.0 while a sweep is unfinished)."""
        b0 = self.budgets[0]
        mid = initial_window(b0)[1]
        lr_specs, lr_mult = self._bracket(LR_GRID, LR_MULTIPLIERS,
                                          lambda m: RunSpec("lr", b0, "dense", mid, lr_mult=m), recs)
        lr_mult = 1.0 if lr_mult is None else lr_mult
        ratios, ratio_specs = {}, {}
        for method in ("peer", "pkm"):
            ratio_specs[method], best = self._bracket(
                RATIO_GRID, EXPERT_LR_RATIOS, lambda r, m=method: RunSpec("expert-lr", b0, m, mid, lr_mult, r), recs)
            ratios[method] = 1.0 if best is None else best
        return {"lr_mult": lr_mult, "expert_ratio": ratios, "lr_specs": lr_specs, "ratio_specs": ratio_specs}

    def _ladder_spec(self, budget: float, method: str, size: str, ch: dict[str, Any], seed: int = 0) -> RunSpec:
        return RunSpec("ladder" if seed == 0 else "seed", budget, method, size, ch["lr_mult"],
                       ch["expert_ratio"].get(method, 1.0), seed)

    def ladder(self, budget: float, method: str, recs: dict[str, dict[str, Any]],
               ch: dict[str, Any]) -> tuple[list[RunSpec], str | None]:
        """The ladder of (budget, method) as far as the records decide it, and its best size when
        that best is bracketed (None while it is not, or while runs are missing)."""
        names = tuple(s.name for s in SIZES)
        return self._bracket(names, tuple(initial_window(budget)),
                             lambda sz: self._ladder_spec(budget, method, sz, ch), recs)

    def plan(self, recs: dict[str, dict[str, Any]] | None = None) -> Iterator[RunSpec]:
        """Every run the study needs as far as the records decide, in the order they will run."""
        recs = self.records() if recs is None else recs
        b0 = self.budgets[0]
        ch = self.choices(recs)
        if "dense" in self.methods:
            yield from ch["lr_specs"]
        for method in ("peer", "pkm"):
            if method in self.methods:
                yield from ch["ratio_specs"][method]
        best: dict[tuple[float, str], str | None] = {}
        for budget in self.budgets:
            for method in self.methods:
                specs, best[budget, method] = self.ladder(budget, method, recs, ch)
                yield from specs
        for (budget, method), sz in best.items():
            if sz is not None:
                yield self._ladder_spec(budget, method, sz, ch, seed=1)
        if "peer" in self.methods and best.get((b0, "peer")):
            yield self._ladder_spec(b0, "peer", best[b0, "peer"], ch).with_(phase="optimizer", sparse_optimizer=True)

    def pending(self) -> list[RunSpec]:
        recs = self.records()
        seen, out = set(), []
        for spec in self.plan(recs):
            if spec.run_id not in recs and spec.run_id not in seen:
                seen.add(spec.run_id)
                out.append(spec)
        return out

    # ---------------------------------------------------------------------------------- running

    def data_dir(self) -> Path:
        """The study's prepared data (default training text, 1024-token BPE), prepared once."""
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
        revision = _git_revision()  # of the code that runs, read before a long run lets the tree move on
        data = self.data_dir()
        fingerprint = self.check_data(data)
        run = self.run_config(spec, data)
        out = self.work / spec.run_id
        steps, _ = plan_steps(run)
        self.log(f"study: {spec.phase} {spec.run_id}: {steps} steps")
        t0 = time.time()
        summary = train(run, out, resume=(out / "checkpoints").is_dir(), progress=progress,
                        log=lambda s: None if s.startswith("step ") and "val" not in s else self.log(s))
        wall = time.time() - t0
        wall_total = self._step_seconds(out)
        t1 = time.time()
        results = evaluate_run(out, splits=["val"], batch_size=16, device=self.device)
        held = [n for n in TokenDataset(data).splits if n in EVAL_CORPORA]
        results.update(evaluate_run(out, splits=held, batch_size=16, max_tokens=EVAL_TOKENS, device=self.device))
        cost = model_cost(run.model)
        rec = {
            "run_id": spec.run_id, "phase": spec.phase,
            "spec": {"budget": spec.budget, "method": spec.method, "size": spec.size, "lr_mult": spec.lr_mult,
                     "expert_ratio": spec.expert_ratio, "seed": spec.seed,
                     "sparse_optimizer": spec.sparse_optimizer}
            | ({"overrides": list(spec.overrides)} if spec.overrides else {})
            | ({"tokens": spec.tokens} if spec.tokens is not None else {}),
            "model": to_dict(run.model), "train": to_dict(run.train), "data": fingerprint,
            "params": cost["params"], "active_params": cost["active_params"],
            "expert_params": cost["expert_params"], "flops_train_per_token": cost["flops_train"],
            "steps": summary["step"], "train_tokens": summary["tokens"], "flops": summary["flops"],
            "epochs": summary["epochs"], "train_seconds": wall_total, "wall_seconds_last_call": wall,
            "tokens_per_second": summary["tokens"] / max(wall_total, 1e-9),
            "eval_seconds": time.time() - t1, "eval_tokens_heldout": EVAL_TOKENS,
            "eval": {k: {f: v[f] for f in ("loss", "perplexity", "bits_per_byte", "tokens") if f in v}
                     | ({"usage": v["usage"]} if v.get("usage") else {}) for k, v in results.items()},
            "last_train_loss": self._last_loss(out),
            "git_revision": revision, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "machine": machine(self.device), "threads": self.threads,
        }
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.runs_dir / f"{spec.run_id}.json", json.dumps(rec, indent=1) + "\n")
        self.log(f"study: done {spec.run_id}: val ppl {rec['eval']['val']['perplexity']:.2f}, "
                 f"{rec['train_tokens']:,} tokens ({rec['epochs']:.2f} epochs) in {wall_total / 60:.1f} min")
        return rec

    @staticmethod
    def _step_seconds(out: Path) -> float:
        """Seconds spent in training steps over the whole run, interrupted calls included: the sum of
        the per-step times in metrics.jsonl (truncated to the checkpoint on resume, so each step counts
        once; validation and checkpoint writes are left out)."""
        f = out / "metrics.jsonl"
        recs = [json.loads(x) for x in f.read_text("utf-8").splitlines()] if f.is_file() else []
        return sum(r["dt"] for r in recs if "dt" in r)

    @staticmethod
    def _last_loss(out: Path) -> float | None:
        f = out / "metrics.jsonl"
        recs = [json.loads(x) for x in f.read_text("utf-8").splitlines()] if f.is_file() else []
        ce = [r["ce"] for r in recs if "ce" in r]
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

    def _time_specs(self, specs: list[RunSpec], steps: int) -> dict[str, float]:
        """Median seconds per training step (after one untimed step) of every distinct ``timing_key``
        among ``specs``, one model after another in this process."""
        torch.set_num_threads(self.threads)
        out: dict[str, float] = {}
        for spec in specs:
            key = timing_key(spec)
            if key in out:
                continue
            model, opt = build_for_training(spec.model(), spec.train(), device=self.device)
            x = torch.randint(0, VOCAB, (BATCH, CONTEXT), device=self.device)
            out[key] = statistics.median(time_train_steps(model, opt, [(x, x)] * (steps + 1))[1:])
        return out

    def calibrate(self, steps: int = 3) -> dict[str, float]:
        """Seconds per training step of every model the plan uses, from ``steps`` timed steps."""
        return self._time_specs(self.pending(), steps)

    @property
    def timing_path(self) -> Path:
        return self.results / "timing.json"

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
        seconds = self._time_specs(specs, steps)
        meta = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(self.device),
                "threads": self.threads, "steps": steps, "git_revision": _git_revision(),
                "seconds": round(time.time() - t0, 1), "batch": [BATCH, CONTEXT]}
        atomic_write_text(self.timing_path, json.dumps({"meta": meta, "step_seconds": seconds}, indent=1) + "\n")
        return self.timing_path

    def timing(self) -> dict[str, Any] | None:
        """``timing.json`` as written by ``time_steps``, or None."""
        return json.loads(self.timing_path.read_text("utf-8")) if self.timing_path.is_file() else None

    def format_plan(self, calibrate: bool = True) -> str:
        pending = self.pending()
        per_step = self.calibrate() if calibrate and pending else {}
        width = max([36] + [len(s.run_id) + 2 for s in pending])
        lines = [f"{'phase':<10}{'run':<{width}}{'params':>10}{'tokens':>12}{'steps':>7}{'est. min':>10}"]
        total = 0.0
        for spec in pending:
            cfg = spec.model()
            c = model_cost(cfg)
            steps = (spec.tokens if spec.tokens is not None else int(spec.budget // c["flops_train"])) // (
                BATCH * CONTEXT)
            est = steps * per_step.get(timing_key(spec), float("nan")) / 60
            total += est if est == est else 0.0
            lines.append(f"{spec.phase:<10}{spec.run_id:<{width}}{c['params'] / 1e6:>9.2f}M"
                         f"{steps * BATCH * CONTEXT:>12,}{steps:>7}{est:>10.1f}")
        done = len(self.records())
        lines.append(f"{len(pending)} runs to go ({done} recorded); estimated {total / 60:.1f} h of training "
                     f"at {self.threads} thread(s){'' if per_step else ' (not calibrated)'}; later phases "
                     "(ladder extensions, seeds) appear as the records decide them")
        return "\n".join(lines)


def timing_key(spec: RunSpec) -> str:
    """What a training step's time depends on: the model and the optimizer mode (not LR or seed)."""
    return " ".join((spec.method, spec.size, *spec.overrides, *(["sparse"] if spec.sparse_optimizer else [])))


def spec_of(rec: dict[str, Any]) -> RunSpec:
    """The RunSpec a record was trained from."""
    s = rec["spec"]
    return RunSpec(rec["phase"], s["budget"], s["method"], s["size"], s["lr_mult"], s["expert_ratio"], s["seed"],
                   s["sparse_optimizer"], tuple(s.get("overrides", ())), s.get("tokens"))


def main_log(msg: str) -> None:
    print(msg, file=sys.stdout, flush=True)
