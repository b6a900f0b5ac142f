"""Triton kernels of the PEER expert mixture; launched by ``peerlm.kernels.peer_triton``, which documents the math.

Three kernels, none of which writes a gathered row:
- ``peer_fwd_kernel``: one program per token; y[t] = sum_s g[t,s] act(u[ids[t,s]] . x[t]) v[ids[t,s]],
  saving z[t,s] = u . x for backward;
- ``peer_bwd_token_kernel``: one program per token; dg, dx and the per-slot weights of the table
  gradients (dz = dL/dz and h = g act(z)), or, with ``ATOMIC``, the table gradients themselves added
  row by row with fp32 atomics;
- ``peer_segment_reduce_kernel``: one program per (distinct expert, width block); sums one segment of
  the (token, slot) pairs sorted by expert id in a fixed order and writes that expert's gradient row
  once: deterministic, no atomics.

Every row a token needs lies in one (BLOCK_M, BLOCK_D) tile with BLOCK_D >= D, masked, so any width
works (not only powers of two) and x, y, dy, dx are read or written once per token. Arithmetic is in
``ACC`` (fp32, or fp64 for fp64 tables so that ``gradcheck`` can run), whatever the storage dtype.
Indices are int64 before they are multiplied by D: N * D passes 2^31 at N = 1024^2, D = 2048.

Importing this module decorates the kernels for Triton's compiler or, when TRITON_INTERPRET=1 is set,
for its CPU interpreter; that must match how Triton itself was imported (``peer_triton`` checks).

Shape legend: T tokens, M slots per token (heads * topk), D width, P (token, slot) pairs = T * M.
"""

import triton
import triton.language as tl

ACT_IDS = {"gelu": 0, "relu": 1, "silu": 2}  # the ACT constexpr of the kernels


