"""Reports of the isoFLOP study, written from its run records alone (so anyone can redo them).

- ``summary.json``: one record per (budget, method, eval set) of the compute-optimal models, with the
  seed mean and spread (half the range over seeds) of perplexity and bits per byte.
- ``table.md``: the paper's Table 1 layout (rows method x budget, columns held-out sets), each
  method's ratio to dense, the comparison at equal wall time on this machine, the tuning sweeps and
  every run.
- ``isoflop.png``: validation perplexity against parameters (log x; total in the top row, active per
  token in the bottom row), one curve per method, one panel per budget; ``walltime.png``: validation
  perplexity against training seconds, every ladder run; ``trend.png`` (from two budgets on): the
  compute-optimal perplexity against budget with each method's power-law fit, and PEER's ratios to
  dense and PKM measured and extrapolated (``peerlm.study.trend``).

Training seconds at equal wall time come from ``timing.json`` (``Runner.time_steps``: every model's
step timed back to back under one load) when it exists, else from the runs' own step times.

A diverged run (``peerlm.study.records.diverged``) is listed among every run as ``diverged`` and left
out of everything else: it is never a compute-optimal model, a seed of one, a point of a curve or a
run at equal wall time. The plots need matplotlib (the ``study`` extra); without it the tables and
JSON are written and the study's log says how to get the plots.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peerlm.fileio import atomic_write_bytes, atomic_write_text
from peerlm.study.design import METHODS, budget_name
from peerlm.study.records import diverged, spec_of, val_loss
from peerlm.study.reproduce import reproduced_lines
from peerlm.study.runner import machine, timing_key
from peerlm.study.stats import compare, mean_sd
from peerlm.study.trend import paired_means, ratio_at, trend_fits

__all__ = ["compute_optimal", "summary_records", "format_table", "write_report", "train_seconds", "timing_note",
           "save_png", "pyplot", "plots_or_note", "trend_lines", "trend_plot", "PlotsUnavailable", "PLOTS_NEED"]

EVAL_ORDER = ("val", "wiki", "news", "fiction", "web")
HELDOUT = EVAL_ORDER[1:]
HELDOUT_MEAN = "heldout"  # the pseudo-set of the tables: geometric mean perplexity over HELDOUT
TABLE_SETS = EVAL_ORDER + (HELDOUT_MEAN,)
PLOTS_NEED = 'the plots need matplotlib: pip install "peerlm[study]"'


class PlotsUnavailable(ImportError):
    """matplotlib is not installed: the reports are written without their plots."""


def pyplot():
    """matplotlib.pyplot on the file-only Agg backend; ``PlotsUnavailable`` without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise PlotsUnavailable(f"{PLOTS_NEED} ({e})") from None
    return plt


def heldout_loss(rec: dict[str, Any]) -> float | None:
    """Mean loss over the held-out sets (log of their geometric-mean perplexity); None if one is missing.
    Text from corpora the model never trained on, unlike val (which holds tails of training books)."""
    losses = [rec["eval"][n]["loss"] for n in HELDOUT if n in rec["eval"]]
    return statistics.fmean(losses) if len(losses) == len(HELDOUT) else None


def _ladder_runs(recs: dict[str, dict[str, Any]], budget: float, method: str) -> list[dict[str, Any]]:
    """The runs of a (budget, method) on its ladder and the sweeps there, seed 0, diverged ones left out."""
    return [r for r in recs.values() if not diverged(r) and r["spec"]["budget"] == budget
            and r["spec"]["method"] == method and r["spec"]["seed"] == 0 and not r["spec"]["sparse_optimizer"]
            and r["phase"] in ("ladder", "lr", "expert-lr")]


