"""The retrofit experiment: PEER added to a trained dense transformers model, healed, against more dense training.

Per seed s, four runs of ``peerlm.hf.training`` on one prepared data directory, in this order:

    base_s{s}      a dense Llama-architecture model from its config alone, ``base_flops`` training FLOPs
    dense_s{s}     base_s{s}'s weights trained on, no memory                       ``heal_flops``
    parallel_s{s}  base_s{s}'s weights + PEER beside the middle block's MLP (zero scale at step 0)  ``heal_flops``
    replace_s{s}   base_s{s}'s weights + PEER in place of the middle block's MLP   ``heal_flops``

The three heal runs start from the base's last checkpoint, exported as a transformers directory
(``peerlm export``), on the same data with the same recipe, and spend the same training FLOPs
(``peerlm.hf.flops``: a PEER run takes fewer tokens for them). Each finished run is evaluated on the
validation split and the first ``EVAL_TOKENS`` tokens of every held-out set of the data directory and
leaves a record, ``<results>/runs/<run>.json`` (its settings, steps, tokens, FLOPs, parameters, loss /
perplexity / bits per byte per set, memory usage); ``table.md`` and ``summary.json`` give each arm's
mean perplexity per set and half the range over the seeds.

Choices (``RetrofitPlan``'s defaults): the trunk is the isoFLOP study's scale (vocabulary of the data,
context 128, batch 16 x 128): Llama with d 128, 4 blocks, 4 heads, SwiGLU hidden 344, tied
embeddings; PEER N = 128^2, h 4, k 8, d_key 64, in block 2 (``layers=middle``). Pretraining at LR
3e-3, healing at 1e-3 for every arm (new warmup, 5%, and cosine to 0.1x), PEER tables at 3x and routing
at 0.1x (the demo's recipe), AdamW (0.9, 0.95), weight decay 0.1. ``steps`` (a smoke test) replaces both
budgets by a step count, which is not the comparison.

Resumable: a run with a record is done; a run with a checkpoint resumes from it (exactly); the runs go
one at a time in one process (a second process on the same runs is refused by the run directories'
locks). ``plan_lines`` says what each run is, its command-line equivalent and its state.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import LlamaConfig

from peerlm import __version__
from peerlm.data import TokenDataset
from peerlm.evaluate import evaluate_run
from peerlm.fileio import atomic_write_text
from peerlm.runconfig import TrainConfig
from peerlm.rundir import RunDir

from .adapter import HFModelConfig
from .export import export_run
from .flops import hf_cost
from .memory import CONFIG_KEY, memory_spec
from .training import parse_memory, plan_hf_run, train_hf

__all__ = ["ARMS", "EVAL_TOKENS", "RetrofitPlan", "RetrofitRun", "plan_lines", "run_retrofit", "write_report"]

ARMS = ("dense", "parallel", "replace")
EVAL_TOKENS = 65536
CONTEXT = 128


@dataclasses.dataclass(frozen=True)
class RetrofitRun:
    """One run of the plan: ``arm`` "base" or one of ``ARMS``."""

    arm: str
    seed: int
    memory: tuple[str, ...]
    train: TrainConfig

    @property
    def id(self) -> str:
        return f"{self.arm}_s{self.seed}"


@dataclasses.dataclass
class RetrofitPlan:
    """The experiment's settings (module docstring); ``out`` holds the runs, ``results`` the records."""

    data: Path
    out: Path
    results: Path
    seeds: tuple[int, ...] = (0, 1)
    base_flops: float = 8e12
    heal_flops: float = 2e12
    steps: int | None = None
    dim: int = 128
    layers: int = 4
    heads: int = 4
    hidden: int = 344
    peer: str = "num_experts=128**2:heads=4:topk=8:dim_key=64"
    base_lr: float = 3e-3
    heal_lr: float = 1e-3
    batch_size: int = 16

    def __post_init__(self) -> None:
        self.data, self.out, self.results = Path(self.data), Path(self.out), Path(self.results)
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"--seeds must be distinct seeds, got {list(self.seeds)}")
        if not (self.base_flops > 0 and self.heal_flops > 0):
            raise ValueError("--base-flops and --heal-flops must be > 0")

    # ------------------------------------------------------------------------------------- the runs

    def _train(self, lr: float, seed: int) -> TrainConfig:
        fields: dict[str, Any] = {"lr": lr, "expert_lr_ratio": 3.0, "routing_lr_ratio": 0.1, "weight_decay": 0.1,
                                  "betas": (0.9, 0.95), "warmup_frac": 0.05, "min_lr_ratio": 0.1,
                                  "batch_size": self.batch_size, "seed": seed, "eval_every": 500,
                                  "ckpt_every": 100, "log_every": 10}
        return TrainConfig(**fields)

    def _budget(self, t: TrainConfig, flops: float) -> TrainConfig:
        limit = {"max_steps": self.steps} if self.steps is not None else {"flops": flops}
        return dataclasses.replace(t, **limit)

    def runs(self) -> list[RetrofitRun]:
        """Every run, each seed's base before its heal runs."""
        out = []
        for s in self.seeds:
            out.append(RetrofitRun("base", s, (), self._budget(self._train(self.base_lr, s), self.base_flops)))
            heal = self._budget(self._train(self.heal_lr, s), self.heal_flops)
            for arm in ARMS:
                memory = () if arm == "dense" else (f"peer:layers=middle:mode={arm}:{self.peer}",)
                out.append(RetrofitRun(arm, s, memory, heal))
        return out

    def llama(self) -> LlamaConfig:
        """The base model's transformers config (the data's vocabulary)."""
        return LlamaConfig(vocab_size=TokenDataset(self.data).vocab_size, hidden_size=self.dim,
                           intermediate_size=self.hidden, num_hidden_layers=self.layers,
                           num_attention_heads=self.heads, num_key_value_heads=self.heads,
                           max_position_embeddings=CONTEXT, tie_word_embeddings=True)

    # ---------------------------------------------------------------------------------- the places

    def run_dir(self, r: RetrofitRun) -> Path:
        return self.out / "runs" / r.id

    def record_path(self, r: RetrofitRun) -> Path:
        return self.results / "runs" / f"{r.id}.json"

    @property
    def config_dir(self) -> Path:
        """The base model's config-only transformers directory."""
        return self.out / "base-config"

    def source(self, r: RetrofitRun) -> Path:
        """The transformers directory a run starts from (the base's config, or the base's export)."""
        return self.config_dir if r.arm == "base" else self.out / "exports" / f"base_s{r.seed}"

    def settings(self, r: RetrofitRun) -> dict[str, Any]:
        """What a record must have been made with to count for ``r`` (as JSON)."""
        shape = {k: getattr(self, k) for k in ("dim", "layers", "heads", "hidden")}
        return json.loads(json.dumps({"train": dataclasses.asdict(r.train), "memory": list(r.memory),
                                      "shape": shape}))

    def record(self, r: RetrofitRun) -> dict[str, Any] | None:
        """The record of ``r`` (None: not run yet); ValueError for a record made with other settings."""
        p = self.record_path(r)
        if not p.is_file():
            return None
        try:
            rec = json.loads(p.read_text("utf-8"))
            made = {k: rec[k] for k in ("train", "memory", "shape")}
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{p} is not a valid record; delete it to run {r.id} again") from None
        want = self.settings(r)
        if made != want:
            diff = [f"{sec}.{k}" for sec in ("shape", "train") for k in want[sec]
                    if not isinstance(made[sec], dict) or made[sec].get(k) != want[sec][k]]
            diff += ["memory"] if made["memory"] != want["memory"] else []
            raise ValueError(f"{p} was made with other settings ({', '.join(diff)}); give other --out and "
                             "--results directories for these settings, or the settings of the records")
        return rec

    def flops_per_token(self, r: RetrofitRun) -> float:
        """Training FLOPs per token of the run's model, from the configs alone."""
        config = self.llama()
        for text in r.memory:
            spec = memory_spec(config, **parse_memory(text, self.layers))
            setattr(config, CONFIG_KEY, [*(getattr(config, CONFIG_KEY, None) or []), spec])
        return hf_cost(HFModelConfig(config.to_dict(), CONTEXT))["flops_train"]