@triton.jit
def _act(z, ACT: tl.constexpr):
    if ACT == 0:  # exact (erf) GELU, as F.gelu's default
        return z * (0.5 + 0.5 * tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        return tl.maximum(z, 0.0)
    else:
        return z * tl.sigmoid(z)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    if ACT == 0:
        cdf = 0.5 + 0.5 * tl.math.erf(z * 0.7071067811865476)
        return cdf + z * tl.exp(-0.5 * z * z) * 0.3989422804014327
    elif ACT == 1:
        return tl.where(z > 0, 1.0, 0.0).to(z.dtype)  # F.relu's gradient is 0 at z == 0
    else:
        s = tl.sigmoid(z)
        return s * (1.0 + z * (1.0 - s))


@triton.jit
def peer_fwd_kernel(x_ptr, ids_ptr, g_ptr, wd_ptr, wu_ptr, y_ptr, z_ptr, M, D,
                    ACT: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    x = tl.load(x_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(ACC)  # (BLOCK_D,)
    acc = tl.zeros((BLOCK_D,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        ids = tl.load(ids_ptr + t * M + offs_m, mask=mask_m, other=0).to(tl.int64)
        g = tl.load(g_ptr + t * M + offs_m, mask=mask_m, other=0.0).to(ACC)
        rows = ids[:, None] * D + offs_d[None, :]  # (BLOCK_M, BLOCK_D)
        mask = mask_m[:, None] & mask_d[None, :]
        u = tl.load(wd_ptr + rows, mask=mask, other=0.0).to(ACC)
        z = tl.sum(u * x[None, :], axis=1)  # (BLOCK_M,)
        tl.store(z_ptr + t * M + offs_m, z, mask=mask_m)
        h = g * _act(z, ACT)
        v = tl.load(wu_ptr + rows, mask=mask, other=0.0).to(ACC)
        acc += tl.sum(h[:, None] * v, axis=0)
    tl.store(y_ptr + t * D + offs_d, acc.to(y_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def peer_bwd_token_kernel(x_ptr, dy_ptr, ids_ptr, g_ptr, z_ptr, wd_ptr, wu_ptr,
                          dx_ptr, dg_ptr, dz_ptr, h_ptr, rows_ptr, gd_ptr, gu_ptr, M, D,
                          ACT: tl.constexpr, ACC: tl.constexpr, NEED_DX: tl.constexpr,
                          NEED_DOWN: tl.constexpr, NEED_UP: tl.constexpr, ATOMIC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    dy = tl.load(dy_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    if ATOMIC and NEED_DOWN:
        x = tl.load(x_ptr + t * D + offs_d, mask=mask_d, other=0.0).to(ACC)
    dx = tl.zeros((BLOCK_D,), dtype=ACC)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        pair = t * M + offs_m
        ids = tl.load(ids_ptr + pair, mask=mask_m, other=0).to(tl.int64)
        g = tl.load(g_ptr + pair, mask=mask_m, other=0.0).to(ACC)
        z = tl.load(z_ptr + pair, mask=mask_m, other=0.0).to(ACC)
        rows = ids[:, None] * D + offs_d[None, :]
        mask = mask_m[:, None] & mask_d[None, :]
        v = tl.load(wu_ptr + rows, mask=mask, other=0.0).to(ACC)
        dh = tl.sum(v * dy[None, :], axis=1)  # dL/d(g act(z)) = v . dy
        a = _act(z, ACT)
        tl.store(dg_ptr + pair, dh * a, mask=mask_m)
        dz = dh * g * _act_grad(z, ACT)
        h = g * a
        if NEED_DX:
            u = tl.load(wd_ptr + rows, mask=mask, other=0.0).to(ACC)
            dx += tl.sum(dz[:, None] * u, axis=0)
        if ATOMIC:
            target = tl.load(rows_ptr + pair, mask=mask_m, other=0).to(tl.int64)
            out = target[:, None] * D + offs_d[None, :]
            if NEED_DOWN:
                tl.atomic_add(gd_ptr + out, (dz[:, None] * x[None, :]).to(gd_ptr.dtype.element_ty), mask=mask)
            if NEED_UP:
                tl.atomic_add(gu_ptr + out, (h[:, None] * dy[None, :]).to(gu_ptr.dtype.element_ty), mask=mask)
        else:
            if NEED_DOWN:
                tl.store(dz_ptr + pair, dz, mask=mask_m)
            if NEED_UP:
                tl.store(h_ptr + pair, h, mask=mask_m)
    if NEED_DX:
        tl.store(dx_ptr + t * D + offs_d, dx.to(dx_ptr.dtype.element_ty), mask=mask_d)


@triton.jit
def peer_segment_reduce_kernel(x_ptr, dy_ptr, dz_ptr, h_ptr, perm_ptr, starts_ptr, counts_ptr, out_rows_ptr,
                               gd_ptr, gu_ptr, M, D,
                               ACC: tl.constexpr, NEED_DOWN: tl.constexpr, NEED_UP: tl.constexpr,
                               BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr):
    seg = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    start = tl.load(starts_ptr + seg)
    count = tl.load(counts_ptr + seg)
    row = tl.load(out_rows_ptr + seg).to(tl.int64)
    acc_down = tl.zeros((BLOCK_D,), dtype=ACC)
    acc_up = tl.zeros((BLOCK_D,), dtype=ACC)
    for j0 in range(0, count, BLOCK_P):  # a fixed order: the segment's pairs as the stable sort left them
        offs_p = j0 + tl.arange(0, BLOCK_P)
        mask_p = offs_p < count
        pair = tl.load(perm_ptr + start + offs_p, mask=mask_p, other=0).to(tl.int64)
        t = pair // M
        tok = t[:, None] * D + offs_d[None, :]
        mask = mask_p[:, None] & mask_d[None, :]
        if NEED_DOWN:
            w = tl.load(dz_ptr + pair, mask=mask_p, other=0.0).to(ACC)
            xt = tl.load(x_ptr + tok, mask=mask, other=0.0).to(ACC)
            acc_down += tl.sum(w[:, None] * xt, axis=0)
        if NEED_UP:
            w = tl.load(h_ptr + pair, mask=mask_p, other=0.0).to(ACC)
            dyt = tl.load(dy_ptr + tok, mask=mask, other=0.0).to(ACC)
            acc_up += tl.sum(w[:, None] * dyt, axis=0)
    if NEED_DOWN:
        tl.store(gd_ptr + row * D + offs_d, acc_down.to(gd_ptr.dtype.element_ty), mask=mask_d)
    if NEED_UP:
        tl.store(gu_ptr + row * D + offs_d, acc_up.to(gu_ptr.dtype.element_ty), mask=mask_d)
