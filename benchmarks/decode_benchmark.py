"""Generation speed with the KV cache (tokens/s, per-step latency, peak memory) of dense, MoE, fine-grained
MoE, PKM and PEER language models at batch 1, 8 and 64, at equal active FLOPs and at equal total parameters.

For each model and batch B: a random prompt of ``--prompt`` tokens per sequence is prefilled into a
``KVCache`` of batch B, then ``--steps`` new tokens are decoded one step at a time, each step feeding
the greedy (argmax) token of the last logits back in (no sampling cost); every decode step is timed.
Reported: tokens/s = B * steps / (sum of the step times), the median and p90 step latency, the
prefill time, the peak RSS of the process (``ru_maxrss``, with the RSS after importing torch and
peerlm, before the model exists, beside it) and the model's parameter bytes. Eval mode, no_grad,
fp32. The models are freshly initialised, not trained: the speed of a step does not depend on the
weights, except for how a router spreads tokens (untrained routers spread them evenly), and
expert-choice MoE, which before any training step routes each token to its top-1 expert (what a
trained model's thresholds give on average; ``peerlm.ffn.MoE``).

Two sets of models, on the isoFLOP study's trunk ``--size`` (``peerlm.study.design``; default L3d80:
3 blocks, width 80, vocabulary 1024, context 128):

- ``flops`` (equal active FLOPs): the study's five models, which swap only the middle block's
  feed-forward: ``dense``; ``moe`` (8 experts the size of the MLP, expert choice, one per token);
  ``moe-fine`` (32 quarter-size experts, top-4); ``pkm`` (256^2 slots, h 8, k 32); ``peer`` (256^2
  one-neuron experts, h 8, k 16). Their forward FLOPs per token differ only by the router and the
  product-key retrieval (printed from ``peerlm.flops.model_cost``); total parameters differ up to 35-fold (L3d80).
- ``params`` (equal total parameters, the axis on which UltraMem, Huang et al. 2024, reports memory
  layers beating MoE at inference): every model is sized to the PEER model's total parameter count
  (the anchor, the same model as in ``flops``), each by the one knob that adds parameters to its
  kind: ``dense`` widens the MLP hidden size of every block (a dense model of that size, all of it
  active; a multiple of 64); ``moe`` and ``moe-fine`` keep their expert size and experts per token
  and add experts; ``pkm`` takes about twice PEER's slots (the square n^2 nearest to it), since a
  PKM slot holds one D-wide value row where a PEER expert holds two (``w_down`` and ``w_up``). The
  matched counts are printed; all lie within 1% of PEER's.

Each (model, batch) case runs in its own process, so peak RSS is that case's alone (the PEER model,
in both sets, is measured once and reported in both); repeats
are interleaved (every case once, then every case again), so a change in machine load hits all of
them alike. tokens/s is the median over repeats; step latencies are pooled over repeats.

Usage:
    python benchmarks/decode_benchmark.py                         # both sets, batch 1 8 64, 48 steps, 1 thread
    python benchmarks/decode_benchmark.py --quick                 # L1d48, batch 1 and 8, 8 steps, one repeat
    python benchmarks/decode_benchmark.py --sets params --size L5d112 --batches 1 64 --steps 32 \\
        --out benchmarks/results/decode_cpu.md
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

from peerlm.config import DenseConfig, ModelConfig, to_json
from peerlm.flops import model_cost
from peerlm.study.design import METHODS, model_config, size

SETS = ("flops", "params")
SET_TITLES = {"flops": "equal active FLOPs (the study's models)",
              "params": "equal total parameters (sized to the PEER model)"}


def _params(cfg: ModelConfig) -> int:
    return model_cost(cfg)["params"]


def _closest(make, target: int, lo: int, hi: int, step: int = 1) -> ModelConfig:
    """The config ``make(x)``, x in lo, lo + step, ... <= hi, whose parameter count is nearest ``target``
    (parameters grow with x)."""
    xs = range(lo, hi + 1, step)
    a, b = 0, len(xs) - 1
    while a < b:  # first x with params >= target
        m = (a + b) // 2
        if _params(make(xs[m])) >= target:
            b = m
        else:
            a = m + 1
    near = [make(xs[i]) for i in (a - 1, a) if 0 <= i < len(xs)]
    return min(near, key=lambda c: abs(_params(c) - target))


def configs(which: str, size_name: str) -> dict[str, ModelConfig]:
    """The five models of one set (see the module docstring), by method."""
    sz = size(size_name)
    study = {m: model_config(m, sz) for m in METHODS}
    if which == "flops":
        return study
    target = _params(study["peer"])
    dense = study["dense"]
    out = {"dense": _closest(lambda h: dataclasses.replace(dense, mlp=DenseConfig(hidden=h)), target,
                             64, 64 * (target // (64 * sz.dim)), step=64)}
    for m in ("moe", "moe-fine"):
        cfg = study[m]
        out[m] = _closest(lambda e, cfg=cfg: dataclasses.replace(cfg, ffn=dataclasses.replace(cfg.ffn, num_experts=e)),
                          target, cfg.ffn.num_experts, target // sz.dim)
    pkm = study["pkm"]
    out["pkm"] = _closest(lambda n: dataclasses.replace(pkm, ffn=dataclasses.replace(pkm.ffn, num_keys=n * n)),
                          target, pkm.ffn.topk, int((target / sz.dim) ** 0.5) + 1)
    out["peer"] = study["peer"]
    return out


def describe(method: str, cfg: ModelConfig) -> str:
    """The knob a set turns, in a few words."""
    f = cfg.ffn
    if f is None:
        return f"MLP hidden {cfg.mlp.hidden_size(cfg.dim)} in all {cfg.n_layers} blocks"
    if method in ("moe", "moe-fine"):
        per = f"top-{f.topk}" if f.routing == "token" else f"expert choice, {f.capacity():g}/token"
        hidden = f.hidden_size(cfg.mlp.hidden_size(cfg.dim))
        return f"{f.num_experts} experts x {hidden} hidden, {per}, middle block"
    n = f.num_keys if method == "pkm" else f.num_experts
    r = round(n**0.5)
    kind = "slots" if method == "pkm" else "experts"
    return f"{r}^2 {kind}, h {f.heads}, k {f.topk}, d_key {f.dim_key}, middle block"


# --------------------------------------------------------------------------------------------- worker


def worker(args: argparse.Namespace) -> dict:
    """Build one model, prefill and decode in this process, return the figures."""
    import torch

    from peerlm.model import build_model

    torch.set_num_threads(args.threads)
    rss_base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = configs(args.set, args.size)[args.method]
    torch.manual_seed(0)
    model = build_model(cfg, args.device).eval()
    B, P, N = args.batch, args.prompt, args.steps
    prompt = torch.randint(0, cfg.vocab_size, (B, P), generator=torch.Generator().manual_seed(0)).to(args.device)
    cache = model.new_kv_cache(batch=B, max_len=P + max(N, args.warmup))
    times, prefill = [], 0.0
    with torch.no_grad():
        for timed, steps in ((False, args.warmup), (True, N)):  # the warm-up pass fills caches and allocators
            cache.reset()
            sync()
            t0 = time.perf_counter()
            logits, _ = model(prompt, kv_cache=cache)
            nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
            sync()
            if timed:
                prefill = time.perf_counter() - t0
            for _ in range(steps):
                t0 = time.perf_counter()
                logits, _ = model(nxt, kv_cache=cache)
                nxt = logits[:, -1].argmax(dim=-1, keepdim=True)
                sync()
                if timed:
                    times.append(time.perf_counter() - t0)
    return {
        "set": args.set, "method": args.method, "batch": B, "step_s": times, "prefill_s": prefill,
        "tokens_per_s": B * N / sum(times),
        "params": model.num_params(),
        "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
        "kv_bytes": cache.k.numel() * cache.k.element_size() * 2,
        "rss_base_mb": rss_base,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_cuda_mb": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
    }


def run_case(args: argparse.Namespace, which: str, method: str, batch: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--set", which, "--method", method, "--batch", str(batch)]
    for name in ("size", "prompt", "steps", "warmup", "threads", "device"):
        cmd += [f"--{name}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"set": which, "method": method, "batch": batch, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------- report


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def _p90(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(0.9 * len(xs)))]


def summarise(runs: list[dict]) -> dict:
    """One case's repeats -> medians (tokens/s, prefill, RSS) and pooled step latencies."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return {"error": runs[0]["error"]}
    steps = [t for r in ok for t in r["step_s"]]
    med = statistics.median
    return {"tokens_per_s": med(r["tokens_per_s"] for r in ok), "step_med_s": med(steps), "step_p90_s": _p90(steps),
            "prefill_s": med(r["prefill_s"] for r in ok), "peak_rss_mb": med(r["peak_rss_mb"] for r in ok),
            "rss_base_mb": med(r["rss_base_mb"] for r in ok), "param_bytes": ok[0]["param_bytes"],
            "kv_bytes": ok[0]["kv_bytes"], "peak_cuda_mb": ok[0]["peak_cuda_mb"], "repeats": len(ok)}


