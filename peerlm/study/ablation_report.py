"""Reports of an ablation from its records: ``summary.json``, ``table.md`` and ``<ablation>.png``.

``summary.json`` holds one record per (run, eval set) with the keys the ablation varies
(``num_experts``, ``heads``, ``topk``, ``query_norm``, ``gate``, ``expert_lr_ratio``, ``blocks``: the
memory's block ids) and ``method``, ``seed``,
``eval_set``, ``perplexity``, ``bits_per_byte``, ``usage``, ``unevenness``, ``distinct`` and
``effective`` (per token: the share of distinct slots among its h*k and its gates' exp-entropy; null
in records written before they were measured), each the mean over the memory blocks where there are
several, ``train_tokens``,
``train_seconds`` (steps times ``timing.json``'s step time where ``--time-steps`` wrote one, else the
run's own summed step times), ``diverged`` (why, for a run that diverged: its one row, on val, has
no perplexity or usage; null otherwise). The table averages seeds (± half their range) per variant
and says ``diverged`` where a run did; the plot leaves diverged runs out. Without matplotlib the
table and JSON are written, and the log says how to get the plot.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from peerlm.config import ModelConfig
from peerlm.configio import from_dict
from peerlm.fileio import atomic_write_text
from peerlm.study.records import diverged
from peerlm.study.report import EVAL_ORDER, plots_or_note, pyplot, save_png, timing_note, train_seconds
from peerlm.study.reproduce import reproduced_lines
from peerlm.study.runner import machine

__all__ = ["ablation_rows", "write_ablation_report"]

USAGE_KEYS = ("usage", "unevenness", "distinct", "effective")  # see peerlm.usage


def _settings(rec: dict[str, Any]) -> dict[str, Any]:
    ffn = rec["model"]["ffn"]
    slots = ffn.get("num_experts", ffn.get("num_keys"))
    blocks = from_dict(ModelConfig, rec["model"]).sparse_blocks()
    return {"method": rec["spec"]["method"], "num_experts": slots, "heads": ffn["heads"], "topk": ffn["topk"],
            "query_norm": ffn["query_norm"], "gate": ffn.get("gate", "softmax"),
            "expert_lr_ratio": rec["train"]["expert_lr_ratio"],
            "blocks": ",".join(map(str, blocks))}


def ablation_rows(ablation) -> list[dict[str, Any]]:
    """One row per (planned run with a record, eval set); one row on val for a diverged run."""
    recs, timing = ablation.records(), ablation.timing()
    rows = []
    for spec in ablation.planned(recs):
        rec = recs.get(spec.run_id)
        if rec is None:
            continue
        if diverged(rec):
            rows.append({**_settings(rec), "seed": spec.seed, "eval_set": "val", "perplexity": None,
                         "bits_per_byte": None, **{k: None for k in USAGE_KEYS}, "train_tokens": rec["train_tokens"],
                         "train_seconds": train_seconds(rec, timing), "run_id": rec["run_id"],
                         "diverged": rec.get("diverged", "the validation loss is not finite")})
            continue
        for name in EVAL_ORDER:
            ev = rec["eval"].get(name)
            if ev is None:
                continue
            layers = list(ev.get("usage", {}).values())  # one entry per memory block: their mean
            usage = {k: statistics.fmean(u[k] for u in layers) for k in USAGE_KEYS
                     if layers and all(k in u for u in layers)}  # distinct, effective: newer records only
            rows.append({**_settings(rec), "seed": spec.seed, "eval_set": name, "perplexity": ev["perplexity"],
                         "bits_per_byte": ev["bits_per_byte"], **{k: usage.get(k) for k in USAGE_KEYS},
                         "train_tokens": rec["train_tokens"],
                         "train_seconds": train_seconds(rec, timing), "run_id": rec["run_id"], "diverged": None})
    return rows


def _grouped(rows: list[dict[str, Any]]) -> dict[tuple, dict[str, list[dict[str, Any]]]]:
    keys = ("method", "num_experts", "heads", "topk", "query_norm", "gate", "expert_lr_ratio", "blocks")
    out: dict[tuple, dict[str, list[dict[str, Any]]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        out[tuple(r[k] for k in keys)][r["eval_set"]].append(r)
    return out


def _cell(rs: list[dict[str, Any]], key: str, fmt: str) -> str:
    vals = [r[key] for r in rs if r[key] is not None]
    if not vals:
        return ""
    mean = statistics.fmean(vals)
    return format(mean, fmt) + (f" ± {format((max(vals) - min(vals)) / 2, fmt)}" if len(vals) > 1 else "")


def _perplexity_cell(rs: list[dict[str, Any]]) -> str:
    """The seeds' mean perplexity, saying how many of them diverged (``diverged`` when all did)."""
    cell, gone = _cell(rs, "perplexity", ".2f"), sum(r["diverged"] is not None for r in rs)
    return cell if not gone else "diverged" if not cell else f"{cell} ({gone} seed(s) diverged)"