def compute_optimal(plan, recs: dict[str, dict[str, Any]]) -> dict[tuple[float, str], dict[str, Any]]:
    """Of the isoFLOP ``plan``: (budget, method) -> the records of its best ladder size, seed 0 first
    then other seeds, with ``bracketed``: whether that best size has a smaller and a larger run beside it,
    ``decided``: whether the ladder is finished (bracketed, or its best at an end of the size grid, where
    it cannot grow), and ``ladder``: its runs that did not diverge. Diverged runs are in no list; a ladder
    whose runs all diverged has no entry."""
    ch = plan.choices(recs)
    out = {}
    for budget in plan.budgets:
        for method in plan.methods:
            specs, best = plan.ladder(budget, method, recs, ch)
            done = [recs[s.run_id] for s in specs if s.run_id in recs and not diverged(recs[s.run_id])]
            if not done:
                continue
            decided = best is not None
            if not decided:  # ladder unfinished: report the best so far, marked as such
                best = min(done, key=val_loss)["spec"]["size"]
            names = [s.size for s in specs]
            seeds = [r for r in recs.values() if r["spec"]["budget"] == budget and r["spec"]["method"] == method
                     and r["spec"]["size"] == best and not r["spec"]["sparse_optimizer"] and not diverged(r)
                     and r["spec"]["lr_mult"] == ch["lr_mult"]
                     and r["spec"]["expert_ratio"] == ch["expert_ratio"].get(method, 1.0)
                     and not r["spec"].get("overrides") and r["spec"].get("tokens") is None
                     and r["spec"].get("routing_ratio") is None]
            seeds.sort(key=lambda r: r["spec"]["seed"])
            i = names.index(best)
            out[budget, method] = {"size": best, "runs": seeds, "bracketed": 0 < i < len(names) - 1
                                   and all(s.run_id in recs for s in specs), "decided": decided, "ladder": done}
    return out


