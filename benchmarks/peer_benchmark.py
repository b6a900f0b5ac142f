"""Forward+backward time and peak memory of one PEER layer, per implementation, over a grid of N and tokens.

Each (implementation, N, tokens) case runs in its own process, so peak resident memory (ru_maxrss)
belongs to that case alone. Implementations:
- ``reference``: peerlm's Algorithm 1 path (gather + einsum), dense table gradients;
- ``fused``, ``fused-sparse``: peerlm's fused path with dense or row-sparse table gradients;
- ``fused-in-backward``: the fused path with the tables' update in the backward
  (``peerlm.optim.update_in_backward``: no table gradient is stored); needs ``--update``;
- ``experts-only``: the fused sparse-gradient expert computation alone, on ids and gates retrieved
  once before timing (so retrieval, whose sub-key scoring grows with sqrt(N), is left out);
- ``peer-pytorch``: ``peer-pytorch==0.2.2`` (softmax gates, ``non_competing_scores=False``), when
  installed (``pip install peer-pytorch==0.2.2``). Its ``dim_key`` is the width of each query half,
  so it gets ``dim_key // 2`` to do the same arithmetic as ours.

Usage:
    python benchmarks/peer_benchmark.py                       # the default grid
    python benchmarks/peer_benchmark.py --experts 1048576 --tokens 2048 --impls fused-sparse peer-pytorch
    python benchmarks/peer_benchmark.py --quick               # small grid, a smoke run

The step is ``y = layer(x); y.square().mean().backward()`` in fp32 on CPU (or CUDA with --device cuda),
timed ``--repeats`` times after one warm-up step; the table shows the median. With ``--update sgd`` or
``adamw`` it also updates the two expert tables, each implementation with its own best optimizer for
its gradients: torch's SGD / AdamW (foreach) on dense ones, torch's SGD or peerlm's ``RowSparseAdamW``
on row-sparse ones, the same two in the backward for ``fused-in-backward``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

IMPLS = ("reference", "fused", "fused-sparse", "peer-pytorch", "experts-only", "fused-in-backward")
UPDATES = ("none", "sgd", "adamw")


def build(impl: str, dim: int, experts: int, heads: int, topk: int, dim_key: int, device: str):
    import torch

    torch.manual_seed(0)
    if impl == "peer-pytorch":
        from PEER_pytorch import PEER as PublicPEER

        layer = PublicPEER(dim=dim, heads=heads, num_experts=experts, num_experts_per_head=topk,
                           dim_key=dim_key // 2, non_competing_scores=False)
    else:
        from peerlm import PEER

        layer = PEER(dim, experts, heads=heads, topk=topk, dim_key=dim_key,
                     impl="reference" if impl == "reference" else "fused",
                     sparse_grad=impl in ("fused-sparse", "fused-in-backward"))
    return layer.to(device)


def table_optimizer(impl: str, layer, update: str, lr: float = 1e-3):
    """The optimizer of the layer's two expert tables for ``--update`` (None for ``none``)."""
    import torch

    if update == "none":
        return None
    if impl == "peer-pytorch":
        tables = [layer.weight_down_embed.weight, layer.weight_up_embed.weight]
    else:
        tables = [layer.w_down, layer.w_up]
    sparse = impl in ("fused-sparse", "fused-in-backward", "experts-only")
    if update == "sgd":
        opt = torch.optim.SGD(tables, lr=lr)
    elif sparse:
        from peerlm.optim import RowSparseAdamW

        opt = RowSparseAdamW(tables, lr=lr)
    else:
        opt = torch.optim.AdamW(tables, lr=lr, weight_decay=0.0)
    if impl == "fused-in-backward":
        from peerlm.optim import update_in_backward

        update_in_backward(opt)
    return opt


