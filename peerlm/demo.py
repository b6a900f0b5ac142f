"""`peerlm demo`: a dense transformer and a PEER transformer at the same training FLOP budget, on CPU.

Steps, each reused when a previous run already did it (rerunning is cheap; a killed run resumes):
1. fetch ``gutenberg`` (training text) and the four held-out sets ``wiki``, ``news``, ``fiction``,
   ``web`` through ``peerlm.data`` (cached), and prepare them with a 4096-token BPE;
2. train ``dense-small`` and ``peer-small`` (the same 4-block trunk; PEER with N = 128^2, h = 8,
   k = 16 in the middle block in place of its MLP) for one budget of training FLOPs
   (``peerlm.flops``, 3 x forward, retrieval counted), with the isoFLOP study's recipe
   (``peerlm.study.design.recipe``: the width rule's peak LR times the study's chosen multiplier,
   AdamW (0.9, 0.95), warmup 5%, cosine to 10%; PEER's tables at the study's chosen LR ratio and its
   routing at 0.1x, every table trained by the same dense AdamW as the trunk);
3. evaluate both on the val split and the first ``EVAL_TOKENS`` tokens of each held-out set, and print
   perplexity and bits per byte side by side, with PEER's expert usage.

The two runs are the demo's plan (``plan``: ``DemoRun`` specs, each a preset and the shared recipe),
trained, timed and counted in steps by the study runner's own functions (``peerlm.study.runner``).
The default budget is fixed (comparable across machines) and takes about 4-5 minutes per model on
2 CPU cores; ``minutes`` instead times a few steps of each model and sizes the budget so the whole
demo takes about that long here. The two presets cost almost the same FLOPs per token, so they see
almost the same number of tokens; PEER steps are slower in wall time on CPU (gathers, not matmuls).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerlm.checkpoint import checkpoint_step
from peerlm.config import ModelConfig, apply_overrides, get_preset, to_dict
from peerlm.data import EVAL_CORPORA, Corpus, DataError, prepare
from peerlm.evaluate import evaluate_run
from peerlm.fileio import atomic_write_text
from peerlm.flops import model_cost
from peerlm.runconfig import RunConfig, TrainConfig, data_info, plan_steps
from peerlm.rundir import RunDir
from peerlm.study.design import Size
from peerlm.study.design import recipe as study_recipe
from peerlm.study.runner import steps_of, time_models, train_run

__all__ = ["run_demo", "plan", "DemoRun", "DEFAULT_FLOPS", "PRESETS"]

PRESETS = ("dense-small", "peer-small")
VOCAB = 4096
DEFAULT_FLOPS = 2.5e13  # ~0.9M training tokens each at ~28 MFLOPs per token
EVAL_TOKENS = 32768
OVERHEAD_S = 75.0  # preparing (cached after the first run) and evaluating, outside the budget
RATE_FLOPS = 1e3 * DEFAULT_FLOPS  # calibration: a budget large enough that whole steps do not bias s/FLOP


# the isoFLOP study's choices (results/isoflop: the dense LR sweep, PEER's table-LR sweep)
STUDY_LR_MULT = 2.0
STUDY_TABLE_LR_RATIO = 3.0


def recipe(preset: str, flops: float) -> TrainConfig:
    """The isoFLOP study's recipe for ``preset`` at ``flops`` (see the module docstring), with the
    demo's batch (8 sequences of the presets' 256 tokens: the study's 2048 tokens a step) and its
    evaluation, checkpoint and log cadence."""
    cfg = _model(preset)
    memory = preset.startswith("peer")
    t = study_recipe("peer" if memory else "dense", Size(preset, cfg.n_layers, cfg.dim), flops, STUDY_LR_MULT,
                     STUDY_TABLE_LR_RATIO if memory else 1.0, seed=0)
    return dataclasses.replace(t, batch_size=8, eval_every=100, eval_batches=4, ckpt_every=50, keep=1, log_every=10)


def _model(preset: str) -> ModelConfig:
    return apply_overrides(get_preset(preset), [f"vocab_size={VOCAB}"])


@dataclass(frozen=True)
class DemoRun:
    """One run of the demo: ``preset`` trained for ``flops`` with the shared recipe."""

    preset: str
    flops: float
    phase: str = "demo"

    @property
    def run_id(self) -> str:
        return f"{self.preset}_{self.flops:.2g}"

    def model(self) -> ModelConfig:
        return _model(self.preset)

    def train(self) -> TrainConfig:
        return recipe(self.preset, self.flops)


def plan(flops: float) -> list[DemoRun]:
    """The demo's runs: each preset at the same budget, in the order they train and are compared."""
    return [DemoRun(p, flops) for p in PRESETS]


def prepare_data(out: Path, progress: bool) -> Path:
    data = out / "data"
    if (data / "meta.json").is_file():
        print(f"demo: reusing prepared data in {data}")
        return data
    print(f"demo: fetching and preparing gutenberg + {', '.join(EVAL_CORPORA)} into {data}")
    try:
        prepare([Corpus("gutenberg")], data, vocab_size=VOCAB, eval_sets=list(EVAL_CORPORA),
                progress=progress)
    except DataError as e:
        raise DataError(f"{e} (the demo needs the corpora once; afterwards they are cached)") from None
    return data