def _mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and standard deviation over seeds (nan for one seed)."""
    return mean_sd(values)


def _seed_losses(runs: list[dict[str, Any]], eval_set: str) -> dict[int, float]:
    if eval_set == HELDOUT_MEAN:
        return {r["spec"]["seed"]: heldout_loss(r) for r in runs if heldout_loss(r) is not None}
    return {r["spec"]["seed"]: r["eval"][eval_set]["loss"] for r in runs if eval_set in r["eval"]}


def comparison_lines(seeds: dict[tuple[float, str], list[dict[str, Any]]], budgets: tuple[float, ...],
                     methods: tuple[str, ...], subject: str = "peer") -> list[str]:
    """A markdown table of ``subject`` against every other method at each budget, from the records of
    each compute-optimal model's seeds: the perplexity ratio other / subject over their common seeds with
    its paired 95% interval (``peerlm.study.stats``) on val and on the held-out mean, and a verdict word
    (``ahead``: the subject's perplexity is lower) only where the interval excludes 1."""
    lines = [f"| budget | {subject} against | seeds | val: ppl ratio [95% interval] | verdict | "
             "held-out: ppl ratio [95% interval] | verdict |", "|" + "---|" * 7]
    for budget in budgets:
        mine = seeds.get((budget, subject))
        if not mine:
            continue
        for other in methods:
            theirs = seeds.get((budget, other))
            if other == subject or not theirs:
                continue
            cells, common = [], ()
            for eval_set in ("val", HELDOUT_MEAN):
                c = compare(_seed_losses(mine, eval_set), _seed_losses(theirs, eval_set))
                if c is None:
                    cells += ["", ""]
                    continue
                common = c.seeds
                r, lo, hi = c.ratio
                cells += [f"{r:.3f} [{lo:.3f}, {hi:.3f}]" if len(c.seeds) > 1 else f"{r:.3f}", c.verdict]
            lines.append(f"| {budget_name(budget)} | {other} | {len(common)} | " + " | ".join(cells) + " |")
    return lines


def _optimum_val_losses(opt: dict[tuple[float, str], dict[str, Any]], budgets: tuple[float, ...],
                        methods: tuple[str, ...]) -> dict[str, dict[float, dict[int, float]]]:
    """method -> budget -> {seed: val loss} of the seeds of its compute-optimal model."""
    return {m: {b: {r["spec"]["seed"]: r["eval"]["val"]["loss"] for r in opt[b, m]["runs"]} for b in budgets
                if (b, m) in opt} for m in methods}


def trend_lines(opt: dict[tuple[float, str], dict[str, Any]], budgets: tuple[float, ...], methods: tuple[str, ...],
                target: float = 2e19) -> list[str]:
    """The trend section: per method a power law in the compute-optimal val loss against budget
    (``peerlm.study.trend``), its exponent and its extrapolation to ``target``, and PEER's perplexity
    ratio to dense and to PKM measured at each budget and extrapolated; empty below two budgets."""
    seeds = _optimum_val_losses(opt, budgets, methods)
    fits = trend_fits(seeds, target)
    if not fits:
        return []
    lines = [f"Trend (an extrapolation from this study's budgets to {target:.0e} FLOPs, far outside them): "
             "compute-optimal val loss L against budget C fitted as L = a C^-b per method; 95% intervals from "
             "resampling the seeds at each budget (for a ratio, the two methods' common seeds, as pairs; a budget "
             "with one seed adds none of its noise). A power law with no irreducible loss falls without bound, so "
             "the extrapolated perplexities are low; the ratios between methods are the more telling output.", "",
             f"| method | budgets | b | val ppl at {target:.0e} (extrapolated) |", "|---|---|---|---|"]
    for m, f in fits.items():
        lines.append(f"| {m} | {', '.join(budget_name(b) for b in f.budgets)} | {f.b:.4f} "
                     f"[{f.b_interval[0]:.4f}, {f.b_interval[1]:.4f}] | {math.exp(f.loss_at):.2f} "
                     f"[{math.exp(f.loss_interval[0]):.2f}, {math.exp(f.loss_interval[1]):.2f}] |")
    for other in ("dense", "pkm"):
        pairs = paired_means(seeds, "peer", other)
        measured = [f"{budget_name(b)}: {math.exp(x.mean() - y.mean()):.3f} ({len(x)} seeds)"
                    for b, (x, y) in pairs.items()]
        r = ratio_at(seeds, "peer", other, target)
        if measured:
            extra = "" if r is None else (f"; extrapolated to {target:.0e} by both methods' fits over these "
                                          f"budgets only: {r[0]:.3f} [{r[1]:.3f}, {r[2]:.3f}]")
            lines.append(f"\nPEER/{other} perplexity ratio over their common seeds, measured at " + ", ".join(measured)
                         + extra + ".")
    return lines


def summary_records(opt: dict[tuple[float, str], dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for (budget, method), o in sorted(opt.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))):
        first = o["runs"][0] if o["runs"] else min(o["ladder"], key=lambda r: r["eval"]["val"]["loss"])
        for name in EVAL_ORDER:
            runs = [r for r in (o["runs"] or [first]) if name in r["eval"]]
            if not runs:
                continue
            ppl, ppl_spread = _mean_spread([r["eval"][name]["perplexity"] for r in runs])
            bpb, bpb_spread = _mean_spread([r["eval"][name]["bits_per_byte"] for r in runs])
            usage = runs[0]["eval"][name].get("usage", {})
            rows.append({
                "budget": budget, "method": method, "eval_set": name, "perplexity": ppl,
                "perplexity_spread": ppl_spread, "bits_per_byte": bpb, "bits_per_byte_spread": bpb_spread,
                "seeds": [r["spec"]["seed"] for r in runs], "size": o["size"], "bracketed": o["bracketed"],
                "params": first["params"], "active_params": first["active_params"],
                "train_tokens": first["train_tokens"], "epochs": first["epochs"],
                "flops_train_per_token": first["flops_train_per_token"], "train_seconds": first["train_seconds"],
                "eval_tokens": runs[0]["eval"][name]["tokens"],
                "usage": {k: v["usage"] for k, v in usage.items()},
                "unevenness": {k: v["unevenness"] for k, v in usage.items()},
            })
        runs = [r for r in (o["runs"] or [first]) if heldout_loss(r) is not None]
        if runs:
            ppl, ppl_spread = _mean_spread([math.exp(heldout_loss(r)) for r in runs])
            bpb, bpb_spread = _mean_spread([statistics.fmean(r["eval"][n]["bits_per_byte"] for n in HELDOUT)
                                            for r in runs])
            rows.append({**rows[-1], "eval_set": HELDOUT_MEAN, "perplexity": ppl, "perplexity_spread": ppl_spread,
                         "bits_per_byte": bpb, "bits_per_byte_spread": bpb_spread,
                         "seeds": [r["spec"]["seed"] for r in runs],
                         "eval_tokens": sum(runs[0]["eval"][n]["tokens"] for n in HELDOUT),
                         "usage": {}, "unevenness": {}})
    return rows


def _selection_check(opt: dict[tuple[float, str], dict[str, Any]]) -> str:
    """Whether choosing each compute-optimal size by the held-out sets instead of val changes it."""
    moved = []
    for (budget, method), o in sorted(opt.items(), key=lambda kv: (kv[0][0], METHODS.index(kv[0][1]))):
        ladder = [r for r in o["ladder"] if heldout_loss(r) is not None]
        if ladder:
            by_heldout = min(ladder, key=heldout_loss)["spec"]["size"]
            if by_heldout != o["size"]:
                moved.append(f"{method} at {budget_name(budget)}: {by_heldout} instead of {o['size']}")
    return ("Chosen by the held-out sets' mean loss instead of val, every compute-optimal size stays the same."
            if not moved else "Chosen by the held-out sets' mean loss instead of val, sizes change for "
            + "; ".join(moved) + ".")


def _fmt(mean: float, spread: float) -> str:
    return f"{mean:.2f}" if math.isnan(spread) else f"{mean:.2f} ± {spread:.2f}"


def train_seconds(rec: dict[str, Any], timing: dict[str, Any] | None) -> float:
    """A run's training seconds: its steps times the step time of ``timing.json`` (all models timed
    back to back under one load) where that has the model, else the run's own summed step times."""
    per_step = (timing or {}).get("step_seconds", {}).get(timing_key(spec_of(rec)))
    return rec["steps"] * per_step if per_step is not None else rec["train_seconds"]


def timing_note(timing: dict[str, Any] | None, study_name: str = "isoflop") -> str:
    """The sentence that says where a report's training times come from."""
    command = f"`peerlm study {study_name} --time-steps`"
    if timing is None:
        return ("Training time here is each run's own summed step times, measured under whatever else the "
                f"machine ran meanwhile ({command} times every model under one load and replaces them).")
    m = timing["meta"]
    return (f"Training time here is each run's steps times its model's median step time from {command} "
            f"({m['steps']} steps per model, back to back, {m['threads']} thread(s), {m['machine']}, "
            f"{m['date'][:10]}).")


def _equal_wall_time(recs: dict[str, dict[str, Any]], study, timing: dict[str, Any] | None) -> list[str]:
    """For each budget: each method's best validation perplexity among its ladder runs that trained no
    longer than the dense compute-optimal run did (on this machine, at the same thread count)."""
    lines = []
    opt = compute_optimal(study.plan, recs)
    for budget in study.plan.budgets:
        dense = opt.get((budget, "dense"))
        if not dense or not dense["runs"]:
            continue
        limit = train_seconds(dense["runs"][0], timing)
        cells = []
        for method in study.plan.methods:
            pool = [r for b in study.plan.budgets for r in _ladder_runs(recs, b, method)
                    if train_seconds(r, timing) <= limit]
            if pool:
                best = min(pool, key=lambda r: r["eval"]["val"]["loss"])
                cells.append(f"{best['eval']['val']['perplexity']:.2f} ({best['spec']['size']}, "
                             f"{budget_name(best['spec']['budget'])} FLOPs)")
            else:
                cells.append("no run that short")
        lines.append(f"| {limit / 60:.1f} min (dense optimum at {budget_name(budget)}) | " + " | ".join(cells) + " |")
    if not lines:
        return []
    head = "| training time | " + " | ".join(study.plan.methods) + " |"
    return [head, "|" + "---|" * (len(study.plan.methods) + 1), *lines]


def format_table(study, recs: dict[str, dict[str, Any]], command: str) -> str:
    opt = compute_optimal(study.plan, recs)
    rows = summary_records(opt)
    by = {(r["budget"], r["method"], r["eval_set"]): r for r in rows}
    revs = sorted({r["git_revision"] for r in recs.values()})
    lines = ["# isoFLOP study: compute-optimal models at equal training FLOPs", "",
             f"Command: `{command}`  ", f"Report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on "
             f"{machine()}; runs at git revisions {', '.join(revs)}; {len(recs)} run records.", "",
             "Perplexity (per token of the study's 1024-token BPE) of each method's compute-optimal model on the "
             "whole validation split and on the first 65,536 tokens of each held-out set; `heldout` is their "
             "geometric mean. ± is the standard deviation over seeds (where a second seed has finished). A size marked "
             "* has no smaller or no larger run beside it (its ladder is unfinished, or reached an end of the size "
             "grid). Sizes, the LR multiplier and the table LR "
             "ratios are chosen on val, which is in-distribution (part of it is the last pages of the training "
             "books); the held-out sets are other corpora. " + _selection_check(opt), "",
             "Conventions: FLOPs from `peerlm.flops` (a multiply-add is 2 FLOPs; attention is charged the full "
             "context of 128 positions per token; the output head's 2 D V is counted, embedding lookups are "
             "free; training = 3 x forward, except PEER/PKM sub-key scoring, which runs without autograd and is "
             "charged once, its k-winner re-scoring 3 x). Every PEER and PKM table is trained by torch's dense "
             "AdamW, as the trunk is, except in runs named `sparse` (the row-sparse, lazy AdamW), at their own "
             "swept LR ratio and without weight decay; MoE experts train like the trunk (its LR, weight decay "
             "0.1). Training seconds are the sum of step times at one CPU thread; validation and checkpoints "
             "are excluded.", "",
             "| model (budget) | size | params | tokens (epochs) | " + " | ".join(TABLE_SETS) + " |",
             "|" + "---|" * (4 + len(TABLE_SETS))]
    for budget in study.plan.budgets:
        for method in study.plan.methods:
            r = by.get((budget, method, "val"))
            if r is None:
                continue
            cells = [_fmt(by[budget, method, n]["perplexity"], by[budget, method, n]["perplexity_spread"])
                     if (budget, method, n) in by else "" for n in TABLE_SETS]
            mark = "" if r["bracketed"] else "*"
            lines.append(f"| {method} ({budget_name(budget)}) | {r['size']}{mark} | {r['params'] / 1e6:.2f}M | "
                         f"{r['train_tokens'] / 1e6:.2f}M ({r['epochs']:.2f}) | " + " | ".join(cells) + " |")
    lines += ["", "Ratio of perplexity to dense's at the same budget (the paper: PEER/dense 0.87 at 6e18, 0.90 at "
              "2e19 on C4):", "", "| method (budget) | " + " | ".join(TABLE_SETS) + " |",
              "|" + "---|" * (1 + len(TABLE_SETS))]
    for budget in study.plan.budgets:
        for method in study.plan.methods:
            if method == "dense" or (budget, method, "val") not in by:
                continue
            cells = [f"{by[budget, method, n]['perplexity'] / by[budget, 'dense', n]['perplexity']:.3f}"
                     if (budget, method, n) in by and (budget, "dense", n) in by else "" for n in TABLE_SETS]
            lines.append(f"| {method} ({budget_name(budget)}) | " + " | ".join(cells) + " |")
    lines += ["", "PEER against each baseline, seed by seed (the same seed is the same data order; ratio > 1: PEER's "
              "perplexity is lower; 95% interval of the paired mean difference in loss, Student's t; ahead or "
              "behind only where the interval excludes 1, tie where it holds 1, no word from one seed):", "",
              *comparison_lines({k: o["runs"] for k, o in opt.items()}, study.plan.budgets, study.plan.methods)]
    trend = trend_lines(opt, study.plan.budgets, study.plan.methods)
    if trend:
        lines += ["", *trend]
    timing = study.timing()
    wall = _equal_wall_time(recs, study, timing)
    if wall:
        lines += ["", "At equal training time on this machine (1 thread): best validation perplexity of any "
                  "ladder run that trained no longer than dense's compute-optimal run. "
                  + timing_note(timing), "", *wall]
    gone = sorted(r["run_id"] for r in recs.values() if diverged(r))
    lines += ["", "## Every run", ""]
    if gone:
        lines += [f"{len(gone)} run(s) diverged (a NaN or inf loss; val ppl `diverged`, tokens and time as far as it "
                  "trained): they count as worse than any other run of their sweep or ladder and "
                  "are left out of every table and plot above: " + ", ".join(gone) + ".", ""]
    lines += ["| phase | run | params | active | train FLOPs/token | tokens | epochs | val ppl | usage (unevenness) "
              "| train min | tokens/s |", "|" + "---|" * 11]
    for r in sorted(recs.values(), key=lambda r: (r["spec"]["budget"], METHODS.index(r["spec"]["method"]),
                                                 r["params"], r["run_id"])):
        bad = diverged(r)
        usage = "" if bad else ", ".join(f"{u['usage']:.1%} ({u['unevenness']:.2f})"
                                         for u in r["eval"]["val"].get("usage", {}).values())
        lines.append(f"| {r['phase']} | {r['run_id']} | {r['params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.3f}M | "
                     f"{r['flops_train_per_token'] / 1e6:.2f}M | {r['train_tokens'] / 1e6:.2f}M | {r['epochs']:.2f} | "
                     f"{'diverged' if bad else format(r['eval']['val']['perplexity'], '.2f')} | {usage} | "
                     f"{r['train_seconds'] / 60:.1f} | {r['tokens_per_second']:,.0f} |")
    return "\n".join(lines + reproduced_lines(study.results)) + "\n"


def _plots(study, recs: dict[str, dict[str, Any]], out: Path) -> list[Path]:
    plt = pyplot()
    written = []
    ch = study.plan.choices(recs)
    # top row: total parameters (the paper's axis); bottom row: parameters used per token, where the
    # memory methods' curves sit on the same trunks as dense and MoE
    axis = (("params", "parameters (total)"), ("active_params", "parameters active per token"))
    budgets = study.plan.budgets
    fig, axes = plt.subplots(len(axis), len(budgets), figsize=(5.5 * len(budgets), 4.0 * len(axis)), squeeze=False)
    for row, (key, label) in enumerate(axis):
        for ax, budget in zip(axes[row], study.plan.budgets):
            for method in study.plan.methods:
                runs = sorted(_ladder_runs(recs, budget, method), key=lambda r: r[key])
                runs = [r for r in runs if r["spec"]["lr_mult"] == ch["lr_mult"]
                        and r["spec"]["expert_ratio"] == ch["expert_ratio"].get(method, 1.0)]
                if runs:
                    ax.plot([r[key] for r in runs], [r["eval"]["val"]["perplexity"] for r in runs], "o-",
                            label=method)
            if not ax.lines:
                ax.text(0.5, 0.5, "no finished runs yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("validation perplexity")
            ax.set_title(f"{budget_name(budget)} training FLOPs")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend()
    fig.tight_layout()
    written.append(save_png(fig, out / "isoflop.png"))
    fig, ax = plt.subplots(figsize=(6, 4.2))
    timing = study.timing()
    for method in study.plan.methods:
        runs = [r for b in study.plan.budgets for r in _ladder_runs(recs, b, method)]
        if runs:
            ax.scatter([train_seconds(r, timing) / 60 for r in runs], [r["eval"]["val"]["perplexity"] for r in runs],
                       label=method, s=18)
    ax.set_xscale("log")
    ax.set_xlabel("training minutes on this machine (1 thread" + (", timed together)" if timing else ")"))
    ax.set_ylabel("validation perplexity")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    written.append(save_png(fig, out / "walltime.png"))
    trend = trend_plot(compute_optimal(study.plan, recs), study.plan.budgets, study.plan.methods, out)
    if trend is not None:
        written.append(trend)
    plt.close("all")
    return written


# the paper's PEER/dense perplexity ratios on C4 (its Table 1), drawn for reference
PAPER_PEER_DENSE = ((6e18, 0.87), (2e19, 0.90))


def trend_plot(opt: dict[tuple[float, str], dict[str, Any]], budgets: tuple[float, ...], methods: tuple[str, ...],
               out: Path, target: float = 2e19) -> Path | None:
    """``trend.png`` (None below two budgets): left, each method's compute-optimal val perplexity
    against budget (seed mean, error bar one standard deviation) with its power-law fit over the
    measured range; right, PEER's perplexity ratio to dense and to PKM, measured at each budget and
    as the two fits give it out to ``target``, where the extrapolation and its 95% interval are marked."""
    seeds = _optimum_val_losses(opt, budgets, methods)
    fits = trend_fits(seeds, target)
    if not fits:
        return None
    import numpy as np
    from matplotlib.ticker import FuncFormatter, NullFormatter

    from peerlm.study.trend import fit_power_law

    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11.5, 4.4))
    for m in fits:
        bs = sorted(b for b, v in seeds[m].items() if v)
        means = [statistics.fmean(seeds[m][b].values()) for b in bs]
        sds = [statistics.stdev(seeds[m][b].values()) if len(seeds[m][b]) > 1 else 0.0 for b in bs]
        ppl = [math.exp(x) for x in means]
        err = [[p - math.exp(x - d) for p, x, d in zip(ppl, means, sds)],
               [math.exp(x + d) - p for p, x, d in zip(ppl, means, sds)]]
        (line,) = left.plot(bs, ppl, "o", label=f"{m} (b = {fits[m].b:.3f})")
        left.errorbar(bs, ppl, yerr=err, fmt="none", color=line.get_color(), capsize=3)
        grid = np.geomspace(bs[0] / 1.5, bs[-1] * 1.5, 50)
        left.plot(grid, np.exp(np.exp(fits[m].log_a - fits[m].b * np.log(grid))), "-", color=line.get_color(),
                  alpha=0.6)
    left.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel="compute-optimal val perplexity",
             title="measured, with the power-law fits")
    measured = sorted({b for f in fits.values() for b in f.budgets})
    left.set_xticks(measured, [budget_name(b) for b in measured])  # the budgets, not crowded log-minor labels
    left.xaxis.set_minor_formatter(NullFormatter())
    for fmt in (left.yaxis.set_major_formatter, left.yaxis.set_minor_formatter):
        fmt(FuncFormatter(lambda v, _: f"{v:g}"))  # perplexities as numbers, not powers of ten
    left.grid(True, which="both", alpha=0.3)
    left.legend(fontsize=8)
    for other in ("dense", "pkm"):
        pairs = paired_means(seeds, "peer", other)  # over their common seeds, as ratio_at
        if not pairs:
            continue
        common = sorted(pairs)
        measured = [math.exp(pairs[c][0].mean() - pairs[c][1].mean()) for c in common]
        (line,) = right.plot(common, measured, "o", label=f"PEER/{other}, measured")
        r = ratio_at(seeds, "peer", other, target)
        if r is not None:
            fa = fit_power_law(common, [float(pairs[c][0].mean()) for c in common])
            fb = fit_power_law(common, [float(pairs[c][1].mean()) for c in common])
            grid = np.geomspace(common[0], target, 80)
            loss_a, loss_b = (np.exp(f[0] - f[1] * np.log(grid)) for f in (fa, fb))  # L = a C^-b
            right.plot(grid, np.exp(loss_a - loss_b), "--", color=line.get_color(), alpha=0.7,
                       label=f"PEER/{other}, fits over {', '.join(budget_name(c) for c in common)} (extrapolated)")
            right.errorbar([target], [r[0]], yerr=[[r[0] - r[1]], [r[2] - r[0]]], fmt="s", color=line.get_color(),
                           capsize=4)
    right.plot(*zip(*PAPER_PEER_DENSE), "kx", label="PEER/dense, the paper (C4)")
    right.axhline(1.0, color="grey", lw=0.8)
    right.set(xscale="log", xlabel="training FLOPs", ylabel="perplexity ratio",
              title=f"PEER's ratios, extrapolated to {target:.0e} (95% interval)")
    right.grid(True, which="both", alpha=0.3)
    right.legend(fontsize=8)
    fig.tight_layout()
    path = save_png(fig, out / "trend.png")
    plt.close(fig)
    return path


