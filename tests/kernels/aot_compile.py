"""Compile every PEER Triton kernel variant for a CUDA target with no GPU present: ``python aot_compile.py bf16 fp64``.

The interpreter runs the kernels as Python, so it never sees what only Triton's compiler rejects
(types, static branches, layouts). This runs the compiler down to machine code for sm_90 at the
tiles the layer uses for D = 512 and 2048 and for an odd width, for each storage dtype named. Run
by ``test_peer_triton.py`` in its own process: Triton must be imported without TRITON_INTERPRET.
"""

import os
import sys

assert not os.environ.get("TRITON_INTERPRET"), "compile with Triton's compiler, not its interpreter"

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import ASTSource  # noqa: E402

from peerlm.kernels import peer_kernels as k  # noqa: E402
from peerlm.kernels import peer_triton  # noqa: E402


def compile_all(storage: str, target: GPUTarget) -> int:
    acc = "fp64" if storage == "fp64" else "fp32"
    tl_acc = tl.float64 if storage == "fp64" else tl.float32
    types = {"ids": "*i64", "perm": "*i64", "starts": "*i64", "counts": "*i64", "out_rows": "*i64", "rows": "*i64",
             "g": "*fp32", "z": f"*{acc}", "dg": f"*{acc}", "dz": f"*{acc}", "h": f"*{acc}", "M": "i32", "D": "i32"}
    n = 0
    for D in (512, 2048, 33):
        block_m, block_d, warps = peer_triton._row_tiles(128, D)
        block_p, block_dr = peer_triton._reduce_tiles(D)
        launches = [
            (k.peer_fwd_kernel, {}, dict(ACT=0, ACC=tl_acc, BLOCK_M=block_m, BLOCK_D=block_d), warps),
            (k.peer_segment_reduce_kernel, {}, dict(ACC=tl_acc, NEED_DOWN=True, NEED_UP=True, BLOCK_P=block_p,
                                                    BLOCK_D=block_dr), 4),
        ] + [(k.peer_bwd_token_kernel, {"gd": f"*{acc}", "gu": f"*{acc}"},  # atomics add into fp32 (fp64)
              dict(ACT=act, ACC=tl_acc, NEED_DX=True, NEED_DOWN=True, NEED_UP=True, ATOMIC=atomic, BLOCK_M=block_m,
                   BLOCK_D=block_d), warps) for act, atomic in ((0, False), (1, False), (2, True))]
        for kernel, special, constexprs, num_warps in launches:
            signature = {}
            for param in kernel.params:
                base = param.name.removesuffix("_ptr")
                signature[param.name] = ("constexpr" if param.is_constexpr
                                         else special.get(base) or types.get(base) or f"*{storage}")
            out = triton.compile(ASTSource(kernel, signature, constexprs), target=target,
                                 options={"num_warps": num_warps})
            assert out.asm["cubin"], kernel.__name__
            n += 1
    return n


if __name__ == "__main__":
    assert not peer_triton.INTERPRETED
    total = sum(compile_all(storage, GPUTarget("cuda", 90, 32)) for storage in sys.argv[1:] or ["bf16"])
    print(f"compiled {total} kernel variants for sm_90")
