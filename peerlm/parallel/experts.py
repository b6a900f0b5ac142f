"""Column-sharded PEER experts (and PKM values): the fused expert mixture of ``peerlm.fused`` on 1/P of
each table, built from the same embedding-bag primitives (``peerlm.bags``). It is the expert step of a
``PEER`` (a ``PKM``) whose tables are sharded: the layer's forward calls it in place of the unsharded path.

Layout (``ColumnShard``, ``peerlm.tables``): in a process group of P ranks, rank r holds columns
[r C, (r+1) C), C = D/P, of every row of both expert tables, as a contiguous (N, C) tensor; this is
DTensor's ``Shard(1)`` local chunk of the (N, D) table (``peerlm.parallel.shard`` presents it as such
in state dicts). D must be a
multiple of P. Every rank keeps its own tokens (data parallel; their counts may differ between ranks),
and the routing that produced ids and gates (query, norm, sub-keys) is replicated.

For the tokens of the whole group (T of them, rank order), each rank computes its columns' share:

    forward   x_TC  = x[:, cols] of every rank's tokens            all-to-all of column slices
              ids_TK                                               all-gather
              z_TrK = sum over ranks of u[ids, cols] . x_TC        sampled dot here, reduce-scatter
              h_TrK = g * act(z) on the token's own rank; h_TK     all-gather
              y[:, cols] = sum_K h_TK v[ids, cols], back to the token's rank    all-to-all
    backward  dy_TC                                                all-to-all
              dh_TrK = sum over ranks of v[ids, cols] . dy_TC      sampled dot here, reduce-scatter
              dg = dh act(z), dz = dh g act'(z) on the own rank; dz_TK    all-gather
              dx[:, cols] = sum_K dz_TK u[ids, cols], back         all-to-all
              d v[:, cols] = sum h_TK dy_TC, d u[:, cols] = sum dz_TK x_TC   (local, no communication)

so y, dx and dg equal the unsharded layer's to rounding (the u.x and v.dy sums are split in P column
blocks), and each rank's table gradient is its columns of the gradient over the group's tokens. Every
rank runs the same embedding-bag kernels as ``peerlm.fused`` on its (N, C) shard; with
``sparse_grad=True`` the table gradients are coalesced COO tensors over the group's distinct
experts, the same rows on every rank. The communication volume and why columns rather than rows:
``peerlm.parallel.arithmetic``. ``column_sharded_memory`` is the same for a PKM value table, which is
the second half alone (no u.x: ids and gates travel, y comes back).

Gradient scale: DDP and FSDP average the gradients of replicated parameters over ranks (each rank's
loss is a mean over its own tokens), so ``grad_reduction="mean"`` (default) divides the table
gradients by P: one optimizer step then sees the same table gradient as one process training on the
union of the ranks' batches. ``"sum"`` leaves the sum of the ranks' gradients.

On the wire: x, y and their gradients in the activations' dtype (bf16 under autocast; cast to the
table's dtype after the move, so the arithmetic is that of the unsharded fused path), u.x, gates and
their gradients in the table's dtype, ids as int32.

Every rank of the group must call the layer the same number of times in the same order (as with any
collective); a rank with no tokens still takes part.

Shape legend: Tr this rank's tokens, T the group's tokens, K experts per token (heads * topk),
D model dim, C = D / P columns per rank, N experts, U distinct experts retrieved by the group.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from peerlm.bags import ACTIVATION_GRADS, ACTIVATIONS, bag_dot, bags, table_grads
from peerlm.tables import GRAD_REDUCTIONS, ColumnShard

__all__ = ["ColumnShard", "ColumnShardedExperts", "ColumnShardedMemory", "column_sharded_experts",
           "column_sharded_memory", "GRAD_REDUCTIONS"]


class _Exchange:
    """The four collectives of the layout, for one call's token counts (one all-gather to learn them)."""

    def __init__(self, shard: ColumnShard, tokens: int, device: torch.device):
        self.shard, self.P, self.tokens = shard, shard.ranks, tokens
        if self.P == 1:
            self.counts = [tokens]
            return
        mine = torch.tensor([tokens], dtype=torch.long, device=device)
        every = [torch.empty_like(mine) for _ in range(self.P)]
        dist.all_gather(every, mine, group=shard.group)
        self.counts = [int(c) for c in torch.cat(every).tolist()]

    def _all_to_all(self, send: Tensor, send_rows: list[int], recv_rows: list[int]) -> Tensor:
        recv = send.new_empty((sum(recv_rows), *send.shape[1:]))
        dist.all_to_all_single(recv, send.contiguous(), recv_rows, send_rows, group=self.shard.group)
        return recv

    def scatter_columns(self, a_TrD: Tensor) -> Tensor:
        """(Tr, D) of every rank -> (T, C): this rank's columns of the group's tokens, in rank order."""
        if self.P == 1:
            return a_TrD.contiguous()
        Tr, C = a_TrD.shape[0], self.shard.cols
        send = a_TrD.reshape(Tr, self.P, C).transpose(0, 1).reshape(self.P * Tr, C)  # block q: columns of q
        return self._all_to_all(send, [Tr] * self.P, self.counts)

    def gather_columns(self, a_TC: Tensor) -> Tensor:
        """Inverse of ``scatter_columns``: (T, C) of every rank -> (Tr, D) of this rank's tokens."""
        if self.P == 1:
            return a_TC
        Tr, C = self.tokens, self.shard.cols
        recv = self._all_to_all(a_TC, self.counts, [Tr] * self.P)  # (P * Tr, C), block q: columns of q
        return recv.view(self.P, Tr, C).transpose(0, 1).reshape(Tr, self.P * C)

    def all_gather_rows(self, a_TrK: Tensor) -> Tensor:
        """(Tr, K) of every rank -> (T, K), the group's rows in rank order."""
        if self.P == 1:
            return a_TrK.contiguous()
        send = a_TrK.contiguous().expand(self.P, *a_TrK.shape).reshape(-1, *a_TrK.shape[1:])
        return self._all_to_all(send, [a_TrK.shape[0]] * self.P, self.counts)

    def reduce_rows(self, partial_TK: Tensor) -> Tensor:
        """(T, K) partial sums of every rank -> (Tr, K): this rank's rows summed over ranks, in rank order."""
        if self.P == 1:
            return partial_TK
        recv = self._all_to_all(partial_TK, self.counts, [self.tokens] * self.P)
        return recv.view(self.P, self.tokens, *partial_TK.shape[1:]).sum(dim=0)


