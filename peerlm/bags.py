"""The embedding-bag primitives every non-Triton expert path is built from, unsharded (``peerlm.fused``)
and column-sharded (``peerlm.parallel.experts``), and PEER's activations by name.

A batch of T tokens with K retrieved rows each is T "bags" of exactly K rows (``bags``). Two of
PyTorch's embedding-bag kernels then compute, row by row straight from an (N, D) table and without
writing gathered rows:
- ``bag_dot``: out[t*K + s] = table[ids[t, s]] . rows[t] (embedding-bag's per-sample-weight backward);
- ``bag_table_grad``: out[e] = sum over (t, s) with ids[t, s] == e of weights[t, s] * rows[t]
  (embedding-bag's dense backward);
and ``table_grads`` hands table gradients out dense (N, D), or row-sparse: accumulated into one compact
row per distinct id (U rows) and wrapped as coalesced COO tensors, as ``nn.Embedding(sparse=True)``
would; or, for a table in ``row_updates``, applies them to the table then and there (the update fused
into the backward, ``peerlm.optim.update_in_backward``) and hands out no gradient.

Shape legend: T tokens (bags), K rows per bag, D row width, N table rows, U distinct ids,
TK = T * K flattened (bag-major).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from peerlm.config import PEER_ACTIVATIONS
from peerlm.kernels.cpu import usable

__all__ = ["ACTIVATIONS", "ACTIVATION_GRADS", "bags", "bag_dot", "bag_table_grad", "table_grads", "GradBuffers",
           "grad_buffers", "RowUpdate", "row_updates"]

ACTIVATIONS = {name: getattr(F, name) for name in PEER_ACTIVATIONS}  # gelu, relu, silu
# dL/dz from dL/da for a = act(z): the ops autograd runs for each of ACTIVATIONS, so the same bits; called
# directly rather than through torch.autograd.grad, which torch.compile cannot trace in a backward
ACTIVATION_GRADS = {
    "gelu": lambda grad, z, a: torch.ops.aten.gelu_backward(grad, z),
    "relu": lambda grad, z, a: torch.ops.aten.threshold_backward(grad, a, 0),
    "silu": lambda grad, z, a: torch.ops.aten.silu_backward(grad, z),
}

_MODE_SUM = 0
_aten = torch.ops.aten


def bags(T: int, K: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """Offsets (T,), offset2bag (TK,) and bag sizes (T,) for T bags of exactly K rows."""
    offsets_T = torch.arange(0, T * K, K, device=device)
    offset2bag_TK = torch.arange(T, device=device).repeat_interleave(K)
    bag_size_T = torch.full((T,), K, dtype=torch.long, device=device)
    return offsets_T, offset2bag_TK, bag_size_T


def bag_dot(rows_TD: Tensor, table_ND: Tensor, ids_TK: Tensor, offsets_T: Tensor, offset2bag_TK: Tensor) -> Tensor:
    """out[t*K + s] = table[ids[t, s]] . rows[t], shape (TK,), without gathering the table rows."""
    kernels = usable(rows_TD, table_ND)
    if kernels is not None:
        with torch.profiler.record_function("peerlm::bag_dot"):
            return kernels.bag_dot(rows_TD.contiguous(), table_ND.contiguous(), ids_TK.contiguous())
    return _aten._embedding_bag_per_sample_weights_backward(
        rows_TD, table_ND, ids_TK.reshape(-1), offsets_T, offset2bag_TK, _MODE_SUM
    )


class GradBuffers:
    """Storage for table gradients, reused from step to step.

    A table gradient is a large tensor made afresh by every backward (at N = 1024^2 and d 512, 232k
    rows of a batch: 0.47 GiB per table) and dropped by ``zero_grad`` after the optimizer step; a new
    allocation of that size comes back from the system as untouched pages, and faulting them in cost
    as much as computing the gradient. ``take`` hands out a (rows, D) view of a buffer nobody else holds
    (its storage's use count is back to what the pool alone gives it: the last step's gradient was
    freed), or of a new one, 25% roomier (pages never written are never resident), kept for later
    steps; a gradient still held (accumulation over micro-batches, a caller keeping ``.grad``) is never
    written into. Free buffers too small for a request are dropped when a larger one is made, so the
    pool holds no more between steps than the gradients of one step did; at most ``keep`` buffers per
    (width, dtype) stay (two per PEER layer, one per PKM layer), the oldest going first."""

    def __init__(self, keep: int = 16):
        self.keep = keep
        self._bufs: dict[tuple, list[tuple[Tensor, int]]] = {}

    @staticmethod
    def _uses(t: Tensor) -> int:
        return torch._C._storage_Use_Count(t.untyped_storage()._cdata)

    def take(self, rows: int, width: int, dtype: torch.dtype) -> Tensor:
        bufs = self._bufs.setdefault((width, dtype), [])
        free = [i for i, (b, n) in enumerate(bufs) if self._uses(b) == n]
        fits = [i for i in free if bufs[i][0].shape[0] >= rows]
        if fits:
            buf, n = bufs.pop(min(fits, key=lambda i: bufs[i][0].shape[0]))
        else:  # free buffers too small to use go first: they would only hold memory beside the new one
            bufs[:] = [bn for i, bn in enumerate(bufs) if i not in free]
            buf = torch.empty(rows + rows // 4, width, dtype=dtype)
            n = self._uses(buf)
            if len(bufs) >= self.keep:
                bufs.pop(0)
        bufs.append((buf, n))  # most recently used last
        return buf

    def clear(self) -> None:
        self._bufs.clear()


# table gradients of the CPU kernel path (``bag_table_grad``); ``grad_buffers.clear()`` frees them
grad_buffers = GradBuffers()


def bag_table_grad(rows_TD: Tensor, ids_TK: Tensor, offset2bag_TK: Tensor, bag_size_T: Tensor,
                   num_rows: int, weights_TK: Tensor) -> Tensor:
    """out[e] = sum over (t, s) with ids[t, s] == e of weights[t, s] * rows[t]; shape (num_rows, D).
    On the CPU kernels' path the result is a view of a buffer of ``grad_buffers``."""
    kernels = usable(rows_TD, weights_TK)
    if kernels is not None:
        with torch.profiler.record_function("peerlm::bag_scatter"):
            out = grad_buffers.take(num_rows, rows_TD.shape[1], rows_TD.dtype)
            return kernels.bag_scatter(rows_TD.contiguous(), ids_TK.contiguous(), weights_TK.contiguous(), num_rows,
                                       out)
    empty = torch.empty(0, dtype=torch.long, device=rows_TD.device)
    return _aten._embedding_bag_dense_backward(
        rows_TD, ids_TK.reshape(-1), offset2bag_TK, bag_size_T, empty, num_rows, False, _MODE_SUM,
        weights_TK.reshape(-1),
    )


