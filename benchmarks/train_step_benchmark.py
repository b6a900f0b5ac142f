"""Time of one full training step (forward, backward, clipping, optimizer) of a small PEER LM, at two
expert counts, with torch's dense AdamW against peerlm's row-sparse AdamW, at the step or in the backward.

With dense AdamW the expert tables get dense (N, d) gradients and the optimizer reads and writes
four (N, d) arrays (parameter, gradient, m, v) every step, so a step's cost grows with N. With
``sparse_optimizer`` (PEER ``sparse_grad=True`` + ``RowSparseAdamW``) only the rows retrieved in the
batch are touched: U rows (``rows/step``), at most tokens * h * k, which is what the sparse step's cost
follows; from N = 128^2 to 1024^2 U itself grows (a batch retrieves most of 16k experts, a fraction of
1M), and the O(sqrt(N)) sub-key scoring remains N-dependent. ``backward`` is the row-sparse AdamW
updating the tables inside the backward (``train.expert_update=backward``): its table update is
counted in fwd+bwd, and clipping sees the other parameters only.

Each (N, optimizer) case runs in its own process, so peak memory (ru_maxrss) is that case's alone.

Usage:
    python benchmarks/train_step_benchmark.py                  # N = 128^2 and 1024^2, both optimizers
    python benchmarks/train_step_benchmark.py --quick          # N = 16^2 and 64^2, a smoke run
    python benchmarks/train_step_benchmark.py --experts 16384 262144 --dim 256 --repeats 7
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

OPTIMIZERS = ("dense", "sparse", "backward")


def worker(args: argparse.Namespace) -> dict:
    """Build the model, run warm-up and timed steps in this process, return the figures."""
    import torch

    from peerlm.config import ModelConfig, PEERConfig
    from peerlm.model import build_model
    from peerlm.optim import build_optimizer, clip_grad_norm

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    sparse = args.optimizer in ("sparse", "backward")
    cfg = ModelConfig(vocab_size=args.vocab, context_length=args.seq_len, dim=args.dim, n_layers=args.layers,
                      n_heads=args.heads_attn, ffn=PEERConfig(num_experts=args.experts, heads=args.heads,
                                                              topk=args.topk, dim_key=args.dim_key,
                                                              sparse_grad=sparse))
    t_build = time.perf_counter()
    model = build_model(cfg, args.device)
    t_build = time.perf_counter() - t_build
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), sparse_experts=sparse,
                          in_backward=args.optimizer == "backward")
    table = model.blocks[cfg.sparse_blocks()[0]].ffn.w_up
    params = [p for g in opt.param_groups for p in g["params"]]
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    gen = torch.Generator().manual_seed(0)
    steps, fwd_bwd, optim = [], [], []
    for i in range(args.warmup + args.repeats):
        x = torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen).to(args.device)
        sync()
        t0 = time.perf_counter()
        _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        sync()
        t1 = time.perf_counter()
        if i == 0:  # untimed: rows of one table that got gradient (distinct experts retrieved)
            g = table.grad
            if g is None:  # updated in the backward: the rows its first update touched
                rows = int(opt.optimizers[-1].state[table]["step"].count_nonzero())
            else:
                rows = g.coalesce()._nnz() if g.is_sparse else int((g != 0).any(dim=1).sum())
            t1 = time.perf_counter()
        clip_grad_norm(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t2 = time.perf_counter()
        if i >= args.warmup:
            steps.append(t2 - t0)
            fwd_bwd.append(t1 - t0)
            optim.append(t2 - t1)
    return {
        "experts": args.experts, "optimizer": args.optimizer, "step_s": statistics.median(steps),
        "fwd_bwd_s": statistics.median(fwd_bwd), "optim_s": statistics.median(optim), "build_s": t_build,
        "rows": rows, "params": model.num_params(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_case(args: argparse.Namespace, experts: int, optimizer: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--experts-one", str(experts), "--optimizer", optimizer]
    for name in ("dim", "layers", "heads_attn", "heads", "topk", "dim_key", "vocab", "seq_len", "batch",
                 "warmup", "repeats", "threads", "device"):
        cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or ["(no output)"]
        return {"experts": experts, "optimizer": optimizer, "error": tail[0]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _n(experts: int) -> str:
    n = int(round(experts**0.5))
    return f"{n}^2" if n * n == experts else str(experts)


def report(args: argparse.Namespace, rows: list[dict]) -> str:
    lines = [f"PEER LM training step: d={args.dim}, {args.layers} layers, PEER h={args.heads} k={args.topk} "
             f"d_key={args.dim_key} in the middle block; batch {args.batch} x {args.seq_len} tokens; "
             f"median of {args.repeats} steps after {args.warmup} warm-up; {args.device}, "
             f"{args.threads or 'default'} threads",
             f"{'N':>8}  {'optimizer':<10}{'step':>10}{'fwd+bwd':>10}{'optim':>10}{'rows/step':>11}"
             f"{'params':>10}{'peak RSS':>11}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{_n(r['experts']):>8}  {r['optimizer']:<10}  failed: {r['error']}")
            continue
        lines.append(f"{_n(r['experts']):>8}  {r['optimizer']:<10}{r['step_s'] * 1e3:>8.0f}ms"
                     f"{r['fwd_bwd_s'] * 1e3:>8.0f}ms{r['optim_s'] * 1e3:>8.0f}ms{r['rows']:>11,}"
                     f"{r['params'] / 1e6:>9.1f}M"
                     f"{r['peak_rss_mb']:>9.0f}MB")
    lo, hi = min(args.experts), max(args.experts)
    lines.append("")
    for opt in OPTIMIZERS:
        by = {r["experts"]: r for r in rows if r["optimizer"] == opt and "error" not in r}
        if lo in by and hi in by:
            lines.append(f"step time ratio N={_n(hi)} / N={_n(lo)} with {opt} optimizer: "
                         f"{by[hi]['step_s'] / by[lo]['step_s']:.2f}x "
                         f"(optimizer alone {by[hi]['optim_s'] / by[lo]['optim_s']:.1f}x)")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--experts", type=int, nargs="+", default=[128**2, 1024**2],
                   help="N values (perfect squares)")
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads-attn", type=int, default=2)
    p.add_argument("--heads", type=int, default=8, help="PEER heads h")
    p.add_argument("--topk", type=int, default=16, help="PEER top-k")
    p.add_argument("--dim-key", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true", help="N = 16^2 and 64^2, 3 repeats")
    p.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--experts-one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--optimizer", choices=OPTIMIZERS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.experts = args.experts_one
        print(json.dumps(worker(args)))
        return
    if args.quick:
        args.experts, args.repeats = [16**2, 64**2], 3
    rows = [run_case(args, n, opt) for opt in args.optimizers for n in args.experts]
    print(report(args, rows))
    if args.json:
        meta = {"when": datetime.now(timezone.utc).isoformat(), "machine": platform.platform(),
                "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
