"""PEER on CUDA: forward and forward+backward time and achieved memory bandwidth, Triton vs the other paths.

Two modes, each over dim in {512, 1024, 2048} at N = 1024^2, h 8, k 16 (h*k = 128), 16K tokens, bf16:
- ``experts``: the expert mixture alone, on ids and gates retrieved once before timing, for
  ``triton`` (deterministic reduction), ``triton-atomic``, ``fused`` (embedding-bag) and ``reference``
  (gather + einsum). This is the memory-bound part the kernels are for.
- ``layer``: the whole PEER layer (retrieval included) for the same four and ``peer-pytorch``
  (``peer-pytorch==0.2.2``, when importable; softmax gates, ``dim_key // 2`` per query half so it does
  the same arithmetic, dense table gradients as it has no other kind).

Bandwidth = bytes that must move / time, with the bytes of the minimal traffic of the expert mixture:
forward reads every gathered row once (2 * T * M rows of D values: u and v), x, ids and gates, and
writes y and z; backward re-reads the gathered rows, reads x and dy, writes dx and dg, and writes each
table-gradient row once (the U distinct retrieved rows with row-sparse gradients, all N with dense
ones). Rows are counted per retrieval, not per distinct expert: at 1024^2 experts the tables are GiBs
against an L2 of tens of MiB, so a row retrieved twice is read from HBM twice. The fraction of peak
uses the device's HBM bandwidth from ``PEAK_TBS`` (by device name), ``--peak-tbs`` to override; a
device-to-device copy is measured too and reported beside it. In ``layer`` mode the same byte count
is used, so there the figure is an effective bandwidth that retrieval lowers.

Timing: CUDA events around each call, median of ``--repeats`` after ``--warmup`` calls (Triton compiles
in the first); forward is timed with autograd recording, as in training. Table gradients are row-sparse
(``sparse_grad=True``, what ``train.sparse_optimizer`` uses) unless ``--dense-grad``.

Usage:
    python benchmarks/peer_triton_benchmark.py --out benchmarks/results/peer_triton_h200.json
    python benchmarks/peer_triton_benchmark.py --dims 512 --modes experts --impls triton triton-atomic
    python benchmarks/peer_triton_benchmark.py --interpret-smoke --out /tmp/smoke.json   # CPU, tiny, no GPU

Without CUDA it refuses, except with ``--interpret-smoke``: tiny shapes on CPU with the Triton kernels
in Triton's interpreter (TRITON_INTERPRET=1), to check the script itself; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone

IMPLS = ("triton", "triton-atomic", "fused", "reference", "peer-pytorch")
MODES = ("experts", "layer")
# HBM bandwidth in TB/s by device name (substring, most specific first), from the vendors' data sheets
PEAK_TBS = (
    ("GH200", 4.0), ("H200", 4.8), ("H100 NVL", 3.9), ("H100 PCIe", 2.0), ("H100", 3.35), ("H800", 3.35),
    ("B200", 8.0), ("B100", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555),
    ("A800", 2.039), ("L40S", 0.864), ("L40", 0.864), ("L4", 0.3), ("A10G", 0.6), ("A10", 0.6),
    ("V100", 0.9), ("RTX 4090", 1.008), ("RTX 3090", 0.936), ("MI300X", 5.3), ("MI250X", 3.2),
)


def peak_for(name: str) -> float | None:
    for key, tbs in PEAK_TBS:
        if key.lower() in name.lower():
            return tbs * 1e12
    return None


def bytes_moved(T: int, M: int, D: int, N: int, U: int, table_bytes: int, act_bytes: int,
                sparse: bool) -> tuple[int, int]:
    """Minimal HBM traffic of the expert mixture: (forward, forward + backward); see the module docstring."""
    rows = 2 * T * M * D * table_bytes  # u and v rows, one read per retrieval
    slots = T * M * (8 + 4)  # int64 ids, fp32 gates
    fwd = rows + slots + T * M * 4 + 2 * T * D * act_bytes  # + z written, x read, y written
    grad_rows = (U if sparse else N) * 2 * D * table_bytes
    bwd = rows + slots + T * M * (4 + 4) + 3 * T * D * act_bytes + grad_rows  # z read, dg written; x, dy, dx
    return fwd, fwd + bwd


def copy_bandwidth(torch, device: str, gib: float = 2.0) -> float:
    """Bytes per second of a device-to-device copy (read + write), the best a plain kernel gets."""
    src = torch.empty(int(gib * 2**30) // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(5):
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * gib * 2**30 / statistics.median(times)


class Timer:
    def __init__(self, torch, cuda: bool):
        self.torch, self.cuda = torch, cuda

    def __call__(self, fn, before=None, warmup: int = 2, repeats: int = 10) -> float:
        """Median seconds of ``fn()``; ``before()`` runs untimed ahead of each call."""
        times = []
        for i in range(warmup + repeats):
            if before:
                before()
            if self.cuda:
                start = self.torch.cuda.Event(enable_timing=True)
                end = self.torch.cuda.Event(enable_timing=True)
                self.torch.cuda.synchronize()
                start.record()
                fn()
                end.record()
                self.torch.cuda.synchronize()
                elapsed = start.elapsed_time(end) / 1e3
            else:
                t0 = time.perf_counter()
                fn()
                elapsed = time.perf_counter() - t0
            if i >= warmup:
                times.append(elapsed)
        return statistics.median(times)


def peer_pytorch_available() -> bool:
    try:
        import PEER_pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def run_dim(torch, args, dim: int, timer: Timer) -> list[dict]:
    """Every (mode, impl, tile) case at one width, on one PEER layer whose ``impl`` is switched between runs."""
    from peerlm import PEER, kernels
    from peerlm.fused import peer_experts
    from peerlm.kernels import peer_triton

    dev, dtype, sparse = args.device, args.dtype, not args.dense_grad
    torch.manual_seed(0)
    layer = PEER(dim, args.experts, heads=args.heads, topk=args.topk, dim_key=args.dim_key, sparse_grad=sparse,
                 device=dev, dtype=dtype)
    T, M, N = args.tokens, args.heads * args.topk, args.experts
    x = torch.randn(T, dim, device=dev, dtype=dtype)
    dy = torch.randn(T, dim, device=dev, dtype=dtype)
    with torch.no_grad():
        scores, ids_THK = layer.retrieve(x)
        gates = scores.softmax(-1)  # (T, H, K) fp32, as the layer gates them
    U = torch.unique(ids_THK).numel()
    elem = torch.empty((), dtype=dtype).element_size()
    fwd_bytes, step_bytes = bytes_moved(T, M, dim, N, U, elem, elem, sparse)
    xg, gg, ids_TM = x.clone().requires_grad_(), gates.clone().requires_grad_(), ids_THK.view(T, M)
    reduction = lambda impl: "atomic" if impl == "triton-atomic" else "deterministic"

    def build(mode: str, impl: str):
        """(the call to time, the parameters whose gradients it makes)."""
        tables = [layer.w_down, layer.w_up]
        if mode == "experts":
            if impl.startswith("triton"):
                return lambda: peer_triton.peer_experts_triton(xg, ids_TM, gg.view(T, M), *tables, layer.activation,
                                                               sparse, reduction(impl)), tables
            if impl == "fused":
                return lambda: peer_experts(xg, ids_TM, gg.view(T, M), *tables, layer.activation, sparse), tables
            return lambda: layer._experts_reference(xg, ids_THK, gg), tables
        if impl == "peer-pytorch":
            from PEER_pytorch import PEER as PublicPEER

            with torch.device(dev):  # its 1024^2-row tables are built and initialised on the device
                public = PublicPEER(dim=dim, heads=args.heads, num_experts=N, num_experts_per_head=args.topk,
                                    dim_key=args.dim_key // 2, non_competing_scores=False).to(dtype)
            return lambda: public(xg[None])[0], list(public.parameters())
        layer.impl = "triton" if impl.startswith("triton") else impl
        kernels.set_triton_reduction(reduction(impl))
        return lambda: layer(xg), list(layer.parameters())

    def measure(mode: str, impl: str) -> dict:
        fn, params = build(mode, impl)

        def clear():
            xg.grad = gg.grad = None
            for p in params:
                p.grad = None

        try:
            if timer.cuda:
                torch.cuda.reset_peak_memory_stats()
            out = {"fwd_s": timer(fn, clear, args.warmup, args.repeats),
                   "fwd_bwd_s": timer(lambda: fn().backward(dy), clear, args.warmup, args.repeats)}
            if timer.cuda:
                out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["fwd_gbs"] = fwd_bytes / out["fwd_s"] / 1e9
            out["fwd_bwd_gbs"] = step_bytes / out["fwd_bwd_s"] / 1e9
            if args.peak:
                out["fwd_peak_frac"] = out["fwd_gbs"] * 1e9 / args.peak
                out["fwd_bwd_peak_frac"] = out["fwd_bwd_gbs"] * 1e9 / args.peak
            return out
        finally:
            clear()

    cases = [(mode, impl, tile) for mode in args.modes for impl in args.impls
             for tile in (args.tiles if impl.startswith("triton") else [None])
             if not (mode == "experts" and impl == "peer-pytorch")]
    default_tile, results = peer_triton._TILE, []
    for mode, impl, tile in cases:
        case = {"mode": mode, "impl": impl, "tile": tile, "dim": dim, "experts": N, "tokens": T,
                "heads": args.heads, "topk": args.topk, "dtype": str(dtype).removeprefix("torch."),
                "sparse_grad": sparse and impl != "peer-pytorch", "distinct_experts": U,
                "fwd_bytes": fwd_bytes, "fwd_bwd_bytes": step_bytes}
        peer_triton._TILE = tile or default_tile
        try:
            case.update(measure(mode, impl))
        except Exception as e:  # one failing case (an OOM, a missing package) must not end the run
            case["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if timer.cuda:
            torch.cuda.empty_cache()  # peer-pytorch's layer is gone with measure's frame
        results.append(case)
        print_row(case)
    kernels.set_triton_reduction("deterministic")
    peer_triton._TILE = default_tile
    return results


HEADER = (f"{'mode':<8}{'impl':<15}{'tile':>6}{'dim':>5}{'fwd ms':>9}{'fwd GB/s':>10}{'%peak':>7}"
          f"{'f+b ms':>9}{'f+b GB/s':>10}{'%peak':>7}{'mem GiB':>9}")


def print_row(r: dict) -> None:
    head = f"{r['mode']:<8}{r['impl']:<15}{r['tile'] or '-':>6}{r['dim']:>5}"
    if "error" in r:
        print(f"{head}  failed: {r['error']}", flush=True)
        return
    pct = lambda key: f"{100 * r[key]:>7.1f}" if key in r else f"{'-':>7}"
    mem = f"{r['peak_mem_gib']:>9.2f}" if "peak_mem_gib" in r else f"{'-':>9}"
    print(f"{head}{1e3 * r['fwd_s']:>9.3f}{r['fwd_gbs']:>10.1f}{pct('fwd_peak_frac')}"
          f"{1e3 * r['fwd_bwd_s']:>9.3f}{r['fwd_bwd_gbs']:>10.1f}{pct('fwd_bwd_peak_frac')}{mem}", flush=True)


def summarize(results: list[dict]) -> list[str]:
    """The issue's targets, as measured: fwd >= 60% of peak, >= 5x peer-pytorch, deterministic <= 1.5x atomic."""
    ok: dict[tuple, dict] = {}
    for r in results:  # the fastest tile of each Triton case
        key = (r["mode"], r["impl"], r["dim"])
        if "error" not in r and (key not in ok or r["fwd_bwd_s"] < ok[key]["fwd_bwd_s"]):
            ok[key] = r
    lines = []
    for (mode, impl, dim), r in sorted(ok.items()):
        if impl != "triton":
            continue
        at = f"{mode} dim {dim} (tile {r['tile']})"
        if "fwd_peak_frac" in r and mode == "experts":
            lines.append(f"{at}: triton forward at {100 * r['fwd_peak_frac']:.1f}% of peak (goal >= 60%)")
        atomic = ok.get((mode, "triton-atomic", dim))
        if atomic:
            lines.append(f"{at}: forward+backward time deterministic / atomic = "
                         f"{r['fwd_bwd_s'] / atomic['fwd_bwd_s']:.2f} (goal <= 1.5)")
        for other in ("fused", "reference", "peer-pytorch"):
            base = ok.get((mode, other, dim))
            if base:
                goal = " (goal >= 5)" if other == "peer-pytorch" else ""
                lines.append(f"{at}: forward+backward time {other} / triton = "
                             f"{base['fwd_bwd_s'] / r['fwd_bwd_s']:.2f}{goal}")
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dims", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--experts", type=int, default=1024**2)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--topk", type=int, default=16)
    p.add_argument("--dim-key", type=int, default=128)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--dense-grad", action="store_true", help="dense (N, D) table gradients instead of row-sparse")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-tbs", type=float, help="HBM peak in TB/s (default: from the device name)")
    p.add_argument("--tiles", type=int, nargs="+", default=[8192],
                   help="elements per gathered-row tile of the Triton kernels to try (sets BLOCK_M and warps)")
    p.add_argument("--out", help="write the figures to this JSON file")
    p.add_argument("--interpret-smoke", action="store_true",
                   help="tiny shapes on CPU in Triton's interpreter: checks the script, measures nothing")
    args = p.parse_args(argv)

    if args.interpret_smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # read when the kernels launch
    import torch

    try:
        import triton
    except ImportError:
        print("peer_triton_benchmark: Triton is not installed; pip install 'peerlm[triton]'", file=sys.stderr)
        return 2
    if args.interpret_smoke:
        args.dims, args.experts, args.tokens, args.heads, args.topk, args.dim_key = [24, 40], 16**2, 9, 2, 3, 8
        args.repeats, args.warmup, args.device = 1, 1, "cpu"
    elif not torch.cuda.is_available():
        print("peer_triton_benchmark: needs a CUDA device (torch.cuda.is_available() is False); run it on a GPU "
              "machine, or pass --interpret-smoke for a tiny CPU run that checks the script", file=sys.stderr)
        return 2
    else:
        args.device = "cuda"
    args.dtype = getattr(torch, args.dtype)
    if "peer-pytorch" in args.impls and not peer_pytorch_available():
        print("# peer-pytorch: not importable, skipped (pip install peer-pytorch==0.2.2)")
        args.impls = [i for i in args.impls if i != "peer-pytorch"]

    cuda = args.device == "cuda"
    meta = {"date": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC", "torch": torch.__version__,
            "triton": triton.__version__, "python": platform.python_version(),
            "interpret_smoke": args.interpret_smoke}
    if cuda:
        name = torch.cuda.get_device_name()
        table_peak = peak_for(name)
        args.peak = args.peak_tbs * 1e12 if args.peak_tbs else table_peak
        meta.update(device=name, peak_tbs=(args.peak or 0) / 1e12,
                    peak_source="--peak-tbs" if args.peak_tbs else ("table" if table_peak else "unknown"),
                    copy_tbs=copy_bandwidth(torch, "cuda") / 1e12)
        if not args.peak:
            print(f"# {name}: not in the peak table; pass --peak-tbs for the fractions of peak")
    else:
        args.peak = None
        meta.update(device=f"cpu ({platform.machine()}), Triton interpreter", peak_tbs=None, peak_source=None)
    print(f"# PEER Triton benchmark, {meta['device']}; {meta['date']}; torch {meta['torch']}, "
          f"triton {meta['triton']}")
    if cuda:
        print(f"# HBM peak {meta['peak_tbs']:.2f} TB/s ({meta['peak_source']}); measured device copy "
              f"{meta['copy_tbs']:.2f} TB/s")
    print(f"# N {args.experts}, h {args.heads}, k {args.topk}, d_key {args.dim_key}, {args.tokens} tokens, "
          f"{str(args.dtype).removeprefix('torch.')}, {'dense' if args.dense_grad else 'row-sparse'} table "
          f"gradients; median of {args.repeats} after {args.warmup} warm-up")
    if args.interpret_smoke:
        print("# --interpret-smoke: CPU interpreter, tiny shapes; the figures check the script, not the kernels' speed")
    print(HEADER)
    print("-" * len(HEADER))
    timer = Timer(torch, cuda)
    results = []
    for dim in args.dims:
        results += run_dim(torch, args, dim, timer)
    summary = summarize(results)
    print()
    for line in summary:
        print(f"# {line}")
    if args.out:
        meta["args"] = {k: (str(v) if k == "dtype" else v) for k, v in vars(args).items()}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=1)
        print(f"# wrote {args.out}")
    failed = [r for r in results if "error" in r]
    return 1 if failed and args.interpret_smoke else 0


if __name__ == "__main__":
    sys.exit(main())
