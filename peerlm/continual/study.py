"""``peerlm study continual``: learning against forgetting, per finetuning method, on PEER, PKM and
dense models of equal training FLOPs.

Bases: the isoFLOP study's compute-optimal PEER, PKM and dense models at ``BASE_BUDGET`` (8e12, the
larger budget of its first pass: at 2e12 the bases, one block of width 48 or two of 64, learned
almost none of the facts in a first try: exact match 0.0-0.4% after full finetuning), by
``isoflop_bases``; equal training FLOPs by construction. Their checkpoints are the isoFLOP study's
(``<its work>/<run_id>``); a base whose checkpoint is not on this machine is trained again from its
record's spec (to the last bit on the machine and revision that wrote the record; elsewhere a
memory-layer base differs by about a seed's worth).

Tasks (``TASKS``), prepared once with the bases' tokenizer:
- ``facts``: the synthetic biographies of ``peerlm data facts``; learning = exact match on the
  held-out prompts (completion and question), and perplexity on the held-out biographies;
- ``docs``: a held-out corpus (``news``) split 80/20 into a finetuning part and a test part;
  learning = perplexity on the test part. ``news`` is then left out of the forgetting sets.

Forgetting = the loss change of the finetuned model against its base, in nats and %, on the first
``EVAL_TOKENS`` tokens of the base data's validation split and of each held-out set.

Sweeps (``SWEEPS``): each method's knob, to trace learning against forgetting: the LR for ``full``
and ``memory``, t for ``sparse`` (with the lazy AdamW: see ``SWEEPS``), m for ``grow``, the rank for
``lora``. ``memory`` and ``sparse`` run on PEER and PKM, ``grow`` on PEER, ``full`` and ``lora`` on
all three. Every run trains ``STEPS`` steps of ``BATCH`` windows. Once a sweep has all its records, its
best-learning point is repeated with further seeds (``SEEDS`` in all), task by task, before the next task.

Records: ``<results>/runs/<run_id>.json`` per finetune (``ContinualRunner``: claimed while it runs,
resumed from its checkpoints in ``<work>/<run_id>``, written atomically once evaluated) and
``<results>/bases/<base run id>.json`` with each base's own evaluation (the "before"). A plan is a
pure function of its settings and the records, so two machines agree on the next run. Reports: ``study_report``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from peerlm.continual.facts import exact_match, load_tests, prepare_facts
from peerlm.continual.finetune import finetune, finetune_config, plan_finetune
from peerlm.data import Corpus, TokenDataset, prepare
from peerlm.data.cache import cache_dir
from peerlm.evaluate import evaluate_run
from peerlm.fileio import atomic_write_text
from peerlm.rundir import RunDir, load_run, run_tokenizer
from peerlm.study.claims import RunClaimed, claim
from peerlm.study.records import RecordStore, finite_json
from peerlm.study.runner import git_revision, machine

__all__ = ["Base", "Task", "FactsTask", "DocsTask", "TASKS", "SWEEPS", "STEPS", "BATCH", "EVAL_TOKENS",
           "SEEDS", "ContinualSpec", "ContinualPlan", "ContinualRunner", "learning_score", "isoflop_bases",
           "continual_study"]

STEPS = 600
BATCH = 16
EVAL_TOKENS = 65536
# method -> (knob, values, fixed settings); the knob is a FinetuneSpec field or "lr". Ranges from probes
# on the 8e12 PEER base and the facts task (exact match on held-out completion prompts after 600 steps):
# full (AdamW, 3e-3) 56% at step 420 and 64% at 840; memory 11% at 1e-2, 19% at 3e-2; sparse with SGD
# barely moved (LR 1.0: loss 4.67 -> 4.50 in 76 steps; LR 30, t = 10000: loss 1.59, 0%) where the lazy
# row-sparse AdamW learned (t = 1000 at 1e-2: loss 2.1, 0%; t = 10000 at 3e-2: loss 0.52, 8%), so
# sparse sweeps t with the lazy AdamW at about the LR the tables pretrained with (2e-2). LoRA (rank 16):
# 4.7% at LR 3e-3 (val loss +89%), 8.7% at 1e-2 (+110% on the whole val split). grow with zero-initialised
# sub-keys (the step-0-exact start) learned nothing at m = 16 (0.0%, val loss +0.0%): on this base every
# position has k old sub-keys scoring above 0 in both halves, so no new expert is ever retrieved and none
# gets a gradient; the sweep draws the new sub-keys at random instead.
# The tables' LRs differ by base: the isoFLOP optima trained PEER's at 3x the trunk's (2.1e-2) and PKM's
# at 10x (7.2e-2). So sparse runs at about 1.4x each base's own table LR (PEER 3e-2, PKM 1e-1: at PEER's
# 3e-2, PKM learned 0.0 / 0.0 / 5.7% at t = 1000 / 10000 / 30000), and memory's LR sweep reaches 3e-1, about
# 4x PKM's table LR as 1e-1 is for PEER's (PKM's best was at 1e-1, the sweep's edge). Likewise full
# finetuning's LR sweep reaches 1e-2, past the bases' own peak LR (7.2e-3): its best was at 3e-3, the
# edge of a first sweep, on every base for the facts and on PEER for the documents.
SWEEPS: dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]] = {
    "full": ("lr", (3e-4, 1e-3, 3e-3, 1e-2), {}),
    "lora": ("lora_rank", (4, 16, 64), {"lr": 1e-2, "lora_alpha": 32.0}),
    "memory": ("lr", (1e-2, 3e-2, 1e-1, 3e-1), {}),
    "sparse": ("slots", (1000, 10000, 30000), {"lr": {"peer": 3e-2, "pkm": 1e-1}, "optimizer": "adamw",
                                               "background": 100}),
    "grow": ("grow", (16, 64), {"lr": 3e-2, "key_init": "random"}),
}
SEEDS = 2  # seeds of the points the report leans on (ContinualPlan.repeats)
METHOD_KINDS = {"full": ("peer", "pkm", "dense"), "lora": ("peer", "pkm", "dense"), "memory": ("peer", "pkm"),
                "sparse": ("peer", "pkm"), "grow": ("peer",)}


@dataclasses.dataclass(frozen=True)
class Base:
    """A base model: its kind (peer, pkm, dense), the run id that names it and the run directory
    holding its checkpoint; ``make`` trains it there when it has none (None: it must exist)."""

    kind: str
    run_id: str
    path: Path
    make: Callable[[], None] | None = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class FactsTask:
    name: str = "facts"
    people: int = 50
    paraphrases: int = 20

    def settings(self) -> dict[str, Any]:
        return {"people": self.people, "paraphrases": self.paraphrases}

    def prepare(self, out: Path, tokenizer_json: bytes) -> None:
        prepare_facts(out, tokenizer_json, people=self.people, paraphrases=self.paraphrases, progress=False)

    def learning(self, run: Path, data: Path, device: torch.device) -> dict[str, Any]:
        model, config = load_run(run, device)
        ds = TokenDataset(data)
        res = exact_match(model, run_tokenizer(run, config, data), load_tests(data), bos_id=ds.eot_id)
        ppl = evaluate_run(run, data, splits=["heldout"], batch_size=16, device=device, model=model, config=config)
        return {"exact_match": res["exact_match"], "by_kind": res["by_kind"],
                "heldout_loss": ppl["heldout"]["loss"], "heldout_ppl": ppl["heldout"]["perplexity"]}


@dataclasses.dataclass(frozen=True)
class DocsTask:
    name: str = "docs"
    corpus: str = "news"
    test_fraction: float = 0.2
    source: Any = None  # a data source instead of the corpus (tests)

    def settings(self) -> dict[str, Any]:
        source = self.source.describe() if self.source is not None else self.corpus
        return {"corpus": source, "test_fraction": self.test_fraction}

    def prepare(self, out: Path, tokenizer_json: bytes) -> None:
        prepare([self.source if self.source is not None else Corpus(self.corpus)], out,
                val_fraction=self.test_fraction, progress=False, tokenizer_json=tokenizer_json)

    def learning(self, run: Path, data: Path, device: torch.device) -> dict[str, Any]:
        res = evaluate_run(run, data, splits=["val"], batch_size=16, device=device)["val"]
        return {"test_loss": res["loss"], "test_ppl": res["perplexity"]}


Task = FactsTask | DocsTask
TASKS: tuple[Task, ...] = (FactsTask(), DocsTask())


def learning_score(rec: dict[str, Any]) -> float:
    """How much a finetune's record says it learned, higher is better: the exact match (facts) or minus
    the test loss (docs)."""
    ln = rec["learning"]
    return ln["exact_match"] if "exact_match" in ln else -ln["test_loss"]


@dataclasses.dataclass(frozen=True)
class ContinualSpec:
    """One finetune of the study."""

    base: str  # the base's kind
    task: str
    method: str
    knob: str
    value: Any
    seed: int = 0

    @property
    def run_id(self) -> str:
        knob = {"lr": "lr", "lora_rank": "r", "slots": "t", "grow": "m"}[self.knob]
        return f"{self.base}_{self.task}_{self.method}_{knob}{self.value:g}_s{self.seed}"

    def spec_args(self, fixed: dict[str, Any]) -> dict[str, Any]:
        """The FinetuneSpec fields of this run: the knob's (unless it is the LR) and its sweep's ``fixed``
        settings (the LR aside)."""
        out = {"method": self.method, **{k: v for k, v in fixed.items() if k != "lr"}}
        if self.knob != "lr":
            out[self.knob] = self.value
        return out

    def lr(self, fixed: dict[str, Any]) -> float:
        """The knob's value where the knob is the LR, else the sweep's fixed LR (its base's, where it
        names one per base kind)."""
        if self.knob == "lr":
            return self.value
        lr = fixed["lr"]
        return lr[self.base] if isinstance(lr, dict) else lr


@dataclasses.dataclass(frozen=True)
class ContinualPlan:
    """The runs: every (base, task, method, knob value) the sweeps name, in that order, task by task,
    each task's sweeps followed by the further seeds of their best points (``repeats``)."""

    bases: tuple[Base, ...]
    tasks: tuple[Task, ...] = TASKS
    sweeps: tuple[tuple[str, tuple[str, tuple[Any, ...], dict[str, Any]]], ...] = tuple(SWEEPS.items())
    steps: int = STEPS
    batch: int = BATCH
    name: str = "continual"
    seeds: int = SEEDS

    def sweep(self, task: Task) -> list[ContinualSpec]:
        """The task's first-seed runs: base by base, method by method, knob value by knob value."""
        return [ContinualSpec(base.kind, task.name, method, knob, v)
                for base in self.bases for method, (knob, values, _) in self.sweeps
                if base.kind in METHOD_KINDS[method] for v in values]

    def runs(self, records: dict[str, dict[str, Any]] | None = None) -> Iterator[ContinualSpec]:
        """Task by task (the facts first): the sweep, then the repeats that ``records`` can choose."""
        for task in self.tasks:
            yield from self.sweep(task)
            yield from self.repeats(task, records or {})[0]

    def repeats(self, task: Task, records: dict[str, dict[str, Any]]) -> tuple[list[ContinualSpec], int]:
        """The further seeds (1 .. ``seeds`` - 1) of the points the report leans on: each (base, method)
        sweep's best-learning knob value (the reference of the target, and each method's best). A sweep's
        point is known once every run of it has a record; returns (the repeats known, how many are not
        known yet)."""
        groups: dict[tuple[str, str], list[ContinualSpec]] = {}
        for s in self.sweep(task):
            groups.setdefault((s.base, s.method), []).append(s)
        out, unknown = [], 0
        for specs in groups.values():
            if all(s.run_id in records for s in specs):
                best = max(specs, key=lambda s: learning_score(records[s.run_id]))  # the first of equals
                out += [dataclasses.replace(best, seed=seed) for seed in range(1, self.seeds)]
            else:
                unknown += self.seeds - 1
        return out, unknown

    def fixed(self, method: str) -> dict[str, Any]:
        """The settings ``method``'s sweep holds fixed."""
        return dict(self.sweeps)[method][2]

    def base(self, kind: str) -> Base:
        return next(b for b in self.bases if b.kind == kind)

    def task(self, name: str) -> Task:
        return next(t for t in self.tasks if t.name == name)


