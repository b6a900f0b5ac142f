"""Speed and memory of sparse memory finetuning (``peerlm finetune --method sparse``).

1. ``update``: the cost of a sparse step's update follows t, the rows chosen, not N, the rows of the
   table. For N in {256^2, 1024^2} and t in {500, 10000}, one PEER layer's tables get the row-sparse
   gradients of a batch (``tokens`` x h x k retrievals, drawn at random), and a step runs what
   ``SparseRows`` and the optimizer do: count the ids, rank them by TF-IDF, keep the top t rows of both
   tables' gradients, SGD (or the lazy row-sparse AdamW) on them. Next to it, for reference, what a
   dense re-implementation does: a dense (N, d) gradient with every row but the chosen zeroed, and a
   dense SGD step.
2. ``memory``: peak memory (ru_maxrss) of a sparse finetuning step of a one-block PEER LM with
   N = 1024^2 against that model's inference (a forward pass without autograd) on the same batch.
   Each case runs in its own process, so its peak is its own. The target is a ratio of at most 1.2.

Not a test: run it on a quiet machine. Results go to stdout as a table and, with ``--write``, to
benchmarks/results/continual_cpu.md.

Usage:
    python benchmarks/continual_benchmark.py                 # both parts, the sizes above
    python benchmarks/continual_benchmark.py --quick         # N = 64^2 / 128^2, t 50 / 500: a smoke run
    python benchmarks/continual_benchmark.py --part update --repeats 9 --write
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
from pathlib import Path


def _update_case(args: argparse.Namespace, N: int, t: int, mode: str) -> dict:
    import torch

    from peerlm.continual.memory import idf, keep_rows, top_tfidf
    from peerlm.optim import RowSparseAdamW

    torch.manual_seed(0)
    D = args.dim
    tables = [torch.nn.Parameter(torch.randn(N, D) * D**-0.5) for _ in range(2)]
    idf_N = idf(torch.randint(0, args.background, (N,)), args.background)
    opt = (RowSparseAdamW(tables, lr=1e-3) if mode == "adamw" else torch.optim.SGD(tables, lr=1.0, foreach=False))
    retrievals = args.tokens * args.heads * args.topk
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(args.warmup + args.repeats):
        ids = torch.randint(0, N, (retrievals,), generator=gen)
        vals = torch.randn(retrievals, D, generator=gen)
        grads = [torch.sparse_coo_tensor(ids.unsqueeze(0), vals, (N, D), check_invariants=False) for _ in tables]
        t0 = time.perf_counter()
        ids_U, counts_U = torch.unique(ids, sorted=True, return_counts=True)
        rows = top_tfidf(ids_U, counts_U, idf_N, t)
        if mode == "dense-mask":  # the dense re-implementation: an (N, D) gradient, rows zeroed
            keep = torch.zeros(N, dtype=torch.bool)
            keep[rows] = True
            for p, g in zip(tables, grads):
                dense = g.to_dense()
                dense[~keep] = 0
                p.grad = dense
        else:
            for p, g in zip(tables, grads):
                p.grad = keep_rows(g, rows)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"part": "update", "N": N, "t": t, "mode": mode, "rows_retrieved": int(ids_U.numel()),
            "ms": 1000 * statistics.median(times)}


def _memory_case(args: argparse.Namespace, N: int, mode: str) -> dict:
    import torch

    from peerlm.config import ModelConfig, PEERConfig
    from peerlm.continual.memory import SparseRows, table_parameters
    from peerlm.model import build_model

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=args.vocab, context_length=args.seq_len, dim=args.dim, n_layers=1, n_heads=4,
                      ffn=PEERConfig(num_experts=N, heads=args.heads, topk=args.topk, dim_key=args.dim_key))
    model = build_model(cfg)
    x = torch.randint(0, args.vocab, (args.batch, args.seq_len))
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if mode == "inference":
        model.eval()
        with torch.no_grad():
            for _ in range(2):
                model(x)
    else:
        name, layer = model.memory_layers()[0]
        layer.sparse_grad = True
        tables = table_parameters(layer)
        for p in model.parameters():
            p.requires_grad = any(p is q for q in tables)
        hooks = SparseRows(model, {name: torch.zeros(N, dtype=torch.int64)}, args.background, args.case_t)
        opt = torch.optim.SGD(tables, lr=1.0, foreach=False)
        model.train()
        for step in range(2):
            hooks.begin_step(model, step)
            _, loss = model(x, x)
            loss.backward()
            hooks.before_update(model, step)
            opt.step()
            opt.zero_grad(set_to_none=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return {"part": "memory", "N": N, "mode": mode, "peak_gib": peak * scale / 2**30,
            "after_build_gib": base * scale / 2**30}


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    if args.case_part == "update":
        return _update_case(args, args.case_n, args.case_t, args.case_mode)
    return _memory_case(args, args.case_n, args.case_mode)


def _run(argv: list[str], case: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", *case], capture_output=True, text=True,
                         check=False)
    if out.returncode:
        raise RuntimeError(f"case {case} failed: {out.stderr.strip()[-400:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("update", "memory", "all"), default="all")
    p.add_argument("--quick", action="store_true", help="small N and t: a smoke run")
    p.add_argument("--experts", type=int, nargs="+", default=None, help="N values (default 256^2 1024^2)")
    p.add_argument("--slots", type=int, nargs="+", default=None, help="t values (default 500 10000)")
    p.add_argument("--modes", nargs="+", default=["sgd", "adamw", "dense-mask"])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per batch (retrievals = tokens x h x k)")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--dim-key", type=int, default=128)
    p.add_argument("--background", type=int, default=100)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--write", action="store_true", help="write benchmarks/results/continual_cpu.md")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case-part", help=argparse.SUPPRESS)
    p.add_argument("--case-n", type=int, help=argparse.SUPPRESS)
    p.add_argument("--case-t", type=int, help=argparse.SUPPRESS)
    p.add_argument("--case-mode", help=argparse.SUPPRESS)
    args, _ = p.parse_known_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    experts = args.experts or ([64**2, 128**2] if args.quick else [256**2, 1024**2])
    slots = args.slots or ([50, 500] if args.quick else [500, 10000])
    base = [a for a in sys.argv[1:] if a != "--write"]
    rows = []
    if args.part in ("update", "all"):
        for N in experts:
            for t in slots:
                for mode in args.modes:
                    rows.append(_run(base, ["--case-part", "update", "--case-n", str(N), "--case-t", str(t),
                                            "--case-mode", mode]))
                    r = rows[-1]
                    print(f"update N={N:>8} t={t:>6} {mode:>10}: {r['ms']:8.2f} ms "
                          f"({r['rows_retrieved']:,} rows retrieved)", flush=True)
    if args.part in ("memory", "all"):
        N = max(experts)
        for mode in ("inference", "sparse"):
            rows.append(_run(base, ["--case-part", "memory", "--case-n", str(N), "--case-t", str(max(slots)),
                                    "--case-mode", mode]))
            print(f"memory N={N:>8} {mode:>10}: peak {rows[-1]['peak_gib']:.2f} GiB", flush=True)
        inf, sp = rows[-2]["peak_gib"], rows[-1]["peak_gib"]
        print(f"memory: sparse finetuning / inference peak = {sp / inf:.2f} (target <= 1.2)")
    if args.write:
        lines = ["# Sparse memory finetuning: update cost and memory (CPU)", "",
                 f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
                 f"{args.threads} thread(s); `python benchmarks/continual_benchmark.py {' '.join(base)}`", "",
                 "| part | N | t | mode | result |", "|---|---|---|---|---|"]
        for r in rows:
            res = f"{r['ms']:.2f} ms" if r["part"] == "update" else f"peak {r['peak_gib']:.2f} GiB"
            lines.append(f"| {r['part']} | {r['N']} | {r.get('t', '')} | {r['mode']} | {res} |")
        out = Path(__file__).parent / "results" / "continual_cpu.md"
        out.write_text("\n".join(lines) + "\n")
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
