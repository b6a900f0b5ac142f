"""The continual study's report: ``summary.json``, ``table.md`` and the Pareto plot of learning
against forgetting, from the records of ``peerlm.continual.study``.

Per (base, task), each method's sweep is a curve: learning (facts: exact match on held-out prompts;
docs: test perplexity) against forgetting (the loss change on the base data's validation split, in
%). A point (one knob value) with several seeds shows their mean and range. A point is on the Pareto
front of its (base, task) when no other point learns at least as much with no more forgetting, and
better in one of the two. The plot needs the ``study`` extra (matplotlib);
without it the table and JSON are written and a line says so.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from peerlm.continual.study import ContinualRunner, learning_score
from peerlm.fileio import atomic_write_text
from peerlm.study.records import finite_json

__all__ = ["rows", "points", "pareto", "target_lines", "write_continual_report"]


def rows(records: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per record."""
    out = []
    for run_id, rec in sorted(records.items()):
        s = rec["spec"]
        val = rec["forgetting"].get("val", {})
        held = [v["pct"] for k, v in rec["forgetting"].items() if k != "val" and v.get("pct") is not None]
        out.append({"run_id": run_id, "base": s["base"], "task": s["task"], "method": s["method"], "knob": s["knob"],
                    "value": s["value"], "seed": s.get("seed", 0), "learning": learning_score(rec),
                    "learning_before": learning_score({"learning": rec["learning_before"]}),
                    "forgetting_val_nats": val.get("nats"), "forgetting_val_pct": val.get("pct"),
                    "forgetting_heldout_pct": sum(held) / len(held) if held else None,
                    "train_seconds": rec.get("train_seconds")})
    return out


MEASURES = ("learning", "learning_before", "forgetting_val_nats", "forgetting_val_pct", "forgetting_heldout_pct")