class RowUpdate(Protocol):
    """An optimizer's update of one table, run by the backward that computes the table's gradient."""

    def fused_(self, table: Tensor, rows_TD: Tensor, target_TK: Tensor, weights_TK: Tensor, rows_U: Tensor) -> bool:
        """Sum gradient row u = sum over target[t, s] == u of weights[t, s] * rows[t] and update table row
        rows_U[u] with it, in one pass (targets >= U: no row); False where it cannot (then ``apply_``)."""

    def apply_(self, table: Tensor, rows_U: Tensor, grad_UD: Tensor) -> None:
        """Update table rows rows_U (ascending, distinct) with their gradient rows."""


# tables whose optimizer updates them inside the backward (``peerlm.optim.update_in_backward``)
row_updates: torch.utils.weak.WeakIdKeyDictionary = torch.utils.weak.WeakIdKeyDictionary()


def table_grads(ids_TK: Tensor, num_rows: int, sparse_grad: bool, offset2bag_TK: Tensor, bag_size_T: Tensor,
                parts: list[tuple[Tensor, Tensor] | None],
                grad_rows: Callable[[Tensor, Tensor], Tensor] | None = None,
                tables: Sequence[Tensor | None] = ()) -> list[Tensor | None]:
    """For each (rows_TD, weights_TK) of ``parts`` (None: no gradient wanted), the (num_rows, D) table
    gradient ``bag_table_grad`` sums; dense, or with ``sparse_grad`` coalesced COO over the distinct ids,
    holding O(U D) instead of O(N D).

    ``grad_rows`` (row-sparse gradients and updates in the backward) restricts the gradient to some rows
    before any is summed: it gets the distinct ids (ascending) and how often each was retrieved, and
    returns the ids to keep (an ascending subset); the rest get no row at all. Sparse memory finetuning
    chooses its rows this way, so the batch's full U-row gradient is never held
    (``peerlm.continual.memory.SparseRows``).

    ``tables``: the parts' tables. One registered in ``row_updates`` is updated here, over its distinct
    rows (those ``grad_rows`` keeps), and its gradient is None: on the CPU kernels' path without ever
    storing the gradient rows (``RowUpdate.fused_``), elsewhere from the U-row gradient at once."""
    T, K = ids_TK.shape
    # a compiled backward (whose tracer does not enter the registry) hands table gradients to the step
    registered = not torch.compiler.is_compiling() and len(row_updates) > 0
    tables = list(tables) + [None] * (len(parts) - len(tables))
    updates = [row_updates.get(t) if registered and t is not None and part is not None else None
               for t, part in zip(tables, parts)]
    rowwise = sparse_grad or any(u is not None for u in updates)
    if rowwise and grad_rows is not None:
        uniq_U, inv, counts_U = torch.unique(ids_TK.reshape(-1), return_inverse=True, return_counts=True)
        keep_R = grad_rows(uniq_U, counts_U)
        kept_U = torch.isin(uniq_U, keep_R)
        # kept ids to 0..R-1 in order, the others to one spare row R that is summed and dropped
        slot_U = torch.where(kept_U, kept_U.cumsum(0) - 1, int(kept_U.sum()))
        uniq_U, rows, target_TK = uniq_U[kept_U], int(kept_U.sum()) + 1, slot_U[inv].view(T, K)
    elif rowwise:
        uniq_U, inv = torch.unique(ids_TK.reshape(-1), return_inverse=True)
        rows, target_TK = uniq_U.numel(), inv.view(T, K)
    grads = []
    for part, update, table in zip(parts, updates, tables):
        if part is None:
            grads.append(None)
            continue
        rows_TD, weights_TK = part
        if update is not None:
            if not update.fused_(table, rows_TD, target_TK, weights_TK, uniq_U):
                g = bag_table_grad(rows_TD, target_TK, offset2bag_TK, bag_size_T, rows, weights_TK)
                update.apply_(table, uniq_U, g[:uniq_U.numel()])
            grads.append(None)
            continue
        if not sparse_grad:
            grads.append(bag_table_grad(rows_TD, ids_TK, offset2bag_TK, bag_size_T, num_rows, weights_TK))
            continue
        g = bag_table_grad(rows_TD, target_TK, offset2bag_TK, bag_size_T, rows, weights_TK)
        grads.append(torch.sparse_coo_tensor(uniq_U.unsqueeze(0), g[:uniq_U.numel()], (num_rows, g.shape[1]),
                                             is_coalesced=True, check_invariants=False))
    return grads