def _command(plan: RetrofitPlan, r: RetrofitRun) -> str:
    t = r.train
    argv = ["peerlm", "train", "--hf-model", str(plan.source(r)), "--data", str(plan.data), "--out",
            str(plan.run_dir(r))]
    for m in r.memory:
        argv += ["--add-memory", m]
    argv += ["--max-steps", str(t.max_steps)] if t.max_steps is not None else ["--flops", f"{t.flops:g}"]
    argv += ["--set", f"model.context_length={CONTEXT}"]
    default = dataclasses.asdict(TrainConfig())
    for k, v in dataclasses.asdict(t).items():
        if k not in TrainConfig.LIMITS and v != default[k]:
            argv += ["--set", f"train.{k}={v}"]
    return shlex.join(argv)


def plan_lines(plan: RetrofitPlan) -> list[str]:
    """What each run is, its state, and the `peerlm train` command it amounts to."""
    lines = []
    for r in plan.runs():
        per_token = plan.flops_per_token(r)
        budget = (f"{r.train.max_steps} steps (smoke test)" if r.train.max_steps is not None else
                  f"{r.train.flops:.3g} FLOPs = {r.train.flops / per_token:,.0f} tokens")
        ckpt = RunDir(plan.run_dir(r)).latest_checkpoint()
        try:
            state = ("done (record)" if plan.record(r) is not None else
                     f"resumes from {ckpt.name}" if ckpt is not None else "to do")
        except ValueError as e:
            state = f"refused: {e}"
        lines.append(f"{r.id:<12} {budget}, {per_token:.3g} FLOPs/token: {state}")
        lines.append(f"    {_command(plan, r)}")
    return lines