def points(table: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rows averaged over seeds: one point per (base, task, method, knob value), named by its runs'
    id without the seed, with each measure's mean and, from two seeds on, its range (min, max)."""
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in table:
        groups.setdefault((r["base"], r["task"], r["method"], r["knob"], r["value"]), []).append(r)
    out = []
    for (base, task, method, knob, value), rs in groups.items():
        rs = sorted(rs, key=lambda r: r["seed"])
        p: dict[str, Any] = {"run_id": rs[0]["run_id"].rsplit("_s", 1)[0], "base": base, "task": task,
                             "method": method, "knob": knob, "value": value, "seeds": [r["seed"] for r in rs],
                             "runs": [r["run_id"] for r in rs]}
        for k in MEASURES:
            vals = [r[k] for r in rs if r[k] is not None]
            p[k] = sum(vals) / len(vals) if vals else None
            p[f"{k}_range"] = [min(vals), max(vals)] if len(vals) > 1 else None
        out.append(p)
    return out


def _shown(task: str, score: float) -> str:
    return f"{100 * score:.1f}%" if task == "facts" else f"{math.exp(-score):.2f} ppl"


def learning_shown(p: dict[str, Any]) -> str:
    """A point's learning as the table prints it: exact match or test perplexity, with its seeds' range."""
    rng = p.get("learning_range")
    if not rng:
        return _shown(p["task"], p["learning"])
    lo, hi = rng if p["task"] == "facts" else rng[::-1]  # docs: the lower perplexity first
    return f"{_shown(p['task'], p['learning'])} ({_shown(p['task'], lo)} to {_shown(p['task'], hi)})"


def pareto(points: list[dict[str, Any]]) -> set[str]:
    """The ids of the points on the front (more learning, less val forgetting) of ``points`` (one base
    and task); a point without a val forgetting counts as forgetting everything."""
    def forgot(p: dict[str, Any]) -> float:
        return p["forgetting_val_pct"] if p["forgetting_val_pct"] is not None else math.inf

    front = set()
    for p in points:
        f = forgot(p)
        dominated = any(q["learning"] >= p["learning"] and forgot(q) <= f
                        and (q["learning"] > p["learning"] or forgot(q) < f) for q in points if q is not p)
        if not dominated:
            front.add(p["run_id"])
    return front


TARGET_SHARE = 0.9  # of full finetuning's best fact accuracy
TARGET_FORGETTING = 0.25  # of what that full finetune forgets


def full_at(full: list[dict[str, Any]], forgetting: float, before: float) -> float | None:
    """Full finetuning's learning at ``forgetting`` (val %), linear along its sweep's points from the base
    itself (no forgetting, learning ``before``); None outside that range."""
    pts = sorted([(0.0, before)] + [(r["forgetting_val_pct"], r["learning"]) for r in full])
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= forgetting <= x1:
            return y0 + (y1 - y0) * (forgetting - x0) / (x1 - x0) if x1 > x0 else max(y0, y1)
    return None


def target_lines(table: list[dict[str, Any]], subject: str = "sparse") -> tuple[list[str], list[dict[str, Any]]]:
    """The issue's target per base on the facts task, as markdown lines and rows, over points (means of
    their seeds): the reference is the full finetuning point of highest exact match; each other
    method's point with the least val forgetting among those reaching ``TARGET_SHARE`` of that accuracy
    is compared with it (forgetting ratio), and ``subject`` meets the target where its ratio is at most
    ``TARGET_FORGETTING`` and below LoRA's.
    Each method's best-learning point is also set against full finetuning at the same forgetting
    (``full_at``)."""
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
            same = full_at(full, top["forgetting_val_pct"], top["learning_before"])
            row = {"base": base, "method": method, "reference": ref["run_id"], "bar": bar,
                   "run": best[method]["run_id"] if best[method] else None, "forgetting_ratio": ratios[method],
                   "best_learning": top["learning"], "full_at_same_forgetting": same, "runs": len(mine)}
            rows.append(row)
            if best[method] is None:
                out.append(f"  - {method}: no point reaches the bar ({len(mine)} point(s); best "
                           f"{100 * top['learning']:.1f}% at {top['knob']}={top['value']:g}, val loss "
                           f"{top['forgetting_val_pct']:+.1f}%)")
            else:
                r = best[method]
                out.append(f"  - {method}: {r['knob']}={r['value']:g} reaches {100 * r['learning']:.1f}% with val loss "
                           f"{r['forgetting_val_pct']:+.1f}%, {row['forgetting_ratio']:.2f}x full's forgetting")
            if same is not None:
                out.append(f"    full finetuning at its best's forgetting ({top['forgetting_val_pct']:+.1f}%) learns "
                           f"{100 * same:.1f}% (along its sweep from the base)")
        if subject in best:
            mine, lora = best[subject], best.get("lora")
            ratio = ratios[subject]
            if mine is None or ratio is None:
                verdict = "not met: no point reaches the bar" if mine is None else "undecided: full forgot nothing"
            else:
                below_lora = lora is None or mine["forgetting_val_pct"] < lora["forgetting_val_pct"]
                verdict = ("met" if ratio <= TARGET_FORGETTING and below_lora else "not met") + \
                    f" (forgetting {ratio:.2f}x full's, target at most {TARGET_FORGETTING:g}x" + \
                    ("" if lora is None else f"; LoRA at the bar {lora['forgetting_val_pct']:+.1f}%") + ")"
            out.append(f"  - target for {subject}: {verdict}")
    return out, rows


COLORS = {"full": "C0", "lora": "C1", "memory": "C2", "sparse": "C3", "grow": "C4"}  # one per method, every panel


def _spread(pts: list[dict[str, Any]], key: str) -> list[list[float]]:
    """Error-bar lengths (below, above) of each point's ``key`` from its seeds' range (0 for one seed)."""
    lo = [r[key] - r[f"{key}_range"][0] if r[f"{key}_range"] else 0.0 for r in pts]
    hi = [r[f"{key}_range"][1] - r[key] if r[f"{key}_range"] else 0.0 for r in pts]
    return [lo, hi]


def write_continual_report(study: ContinualRunner) -> list[Path]:
    """Write summary.json, table.md and (with matplotlib) pareto.png into the study's results."""
    recs = study.records()
    runs = rows(recs)
    table = points(runs)
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
    atomic_write_text(paths[0], json.dumps(finite_json({"runs": runs, "points": table,
                                                        "bases": sorted({r["base"] for r in table}),
                                                        "target": target_rows}), indent=1) + "\n")
    repeated = sum(len(p["seeds"]) > 1 for p in table)
    lines = ["# Continual learning: learning against forgetting", "",
             f"{len(runs)} finetune records (`peerlm study continual`) at {len(table)} points; {repeated} points "
             "have more than one seed: the mean is shown, and the seeds' range in brackets. Learning: exact match "
             "on the facts' held-out prompts (completion and question), or the docs task's test perplexity (over "
             "seeds: the exponential of the mean test loss). "
             "Forgetting: the change of the loss on the base data's validation split (nats and %) and the mean % "
             "over the held-out sets, against the base itself. Pareto: no point of the same base and task learns "
             "at least as much with no more val forgetting, and better in one.", ""]
    if target:
        lines += [f"Target (facts): at {TARGET_SHARE:.0%} or more of full finetuning's best exact match, sparse "
                  f"forgets at most {TARGET_FORGETTING:g}x what that full finetune forgets on val, and less than "
                  "LoRA at the same bar.", "", *target, ""]
    lines += ["| base | task | method | knob | seeds | learning | forgetting val (nats) | val % | held-out % "
              "| Pareto |", "|---|---|---|---|---|---|---|---|---|---|"]

    def num(x: Any, fmt: str, rng: list[float] | None = None) -> str:
        if x is None:
            return ""
        return format(x, fmt) + (f" ({format(rng[0], fmt)} to {format(rng[1], fmt)})" if rng else "")

    for r in sorted(table, key=lambda r: (r["task"] != "facts", r["base"], r["method"], r["knob"], r["value"])):
        lines.append(f"| {r['base']} | {r['task']} | {r['method']} | {r['knob']}={r['value']:g} | {len(r['seeds'])} | "
                     f"{learning_shown(r)} | {num(r['forgetting_val_nats'], '+.4f')} | "
                     f"{num(r['forgetting_val_pct'], '+.2f', r['forgetting_val_pct_range'])} | "
                     f"{num(r['forgetting_heldout_pct'], '+.2f')} | {'yes' if r.get('pareto') else ''} |")
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
                x, y = [r["forgetting_val_pct"] for r in pts], [r["learning"] for r in pts]
                ax.errorbar(x, y, xerr=_spread(pts, "forgetting_val_pct"), yerr=_spread(pts, "learning"), marker="o",
                            capsize=2, label=method, color=COLORS.get(method))  # bars: the seeds' range
            ax.set_title(f"{base}, {task}")
            ax.set_xlabel("forgetting: val loss change (%)")
            ax.set_ylabel("exact match" if task == "facts" else "- test loss (nats)")
            ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(out / "pareto.png")
        fig.savefig(paths[-1], dpi=120)
        plt.close(fig)
    return paths
