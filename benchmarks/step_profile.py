"""Where a training step's time goes, for the isoFLOP study's dense, PKM and PEER models.

For each model (the study's trunk and recipe: ``peerlm.study.design``; batch 16 x 128, one thread by
default, the ``--time-steps`` protocol), this times whole steps with the methods interleaved (so a
change in machine load hits all of them alike) and reports medians, the memory layer's share of
the step's forward (module hooks), and the operators that take the most time over a few profiled
steps (``torch.profiler``, self CPU time), grouped into what the speed work acts on: top-k, the
embedding-bag forward and backward of the tables, the optimizer, the rest.

Usage:
    python benchmarks/step_profile.py                          # L1d48 and L3d80, dense / pkm / peer
    python benchmarks/step_profile.py --sizes L1d48 --steps 5 --out benchmarks/results/step_profile_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import time
from collections import defaultdict
from datetime import datetime, timezone

import torch
from torch.profiler import ProfilerActivity, profile

from peerlm.study.design import BATCH, CONTEXT, model_config, recipe, size
from peerlm.train import build_for_training

EXPERT_RATIO = {"peer": 3.0, "pkm": 10.0}  # the study's table LR ratios
GROUPS = {  # operator name -> group, first match wins
    "aten::topk": "top-k",
    "peerlm::pk_topk": "top-k",
    "peerlm::bag_scatter": "table gradients (embedding-bag backward)",
    "peerlm::bag_dot": "per-pair dot products (gate gradients, sampled dots)",
    "embedding_bag_dense_backward": "table gradients (embedding-bag backward)",
    "per_sample_weights_backward": "gate gradients (embedding-bag backward)",
    "aten::sort": "sort (embedding-bag backward)",
    "embedding_bag": "embedding-bag forward",
    "Optimizer.step": "optimizer",
}


def build(method: str, sz: str, budget: float):
    cfg = model_config(method, size(sz))
    t = recipe(method, size(sz), budget, lr_mult=2.0, expert_ratio=EXPERT_RATIO.get(method, 1.0), seed=0)
    torch.manual_seed(0)
    model, opt = build_for_training(cfg, t)
    x = torch.randint(0, cfg.vocab_size, (BATCH, CONTEXT + 1), generator=torch.Generator().manual_seed(0))
    return model, opt, x


def step(model, opt, x) -> None:
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def memory_forward_seconds(model, opt, x, steps: int) -> float:
    """Median seconds per step spent in the forward of the memory layers (0 for dense)."""
    layers = [m for _, m in model.memory_layers()]
    spent: list[float] = []
    start: dict[int, float] = {}
    hooks = [m.register_forward_pre_hook(lambda m, a: start.__setitem__(id(m), time.perf_counter())) for m in layers]
    hooks += [m.register_forward_hook(lambda m, a, o: spent.append(time.perf_counter() - start[id(m)]))
              for m in layers]
    per_step = []
    for _ in range(steps):
        spent.clear()
        step(model, opt, x)
        per_step.append(sum(spent))
    for h in hooks:
        h.remove()
    return statistics.median(per_step)


def op_groups(model, opt, x, steps: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """Seconds per step by group, and the ten costliest operators (self CPU seconds per step)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(model, opt, x)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / 1e6 / steps
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        group = next((g for key, g in GROUPS.items() if key in e.key), None)
        if group == "optimizer":  # its own ops are counted where they are (the step's self time is small)
            continue
        groups[group or "other"] += e.self_cpu_time_total / 1e6 / steps
    opt_total = next((e.cpu_time_total for e in events if "Optimizer.step" in e.key), 0.0) / 1e6 / steps
    groups["optimizer (total, overlaps the groups above)"] = opt_total
    groups["profiled step (self CPU, all ops)"] = total
    top = sorted(((e.key, e.self_cpu_time_total / 1e6 / steps) for e in events), key=lambda kv: -kv[1])[:10]
    return dict(groups), top


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", nargs="+", default=["L1d48", "L3d80"])
    p.add_argument("--methods", nargs="+", default=["dense", "pkm", "peer"])
    p.add_argument("--budget", type=float, default=2e12, help="the recipe's budget (sets warmup only)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (interleaved)")
    p.add_argument("--profiled", type=int, default=3, help="profiled steps per model")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", help="also write the report (markdown) here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [f"# Training step profile ({datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, "
             f"torch {torch.__version__}, {args.threads} thread(s), batch {BATCH} x {CONTEXT})", "",
             f"Command: `python benchmarks/step_profile.py --sizes {' '.join(args.sizes)}` (git {rev}); "
             f"medians of {args.steps} interleaved steps after one warm-up each.", ""]
    for sz in args.sizes:
        built = {m: build(m, sz, args.budget) for m in args.methods}
        for m in args.methods:
            step(*built[m])  # warm-up
        times: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.steps):  # interleaved: each round times every method once
            for m in args.methods:
                t0 = time.perf_counter()
                step(*built[m])
                times[m].append(time.perf_counter() - t0)
        med = {m: statistics.median(v) for m, v in times.items()}
        base = med.get("dense")
        lines += [f"## {sz}", "", "| model | step | / dense | memory-layer forward |", "|---|---|---|---|"]
        for m in args.methods:
            mem = memory_forward_seconds(*built[m], steps=max(3, args.steps // 2))
            ratio = f"{med[m] / base:.2f}x" if base else "-"
            lines.append(f"| {m} | {med[m] * 1e3:.1f} ms | {ratio} | {mem * 1e3:.1f} ms |")
        for m in args.methods:
            if m == "dense":
                continue
            groups, top = op_groups(*built[m], steps=args.profiled)
            whole = groups["profiled step (self CPU, all ops)"]
            lines += ["", f"### {m} {sz}: where the time goes (self CPU per step)", "", "| group | ms | share |",
                      "|---|---|---|"]
            for g, s in sorted(groups.items(), key=lambda kv: -kv[1]):
                lines.append(f"| {g} | {s * 1e3:.1f} | {s / whole:.0%} |")
            lines += ["", "| operator | ms | share |", "|---|---|---|"]
            lines += [f"| `{k}` | {s * 1e3:.1f} | {s / whole:.0%} |" for k, s in top]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