def calibrate(minutes: float) -> float:
    """A FLOP budget that fits both runs in ``minutes`` here, from timing 3 steps of each model (after
    one untimed step): the seconds both runs take per FLOP of budget are their steps at a large
    budget (``peerlm.runconfig.plan_steps``) times their step times, over that budget."""
    runs = plan(RATE_FLOPS)
    per_step = time_models(((r.preset, r.model(), r.train()) for r in runs), steps=3)
    seconds_per_flop = sum(steps_of(r.model(), r.train()) * per_step[r.preset] for r in runs) / RATE_FLOPS
    budget = max(minutes * 60 - OVERHEAD_S, 30.0) / seconds_per_flop
    return float(f"{budget:.2g}")


def _finished(run_dir: Path) -> bool:
    rd = RunDir(run_dir)
    ckpt = rd.latest_checkpoint()
    if ckpt is None:
        return False
    return checkpoint_step(ckpt) >= plan_steps(RunConfig.from_dict(rd.read_config()))[0]


def _train_one(spec: DemoRun, data: Path, out: Path, progress: bool) -> dict[str, Any]:
    run_dir = out / "runs" / spec.run_id
    run = RunConfig(spec.model(), spec.train(), data_info(data))
    summary_file = run_dir / "summary.json"
    if _finished(run_dir) and summary_file.is_file():
        print(f"demo: reusing finished run {run_dir}")
        return json.loads(summary_file.read_text("utf-8"))
    steps, _ = plan_steps(run)
    print(f"\ndemo: training {spec.preset} for {steps} steps ({spec.flops:.3g} FLOPs) -> {run_dir}")
    summary, seconds = train_run(run, run_dir, progress)
    summary = {k: v for k, v in summary.items() if k != "validations"}
    summary["train_seconds"] = seconds
    summary["run_dir"] = str(run_dir)
    atomic_write_text(summary_file, json.dumps(summary, indent=2) + "\n")
    return summary


def _evaluate(summary: dict[str, Any], progress: bool) -> dict[str, Any]:
    run_dir = Path(summary["run_dir"])
    cached = run_dir / "eval.json"
    if cached.is_file():
        return json.loads(cached.read_text("utf-8"))
    print(f"demo: evaluating {run_dir.name} on val + {', '.join(EVAL_CORPORA)} ({EVAL_TOKENS:,} tokens each)")
    results = evaluate_run(run_dir, max_tokens=EVAL_TOKENS, progress=progress)
    atomic_write_text(cached, json.dumps(results, indent=2) + "\n")
    return results


def format_comparison(flops: float, summaries: dict[str, dict], results: dict[str, dict]) -> str:
    """The side-by-side table: per held-out set, perplexity and bits/byte of each model."""
    a, b = PRESETS
    lines = [f"Dense vs PEER at the same training budget: {flops:.3g} FLOPs (gutenberg, BPE {VOCAB})", ""]
    head = f"{'':<12}{a:>22}{b:>22}"
    lines += [head, f"{'':<12}{'ppl':>11}{'bits/byte':>11}{'ppl':>11}{'bits/byte':>11}{'d bits/byte':>13}"]
    lines.append("-" * len(lines[-1]))
    for name in results[a]:
        ra, rb = results[a][name], results[b].get(name)
        if rb is None:
            continue
        lines.append(f"{name:<12}{ra['perplexity']:>11.2f}{ra['bits_per_byte']:>11.4f}{rb['perplexity']:>11.2f}"
                     f"{rb['bits_per_byte']:>11.4f}{rb['bits_per_byte'] - ra['bits_per_byte']:>+13.4f}")
    lines.append("")
    for preset in PRESETS:
        cfg, s = _model(preset), summaries[preset]
        c = model_cost(cfg)
        lines.append(f"{preset:<12} params {c['params'] / 1e6:5.2f}M  active "
                     f"{c['active_params'] / 1e6:5.2f}M  train FLOPs/token {c['flops_train'] / 1e6:5.1f}M  "
                     f"{s['tokens']:,} tokens in "
                     f"{s['step']} steps, {s['train_seconds'] / 60:.1f} min")
    usage = results[b].get("val", {}).get("usage", {})
    experts = _model(b).ffn.num_experts
    for layer, u in usage.items():
        lines.append(f"{b} {layer}: expert usage {u['usage']:.1%}, unevenness {u['unevenness']:.2f} on val "
                     f"(KL from uniform; log N = {math.log(experts):.2f})")
    return "\n".join(lines)


def run_demo(out: Path, minutes: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Run (or finish, or reuse) the demo under ``out`` and print the comparison; returns the results."""
    start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    data = prepare_data(out, progress)
    flops = DEFAULT_FLOPS if minutes is None else calibrate(minutes)
    if minutes is not None:
        print(f"demo: budget {flops:.3g} FLOPs per model to fit about {minutes:g} minutes")
    summaries = {r.preset: _train_one(r, data, out, progress) for r in plan(flops)}
    results = {p: _evaluate(summaries[p], progress) for p in PRESETS}
    table = format_comparison(flops, summaries, results)
    atomic_write_text(out / "comparison.txt", table + "\n")
    print("\n" + table)
    print(f"\ndemo: done in {(time.time() - start) / 60:.1f} min; table in {out / 'comparison.txt'}; try "
          f"`peerlm generate {summaries[PRESETS[1]]['run_dir']} --prompt 'It is a truth' --temperature 0.8`",
          file=sys.stdout)
    return {"flops": flops, "summaries": summaries, "results": results,
            "models": {p: to_dict(_model(p)) for p in PRESETS}}
