"""The tuned table's report: ``results/isoflop-tuned/{summary.json, table.md, isoflop-tuned.png,
trend.png}``.

Per (budget, method): the tuned optimum's settings, how many tuning runs it took, val and held-out
perplexity over its seeds (mean and standard deviation), the ratio to the paper-settings optimum of the
same method, and PEER against each baseline with paired 95% intervals (``report.comparison_lines``);
from two budgets on, the trend of the tuned optima as the first table's report gives it for its own
(``report.trend_lines``, ``report.trend_plot``).
"""

from __future__ import annotations

import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peerlm.fileio import atomic_write_text
from peerlm.study.design import ROUTING_LR_RATIO, SIZES, RunSpec, budget_name
from peerlm.study.records import diverged
from peerlm.study.report import (
    HELDOUT_MEAN,
    comparison_lines,
    compute_optimal,
    heldout_loss,
    mean_sd,
    plots_or_note,
    pyplot,
    save_png,
    trend_lines,
    trend_plot,
)
from peerlm.study.reproduce import reproduced_lines
from peerlm.study.runner import machine
from peerlm.study.tuned import grid_ends

__all__ = ["settings", "tuned_ladder", "tuned_rows", "write_tuned_report"]


def settings(spec: RunSpec) -> str:
    """A run's tuned settings in words (what differs from the recipe is named)."""
    parts = [f"LR x{spec.lr_mult:g}"]
    if spec.method in ("peer", "pkm"):
        ffn = spec.model().ffn
        parts += [f"tables x{spec.expert_ratio:g}", f"h {ffn.heads} k {ffn.topk}",
                  f"routing x{ROUTING_LR_RATIO if spec.routing_ratio is None else spec.routing_ratio:g}",
                  f"{ffn.query_norm}", f"block {spec.model().sparse_blocks()[0]}"]
    elif spec.method == "moe-fine":
        ffn = spec.model().ffn
        parts.append(f"{ffn.num_experts} experts of {ffn.expert_hidden}, top {ffn.topk}")
    return ", ".join(parts)


def _stats(runs: list[dict[str, Any]], eval_set: str) -> tuple[float, float] | None:
    losses = [heldout_loss(r) if eval_set == HELDOUT_MEAN else r["eval"].get(eval_set, {}).get("loss") for r in runs]
    ppl = [math.exp(x) for x in losses if x is not None]
    return mean_sd(ppl) if ppl else None


