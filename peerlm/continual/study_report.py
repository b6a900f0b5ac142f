"""The continual study's report: ``summary.json``, ``table.md`` and the Pareto plot of learning
against forgetting, from the records of ``peerlm.continual.study``.

Per (base, task), each method's sweep is a curve: learning (facts: exact match on held-out prompts;
docs: test perplexity) against forgetting (the loss change on the base data's validation split, in
%). A run is on the Pareto front of its (base, task) when no other run learns at least as much with
no more forgetting, and better in one of the two. The plot needs the ``study`` extra (matplotlib);
without it the table and JSON are written and a line says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peerlm.continual.study import ContinualRunner
from peerlm.fileio import atomic_write_text
from peerlm.study.records import finite_json

__all__ = ["rows", "pareto", "write_continual_report"]


def _learning(rec: dict[str, Any]) -> tuple[float, str]:
    """(score where higher is better, as printed)."""
    ln = rec["learning"]
    if "exact_match" in ln:
        return ln["exact_match"], f"{100 * ln['exact_match']:.1f}%"
    return -ln["test_loss"], f"{ln['test_ppl']:.2f} ppl"


def rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record: what the table and plot show."""
    out = []
    for run_id, rec in sorted(records.items()):
        s = rec["spec"]
        score, shown = _learning(rec)
        val = rec["forgetting"].get("val", {})
        held = [v["pct"] for k, v in rec["forgetting"].items() if k != "val" and v.get("pct") is not None]
        out.append({"run_id": run_id, "base": s["base"], "task": s["task"], "method": s["method"], "knob": s["knob"],
                    "value": s["value"], "learning": score, "learning_shown": shown,
                    "forgetting_val_nats": val.get("nats"), "forgetting_val_pct": val.get("pct"),
                    "forgetting_heldout_pct": sum(held) / len(held) if held else None,
                    "train_seconds": rec.get("train_seconds")})
    return out


def pareto(points: list[dict[str, Any]]) -> set[str]:
    """Run ids on the front (more learning, less val forgetting) of ``points`` (one base and task)."""
    front = set()
    for p in points:
        f = p["forgetting_val_pct"] if p["forgetting_val_pct"] is not None else math.inf
        dominated = any(
            (q["learning"] >= p["learning"] and (q["forgetting_val_pct"] or math.inf) <= f)
            and (q["learning"] > p["learning"] or (q["forgetting_val_pct"] or math.inf) < f)
            for q in points if q is not p)
        if not dominated:
            front.add(p["run_id"])
    return front


TARGET_SHARE = 0.9  # of full finetuning's best fact accuracy
TARGET_FORGETTING = 0.25  # of what that full finetune forgets


def target_lines(table: list[dict[str, Any]], subject: str = "sparse") -> tuple[list[str], list[dict[str, Any]]]:
    """The issue's target per base on the facts task, as markdown lines and rows: the reference is the
    full finetune of highest exact match; each other method's run with the least val forgetting among
    those reaching ``TARGET_SHARE`` of that accuracy is compared with it (forgetting ratio), and
    ``subject`` meets the target where its ratio is at most ``TARGET_FORGETTING`` and below LoRA's."""
    out, rows = [], []
    for base in sorted({r["base"] for r in table if r["task"] == "facts"}):
        runs = [r for r in table if r["base"] == base and r["task"] == "facts" and r["forgetting_val_pct"] is not None]
        full = [r for r in runs if r["method"] == "full"]
        if not full:
            continue
        ref = max(full, key=lambda r: r["learning"])
        bar = TARGET_SHARE * ref["learning"]
        out.append(f"- **{base}**: full finetuning's best exact match is {100 * ref['learning']:.1f}% ({ref['knob']}="
                   f"{ref['value']:g}, val loss {ref['forgetting_val_pct']:+.1f}%); the bar is {100 * bar:.1f}%.")
        best: dict[str, dict[str, Any] | None] = {}
        ratios: dict[str, float | None] = {}
        for method in sorted({r["method"] for r in runs} - {"full"}):
            mine = [r for r in runs if r["method"] == method]
            reach = [r for r in mine if r["learning"] >= bar]
            best[method] = min(reach, key=lambda r: r["forgetting_val_pct"]) if reach else None
            top = max(mine, key=lambda r: r["learning"])
            ratios[method] = (best[method]["forgetting_val_pct"] / ref["forgetting_val_pct"]
                              if best[method] and ref["forgetting_val_pct"] else None)
            row = {"base": base, "method": method, "reference": ref["run_id"], "bar": bar,
                   "run": best[method]["run_id"] if best[method] else None, "forgetting_ratio": ratios[method],
                   "best_learning": top["learning"], "runs": len(mine)}
            rows.append(row)
            if best[method] is None:
                out.append(f"  - {method}: no run reaches the bar ({len(mine)} run(s); best "
                           f"{100 * top['learning']:.1f}% at {top['knob']}={top['value']:g}, val loss "
                           f"{top['forgetting_val_pct']:+.1f}%)")
            else:
                r = best[method]
                out.append(f"  - {method}: {r['knob']}={r['value']:g} reaches {100 * r['learning']:.1f}% with val loss "
                           f"{r['forgetting_val_pct']:+.1f}%, {row['forgetting_ratio']:.2f}x full's forgetting")
        if subject in best:
            mine, lora = best[subject], best.get("lora")
            ratio = ratios[subject]
            if mine is None or ratio is None:
                verdict = "not met: no run reaches the bar" if mine is None else "undecided: full forgot nothing"
            else:
                below_lora = lora is None or mine["forgetting_val_pct"] < lora["forgetting_val_pct"]
                verdict = ("met" if ratio <= TARGET_FORGETTING and below_lora else "not met") + \
                    f" (forgetting {ratio:.2f}x full's, target at most {TARGET_FORGETTING:g}x" + \
                    ("" if lora is None else f"; LoRA at the bar {lora['forgetting_val_pct']:+.1f}%") + ")"
            out.append(f"  - target for {subject}: {verdict}")
    return out, rows


