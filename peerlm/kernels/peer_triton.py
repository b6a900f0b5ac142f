"""PEER experts in Triton: a custom autograd function with the semantics of ``peerlm.fused.peer_experts``.

For every token t and each of its M = heads * topk retrieved experts e = ids[t, s]:

    z[t, s] = u_e . x[t],   y[t] = sum_s g[t, s] * act(z[t, s]) * v_e

On a GPU this is bound by memory bandwidth: 2 M rows of D values are gathered per token for about
one multiply-add each. The kernels (``peerlm.kernels.peer_kernels``) read each of those rows straight
from the tables, never writing a gathered (T, M, D) tensor, and keep only z (T, M) for backward:

- forward: one program per token, z and y in one pass over its M rows of u and v;
- backward, per token: dh = v . dy, dg = dh act(z), dz = dh g act'(z), dx = sum_s dz u;
- table gradients d_down[e] = sum dz[t, s] x[t] and d_up[e] = sum g act(z)[t, s] dy[t] over the pairs
  (t, s) that retrieved e. ``"deterministic"`` (default): stable-sort the T*M pairs by expert id
  (``torch.sort``), then one program per distinct id reduces its run of pairs in sorted order and
  writes that row once: no atomics, the same bits every run. ``"atomic"``: the per-token backward adds
  its rows into an fp32 table with atomics, with no second pass over the pairs (and no sort for dense
  gradients; sparse ones need ``torch.unique`` for their compact rows); the order of the adds, hence
  the rounding, varies between runs.
  Choose with ``peerlm.kernels.set_triton_reduction`` or the ``reduction`` argument.

Gradients come back as the fused path gives them: dense (N, D) in the tables' dtype, or with
``sparse_grad=True`` coalesced sparse COO tensors holding one row per distinct retrieved expert
(indices sorted), which peerlm's row-sparse AdamW and clipping consume.

Arithmetic is fp32 for fp32, bf16 and fp16 storage (fp64 for fp64 tables, so ``gradcheck`` runs);
y and dx come back in x's dtype, dg in g's, table gradients in the tables'.

Kernels launch on CUDA tensors. With TRITON_INTERPRET=1 set before Triton is first imported (and kept
set: Triton reads it again as it launches), they run in Triton's CPU interpreter instead, on tensors of
any device (slow; that is how the tests check them without a GPU). Triton makes that choice once per
process, for its own library as for these kernels.

Shape legend: T tokens, M slots per token, D width, N experts, U distinct experts retrieved,
P = T * M (token, slot) pairs, flattened token-major.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from torch.autograd.function import once_differentiable

from peerlm import kernels
from peerlm.kernels import peer_kernels as _k

__all__ = ["PEERExpertsTriton", "peer_experts_triton"]

# Elements of one (BLOCK_M, BLOCK_D) tile of gathered rows: 32 a thread at 8 warps for each of the u and
# v tiles; many such programs in flight per SM hide the gathers' latency. The atomic backward takes half:
# its atomics need a 64-bit address per element on top of the gathered rows, and at D = 256 a full tile
# needs more than the 255 registers a thread can have. Not tuned on a GPU yet: the benchmark's --tiles
# sweeps it; tests/kernels/aot_compile.py and benchmarks/results/triton_registers.md hold what ptxas
# makes of each variant for sm_80 and sm_90.
_TILE = 8192
# Registers a thread may use (.maxnreg), every kernel: 255, what 8-warp blocks allow. Without an explicit
# budget, ptxas (run by Triton 3.9 with --regAllocOptLevel=2) aims at an occupancy step of its own and
# spills 4 to 28 bytes to reach it; with one, it allocates what the code needs: at widths 256 to 4096 at
# most 110 registers (two 8-warp blocks per SM), but up to 160 in sm_80's atomic backward.
_MAXNREG = 255
# The reduction's width block and pairs per step: most ids are retrieved by a few pairs only.
_REDUCE_BLOCK_D = 1024
_REDUCE_BLOCK_P = 4


# Triton fixes compiler or interpreter when it is imported (TRITON_INTERPRET=1 then selects the
# interpreter, for its own library and for these kernels alike); this records which one they got.
INTERPRETED = not isinstance(_k.peer_fwd_kernel, triton.runtime.JITFunction)
if INTERPRETED != (not isinstance(tl.zeros, triton.runtime.JITFunction)):
    raise ImportError("TRITON_INTERPRET changed between importing triton and peerlm.kernels.peer_triton; "
                      "set it (or not) before either is imported")


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" or INTERPRETED:  # the interpreter takes tensors on any device
        return
    raise RuntimeError(
        f"impl='triton' runs on CUDA tensors, got {device}; on CPU use impl='fused' (what impl='auto' picks) "
        "or set TRITON_INTERPRET=1 before Triton is imported to run the kernels in Triton's interpreter "
        "(slow, for tests)"
    )


def _row_tiles(M: int, D: int, atomic: bool = False) -> tuple[int, int, int]:
    """BLOCK_M, BLOCK_D (the whole width, masked) and num_warps of the per-token kernels; ``atomic``: of
    the backward that adds the table gradients with atomics."""
    block_d = triton.next_power_of_2(D)
    tile = _TILE // 2 if atomic else _TILE
    block_m = max(1, min(triton.next_power_of_2(M), tile // block_d))
    return block_m, block_d, 4 if block_m * block_d <= 2048 else 8


def _reduce_tiles(D: int) -> tuple[int, int, int]:
    """BLOCK_P (pairs a step), BLOCK_D (a width block) and num_warps of the segment reduction."""
    block_d = min(triton.next_power_of_2(D), _REDUCE_BLOCK_D)
    return max(1, min(_REDUCE_BLOCK_P, _TILE // block_d)), block_d, 4


def _sparse(rows_U: Tensor, values_UD: Tensor, N: int) -> Tensor:
    """A coalesced row-sparse (N, D) COO gradient, laid out as ``peerlm.fused`` gives it."""
    return torch.sparse_coo_tensor(rows_U.unsqueeze(0), values_UD, (N, values_UD.shape[1]), is_coalesced=True,
                                   check_invariants=False)


def _sorted_table_grads(x_TD: Tensor, dy_TD: Tensor, ids_P: Tensor, dz_P: Tensor | None, h_P: Tensor | None,
                        N: int, dtype: torch.dtype, sparse: bool) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Deterministic d_down = sum dz x and d_up = sum h dy per expert: (distinct ids U, d_down, d_up).

    Rows are (U, D) with ``sparse`` (one per distinct id, ids ascending), else (N, D) with zeros where
    nobody retrieved the expert. A None weight skips that table.
    """
    T, D = x_TD.shape
    M = ids_P.numel() // T
    dev = x_TD.device
    sorted_P, perm_P = torch.sort(ids_P, stable=True)  # stable: a fixed order inside each run of one id
    rows_U, counts_U = torch.unique_consecutive(sorted_P, return_counts=True)
    starts_U = counts_U.cumsum(0) - counts_U
    U = rows_U.numel()
    if sparse:  # every compact row is written
        out_U = torch.arange(U, device=dev)
        new = lambda: torch.empty(U, D, dtype=dtype, device=dev)
    else:
        out_U = rows_U
        new = lambda: torch.zeros(N, D, dtype=dtype, device=dev)
    d_down = new() if dz_P is not None else None
    d_up = new() if h_P is not None else None
    block_p, block_d, warps = _reduce_tiles(D)
    unused = dy_TD
    _k.peer_segment_reduce_kernel[(U, triton.cdiv(D, block_d))](
        x_TD, dy_TD, unused if dz_P is None else dz_P, unused if h_P is None else h_P, perm_P, starts_U, counts_U,
        out_U, unused if d_down is None else d_down, unused if d_up is None else d_up, M, D,
        ACC=tl.float64 if dtype == torch.float64 else tl.float32, NEED_DOWN=dz_P is not None,
        NEED_UP=h_P is not None, BLOCK_P=block_p, BLOCK_D=block_d, num_warps=warps, maxnreg=_MAXNREG,
    )
    return rows_U, d_down, d_up


