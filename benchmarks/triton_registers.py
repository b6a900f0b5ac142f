"""Registers, spills and shared memory of every PEER Triton kernel variant, per CUDA target and width, no GPU needed.

Compiles each variant the layer launches (forward and per-token backward, sorted and atomic, for each
activation; the segment reduction) at the tiles it picks, for sm_80 and sm_90, with the compiler in
``tests/kernels/aot_compile.py``, and reads ptxas's ``-v`` log. Prints a markdown table and writes it:

    python benchmarks/triton_registers.py --out benchmarks/results/triton_registers.md

Columns per target: registers a thread, spill stores / loads (bytes), shared memory a block (Triton's
allocation, bytes) and resident blocks per SM as registers allow (64K registers, at most 64 warps).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "kernels"))

import aot_compile as aot  # noqa: E402
import triton  # noqa: E402
from triton.backends.nvidia.compiler import get_ptxas  # noqa: E402

from peerlm.kernels import peer_triton  # noqa: E402


def _ptxas_version(target: int) -> str:
    out = subprocess.run([get_ptxas(target).path, "--version"], capture_output=True, text=True).stdout
    return out.strip().splitlines()[-1]


def table(results: list[aot.Result], targets: list[int]) -> list[str]:
    by_key = {(r.variant, r.target): r for r in results}
    rows = list(dict.fromkeys(r.variant for r in results))
    head = "| storage | D | variant | tile | warps |"
    rule = "|---|--:|---|---|--:|"
    for t in targets:
        head += f" sm_{t} regs | spill st/ld | smem | blocks/SM |"
        rule += "--:|--:|--:|--:|"
    lines = [head, rule]
    for v in rows:
        first = by_key[(v, targets[0])]
        line = f"| {v.storage} | {v.D} | {v.label} | {first.block_m}x{first.block_d} | {first.warps} |"
        for t in targets:
            r = by_key[(v, t)]
            spill = f"**{r.spill_stores}/{r.spill_loads}**" if r.spills else "0/0"
            line += f" {r.registers} | {spill} | {r.shared} | {r.blocks_per_sm} |"
        lines.append(line)
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storages", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--targets", nargs="+", type=int, default=list(aot.TARGETS))
    p.add_argument("--widths", nargs="+", type=int, default=list(aot.WIDTHS))
    p.add_argument("--jobs", type=int, default=2, help="compiles in parallel processes")
    p.add_argument("--out", type=Path, help="write the markdown table here")
    args = p.parse_args(argv)
    start = time.perf_counter()
    results = aot.compile_all(args.storages, args.widths, args.targets, "all", args.jobs)
    # sorted by storage, width, variant as variants() lists them
    order = {v: i for i, v in enumerate(dict.fromkeys(r.variant for r in results))}
    results.sort(key=lambda r: (args.storages.index(r.variant.storage), args.widths.index(r.variant.D),
                                order[r.variant]))
    spilling = aot.spilling(results)
    cmd = "python benchmarks/triton_registers.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ptxas = "; ".join(f"sm_{t}: {_ptxas_version(t)}" for t in args.targets)
    lines = [
        "# PEER Triton kernels: registers, spills and shared memory per variant",
        "",
        f"Command: `{cmd.strip()}`, {datetime.date.today().isoformat()}, Triton {triton.__version__} "
        f"({ptxas}), compiled on CPU ({platform.machine()}) with no GPU in {time.perf_counter() - start:.0f} s.",
        "",
        f"Launch settings as `peerlm.kernels.peer_triton` picks them: M = {aot.SLOTS} slots a token (the "
        f"largest tiles at every width), tile {peer_triton._TILE} elements ({peer_triton._TILE // 2} for the "
        f"atomic backward), `maxnreg={peer_triton._MAXNREG}`; pointers 16-byte aligned and M, D specialized "
        "on divisibility by 16 as a launch does. `sorted`: the backward of the deterministic reduction (it "
        "writes per-pair weights; `reduce` sums them per expert); `atomic`: table gradients added with "
        "atomics. Registers and spills from ptxas's `-v` log; smem is Triton's shared-memory allocation a "
        "block; blocks/SM as registers allow.",
        "",
        f"Variants of width <= {aot.SPILL_FREE_UP_TO} that spill: {len(spilling)} of "
        f"{sum(r.variant.D <= aot.SPILL_FREE_UP_TO for r in results)}.",
        "",
        *table(results, args.targets),
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 1 if spilling else 0


if __name__ == "__main__":
    assert not os.environ.get("TRITON_INTERPRET"), "run with Triton's compiler, not its interpreter"
    sys.exit(main())