def worker(args: argparse.Namespace) -> dict:
    """Run one case in this process and return its figures."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    layer = build(args.impl, args.dim, args.experts, args.heads, args.topk, args.dim_key, args.device)
    opt = table_optimizer(args.impl, layer, args.update)
    x = torch.randn(1, args.tokens, args.dim, device=args.device, requires_grad=True)
    if args.impl == "experts-only":
        from peerlm.fused import peer_experts

        with torch.no_grad():
            scores, ids = layer.retrieve(x[0])
            gates = scores.softmax(-1).flatten(1)
        ids, x2d = ids.flatten(1), x[0].detach().requires_grad_()
        step = lambda: peer_experts(x2d, ids, gates, layer.w_down, layer.w_up, layer.activation, True)
    else:
        step = lambda: layer(x)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    rss_built = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.repeats + 1):
        sync()
        t0 = time.perf_counter()
        y = step()
        y.square().mean().backward()
        if opt is not None:
            opt.step()
        sync()
        if i:  # the first step is a warm-up
            times.append(time.perf_counter() - t0)
        layer.zero_grad(set_to_none=True)
        x.grad = None
    out = {
        "impl": args.impl, "experts": args.experts, "tokens": args.tokens, "update": args.update,
        "median_s": statistics.median(times), "times_s": times,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "rss_after_build_gib": rss_built,
    }
    if args.device.startswith("cuda"):
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def available(impl: str) -> bool:
    if impl != "peer-pytorch":
        return True
    try:
        import PEER_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def run_case(args: argparse.Namespace, impl: str, experts: int, tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--impl", impl, "--experts", str(experts), "--tokens", str(tokens),
           "--dim", str(args.dim), "--heads", str(args.heads), "--topk", str(args.topk),
           "--dim-key", str(args.dim_key), "--repeats", str(args.repeats), "--device", args.device,
           "--threads", str(args.threads), "--update", args.update]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        reason = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        return {"impl": impl, "experts": experts, "tokens": tokens, "error": reason[:120]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--impls", nargs="+", default=list(IMPLS[:4]), choices=IMPLS)
    p.add_argument("--experts", type=int, nargs="+", default=[128**2, 256**2, 512**2, 1024**2])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--dim-key", type=int, default=128)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--update", default="none", choices=UPDATES,
                   help="also update the expert tables in each step, with this rule (see the docstring)")
    p.add_argument("--quick", action="store_true", help="a small grid: N in {64^2, 128^2}, 256 tokens")
    p.add_argument("--json", help="also write all figures to this JSON file")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--impl", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.experts, args.tokens = args.experts[0], args.tokens[0]
        print(json.dumps(worker(args)))
        return 0
    if args.quick:
        args.experts, args.tokens, args.repeats = [64**2, 128**2], [256], 3
    if "fused-in-backward" in args.impls and args.update == "none":
        p.error("fused-in-backward updates the tables in the backward: give --update sgd or adamw")

    import torch

    what = "forward+backward" + ("" if args.update == "none" else f"+{args.update} update of the tables")
    print(f"# PEER layer {what}, fp32, {args.device}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"# machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}, python {platform.python_version()}")
    print(f"# dim {args.dim}, heads {args.heads}, topk {args.topk}, dim_key {args.dim_key}; "
          f"median of {args.repeats} steps after a warm-up; peak RSS of the case's own process; "
          f"THP_MEM_ALLOC_ENABLE={os.environ.get('THP_MEM_ALLOC_ENABLE', 'unset')} for every implementation")
    impls = [i for i in args.impls if available(i)]
    for missing in sorted(set(args.impls) - set(impls)):
        print(f"# {missing}: not installed, skipped (pip install peer-pytorch==0.2.2)")
    header = f"{'impl':<19}{'N':>10}{'tokens':>8}{'step s':>9}{'peak GiB':>10}{'built GiB':>10}"
    print(header)
    print("-" * len(header))
    results = []
    for experts in args.experts:
        for tokens in args.tokens:
            for impl in impls:
                r = run_case(args, impl, experts, tokens)
                results.append(r)
                if "error" in r:
                    print(f"{impl:<19}{experts:>10}{tokens:>8}  failed: {r['error']}")
                else:
                    print(f"{impl:<19}{experts:>10}{tokens:>8}{r['median_s']:>9.3f}{r['peak_rss_gib']:>10.2f}"
                          f"{r['rss_after_build_gib']:>10.2f}", flush=True)
    summarize(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def summarize(results: list[dict]) -> None:
    ok = {(r["impl"], r["experts"], r["tokens"]): r for r in results if "error" not in r}
    print()
    for (impl, experts, tokens), r in sorted(ok.items()):
        base = ok.get(("peer-pytorch", experts, tokens))
        if impl.startswith("fused") and base:
            print(f"# {impl} vs peer-pytorch at N={experts}, {tokens} tokens: "
                  f"{base['median_s'] / r['median_s']:.1f}x faster, "
                  f"{r['peak_rss_gib'] / base['peak_rss_gib']:.2f}x the peak memory")
    for impl in ("fused", "fused-sparse", "fused-in-backward", "experts-only"):
        runs = sorted((e, t, r) for (i, e, t), r in ok.items() if i == impl)
        for tokens in sorted({t for _, t, _ in runs}):
            by_n = {e: r["median_s"] for e, t, r in runs if t == tokens}
            if len(by_n) > 1:
                lo, hi = min(by_n), max(by_n)
                print(f"# {impl}, {tokens} tokens: step time at N={hi} / at N={lo} = {by_n[hi] / by_n[lo]:.2f}")


if __name__ == "__main__":
    sys.exit(main())