class PEERExpertsTriton(torch.autograd.Function):
    """y_TD = sum_M g_TM * act(w_down[ids_TM] . x_TD) * w_up[ids_TM]; see the module docstring."""

    @staticmethod
    def forward(ctx, x_TD, ids_TM, g_TM, w_down, w_up, activation: str, sparse_grad: bool, reduction: str):
        T, M = ids_TM.shape
        N, D = w_down.shape
        assert x_TD.shape == (T, D) and g_TM.shape == (T, M) and w_up.shape == (N, D), "shape mismatch"
        assert w_down.dtype == w_up.dtype, "both expert tables must share one dtype"
        assert w_down.is_contiguous() and w_up.is_contiguous(), "expert tables must be contiguous (no copies of N rows)"
        assert not ids_TM.is_floating_point(), "ids must be integers"
        _check_device(x_TD.device)
        acc = torch.float64 if w_down.dtype == torch.float64 else torch.float32
        x_TD, ids_TM, g_TM = x_TD.contiguous(), ids_TM.contiguous(), g_TM.contiguous()
        y_TD = torch.empty_like(x_TD)
        z_TM = torch.empty(T, M, dtype=acc, device=x_TD.device)
        block_m, block_d, warps = _row_tiles(M, D)
        _k.peer_fwd_kernel[(T,)](
            x_TD, ids_TM, g_TM, w_down, w_up, y_TD, z_TM, M, D,
            ACT=_k.ACT_IDS[activation], ACC=tl.float64 if acc == torch.float64 else tl.float32,
            BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, maxnreg=_MAXNREG,
        )
        ctx.save_for_backward(x_TD, ids_TM, g_TM, z_TM, w_down, w_up)
        ctx.activation, ctx.sparse_grad, ctx.reduction = activation, sparse_grad, reduction
        return y_TD

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TD):
        x_TD, ids_TM, g_TM, z_TM, w_down, w_up = ctx.saved_tensors
        T, M = ids_TM.shape
        N, D = w_down.shape
        need_x, _, need_g, need_down, need_up = ctx.needs_input_grad[:5]
        dev, acc = dy_TD.device, z_TM.dtype
        tl_acc = tl.float64 if acc == torch.float64 else tl.float32
        dy_TD = dy_TD.contiguous()
        dx_TD = torch.empty_like(x_TD) if need_x else dy_TD  # unused pointers get any tensor
        dg_TM = torch.empty(T, M, dtype=acc, device=dev)
        ids_P = ids_TM.reshape(-1)
        atomic = ctx.reduction == "atomic"
        sparse = ctx.sparse_grad

        # where each pair's gradient row goes: expert ids (dense) or compact rows 0..U-1 (sparse)
        if atomic and (need_down or need_up):
            if sparse:
                rows_U, target_P = torch.unique(ids_P, return_inverse=True)
                n_rows = rows_U.numel()
            else:
                target_P, n_rows = ids_P, N
            d_down = torch.zeros(n_rows, D, dtype=acc, device=dev) if need_down else dy_TD
            d_up = torch.zeros(n_rows, D, dtype=acc, device=dev) if need_up else dy_TD
            dz_P = h_P = dg_TM  # unused
        else:
            target_P = d_down = d_up = dg_TM  # unused
            dz_P = torch.empty(T * M, dtype=acc, device=dev) if need_down else dg_TM
            h_P = torch.empty(T * M, dtype=acc, device=dev) if need_up else dg_TM

        block_m, block_d, warps = _row_tiles(M, D, atomic)
        _k.peer_bwd_token_kernel[(T,)](
            x_TD, dy_TD, ids_TM, g_TM, z_TM, w_down, w_up, dx_TD, dg_TM, dz_P, h_P, target_P, d_down, d_up, M, D,
            ACT=_k.ACT_IDS[ctx.activation], ACC=tl_acc, NEED_DX=need_x, NEED_DOWN=need_down, NEED_UP=need_up,
            ATOMIC=atomic, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps, maxnreg=_MAXNREG,
        )

        if not (need_down or need_up):
            d_down = d_up = None
        elif atomic:
            d_down = d_down.to(w_down.dtype) if need_down else None
            d_up = d_up.to(w_up.dtype) if need_up else None
        else:
            rows_U, d_down, d_up = _sorted_table_grads(x_TD, dy_TD, ids_P, dz_P if need_down else None,
                                                       h_P if need_up else None, N, w_down.dtype, sparse)
        if sparse:
            d_down = _sparse(rows_U, d_down, N) if d_down is not None else None
            d_up = _sparse(rows_U, d_up, N) if d_up is not None else None
        dx = dx_TD if need_x else None
        dg = dg_TM.to(g_TM.dtype) if need_g else None
        return dx, None, dg, d_down, d_up, None, None, None


def peer_experts_triton(x_TD: Tensor, ids_TM: Tensor, g_TM: Tensor, w_down: Tensor, w_up: Tensor,
                        activation: str = "gelu", sparse_grad: bool = False, reduction: str | None = None) -> Tensor:
    """Triton expert mixture; (T, D) inputs, (T, M) ids, (T, M) gates, (N, D) tables -> (T, D).

    ``reduction``: ``"deterministic"`` or ``"atomic"`` table-gradient sums; None takes
    ``peerlm.kernels.triton_reduction()``.
    """
    reduction = kernels.triton_reduction() if reduction is None else reduction
    if reduction not in kernels.TRITON_REDUCTIONS:
        raise ValueError(f"reduction must be one of {kernels.TRITON_REDUCTIONS}, got {reduction!r}")
    if ids_TM.numel() == 0:
        return x_TD.new_zeros(x_TD.shape)
    return PEERExpertsTriton.apply(x_TD, ids_TM, g_TM, w_down, w_up, activation, sparse_grad, reduction)