def _ids_to_all(ex: _Exchange, ids_TrK: Tensor, num_experts: int) -> Tensor:
    """All-gather the ids, as int32 on the wire where N allows (half the bytes), int64 after."""
    if ex.P == 1:
        return ids_TrK.long().contiguous()
    wire = torch.int32 if num_experts < 2**31 else torch.int64
    return ex.all_gather_rows(ids_TrK.to(wire)).long()


class ColumnShardedExperts(torch.autograd.Function):
    """y_TrD = sum_K g * act(u[ids] . x) v[ids] with u, v column-sharded; see the module docstring."""

    @staticmethod
    def forward(ctx, x_TrD, ids_TrK, g_TrK, down_NC, up_NC, activation: str, sparse_grad: bool,
                shard: ColumnShard, grad_reduction: str):
        Tr, K = ids_TrK.shape
        N, C = down_NC.shape
        assert x_TrD.shape == (Tr, shard.dim) and g_TrK.shape == (Tr, K), (x_TrD.shape, g_TrK.shape, shard)
        assert C == shard.cols and up_NC.shape == (N, C), (down_NC.shape, up_NC.shape, shard)
        dtype, device = down_NC.dtype, x_TrD.device
        ex = _Exchange(shard, Tr, device)
        x_TC = ex.scatter_columns(x_TrD).to(dtype)  # moved in x's dtype (bf16 under autocast), then cast
        ids_TK = _ids_to_all(ex, ids_TrK, N)
        T = ids_TK.shape[0]
        offsets_T, offset2bag_TK, _ = bags(T, K, device)
        z_TrK = ex.reduce_rows(bag_dot(x_TC, down_NC, ids_TK, offsets_T, offset2bag_TK).view(T, K))
        g_TrK = g_TrK.to(dtype)
        h_TK = ex.all_gather_rows(g_TrK * ACTIVATIONS[activation](z_TrK))
        y_TC = F.embedding_bag(ids_TK, up_NC, per_sample_weights=h_TK, mode="sum")
        y_TrD = ex.gather_columns(y_TC.to(x_TrD.dtype))
        ctx.save_for_backward(x_TC, ids_TK, h_TK, g_TrK, z_TrK, down_NC, up_NC)
        ctx.ex, ctx.activation, ctx.sparse_grad, ctx.x_dtype = ex, activation, sparse_grad, x_TrD.dtype
        ctx.scale = 1.0 / shard.ranks if grad_reduction == "mean" else 1.0
        return y_TrD

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TrD):
        x_TC, ids_TK, h_TK, g_TrK, z_TrK, down_NC, up_NC = ctx.saved_tensors
        ex = ctx.ex
        T, K = ids_TK.shape
        N = down_NC.shape[0]
        # every rank runs every collective, whatever it needs, so that no rank waits on another's choice
        dy_TC = ex.scatter_columns(dy_TrD.contiguous()).to(down_NC.dtype)
        offsets_T, offset2bag_TK, bag_size_T = bags(T, K, dy_TC.device)
        dh_TrK = ex.reduce_rows(bag_dot(dy_TC, up_NC, ids_TK, offsets_T, offset2bag_TK).view(T, K))
        a_TrK = ACTIVATIONS[ctx.activation](z_TrK)
        dg_TrK = dh_TrK * a_TrK
        dz_TrK = ACTIVATION_GRADS[ctx.activation](dh_TrK * g_TrK, z_TrK, a_TrK)
        dz_TK = ex.all_gather_rows(dz_TrK)
        dx_TC = F.embedding_bag(ids_TK, down_NC, per_sample_weights=dz_TK, mode="sum")
        dx_TrD = ex.gather_columns(dx_TC.to(ctx.x_dtype))

        need_down, need_up = ctx.needs_input_grad[3:5]
        # the reduction's 1/P goes into the (T, K) weights, not the (N, C) result
        d_down, d_up = table_grads(ids_TK, N, ctx.sparse_grad, offset2bag_TK, bag_size_T,
                                    [(x_TC, dz_TK * ctx.scale) if need_down else None,
                                     (dy_TC, h_TK * ctx.scale) if need_up else None])
        return dx_TrD, None, dg_TrK, d_down, d_up, None, None, None, None