def save_png(fig, path: Path) -> Path:
    """Write a figure as PNG, atomically and without the version stamp (same plot, same bytes)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, metadata={"Software": None})
    atomic_write_bytes(path, buf.getvalue())
    return path


def write_report(study, command: str | None = None) -> list[Path]:
    """Write summary.json, table.md and the plots under the study's results directory (without
    matplotlib: the tables and JSON, and a line in the study's log that says how to get the plots)."""
    recs = study.records()
    if not recs:
        raise ValueError(f"{study.runs_dir} holds no run records yet; run `peerlm study isoflop` first")
    command = command or "peerlm " + " ".join(sys.argv[1:])
    out = study.results
    rows = summary_records(compute_optimal(study.plan, recs))
    meta = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runs": len(recs), "git_revisions": sorted({r["git_revision"] for r in recs.values()}),
            "machine": sorted({r["machine"] for r in recs.values()}),
            "timing": (study.timing() or {}).get("meta")}
    atomic_write_text(out / "summary.json", json.dumps({"meta": meta, "records": rows}, indent=1) + "\n")
    atomic_write_text(out / "table.md", format_table(study, recs, command))
    return [out / "summary.json", out / "table.md", *plots_or_note(study, lambda: _plots(study, recs, out))]


def plots_or_note(study, plot) -> list[Path]:
    """The paths ``plot()`` writes, or none and a line in ``study``'s log when matplotlib is missing."""
    try:
        return plot()
    except PlotsUnavailable:
        study.log(f"study: wrote the tables and JSON but no plots: {PLOTS_NEED}")
        return []

