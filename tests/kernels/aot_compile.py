"""Compile the PEER Triton kernel variants for CUDA targets with no GPU present and read ptxas's resource log.

``python aot_compile.py bf16 fp32 [--targets 80 90] [--widths 256 512 ...] [--variants all|compact] [--jobs 2]``

The interpreter runs the kernels as Python, so it never sees what only Triton's compiler rejects
(types, static branches, layouts). This runs the compiler down to a cubin for each target, at the
tiles the layer picks (``peer_triton._row_tiles`` / ``_reduce_tiles``) for each width, with
M = 128 slots per token (8 heads x 16 experts, the paper's layer: the largest tiles at every width).
Each variant's registers, spill stores and loads, stack frame and shared memory come from the ptxas
``-v`` log that Triton prints under TRITON_DUMP_PTXAS_LOG=1 (a ``CompiledKernel``'s metadata has no
register count until a driver loads the binary); shared memory is Triton's own (dynamic) allocation.

Prints one line per variant and exits non-zero if a variant of width <= ``--spill-free-up-to`` (2048)
spills. Run by ``test_peer_triton.py`` in its own process (Triton must be imported without
TRITON_INTERPRET) and imported by ``benchmarks/triton_registers.py`` for the full table.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import os
import re
import shutil
import sys
import tempfile
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

assert not os.environ.get("TRITON_INTERPRET"), "compile with Triton's compiler, not its interpreter"
# every compile must reach ptxas (a cache hit skips it, and with it the log), into a cache of our own
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
if "TRITON_CACHE_DIR" not in os.environ:
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="peer-aot-")
    atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], ignore_errors=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from peerlm.kernels import peer_kernels as k  # noqa: E402
from peerlm.kernels import peer_triton  # noqa: E402

SLOTS = 128
WIDTHS = (256, 512, 1024, 2048, 4096, 33)
TARGETS = (80, 90)
SPILL_FREE_UP_TO = 2048
ACTS = {v: name for name, v in k.ACT_IDS.items()}
# Registers per SM and the most resident blocks per SM, for sm_80 and sm_90 alike.
_REGS_PER_SM, _MAX_BLOCKS, _MAX_WARPS = 65536, 32, 64


@dataclass(frozen=True)
class Variant:
    kernel: str  # "fwd", "bwd", "reduce"
    storage: str
    D: int
    act: int | None = None
    atomic: bool | None = None

    @property
    def label(self) -> str:
        if self.kernel == "fwd":
            return f"fwd {ACTS[self.act]}"
        if self.kernel == "bwd":
            return f"bwd {ACTS[self.act]} {'atomic' if self.atomic else 'sorted'}"
        return "reduce"


@dataclass
class Result:
    variant: Variant
    target: int
    block_m: int
    block_d: int
    warps: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    shared: int

    @property
    def spills(self) -> int:
        return self.spill_stores + self.spill_loads

    @property
    def blocks_per_sm(self) -> int:
        """Resident blocks per SM as registers allow (256-register allocation units per warp)."""
        per_warp = -(-self.registers * 32 // 256) * 256
        return min(_MAX_BLOCKS, _MAX_WARPS // self.warps, _REGS_PER_SM // per_warp // self.warps)


def variants(storage: str, D: int, which: str = "all") -> list[Variant]:
    """The kernel variants the layer launches at width D: each activation's forward, its backward with
    sorted and with atomic table gradients, and the segment reduction. ``compact``: the gelu forward, one
    backward per activation (atomic for silu) and the reduction."""
    if which == "compact":
        return ([Variant("fwd", storage, D, act=0)]
                + [Variant("bwd", storage, D, act=a, atomic=a == 2) for a in (0, 1, 2)]
                + [Variant("reduce", storage, D)])
    return ([Variant("fwd", storage, D, act=a) for a in (0, 1, 2)]
            + [Variant("bwd", storage, D, act=a, atomic=at) for a in (0, 1, 2) for at in (False, True)]
            + [Variant("reduce", storage, D)])


def parse_ptxas_log(log: str) -> dict[str, int]:
    """Registers, spill stores / loads and stack frame bytes of the one entry function in a ``ptxas -v`` log."""
    regs = re.findall(r"Used (\d+) registers", log)
    frame = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if len(regs) != 1 or len(frame) != 1:
        raise ValueError(f"expected one function's resources in the ptxas log:\n{log}")
    stack, stores, loads = map(int, frame[0])
    return dict(registers=int(regs[0]), spill_stores=stores, spill_loads=loads, stack=stack)


def _launch(v: Variant):
    """(kernel, signature, constexprs, attrs, tiles, num_warps) as ``peer_triton`` launches variant v."""
    acc = "fp64" if v.storage == "fp64" else "fp32"
    tl_acc = tl.float64 if v.storage == "fp64" else tl.float32
    types = {"ids": "*i64", "perm": "*i64", "starts": "*i64", "counts": "*i64", "out_rows": "*i64", "rows": "*i64",
             "g": "*fp32", "z": f"*{acc}", "dg": f"*{acc}", "dz": f"*{acc}", "h": f"*{acc}", "M": "i32", "D": "i32"}
    if v.kernel == "reduce":
        block_p, block_d, warps = peer_triton._reduce_tiles(v.D)
        kernel, tiles = k.peer_segment_reduce_kernel, (block_p, block_d)
        constexprs = dict(ACC=tl_acc, NEED_DOWN=True, NEED_UP=True, BLOCK_P=block_p, BLOCK_D=block_d)
    else:
        block_m, block_d, warps = peer_triton._row_tiles(SLOTS, v.D, atomic=bool(v.atomic))
        tiles = (block_m, block_d)
        constexprs = dict(ACT=v.act, ACC=tl_acc, BLOCK_M=block_m, BLOCK_D=block_d)
        if v.kernel == "fwd":
            kernel = k.peer_fwd_kernel
        else:
            kernel = k.peer_bwd_token_kernel
            constexprs.update(NEED_DX=True, NEED_DOWN=True, NEED_UP=True, ATOMIC=v.atomic)
            if v.atomic:  # atomics add into fp32 (fp64) tables
                types.update(gd=f"*{acc}", gu=f"*{acc}")
    signature, attrs = {}, {}
    for i, param in enumerate(kernel.params):
        base = param.name.removesuffix("_ptr")
        signature[param.name] = "constexpr" if param.is_constexpr else types.get(base, f"*{v.storage}")
        # what a launch specializes on (and ptxas's register use depends on): tensors from PyTorch's
        # allocator are 16-byte aligned, and M and D are multiples of 16 or not
        value = {"M": SLOTS, "D": v.D}.get(param.name, 0 if signature[param.name].startswith("*") else 1)
        if not param.is_constexpr and BaseBackend.get_int_specialization(value, align=True):
            attrs[(i,)] = BaseBackend.parse_attr("D")
    return kernel, signature, constexprs, attrs, tiles, warps


def compile_variant(v: Variant, target: int) -> Result:
    kernel, signature, constexprs, attrs, (block_m, block_d), warps = _launch(v)
    log = io.StringIO()
    with contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Triton 3.9's notice that its FP-fusion default will change
        out = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda", target, 32),
                             options={"num_warps": warps, "maxnreg": peer_triton._MAXNREG})
    assert out.asm["cubin"], v
    return Result(v, target, block_m, block_d, warps, shared=out.metadata.shared, **parse_ptxas_log(log.getvalue()))


def _compile_star(args):
    return compile_variant(*args)


def compile_all(storages, widths=WIDTHS, targets=TARGETS, which="all", jobs=1) -> list[Result]:
    work = [(v, t) for t in targets for s in storages for D in widths for v in variants(s, D, which)]
    if jobs <= 1:
        return [compile_variant(*w) for w in work]
    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_compile_star, work))


def spilling(results: list[Result], up_to: int = SPILL_FREE_UP_TO) -> list[Result]:
    """Variants of width <= up_to with spill stores or loads (fp64 storage, for gradcheck only, aside)."""
    return [r for r in results if r.spills and r.variant.D <= up_to and r.variant.storage != "fp64"]


def describe(r: Result) -> str:
    v = r.variant
    return (f"sm_{r.target} {v.storage:>4} D={v.D:<5} {v.label:<18} tile={r.block_m}x{r.block_d} warps={r.warps} "
            f"regs={r.registers} spill={r.spill_stores}/{r.spill_loads} stack={r.stack} smem={r.shared} "
            f"blocks/SM={r.blocks_per_sm}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("storages", nargs="*", default=["bf16"], help="storage dtypes: bf16 fp16 fp32 fp64")
    p.add_argument("--targets", nargs="+", type=int, default=list(TARGETS), help="compute capabilities")
    p.add_argument("--widths", nargs="+", type=int, default=list(WIDTHS))
    p.add_argument("--variants", choices=["all", "compact"], default="all")
    p.add_argument("--jobs", type=int, default=1, help="compiles in parallel processes")
    p.add_argument("--spill-free-up-to", type=int, default=SPILL_FREE_UP_TO)
    args = p.parse_args(argv)
    assert not peer_triton.INTERPRETED
    results = compile_all(args.storages, args.widths, args.targets, args.variants, args.jobs)
    for r in results:
        print(describe(r))
    targets = " and ".join(f"sm_{t}" for t in args.targets)
    print(f"compiled {len(results)} kernel variants for {targets}")
    bad = spilling(results, args.spill_free_up_to)
    for r in bad:
        print(f"SPILLS: {describe(r)}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
