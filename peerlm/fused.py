"""Memory-efficient PEER experts: a custom autograd function that never forms (tokens, heads, k, dim).

For every token t and each of its K = heads * topk retrieved experts e = ids[t, s]:

    z[t, s] = u_e . x[t]                      (a sampled dense-dense product)
    y[t]    = sum_s g[t, s] * act(z[t, s]) * v_e

Both halves are embedding-bag operations over K-row "bags", one bag per token (the primitives:
``peerlm.bags``, shared with the column-sharded path ``peerlm.parallel.experts``), which PyTorch's
kernels compute row by row straight from the tables (on CPU and CUDA) without writing gathered rows:
- y is ``embedding_bag(ids, w_up, per_sample_weights=g * act(z), mode="sum")``;
- z is what embedding-bag's backward computes for its per-sample weights (``W[ids] . grad``), here
  with ``grad = x``; the same kernel gives dL/d(g * act(z)) = v_e . dy in backward;
- dL/dx is ``embedding_bag(ids, w_down, per_sample_weights=dz)``;
- table gradients are embedding-bag's dense backward (sum over bags of weight * grad rows).

Only z (T, K), the ids and the gates are kept for backward: O(tokens * heads * k). Rows are re-read
in backward. Table gradients are dense (N, D) by default; with ``sparse_grad=True`` they are
accumulated into one compact row per distinct retrieved expert (U rows, U <= min(N, T*K)) and handed
out as coalesced sparse COO tensors, as ``nn.Embedding(sparse=True)`` would
(``torch.optim.SparseAdam``, ``SGD`` and peerlm's row-sparse AdamW consume them). A table whose
optimizer updates it in the backward (``peerlm.optim.update_in_backward``) gets no gradient: its rows
are updated there, after every other use of the table in the backward.

Arithmetic runs in the tables' dtype (inputs are cast to it; fp32 tables under bf16 autocast keep
fp32 expert math).

Shape legend: T tokens, K experts per token (heads * topk), D model dim, N experts,
U distinct experts retrieved in the batch, TK = T * K flattened (bag-major).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from peerlm.bags import ACTIVATION_GRADS, ACTIVATIONS, bag_dot, bag_table_grad, bags, table_grads

__all__ = ["ACTIVATIONS", "MemoryBag", "PEERExperts", "SampledDot", "memory_bag", "peer_experts", "sampled_dot"]


class SampledDot(torch.autograd.Function):
    """out[r, s] = table[ids[r, s]] . rows[r], differentiable in rows and table, never gathering rows."""

    @staticmethod
    def forward(ctx, rows_RD, table_ND, ids_RS):
        R, S = ids_RS.shape
        ids_RS = ids_RS.contiguous()
        offsets, offset2bag, _ = bags(R, S, rows_RD.device)
        out = bag_dot(rows_RD.contiguous(), table_ND, ids_RS, offsets, offset2bag).view(R, S)
        ctx.save_for_backward(rows_RD, table_ND, ids_RS)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_RS):
        rows_RD, table_ND, ids_RS = ctx.saved_tensors
        R, S = ids_RS.shape
        dout_RS = dout_RS.contiguous()
        d_rows = d_table = None
        if ctx.needs_input_grad[0]:
            d_rows = F.embedding_bag(ids_RS, table_ND, per_sample_weights=dout_RS, mode="sum")
        if ctx.needs_input_grad[1]:
            _, offset2bag, bag_size = bags(R, S, rows_RD.device)
            d_table = bag_table_grad(rows_RD.contiguous(), ids_RS, offset2bag, bag_size, table_ND.shape[0], dout_RS)
        return d_rows, d_table, None


def sampled_dot(rows_RD: Tensor, table_ND: Tensor, ids_RS: Tensor) -> Tensor:
    """(R, D) rows, (N, D) table, (R, S) ids -> (R, S) dot products ``table[ids[r, s]] . rows[r]``."""
    return SampledDot.apply(rows_RD, table_ND, ids_RS)


class PEERExperts(torch.autograd.Function):
    """y_TD = sum_K g_TK * act(w_down[ids_TK] . x_TD) * w_up[ids_TK]; see the module docstring."""

    @staticmethod
    def forward(ctx, x_TD, ids_TK, g_TK, w_down, w_up, activation: str, sparse_grad: bool, grad_rows=None):
        T, K = ids_TK.shape
        N, D = w_down.shape
        assert x_TD.shape == (T, D) and g_TK.shape == (T, K) and w_up.shape == (N, D)
        dtype = w_down.dtype
        xw_TD = x_TD.to(dtype).contiguous()
        ids_TK = ids_TK.contiguous()
        gw_TK = g_TK.to(dtype)
        offsets_T, offset2bag_TK, _ = bags(T, K, x_TD.device)
        z_TK = bag_dot(xw_TD, w_down, ids_TK, offsets_T, offset2bag_TK).view(T, K)
        h_TK = gw_TK * ACTIVATIONS[activation](z_TK)
        y_TD = F.embedding_bag(ids_TK, w_up, per_sample_weights=h_TK, mode="sum")
        ctx.save_for_backward(xw_TD, ids_TK, gw_TK, z_TK, w_down, w_up)
        ctx.activation, ctx.sparse_grad, ctx.x_dtype = activation, sparse_grad, x_TD.dtype
        ctx.grad_rows = grad_rows
        return y_TD.to(x_TD.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TD):
        x_TD, ids_TK, g_TK, z_TK, w_down, w_up = ctx.saved_tensors
        T, K = ids_TK.shape
        N = w_down.shape[0]
        need_x, _, need_g, need_down, need_up = ctx.needs_input_grad[:5]
        dy_TD = dy_TD.to(w_down.dtype).contiguous()
        offsets_T, offset2bag_TK, bag_size_T = bags(T, K, dy_TD.device)

        a_TK = ACTIVATIONS[ctx.activation](z_TK)
        dh_TK = bag_dot(dy_TD, w_up, ids_TK, offsets_T, offset2bag_TK).view(T, K)  # dL/d(g*a)
        dg_TK = dh_TK * a_TK if need_g else None
        dz_TK = ACTIVATION_GRADS[ctx.activation](dh_TK * g_TK, z_TK, a_TK)
        dx_TD = None
        if need_x:
            dx_TD = F.embedding_bag(ids_TK, w_down, per_sample_weights=dz_TK, mode="sum").to(ctx.x_dtype)
        d_down, d_up = table_grads(ids_TK, N, ctx.sparse_grad, offset2bag_TK, bag_size_T,
                                   [(x_TD, dz_TK) if need_down else None,
                                    (dy_TD, g_TK * a_TK) if need_up else None], ctx.grad_rows, (w_down, w_up))
        return dx_TD, None, dg_TK, d_down, d_up, None, None, None


def peer_experts(x_TD: Tensor, ids_TK: Tensor, g_TK: Tensor, w_down: Tensor, w_up: Tensor,
                 activation: str = "gelu", sparse_grad: bool = False,
                 grad_rows: Callable[[Tensor, Tensor], Tensor] | None = None) -> Tensor:
    """Fused expert mixture; (T, D) inputs, (T, K) ids, (T, K) gates, (N, D) tables -> (T, D).
    ``grad_rows``: with ``sparse_grad``, which retrieved rows get a table gradient (``bags.table_grads``)."""
    return PEERExperts.apply(x_TD, ids_TK, g_TK, w_down, w_up, activation, sparse_grad, grad_rows)


class MemoryBag(torch.autograd.Function):
    """y[t] = sum_s w[t, s] * table[ids[t, s]] (PKM's value read): embedding-bag's forward, and a backward
    on the same primitives as ``PEERExperts`` (the gate gradient ``bag_dot``, the table gradient
    ``table_grads``: dense, or coalesced row-sparse over the distinct ids)."""

    @staticmethod
    def forward(ctx, ids_TK, w_TK, table_ND, sparse_grad: bool):
        ids_TK, w_TK = ids_TK.contiguous(), w_TK.contiguous()
        ctx.save_for_backward(ids_TK, w_TK, table_ND)
        ctx.sparse_grad = sparse_grad
        return F.embedding_bag(ids_TK, table_ND, per_sample_weights=w_TK, mode="sum")

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TD):
        ids_TK, w_TK, table_ND = ctx.saved_tensors
        T, K = ids_TK.shape
        dy_TD = dy_TD.to(table_ND.dtype).contiguous()
        offsets_T, offset2bag_TK, bag_size_T = bags(T, K, dy_TD.device)
        dw_TK = None
        if ctx.needs_input_grad[1]:
            dw_TK = bag_dot(dy_TD, table_ND, ids_TK, offsets_T, offset2bag_TK).view(T, K).to(w_TK.dtype)
        (d_table,) = table_grads(ids_TK, table_ND.shape[0], ctx.sparse_grad, offset2bag_TK, bag_size_T,
                                 [(dy_TD, w_TK) if ctx.needs_input_grad[2] else None], tables=(table_ND,))
        return None, dw_TK, d_table, None


def memory_bag(ids_TK: Tensor, w_TK: Tensor, table_ND: Tensor, sparse_grad: bool = False) -> Tensor:
    """(T, K) ids, (T, K) weights, (N, D) table -> (T, D) weighted sums of the rows (see ``MemoryBag``)."""
    return MemoryBag.apply(ids_TK, w_TK, table_ND, sparse_grad)