def report(args: argparse.Namespace, results: dict) -> str:
    seq = args.prompt + args.steps
    lines = []
    for which in args.sets:
        cfgs = configs(which, args.size)
        anchor = _params(cfgs["peer"])
        lines += [f"## {SET_TITLES[which]}, {args.size}", "",
                  f"Forward FLOPs per token at context {seq} (``model_cost``, attention over all {seq} positions); "
                  "params / PEER: total parameters relative to the PEER model.", "",
                  "| model | configuration | params | params / PEER | active params | fwd FLOPs/token |",
                  "|---|---|---|---|---|---|"]
        for m in args.methods:
            c = model_cost(cfgs[m], seq_len=seq)
            lines.append(f"| {m} | {describe(m, cfgs[m])} | {_si(c['params'])} | {c['params'] / anchor:.3f} | "
                         f"{_si(c['active_params'])} | {_si(c['flops_forward'])} |")
        mem = "peak GPU memory" if args.device.startswith("cuda") else "peak RSS"
        lines += ["", f"| model | batch | tokens/s | / dense | step median | step p90 | prefill | {mem} | "
                  "param MB | KV MB |", "|---|---|---|---|---|---|---|---|---|---|"]
        for b in args.batches:
            base = results.get((which, "dense", b), {}).get("tokens_per_s")
            for m in args.methods:
                r = results[(which, m, b)]
                if "error" in r:
                    lines.append(f"| {m} | {b} | failed: {r['error']} |")
                    continue
                rel = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
                peak = r["peak_cuda_mb"] if r["peak_cuda_mb"] is not None else r["peak_rss_mb"]
                lines.append(f"| {m} | {b} | {r['tokens_per_s']:,.0f} | {rel} | {r['step_med_s'] * 1e3:.2f} ms | "
                             f"{r['step_p90_s'] * 1e3:.2f} ms | {r['prefill_s'] * 1e3:.1f} ms | {peak:.0f} MB | "
                             f"{r['param_bytes'] / 2**20:.1f} | {r['kv_bytes'] / 2**20:.2f} |")
        base_rss = statistics.median(r["rss_base_mb"] for k, r in results.items() if k[0] == which and "error" not in r)
        lines += ["", f"RSS after importing torch and peerlm, before building the model: {base_rss:.0f} MB.", ""]
    return "\n".join(lines)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def header(args: argparse.Namespace) -> str:
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    cmd = " ".join(["python", "benchmarks/decode_benchmark.py"] + sys.argv[1:])
    return (f"# Decoding with the KV cache ({datetime.now(timezone.utc):%Y-%m-%d}, {platform.machine()}, "
            f"{platform.platform()}, {_cpu_name()}, {os.cpu_count()} CPUs, "
            f"torch {torch.__version__}, {args.threads} thread(s), {args.device})\n\n"
            f"Command: `{cmd}` (git {commit}). Prompt {args.prompt} tokens per sequence, then {args.steps} "
            f"greedy decode steps after {args.warmup} warm-up steps; each (model, batch) in its own process; "
            f"{args.repeats} interleaved repeats: tokens/s and prefill are medians over repeats, step latencies "
            "pooled over them; fp32, eval, no_grad.\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--size", default="L3d80", help="the study's trunk (peerlm.study.design.SIZES)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 64])
    p.add_argument("--prompt", type=int, default=16, help="prompt tokens per sequence")
    p.add_argument("--steps", type=int, default=48, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=4, help="untimed decode steps before the timed pass")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every case")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="L1d48, batch 1 and 8, 8 steps, one repeat")
    p.add_argument("--out", metavar="FILE", help="also write the report (markdown) here")
    p.add_argument("--json", metavar="FILE", help="also write every run's figures as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--set", choices=SETS, help=argparse.SUPPRESS)
    p.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.size, args.batches, args.steps, args.repeats = "L1d48", [1, 8], 8, 1
    size(args.size)  # fails early on an unknown size
    if args.prompt + max(args.steps, args.warmup) > model_config("dense", size(args.size)).context_length:
        p.error("prompt + steps must fit the context length")
    if "dense" not in args.methods:
        args.methods = ["dense"] + args.methods  # the reference of the "/ dense" column
    args.methods = [m for m in METHODS if m in args.methods]
    # a model in both sets (PEER, the anchor of the second) is measured once and reported in both
    cases: dict[tuple, tuple] = {}
    for which in args.sets:
        cfgs = configs(which, args.size)
        for b in args.batches:
            for m in args.methods:
                cases.setdefault((to_json(cfgs[m]), b), (which, m, b))
    runs: dict[tuple, list[dict]] = {key: [] for key in cases}
    for i in range(args.repeats):
        for key, c in cases.items():
            t0 = time.perf_counter()
            runs[key].append(run_case(args, *c))
            print(f"repeat {i + 1}/{args.repeats} {c[0]:<6} {c[1]:<8} batch {c[2]:<3} "
                  f"{time.perf_counter() - t0:5.1f} s", file=sys.stderr)
    results = {}
    for which in args.sets:
        cfgs = configs(which, args.size)
        for b in args.batches:
            for m in args.methods:
                results[(which, m, b)] = summarise(runs[(to_json(cfgs[m]), b)])
    text = header(args) + "\n" + report(args, results)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                       "runs": [r for rs in runs.values() for r in rs]}, f, indent=2)


if __name__ == "__main__":
    main()