def write_continual_report(study: ContinualRunner) -> list[Path]:
    """Write summary.json, table.md and (with matplotlib) pareto.png into the study's results."""
    recs = study.records()
    table = rows(recs)
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in table:
        groups.setdefault((r["base"], r["task"]), []).append(r)
    for g in groups.values():
        front = pareto(g)
        for r in g:
            r["pareto"] = r["run_id"] in front
    out = study.results
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "summary.json", out / "table.md"]
    target, target_rows = target_lines(table)
    atomic_write_text(paths[0], json.dumps(finite_json({"rows": table, "bases": sorted({r["base"] for r in table}),
                                                        "target": target_rows}), indent=1) + "\n")
    lines = ["# Continual learning: learning against forgetting", "",
             f"{len(table)} finetune records (`peerlm study continual`). Learning: exact match on the facts' "
             "held-out prompts (completion and question), or the docs task's test perplexity. Forgetting: the "
             "change of the loss on the base data's validation split (nats and %) and the mean % over the held-out "
             "sets, against the base itself. Pareto: no run of the same base and task learns at least as much "
             "with no more val forgetting, and better in one.", ""]
    if target:
        lines += [f"Target (facts): at {TARGET_SHARE:.0%} or more of full finetuning's best exact match, sparse "
                  f"forgets at most {TARGET_FORGETTING:g}x what that full finetune forgets on val, and less than "
                  "LoRA at the same bar.", "", *target, ""]
    lines += ["| base | task | method | knob | learning | forgetting val (nats) | val % | held-out % | Pareto |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in table:
        def num(x: Any, fmt: str) -> str:
            return "" if x is None else format(x, fmt)

        lines.append(f"| {r['base']} | {r['task']} | {r['method']} | {r['knob']}={r['value']:g} | "
                     f"{r['learning_shown']} | {num(r['forgetting_val_nats'], '+.4f')} | "
                     f"{num(r['forgetting_val_pct'], '+.2f')} | {num(r['forgetting_heldout_pct'], '+.2f')} | "
                     f"{'yes' if r.get('pareto') else ''} |")
    atomic_write_text(paths[1], "\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        study.log("note: matplotlib is not installed (pip install 'peerlm[study]'); no plot written")
        return paths
    if groups:
        fig, axes = plt.subplots(1, len(groups), figsize=(5 * len(groups), 4), squeeze=False)
        for ax, ((base, task), g) in zip(axes[0], sorted(groups.items())):
            for method in sorted({r["method"] for r in g}):
                pts = sorted((r for r in g if r["method"] == method and r["forgetting_val_pct"] is not None),
                             key=lambda r: r["value"])
                ax.plot([r["forgetting_val_pct"] for r in pts], [r["learning"] for r in pts], marker="o", label=method)
            ax.set_title(f"{base}, {task}")
            ax.set_xlabel("forgetting: val loss change (%)")
            ax.set_ylabel("exact match" if task == "facts" else "- test loss (nats)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "pareto.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