def _write_base_config(plan: RetrofitPlan) -> None:
    if (plan.config_dir / "config.json").is_file():
        return
    tmp = plan.config_dir.with_name(plan.config_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    plan.llama().save_pretrained(tmp)
    tmp.rename(plan.config_dir)


def _prepare_source(plan: RetrofitPlan, r: RetrofitRun, log: Callable[[str], None]) -> Path:
    if r.arm == "base":
        _write_base_config(plan)
        return plan.config_dir
    src = plan.source(r)
    if not (src / "config.json").is_file():
        base = dataclasses.replace(r, arm="base")
        if not RunDir(plan.run_dir(base)).latest_checkpoint():
            raise ValueError(f"{r.id} starts from {base.id}, which has no checkpoint in {plan.run_dir(base)}; "
                             f"delete {plan.record_path(base)} to train it again")
        src.parent.mkdir(parents=True, exist_ok=True)
        export_run(plan.run_dir(base), src)  # written whole or not at all
        log(f"retrofit: exported {base.id} to {src}")
    return src


def run_retrofit(plan: RetrofitPlan, progress: bool = False, log: Callable[[str], None] | None = None) -> int:
    """Train, evaluate and record every run that has no record yet; returns how many were done now."""
    log = log or (lambda s: print(s, file=sys.stdout, flush=True))
    TokenDataset(plan.data)  # a prepared directory, before any work
    done = 0
    for r in plan.runs():
        if plan.record(r) is not None:
            continue
        src = _prepare_source(plan, r, log)
        run = plan_hf_run(src, plan.data, r.memory, CONTEXT, r.train)
        out = plan.run_dir(r)
        out.parent.mkdir(parents=True, exist_ok=True)
        resume = RunDir(out).latest_checkpoint() is not None
        log(f"retrofit: {r.id} ({'resuming' if resume else 'from ' + str(src)})")
        summary = train_hf(run, out, resume=resume, progress=progress, log=log, verified=True)
        results = evaluate_run(out, plan.data, max_tokens=EVAL_TOKENS, batch_size=plan.batch_size)
        rec = {"run": r.id, "arm": r.arm, "seed": r.seed, **plan.settings(r), "source": str(src),
               "steps": summary["step"], "tokens": summary["tokens"],
               "flops": summary["flops"], "params": hf_cost(run.model)["params"],
               "seconds": summary["seconds"], "peerlm": __version__,
               "eval": {name: {k: res[k] for k in ("loss", "perplexity", "bits_per_byte", "tokens", "usage")
                               if k in res} for name, res in results.items()}}
        plan.record_path(r).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(plan.record_path(r), json.dumps(rec, indent=2) + "\n")
        log(f"retrofit: {r.id} recorded: "
            + ", ".join(f"{n} ppl {v['perplexity']:.2f}" for n, v in rec["eval"].items()))
        done += 1
    write_report(plan)
    return done


def write_report(plan: RetrofitPlan) -> Path:
    """``summary.json`` and ``table.md`` of the records there are: per arm, the mean perplexity of each
    evaluated set over its seeds and half their range."""
    rows: dict[str, list[dict]] = {}
    for r in plan.runs():
        rec = plan.record(r)
        if rec is not None:
            rows.setdefault(r.arm, []).append(rec)
    sets = sorted({s for recs in rows.values() for rec in recs for s in rec["eval"]},
                  key=lambda s: (s != "val", s))
    summary: dict[str, Any] = {}
    for arm, recs in rows.items():
        summary[arm] = {"seeds": [rec["seed"] for rec in recs], "tokens": [rec["tokens"] for rec in recs],
                        "perplexity": {}}
        for s in sets:
            vals = [rec["eval"][s]["perplexity"] for rec in recs if s in rec["eval"]]
            if vals:
                summary[arm]["perplexity"][s] = {"mean": sum(vals) / len(vals),
                                                 "half_range": (max(vals) - min(vals)) / 2, "n": len(vals)}
    budget = (f"smoke test, {plan.steps} steps each" if plan.steps else
              f"base {plan.base_flops:.3g} training FLOPs, each heal arm {plan.heal_flops:.3g}")
    lines = [f"Retrofit (peerlm.hf.retrofit): perplexity per set, mean over seeds +- half the range; {budget}", "",
             "| arm | seeds | " + " | ".join(sets) + " |", "|---|---|" + "---|" * len(sets)]
    for arm in ("base", *ARMS):
        if arm not in summary:
            continue
        cells = []
        for s in sets:
            p = summary[arm]["perplexity"].get(s)
            ok = p is not None and math.isfinite(p["mean"])
            cells.append(f"{p['mean']:.2f} +- {p['half_range']:.2f}" if ok else "")
        lines.append(f"| {arm} | {len(summary[arm]['seeds'])} | " + " | ".join(cells) + " |")
    plan.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(plan.results / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(plan.results / "table.md", "\n".join(lines) + "\n")
    return plan.results / "table.md"