class ColumnShardedMemory(torch.autograd.Function):
    """PKM's y_TrD = sum_K g * values[ids] with ``values`` column-sharded: the experts' second half alone.

    Forward: all-gather ids and gates, y[:, cols] = embedding_bag on the local shard, all-to-all back;
    backward: dy column slices, dg = reduce-scatter of values[ids, cols] . dy_TC, the table gradient
    locally. Per token 2 (P-1)/P D act_bytes + (P-1) K (index_bytes + 2 score_bytes).
    """

    @staticmethod
    def forward(ctx, ids_TrK, g_TrK, values_NC, sparse_grad: bool, shard: ColumnShard, grad_reduction: str,
                out_dtype: torch.dtype):
        Tr, K = ids_TrK.shape
        N, C = values_NC.shape
        assert g_TrK.shape == (Tr, K) and C == shard.cols, (g_TrK.shape, values_NC.shape, shard)
        ex = _Exchange(shard, Tr, values_NC.device)
        ids_TK = _ids_to_all(ex, ids_TrK, N)
        g_TK = ex.all_gather_rows(g_TrK.to(values_NC.dtype))
        y_TC = F.embedding_bag(ids_TK, values_NC, per_sample_weights=g_TK, mode="sum")
        ctx.save_for_backward(ids_TK, g_TK, values_NC)
        ctx.ex, ctx.sparse_grad = ex, sparse_grad
        ctx.scale = 1.0 / shard.ranks if grad_reduction == "mean" else 1.0
        return ex.gather_columns(y_TC.to(out_dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, dy_TrD):
        ids_TK, g_TK, values_NC = ctx.saved_tensors
        ex = ctx.ex
        T, K = ids_TK.shape
        dy_TC = ex.scatter_columns(dy_TrD.contiguous()).to(values_NC.dtype)
        offsets_T, offset2bag_TK, bag_size_T = bags(T, K, dy_TC.device)
        dg_TrK = ex.reduce_rows(bag_dot(dy_TC, values_NC, ids_TK, offsets_T, offset2bag_TK).view(T, K))
        (d_values,) = table_grads(ids_TK, values_NC.shape[0], ctx.sparse_grad, offset2bag_TK, bag_size_T,
                                   [(dy_TC, g_TK * ctx.scale) if ctx.needs_input_grad[2] else None])
        return None, dg_TrK, d_values, None, None, None, None


def column_sharded_experts(x_TrD: Tensor, ids_TrK: Tensor, g_TrK: Tensor, down_NC: Tensor, up_NC: Tensor,
                           shard: ColumnShard, activation: str = "gelu", sparse_grad: bool = False,
                           grad_reduction: str = "mean") -> Tensor:
    """This rank's (Tr, D) tokens, (Tr, K) ids and gates, (N, D/P) table shards -> (Tr, D) expert mixture.

    Collective over ``shard.group``: every rank of it must call this at the same point.
    """
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
    return ColumnShardedExperts.apply(x_TrD, ids_TrK, g_TrK, down_NC, up_NC, activation, sparse_grad, shard,
                                      grad_reduction)


def column_sharded_memory(ids_TrK: Tensor, g_TrK: Tensor, values_NC: Tensor, shard: ColumnShard,
                          sparse_grad: bool = False, grad_reduction: str = "mean",
                          out_dtype: torch.dtype | None = None) -> Tensor:
    """PKM's lookup on a column-sharded (N, D/P) value table: (Tr, K) ids and gates -> (Tr, D) in
    ``out_dtype`` (default: the table's; the model's activation dtype moves fewer bytes under autocast).

    Collective over ``shard.group``, like ``column_sharded_experts``.
    """
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
    return ColumnShardedMemory.apply(ids_TrK, g_TrK, values_NC, sparse_grad, shard, grad_reduction,
                                     out_dtype or values_NC.dtype)