def _eval_forgetting(run: Path, data: Path, device: torch.device, skip: Sequence[str]) -> dict[str, dict[str, float]]:
    sets = [s for s in TokenDataset(data).splits if s != "train" and s not in skip]
    res = evaluate_run(run, data, splits=sets, batch_size=16, max_tokens=EVAL_TOKENS, device=device, usage=False)
    return {k: {"loss": v["loss"], "perplexity": v["perplexity"]} for k, v in res.items()}


class ContinualRunner:
    """Runs ``plan`` into ``results`` (records, reports); ``work`` holds the task data and the
    finetunes' checkpoints. See the module docstring."""

    def __init__(self, plan: ContinualPlan, results: str | os.PathLike[str], work: str | os.PathLike[str],
                 threads: int = 1, log: Callable[[str], None] = print, device: str = "cpu"):
        self.plan, self.store, self.work = plan, RecordStore(results), Path(work)
        self.threads, self.log, self.device = threads, log, torch.device(device)

    @property
    def results(self) -> Path:
        return self.store.results

    def record_path(self, spec: ContinualSpec) -> Path:
        return self.results / "runs" / f"{spec.run_id}.json"

    def base_path(self, base: Base) -> Path:
        return self.results / "bases" / f"{base.run_id}.json"

    def records(self) -> dict[str, dict[str, Any]]:
        out = {}
        for f in sorted((self.results / "runs").glob("*.json")):
            try:
                rec = json.loads(f.read_text("utf-8"))
            except ValueError as e:
                raise ValueError(f"{f} is not a record of the continual study ({e}); move it aside and run the "
                                 "study again to redo that run") from None
            if not isinstance(rec, dict) or rec.get("run_id") != f.stem or "forgetting" not in rec:
                raise ValueError(f"{f} is not a record of the continual study; move it aside and run the study "
                                 "again to redo that run")
            self._check_task(rec, f)
            out[f.stem] = rec
        return out

    def _check_task(self, rec: dict[str, Any], path: Path) -> None:
        """A record of a task made with other settings (people, paraphrases, corpus), or of a method
        trained with other fixed settings than the plan's sweep (LR, optimizer, LoRA alpha...), measures
        something else: refused, naming both."""
        spec = rec.get("spec", {})
        task = next((t for t in self.plan.tasks if t.name == spec.get("task")), None)
        if task is not None and rec.get("task_settings") != task.settings():
            raise ValueError(f"{path} was made with the {task.name} task's settings {rec.get('task_settings')}, the "
                             f"plan has {task.settings()}; move it aside (or delete it) and run the study again")
        if spec.get("method") in dict(self.plan.sweeps):
            planned = self.planned_settings(ContinualSpec(**spec))
            trained = rec.get("finetune", {})
            differ = {k: v for k, v in planned.items() if trained.get(k) != v}
            if differ:
                had = {k: trained.get(k) for k in differ}
                raise ValueError(f"{path} was trained with {had}, the plan's {spec['method']} sweep has "
                                 f"{differ}; move it aside (or delete it) and run the study again")

    def planned_settings(self, spec: ContinualSpec) -> dict[str, Any]:
        """What the plan trains ``spec`` with, as a run's config names it (``finetune`` fields and the LR)."""
        fixed = self.plan.fixed(spec.method)
        return {"lr": spec.lr(fixed), **{k: v for k, v in spec.spec_args(fixed).items() if k != "method"}}

    def pending(self, recs: dict[str, dict[str, Any]] | None = None) -> list[ContinualSpec]:
        recs = self.records() if recs is None else recs  # records() checks every record
        return [s for s in self.plan.runs(recs) if s.run_id not in recs]

    def format_plan(self) -> str:
        recs = self.records()
        pending = self.pending(recs)
        unknown = sum(self.plan.repeats(t, recs)[1] for t in self.plan.tasks)
        head = ("base", "task", "method", "knob", "run", "steps")
        rows = [(s.base, s.task, s.method, f"{s.knob}={s.value:g}", s.run_id, str(self.plan.steps)) for s in pending]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [head, *rows]]
        done = sum(s.run_id in recs for s in self.plan.runs(recs))
        lines.append(f"{len(pending)} finetunes to go ({done} recorded)"
                     + (f" and {unknown} repeats with further seeds, chosen as their sweeps finish" if unknown else "")
                     + f", {self.plan.steps} steps of {self.plan.batch} windows each; bases: "
                     + ", ".join(f"{b.kind} {b.run_id}" for b in self.plan.bases))
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------ pieces

    def ensure_base(self, base: Base) -> Path:
        """The base's run directory, trained to its end first where ``make`` can: a base whose training
        was interrupted has checkpoints but is not the base yet, so ``make`` resumes it (and returns at
        once for a finished one)."""
        if base.make is None:
            if RunDir(base.path).latest_checkpoint() is None:
                raise ValueError(f"the base {base.run_id} has no checkpoint in {base.path}")
            return base.path
        if RunDir(base.path).latest_checkpoint() is None:
            self.log(f"continual: training the base {base.run_id} again from its record into {base.path}")
        base.make()
        return base.path

    def base_data(self, base: Base) -> Path:
        return Path(RunDir(base.path).read_config()["data"]["dir"])

    def task_data(self, task: Task, base: Base) -> Path:
        """The task's prepared data with the base's tokenizer (one directory per tokenizer and task
        settings)."""
        tok = (base.path / "tokenizer.json").read_bytes()
        key = hashlib.sha256(tok + json.dumps(task.settings(), sort_keys=True).encode()).hexdigest()[:12]
        d = self.work / f"{task.name}-{key}"
        if not (d / "meta.json").is_file():
            self.log(f"continual: preparing the {task.name} task into {d}")
            task.prepare(d, tok)
        return d

    def base_eval(self, base: Base) -> dict[str, Any]:
        """The base's own evaluation (forgetting sets and every task's learning), recorded once."""
        path = self.base_path(base)
        settings = {t.name: t.settings() for t in self.plan.tasks}
        if path.is_file():
            rec = json.loads(path.read_text("utf-8"))
            if rec.get("task_settings") == settings:
                return rec
            self.log(f"continual: {path} was made for other task settings; evaluating the base again")
        run = self.ensure_base(base)
        rec = {"run_id": base.run_id, "kind": base.kind, "task_settings": settings,
               "forgetting": _eval_forgetting(run, self.base_data(base), self.device, ()),
               "learning": {t.name: t.learning(run, self.task_data(t, base), self.device) for t in self.plan.tasks},
               "git_revision": git_revision(), "machine": machine(self.device),
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(finite_json(rec), indent=1) + "\n")
        return rec

    def run_one(self, spec: ContinualSpec, progress: bool = False) -> dict[str, Any]:
        """Finetune (or resume) and evaluate one run, then write its record atomically."""
        with claim(self.work / "claims" / f"{spec.run_id}.claim", spec.run_id):
            if self.record_path(spec).is_file():
                return json.loads(self.record_path(spec).read_text("utf-8"))
            return self._run_one(spec, progress)

    def _run_one(self, spec: ContinualSpec, progress: bool) -> dict[str, Any]:
        torch.set_num_threads(self.threads)
        revision = git_revision()
        base, task = self.plan.base(spec.base), self.plan.task(spec.task)
        before = self.base_eval(base)
        data = self.task_data(task, base)
        out = self.work / spec.run_id
        fixed = self.plan.fixed(spec.method)
        overrides = {"max_steps": self.plan.steps, "batch_size": self.plan.batch, "lr": spec.lr(fixed),
                     "seed": spec.seed, "eval_every": max(self.plan.steps, 1),
                     "ckpt_every": max(self.plan.steps // 4, 1), "keep": 1, "device": str(self.device)}
        resume = RunDir(out).latest_checkpoint() is not None
        if resume:
            from peerlm.runconfig import RunConfig

            run = RunConfig.from_dict(RunDir(out).read_config())
            started_from = run.finetune.get("base")
            if started_from is None or Path(started_from).resolve() != Path(base.path).resolve():
                raise ValueError(f"{out} holds a finetune of the base {started_from}, not of {base.path}; "
                                 f"delete that directory to train {spec.run_id} from {base.run_id}")
            planned = self.planned_settings(spec)
            had = {k: v for k, v in (run.finetune | {"lr": run.train.lr}).items() if k in planned}
            if had != planned:
                raise ValueError(f"{out} holds a finetune with {had}, the plan now has {planned}; delete that "
                                 f"directory to train {spec.run_id} again")
        else:
            fspec, base_config = plan_finetune(base.path, data, out, spec.spec_args(fixed))
            run = finetune_config(fspec, base_config, data, overrides)
        self.log(f"continual: {spec.run_id}: {self.plan.steps} steps{' (resumed)' if resume else ''}")
        t0 = time.time()
        summary = finetune(run, out, resume=resume, progress=progress,
                           log=lambda s: None if s.startswith("step ") else self.log(s))
        seconds = sum(r["dt"] for r in RunDir(out).metric_records() if "dt" in r)
        skip = (task.corpus,) if isinstance(task, DocsTask) else ()
        after = _eval_forgetting(out, self.base_data(base), self.device, skip)
        forgetting = {}
        for name, v in after.items():
            b = before["forgetting"][name]["loss"]
            forgetting[name] = {"before": b, "after": v["loss"], "nats": v["loss"] - b,
                                "pct": 100 * (v["loss"] - b) / b if b else math.nan}
        rec = {"run_id": spec.run_id, "spec": dataclasses.asdict(spec), "base": base.run_id,
               "finetune": run.finetune | {"lr": run.train.lr}, "steps": summary["step"],
               "train_tokens": summary["tokens"], "train_seconds": seconds, "wall_seconds": time.time() - t0,
               "learning": task.learning(out, data, self.device),
               "learning_before": before["learning"][task.name], "forgetting": forgetting,
               "task_settings": task.settings(),
               "git_revision": revision, "machine": machine(self.device), "threads": self.threads,
               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = self.record_path(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(finite_json(rec), indent=1) + "\n")
        val = forgetting.get("val", {}).get("pct", math.nan)
        self.log(f"continual: done {spec.run_id}: forgetting on val {val:+.2f}%")
        return rec

    def run(self, max_runs: int | None = None, progress: bool = False) -> int:
        """Run pending finetunes in plan order (at most ``max_runs``), skipping those another process
        holds; returns how many were run."""
        count, skipped = 0, set()
        while max_runs is None or count < max_runs:
            # planned again after each run: a finished sweep adds its repeats
            spec = next((s for s in self.pending() if s.run_id not in skipped), None)
            if spec is None:
                break
            try:
                self.run_one(spec, progress)
            except RunClaimed as e:
                self.log(f"continual: skipped: {e}")
                skipped.add(spec.run_id)
                continue
            count += 1
        pending = self.pending()
        if not pending:
            self.log("continual: every planned finetune has a record")
        elif count == 0:
            self.log("continual: every pending finetune is being run by another process")
        return count


BASE_BUDGET = 8e12


def isoflop_bases(iso_results: str | os.PathLike[str], iso_work: str | os.PathLike[str] | None = None,
                  device: str = "cpu", threads: int = 1, log: Callable[[str], None] = print) -> tuple[Base, ...]:
    """The isoFLOP study's compute-optimal PEER, PKM and dense models at ``BASE_BUDGET``, as bases;
    ValueError while its ladders are not bracketed."""
    from peerlm.study.isoflop import isoflop_study
    from peerlm.study.runner import train_run

    iso = isoflop_study(iso_results, work=iso_work, threads=threads, log=log, device=device)
    plan = iso.plan
    recs = iso.records()
    ch = plan.choices(recs)
    b0 = BASE_BUDGET
    out = []
    for kind in ("peer", "pkm", "dense"):
        _, best = plan.ladder(b0, kind, recs, ch)
        if best is None:
            raise ValueError(f"the isoFLOP study's {kind} ladder at {b0:.3g} FLOPs is not bracketed yet "
                             f"({iso.runs_dir}); run `peerlm study isoflop` first")
        spec = plan.ladder_spec(b0, kind, best, ch)
        path = iso.work / spec.run_id

        def make(spec=spec, path=path) -> None:
            with claim(iso.work.parent / "claims" / f"{spec.run_id}.claim", spec.run_id):  # as the study does
                train_run(iso.run_config(spec, iso.data_dir()), path, progress=False)

        out.append(Base(kind, spec.run_id, path, make))
    return tuple(out)


def continual_study(results: str | os.PathLike[str], iso_results: str | os.PathLike[str],
                    work: str | os.PathLike[str] | None = None, iso_work: str | os.PathLike[str] | None = None,
                    threads: int = 1, log: Callable[[str], None] = print, device: str = "cpu") -> ContinualRunner:
    """The runner of the study (see the module docstring); ``work`` defaults to
    ``$PEERLM_CACHE/study/continual``."""
    bases = isoflop_bases(iso_results, iso_work, device, threads, log)
    work = work if work is not None else cache_dir() / "study" / "continual"
    return ContinualRunner(ContinualPlan(bases), results, work, threads, log, device)
