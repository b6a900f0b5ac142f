"""Which memory rows a batch retrieves, their TF-IDF ranking, and gradients kept to chosen rows.

Sparse memory finetuning (Lin et al., "Continual learning via sparse memory finetuning", arXiv
2510.15103, 2025) updates only the memory slots that new data uses far more than the data the model
was trained on. Per step and per memory layer (PEER experts, PKM slots):

    tf(i)  = how often slot i was retrieved in the step's batch, over tokens, heads and top-k
    df(i)  = in how many of B background batches (the base run's own training data) slot i was retrieved
    idf(i) = log((B + 1) / (df(i) + 1))
    score  = tf(i) * idf(i); the t retrieved slots of highest score are updated, the rest not at all

Ties are broken by the lower slot id, so a selection is a pure function of the batch. Each memory
layer chooses its own t rows (ids of two layers name different rows). Everything per step is
O(retrieved ids), never O(N): ids are counted with ``torch.unique``, idf is gathered at those ids, and
the kept gradient is the row-sparse COO gradient of the layer (``sparse_grad``) restricted to the
chosen rows, so neither a dense (N, d) gradient nor optimizer state for untouched rows exists.

Ids are read by forward hooks on each layer's ``ProductKeys`` (the module both PEER and PKM route
through), so the layers themselves are not changed.

Shape legend: U distinct ids retrieved in a step, N slots of a layer, t chosen rows.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from peerlm.ffn import PKM
from peerlm.peer import PEER

__all__ = ["table_parameters", "num_slots", "RetrievalCounter", "document_frequencies", "idf", "top_tfidf",
           "keep_rows", "keep_mask", "freeze_routing_modes", "RoutingFrozen", "SparseRows"]


def table_parameters(layer: nn.Module) -> list[nn.Parameter]:
    """The (N, D) tables of a memory layer whose rows are slots: PEER ``w_down`` (u) and ``w_up`` (v),
    PKM ``values``."""
    if isinstance(layer, PEER):
        return [layer.w_down, layer.w_up]
    if isinstance(layer, PKM):
        return [layer.values]
    raise TypeError(f"not a memory layer: {type(layer).__name__}")


def num_slots(layer: nn.Module) -> int:
    return layer.num_experts if isinstance(layer, PEER) else layer.num_keys


class RetrievalCounter:
    """Collects the slot ids each memory layer of ``model`` retrieves (``model.memory_layers()``), from a
    forward hook on the layer's product keys. ``training_only``: record only forwards in training mode
    (validation between steps is not counted). Use as a context manager or call ``close``."""

    def __init__(self, model: nn.Module, training_only: bool = True):
        self.layers = dict(model.memory_layers())
        self.training_only = training_only
        self._ids: dict[str, list[Tensor]] = {name: [] for name in self.layers}
        self._handles = [layer.keys.register_forward_hook(functools.partial(self._record, name))
                         for name, layer in self.layers.items()]

    def _record(self, name: str, module: nn.Module, args: Any, output: tuple[Tensor, Tensor]) -> None:
        if self.training_only and not module.training:
            return
        self._ids[name].append(output[1].detach().reshape(-1))

    def clear(self) -> None:
        for v in self._ids.values():
            v.clear()

    def take(self) -> dict[str, tuple[Tensor, Tensor]]:
        """Per layer, the distinct ids retrieved since the last ``take`` / ``clear`` (ascending) and how
        often each was retrieved; then clears."""
        out = {}
        for name, parts in self._ids.items():
            if parts:
                ids_U, counts_U = torch.unique(torch.cat(parts), sorted=True, return_counts=True)
            else:
                ids_U = counts_U = torch.zeros(0, dtype=torch.long)
            out[name] = (ids_U, counts_U)
        self.clear()
        return out

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> RetrievalCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.no_grad()
def document_frequencies(model: nn.Module, batches: Iterable[Tensor]) -> tuple[dict[str, Tensor], int]:
    """Per memory layer, in how many of ``batches`` (token ids (B, T) each) every slot was retrieved
    (int64, (N,)), with the model in eval mode; and the number of batches."""
    was_training = model.training
    model.eval()
    layers = dict(model.memory_layers())
    df = {name: torch.zeros(num_slots(m), dtype=torch.int64, device=table_parameters(m)[0].device)
          for name, m in layers.items()}
    count = 0
    try:
        with RetrievalCounter(model, training_only=False) as counter:
            for x in batches:
                model(x)
                for name, (ids_U, _) in counter.take().items():
                    df[name][ids_U] += 1
                count += 1
    finally:
        model.train(was_training)
    return df, count


def idf(df: Tensor, batches: int) -> Tensor:
    """log((B + 1) / (df + 1)), float32."""
    return torch.log(torch.tensor(float(batches + 1)) / (df.float() + 1.0))


def top_tfidf(ids_U: Tensor, counts_U: Tensor, idf_N: Tensor, t: int) -> Tensor:
    """The (at most) ``t`` ids of highest tf * idf, ties to the lower id, returned ascending.
    ``ids_U`` must be ascending and distinct (as ``RetrievalCounter.take`` gives them)."""
    assert ids_U.shape == counts_U.shape and ids_U.dim() == 1
    if ids_U.numel() <= t:
        return ids_U
    score_U = counts_U.to(torch.float32) * idf_N[ids_U].to(torch.float32)
    order = torch.sort(-score_U, stable=True).indices[:t]  # stable: equal scores keep ascending ids
    return ids_U[order].sort().values


def keep_rows(grad: Tensor, rows: Tensor) -> Tensor:
    """``grad`` of an (N, D) table restricted to ``rows`` (ascending ids), as a coalesced row-sparse COO
    tensor: O(retrieved rows) for a sparse gradient. A dense gradient is read at ``rows`` only."""
    if grad.is_sparse:
        g = grad.coalesce()
        idx_U = g.indices()[0]
        keep_U = torch.isin(idx_U, rows)
        return torch.sparse_coo_tensor(idx_U[keep_U].unsqueeze(0), g.values()[keep_U], g.shape,
                                       is_coalesced=True, check_invariants=False)
    return torch.sparse_coo_tensor(rows.unsqueeze(0), grad.index_select(0, rows), grad.shape, is_coalesced=True,
                                   check_invariants=False)


def keep_mask(grad: Tensor, trainable_N: Tensor) -> Tensor:
    """``grad`` of an (N, ...) parameter with the rows where ``trainable_N`` is False removed (sparse:
    dropped from the COO tensor; dense: set to zero)."""
    if grad.is_sparse:
        g = grad.coalesce()
        idx_U = g.indices()[0]
        keep_U = trainable_N[idx_U]
        return torch.sparse_coo_tensor(idx_U[keep_U].unsqueeze(0), g.values()[keep_U], g.shape,
                                       is_coalesced=True, check_invariants=False)
    shape = (-1,) + (1,) * (grad.dim() - 1)
    return grad * trainable_N.view(shape).to(grad.dtype)


def freeze_routing_modes(model: nn.Module) -> None:
    """Put every memory layer's query norm in eval mode: its BatchNorm or running statistics are part
    of the routing and must not move while the routing is frozen."""
    for _, m in model.memory_layers():
        m.norm.eval()


class RoutingFrozen:
    """Step hooks (``peerlm.train.StepHooks``) of a run whose routing is frozen: query norms in eval
    mode at every step."""

    def begin_step(self, model: nn.Module, step: int) -> None:
        freeze_routing_modes(model)

    def before_update(self, model: nn.Module, step: int) -> None:
        pass


class SparseRows(RoutingFrozen):
    """Step hooks of sparse memory finetuning: count the step's retrieved ids, choose each layer's top
    ``slots`` rows by TF-IDF against ``df`` (over ``batches`` background batches) and keep only those
    rows of the layer's table gradients. ``chosen`` (when a list) receives {layer: rows} per step.

    With one micro-batch per step (``micro_batches``), a step's ids are all known before its backward:
    each PEER layer then gets the same choice as its ``grad_rows``, and its fused backward sums gradient
    rows for the chosen ids only, so the batch's whole U-row gradient never exists (peak memory follows
    t, not U). The choice after backward still runs and keeps every row of such a gradient; it alone
    restricts the gradients of other paths (PKM, Triton, sharded tables) and of accumulated steps."""

    def __init__(self, model: nn.Module, df: Mapping[str, Tensor], batches: int, slots: int,
                 chosen: list[dict[str, Tensor]] | None = None, micro_batches: int = 1):
        layers = dict(model.memory_layers())
        if set(df) != set(layers):
            raise ValueError(f"background frequencies are for layers {sorted(df)}, the model has {sorted(layers)}")
        for name, m in layers.items():
            if df[name].shape != (num_slots(m),):
                raise ValueError(f"background frequencies of {name} have shape {tuple(df[name].shape)}, "
                                 f"the layer has {num_slots(m)} slots")
            if not 1 <= slots <= num_slots(m):
                raise ValueError(f"slots must be in [1, {num_slots(m)}] (the slots of {name}), got {slots}")
        self.layers, self.slots, self.chosen = layers, slots, chosen
        self.idf = {name: idf(d, batches).to(table_parameters(layers[name])[0].device) for name, d in df.items()}
        self.counter = RetrievalCounter(model)
        if micro_batches == 1:
            for name, layer in layers.items():
                if isinstance(layer, PEER):
                    layer.grad_rows = functools.partial(self.choose, name)

    def choose(self, name: str, ids_U: Tensor, counts_U: Tensor) -> Tensor:
        """Layer ``name``'s rows to update, from its distinct retrieved ids and their counts."""
        idf_N = self.idf[name]
        return top_tfidf(ids_U.to(idf_N.device), counts_U.to(idf_N.device), idf_N, self.slots)

    def begin_step(self, model: nn.Module, step: int) -> None:
        super().begin_step(model, step)
        self.counter.clear()

    def before_update(self, model: nn.Module, step: int) -> None:
        taken = self.counter.take()
        record = {}
        for name, layer in self.layers.items():
            rows = self.choose(name, *taken[name])
            record[name] = rows
            for p in table_parameters(layer):
                if p.grad is not None:
                    p.grad = keep_rows(p.grad, rows)
        if self.chosen is not None:
            self.chosen.append(record)

