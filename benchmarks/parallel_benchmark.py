"""Column-sharded PEER expert tables: communication and memory arithmetic, and a measured step at P ranks.

Without ``--ranks`` it prints the arithmetic of ``peerlm.parallel.arithmetic``: bytes per token of column
vs row sharding, and memory per rank of one PEER layer's tables at N = 1024^2, d_model 1024/2048/4096,
P = 1/8/64. With ``--ranks 1 2`` it also measures a column-sharded ``PEER`` layer's training step (forward,
backward, AdamW step) on P local processes for each P listed (gloo on CPU; ``--device cuda``: nccl, rank
r on cuda:r), with a fixed global batch of ``--tokens`` split evenly over the ranks, and the unsharded
``PEER`` (fused path) in one process as the baseline. Per rank: median step time over ``--repeats``
steps after one warm-up (the slowest rank's), peak memory (CUDA: ``max_memory_allocated``; CPU: peak
resident set of the rank's process, torch's runtime included, and its rise during the steps) and the
table storage it holds.

Usage:
    python benchmarks/parallel_benchmark.py                              # arithmetic only
    OMP_NUM_THREADS=1 python benchmarks/parallel_benchmark.py --ranks 1 2
    python benchmarks/parallel_benchmark.py --device cuda --ranks 1 2 4 8 --experts 1048576 --dim 2048
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from datetime import datetime, timezone

GiB = 2**30


def print_arithmetic(tokens_per_rank: int, heads: int, topk: int) -> None:
    from peerlm.parallel.arithmetic import comm_bytes_per_token, memory_per_rank

    print(f"# communication per token of a rank's batch, one PEER layer, forward + backward, KB; h {heads}, "
          f"k {topk}, bf16 activations, fp32 scores, int32 ids")
    print(f"{'d_model':>8}{'P':>5}{'column':>10}{'row':>10}{'row/col':>9}")
    for dim in (1024, 2048, 4096):
        for P in (2, 8, 64):
            col = comm_bytes_per_token(dim, heads, topk, P, "column")["total"] / 1e3
            row = comm_bytes_per_token(dim, heads, topk, P, "row")["total"] / 1e3
            print(f"{dim:>8}{P:>5}{col:>10.1f}{row:>10.1f}{row / col:>9.1f}")
    print()
    print(f"# memory per rank of one column-sharded PEER layer's tables, N = 1024^2, fp32 weights and "
          f"activations, {tokens_per_rank} tokens per rank, GiB")
    header = f"{'d_model':>8}{'P':>5}{'params':>9}{'grads':>9}{'AdamW':>9}{'activ.':>9}{'total':>9}{'sparse g':>10}"
    print(header)
    for dim in (1024, 2048, 4096):
        for P in (1, 8, 64):
            m = memory_per_rank(1024**2, dim, P, heads, topk, tokens_per_rank)
            sparse = memory_per_rank(1024**2, dim, P, heads, topk, tokens_per_rank, sparse_grad=True)
            print(f"{dim:>8}{P:>5}" + "".join(f"{m[k] / GiB:>9.2f}" for k in ("params", "grads", "adamw",
                                                                           "activations", "total"))
                  + f"{sparse['grads'] / GiB:>10.2f}")
    print("# sparse g: row-sparse gradients of the rows the group's batch retrieves (uniform routing);")
    print("# activations: what backward keeps (own x columns of the group's tokens, the group's ids and")
    print("# gated activations); routing (query, norm, sub-keys) is replicated and small, not counted")


def _rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


def measure(rank: int, ranks: int, cfg: dict) -> dict:
    """One rank's figures for the sharded layer (or the unsharded one when cfg['unsharded'])."""
    import torch
    import torch.distributed as dist

    from peerlm import PEER
    from peerlm.optim import GroupedOptimizer, RowSparseAdamW
    from peerlm.parallel import sharded_peer

    device = torch.device("cuda", rank) if cfg["device"] == "cuda" else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    options = dict(heads=cfg["heads"], topk=cfg["topk"], dim_key=cfg["dim_key"], query_norm="none",
                   sparse_grad=cfg["sparse"])
    torch.manual_seed(0)
    if cfg["unsharded"]:
        layer = PEER(cfg["dim"], cfg["experts"], impl="fused", **options).to(device)
    else:
        layer = sharded_peer(cfg["dim"], cfg["experts"], device=device, **options)
    # AdamW as peerlm trains: torch's (foreach=False) for the routing and dense tables, peerlm's
    # row-sparse one for the tables' sparse gradients
    tables = [layer.w_down, layer.w_up]
    routing = [p for p in layer.parameters() if all(p is not t for t in tables)]
    opts = [torch.optim.AdamW(routing, lr=1e-3, foreach=False)]
    opts.append(RowSparseAdamW(tables, lr=1e-3) if cfg["sparse"] else torch.optim.AdamW(tables, lr=1e-3, foreach=False))
    opt = GroupedOptimizer(opts)
    tokens = cfg["tokens"] // ranks
    x = torch.randn(tokens, cfg["dim"], device=device, generator=None, requires_grad=True)
    table_gib = (layer.w_down.numel() + layer.w_up.numel()) * layer.w_down.element_size() / GiB
    rss_built = _rss_gib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times, passes = [], []
    for i in range(cfg["repeats"] + 1):
        sync()
        if ranks > 1:
            dist.barrier()
        t0 = time.perf_counter()
        layer(x).square().mean().backward()
        sync()
        t1 = time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:  # the first step is a warm-up (and allocates AdamW's state)
            times.append(time.perf_counter() - t0)
            passes.append(t1 - t0)
    out = {"rank": rank, "ranks": ranks, "unsharded": cfg["unsharded"], "median_s": statistics.median(times),
           "fwd_bwd_s": statistics.median(passes),
           "table_gib": table_gib, "peak_rss_gib": _rss_gib(), "rss_built_gib": rss_built}
    if device.type == "cuda":
        out["peak_cuda_gib"] = torch.cuda.max_memory_allocated(device) / GiB
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ranks", type=int, nargs="*", default=[], help="measure at these numbers of ranks")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--experts", type=int, default=256**2)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--dim-key", type=int, default=128)
    p.add_argument("--tokens", type=int, default=2048, help="global batch, split evenly over the ranks")
    p.add_argument("--tokens-per-rank", type=int, default=8192, help="for the memory arithmetic")
    p.add_argument("--sparse", action="store_true", help="row-sparse table gradients and peerlm's RowSparseAdamW")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", help="also write the measured figures to this JSON file")
    args = p.parse_args(argv)
    print_arithmetic(args.tokens_per_rank, args.heads, args.topk)
    if not args.ranks:
        return 0

    import torch

    from peerlm.parallel.launch import spawn

    if args.device == "cuda" and max(args.ranks) > torch.cuda.device_count():
        print(f"peerlm: error: {max(args.ranks)} ranks need as many GPUs, found {torch.cuda.device_count()}",
              file=sys.stderr)
        return 2
    backend = "nccl" if args.device == "cuda" else "gloo"
    threads = os.environ.get("OMP_NUM_THREADS", "unset")
    print()
    print(f"# measured: column-sharded PEER train step (forward, backward, AdamW), {args.device} ({backend}); "
          f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; torch {torch.__version__}, "
          f"python {platform.python_version()}, {os.cpu_count()} cores, OMP_NUM_THREADS={threads}")
    print(f"# d_model {args.dim}, N {args.experts}, h {args.heads}, k {args.topk}, d_key {args.dim_key}, "
          f"{args.tokens} tokens per step in all, fp32, {'row-sparse' if args.sparse else 'dense'} table "
          f"gradients; median of {args.repeats} steps after a warm-up")
    mem = "peak CUDA GiB" if args.device == "cuda" else "peak RSS GiB"
    header = (f"{'layout':<11}{'ranks':>6}{'tokens/rank':>12}{'fwd+bwd s':>10}{'step s':>9}{'tables GiB':>11}"
              f"{mem:>15}{'rise GiB':>10}")
    print(header)
    print("-" * len(header))
    cases = [(1, True)] + [(P, False) for P in args.ranks]
    results = []
    for P, unsharded in cases:
        cfg = {**vars(args), "unsharded": unsharded}
        per_rank = spawn(measure, P, args=(cfg,), backend=backend, timeout_s=600)
        results.append(per_rank)
        slow = max(per_rank, key=lambda r: r["median_s"])
        peak = max(r.get("peak_cuda_gib", r["peak_rss_gib"]) for r in per_rank)
        rise = max(r["peak_rss_gib"] - r["rss_built_gib"] for r in per_rank)
        layout = "unsharded" if unsharded else "column"
        passes = max(r["fwd_bwd_s"] for r in per_rank)
        print(f"{layout:<11}{P:>6}{args.tokens // P:>12}{passes:>10.3f}{slow['median_s']:>9.3f}"
              f"{slow['table_gib']:>11.3f}{peak:>15.2f}{rise:>10.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