def format_ablation_table(ablation, rows: list[dict[str, Any]], command: str) -> str:
    start = ablation.plan.start()
    lines = [f"# Ablation `{ablation.plan.name}`", "", f"Command: `{command}`  ",
             f"Report written {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC on {machine()}.", "",
             ablation.plan.spec.describe(start), "Perplexity on the whole validation split and the first 65,536 "
             "tokens of each held-out set; usage (share of slots with gate mass) and unevenness (KL from "
             "uniform) over the whole validation split, and per token there: distinct (share of distinct "
             "slots among its h*k) and effective (exp of its gates' entropy: h*k when they are equal; blank "
             "where the record predates these two); ± is half the range over two seeds. "
             + timing_note(ablation.timing(), ablation.plan.name), "",
             "| method | blocks | N | h | k | h*k | query norm | gate | expert LR | " + " | ".join(EVAL_ORDER)
             + " | usage | unevenness | distinct | effective | train time |", "|" + "---|" * (14 + len(EVAL_ORDER))]
    for key, by_set in _grouped(rows).items():
        method, n, h, k, qn, gate, ratio, blocks = key
        cells = [_perplexity_cell(by_set.get(name, [])) for name in EVAL_ORDER]
        val = by_set.get("val", [])
        usage, distinct = (_cell([dict(r, **{key: 100 * r[key]}) if r[key] is not None else r for r in val], key, ".1f")
                           for key in ("usage", "distinct"))
        lines.append(f"| {method} | {blocks} | {n} | {h} | {k} | {h * k} | {qn} | {gate} | {ratio:g} | "
                     + " | ".join(cells)
                     + f" | {usage}{'%' if usage else ''} | {_cell(val, 'unevenness', '.2f')} | "
                     f"{distinct}{'%' if distinct else ''} | {_cell(val, 'effective', '.1f')} | "
                     f"{_cell(val, 'train_seconds', '.0f')} s |")
    return "\n".join(lines + reproduced_lines(ablation.results)) + "\n"


def _plot(ablation, rows: list[dict[str, Any]], path: Path) -> Path:
    plt = pyplot()
    spec = ablation.plan.spec
    val = [r for r in rows if r["eval_set"] == "val" and r["diverged"] is None]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    points = [spec.point(r) for r in val]
    places = sorted({x for _, x in points if isinstance(x, str)}, key=lambda b: (len(b), b))  # categories
    series: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (label, x), r in zip(points, val):
        series[label].append((places.index(x) if isinstance(x, str) else x, r["perplexity"]))

    def natural(item):  # "h = 2" before "h = 16"
        return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", item[0])]

    for label, pts in sorted(series.items(), key=natural):
        by_x: dict[float, list[float]] = defaultdict(list)
        for x, y in pts:
            by_x[x].append(y)
        xs = sorted(by_x)
        ax.errorbar(xs, [statistics.fmean(by_x[x]) for x in xs],
                    yerr=[(max(by_x[x]) - min(by_x[x])) / 2 for x in xs], fmt="o-", capsize=3, label=label)
    if spec.log_base is None:
        ax.set_xticks(range(len(places)), [f"block {b}" if "," not in b else f"blocks {b}" for b in places])
    else:
        ax.set_xscale("log", base=spec.log_base)
    ax.set_xlabel(spec.xlabel)
    ax.set_ylabel("validation perplexity")
    ax.set_title(f"ablation: {spec.name}")
    ax.grid(True, which="both", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def write_ablation_report(ablation, command: str | None = None) -> list[Path]:
    rows = ablation_rows(ablation)
    if not rows:
        raise ValueError(f"{ablation.runs_dir} holds no records of this ablation yet; run it first")
    command = command or "peerlm " + " ".join(sys.argv[1:])
    out = ablation.results
    meta = {"command": command, "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "ablation": ablation.plan.name}
    atomic_write_text(out / "summary.json", json.dumps({"meta": meta, "records": rows}, indent=1) + "\n")
    atomic_write_text(out / "table.md", format_ablation_table(ablation, rows, command))
    return [out / "summary.json", out / "table.md",
            *plots_or_note(ablation, lambda: [_plot(ablation, rows, out / f"{ablation.plan.name}.png")])]