def tuned_rows(study, optima: dict[tuple[float, str], dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per decided (budget, method) of the tuned table (``optima``: ``TunedPlan.optima``)."""
    paper = compute_optimal(study.plan.paper, study.plan.paper_records())
    rows = []
    for (budget, method), o in optima.items():
        runs = [r for r in o["runs"] if not diverged(r)]
        if not runs:
            continue
        row = {"budget": budget, "method": method, "size": o["spec"].size, "run_id": o["spec"].run_id,
               "settings": settings(o["spec"]), "tuning_runs": o["tuning_runs"],
               "seeds": [r["spec"]["seed"] for r in runs], "params": runs[0]["params"],
               "train_tokens": runs[0]["train_tokens"]}
        for name in ("val", HELDOUT_MEAN):
            st = _stats(runs, name)
            row[name] = None if st is None else {"perplexity": st[0], "sd": st[1]}
        base = paper.get((budget, method))
        base_st = _stats(base["runs"], "val") if base and base["runs"] else None
        row["paper_val_perplexity"] = None if base_st is None else base_st[0]
        rows.append(row)
    return rows


def _fmt(st: dict[str, float] | None) -> str:
    if st is None:
        return ""
    return f"{st['perplexity']:.2f}" + ("" if math.isnan(st["sd"]) else f" ± {st['sd']:.2f}")


def _seeded(optima: dict[tuple[float, str], dict[str, Any]], seeds: int) -> dict[tuple[float, str], dict[str, Any]]:
    """The optima whose ``seeds`` seeds all have a record (a row still gathering its seeds would enter the
    fit as a point without its noise), with those that did not diverge, in the form the trend reads."""
    return {k: {"runs": [r for r in o["runs"] if not diverged(r)]} for k, o in optima.items()
            if len(o["runs"]) >= seeds}


def format_tuned_table(study, recs: dict[str, dict[str, Any]], optima: dict[tuple[float, str], dict[str, Any]],
                       rows: list[dict[str, Any]], command: str) -> str:
    revs = sorted({r["git_revision"] for r in recs.values()})
    lines = ["# isoFLOP study, tuned per method: compute-optimal models at equal training FLOPs", "",
             f"Command: `{command}`  ", f"Report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on "
             f"{machine()}; runs at git revisions {', '.join(revs)}.", "",
             "Every method tuned by one protocol (`peerlm/study/tuned.py`): the knobs swept one after the other "
             "at its paper-settings optimum, then the size re-laddered with the LR swept at each size; ± is the "
             "standard deviation over seeds. `vs paper` is the paper-settings optimum's val perplexity over this "
             "one's (> 1: tuning helped). `tuning runs` counts every distinct run the protocol used before the "
             "seeds, the first table's runs it read included.", "",
             "| model (budget) | size | settings | tuning runs | seeds | val ppl | held-out ppl | vs paper |",
             "|" + "---|" * 8]
    for r in rows:
        gain = (f"{r['paper_val_perplexity'] / r['val']['perplexity']:.3f}"
                if r["paper_val_perplexity"] and r["val"] else "")
        lines.append(f"| {r['method']} ({budget_name(r['budget'])}) | {r['size']} | {r['settings']} | "
                     f"{r['tuning_runs']} | {len(r['seeds'])} | {_fmt(r['val'])} | {_fmt(r[HELDOUT_MEAN])} | {gain} |")
    at_ends = {(r["budget"], r["method"]): [e for e in grid_ends(optima[r["budget"], r["method"]]["spec"])
                                            # at a carried budget only the LR and the size were swept
                                            if r["budget"] in study.plan.tuned_budgets
                                            or e.startswith(("lr ", "size "))]
               for r in rows}
    ends = [f"{m} ({budget_name(b)}): {', '.join(e)}" for (b, m), e in at_ends.items() if e]
    if ends:
        lines += ["", "Chosen at an end of its sweep's grid, so not bracketed (the best may lie beyond): "
                      + "; ".join(ends) + "."]
    tuned = study.plan.tuned_budgets
    carried = [b for b in study.plan.report_budgets if b > max(tuned) and any(r["budget"] == b for r in rows)]
    if carried:
        lines += ["", f"At {', '.join(budget_name(b) for b in carried)} the knobs but the LR are carried from "
                      f"the {budget_name(max(tuned))} tuned optimum, not swept there (see the protocol); the LR and "
                      "the size are tuned there as everywhere."]
    missing = [f"{m} ({budget_name(b)})" for b in study.plan.report_budgets for m in study.plan.methods
               if not any((r["budget"], r["method"]) == (b, m) for r in rows)]
    if missing:
        lines += ["", f"Still being tuned, no row yet: {', '.join(missing)} (`peerlm study isoflop-tuned --plan`)."]
    seeds = {(b, m): [r for r in o["runs"] if not diverged(r)] for (b, m), o in optima.items()}
    comparisons = comparison_lines(seeds, study.plan.report_budgets, study.plan.methods)
    lines += ["", "PEER against each baseline, seed by seed (ratio > 1: PEER's perplexity is lower; paired 95% "
              "interval, Student's t; ahead or behind only where the interval excludes 1, tie where it holds 1, no "
              "word from one seed):", "",
              *(comparisons if len(comparisons) > 2 else ["None yet: no budget has PEER's tuned optimum and its "
                                                          "seeds."])]
    trend = trend_lines(_seeded(optima, study.plan.seeds), study.plan.report_budgets, study.plan.methods)
    if trend:  # each method over the budgets where its row has all its seeds (the `budgets` column)
        lines += ["", f"The trend of the tuned rows that have all {study.plan.seeds} seeds; a method's fit uses the "
                      "budgets it has such a row at.", "", *trend]
    lines += reproduced_lines(study.results)
    return "\n".join(lines) + "\n"


def tuned_ladder(study, recs: dict[str, dict[str, Any]], optimum: dict[str, Any]) -> list[dict[str, Any]]:
    """The records of a tuned optimum's size ladder, smallest trunk first: at each size, the best-LR run
    among those the re-ladder planned (``optimum["ladder"]``), so that every method's curve shows the
    trunks its own protocol tried and no first-table run it did not."""
    best: dict[str, dict[str, Any]] = {}
    for run_id in optimum["ladder"]:
        r = recs.get(run_id)
        if r is None or diverged(r):
            continue
        s = r["spec"]
        if s["size"] not in best or r["eval"]["val"]["loss"] < best[s["size"]]["eval"]["val"]["loss"]:
            best[s["size"]] = r
    names = [s.name for s in SIZES]
    return sorted(best.values(), key=lambda r: names.index(r["spec"]["size"]))


def _plot(study, recs: dict[str, dict[str, Any]], optima: dict[tuple[float, str], dict[str, Any]],
          out: Path) -> list[Path]:
    plt = pyplot()
    budgets = study.plan.report_budgets
    fig, axes = plt.subplots(1, len(budgets), figsize=(5.5 * len(budgets), 4.0), squeeze=False)
    for ax, budget in zip(axes[0], budgets):
        for method in study.plan.methods:
            o = optima.get((budget, method))
            if o is None:
                continue
            pts = tuned_ladder(study, recs, o)
            ax.plot([r["params"] for r in pts], [r["eval"]["val"]["perplexity"] for r in pts], "o-", label=method)
        if not ax.lines:
            ax.text(0.5, 0.5, "no tuned optimum yet", ha="center", va="center", transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.set_xscale("log")
        ax.set_xlabel("parameters (total)")
        ax.set_ylabel("validation perplexity")
        ax.set_title(f"tuned per method, {budget_name(budget)} FLOPs")
        if ax.lines:
            ax.legend()
    written = [save_png(fig, out / "isoflop-tuned.png")]
    trend = trend_plot(_seeded(optima, study.plan.seeds), budgets, study.plan.methods, out)
    plt.close("all")
    return written + ([] if trend is None else [trend])


def write_tuned_report(study, command: str | None = None) -> list[Path]:
    """Write summary.json, table.md and the plot of the tuned table under its results directory."""
    recs = study.records()
    optima = {k: o for k, o in study.plan.optima(recs).items()  # plans the whole table once: all below reads it
              if k[0] in study.plan.report_budgets}
    rows = tuned_rows(study, optima)
    if not rows:
        raise ValueError("no tuned optimum has its seeds yet; run `peerlm study isoflop-tuned` first")
    command = command or "peerlm " + " ".join(sys.argv[1:])
    out = study.results
    own = study.store.records()
    meta = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "runs": len(own), "git_revisions": sorted({r["git_revision"] for r in recs.values()})}
    atomic_write_text(out / "summary.json", json.dumps({"meta": meta, "records": rows}, indent=1) + "\n")
    atomic_write_text(out / "table.md", format_tuned_table(study, recs, optima, rows, command))
    return [out / "summary.json", out / "table.md", *plots_or_note(study, lambda: _plot(study, recs, optima, out))]
