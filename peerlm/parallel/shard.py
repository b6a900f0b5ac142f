"""Column-sharding the tables of PEER (and PKM) layers across ranks, and what persistence sees of it.

Sharding is a way to store and compute a layer's tables, not another layer: ``shard_peer(layer, group)``
keeps the ``PEER`` (its class, forward, init and validation), replaces its ``w_down`` and ``w_up`` by
this rank's (N, D/P) column shards and sets its ``shard`` (a ``ColumnShard``, ``peerlm.tables``).
Its routing (query projection, query norm, sub-keys) stays untouched and replicated. ``PEER.forward``
then computes the experts with ``column_sharded_experts`` (layout and math: ``peerlm.parallel.experts``),
the fused embedding-bag path on the local shard, with dense or row-sparse (``sparse_grad``) table
gradients, and ``PEER.reset_parameters`` draws the whole tables' stream and keeps this rank's columns
(bit for bit the unsharded layer's table on CPU at the same seed). ``shard_pkm`` does the same for a
``PKM``'s ``values``, and ``shard_experts(model, group)`` for every PEER and PKM of a built (or
meta-device) model, in place, as ``fully_shard`` converts modules in place. The whole table never
exists on any rank: a materialised table is sliced (and dropped with the old parameter), a meta-device
one gets only its shard allocated; ``sharded_peer`` builds a sharded PEER that way from the start.

State dicts: the shards appear as DTensors of the global (N, D) shape with placement ``Shard(1)``
over the group, aliasing the parameters, so ``torch.distributed.checkpoint`` can save with P ranks
and load with any other number (or into an unsharded model in one process). ``load_state_dict``
accepts such DTensors, or full (N, D) tensors (e.g. an unsharded checkpoint), and keeps this rank's
columns. The parameters themselves stay plain tensors: DTensor's ``to_local`` cannot carry a sparse
COO gradient, and plain (N, D/P) tables keep peerlm's row-sparse AdamW and the fused kernels as they are.
``sharded_tables`` / ``ShardedTable`` are what checkpoints need to know of this, by public names.

With DDP or FSDP2 on the same ranks: leave the shards out of them (``sharded_parameter_names``:
DDP's ``_set_params_and_buffers_to_ignore_for_model``, ``fully_shard(..., ignored_params=...)``), as
their gradients are already reduced here, and give the layer a process group of its own
(``dist.new_group()``) so that its collectives never interleave with theirs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peerlm.ffn import PKM
from peerlm.peer import PEER
from peerlm.tables import GRAD_REDUCTIONS, ColumnShard

__all__ = ["shard_peer", "shard_pkm", "shard_experts", "sharded_peer", "sharded_parameter_names", "sharded_tables",
           "ShardedTable"]

_KINDS = (PEER, PKM)


def _is_sharded(module: nn.Module) -> bool:
    return isinstance(module, _KINDS) and module.shard is not None


def _table_shape(layer: PEER | PKM) -> torch.Size:
    return torch.Size((layer.usage_slots, layer.dim))  # rows: N experts or N memory slots


def _as_dtensor(layer: PEER | PKM, local: Tensor):
    """This rank's (N, D/P) columns as the Shard(1) DTensor of the (N, D) table."""
    from torch.distributed.tensor import DTensor, Shard

    shape = _table_shape(layer)
    return DTensor.from_local(local, layer.shard.mesh(local.device.type), [Shard(1)], run_check=False,
                              shape=shape, stride=(shape[1], 1))


def _state_dict_hook(layer: PEER | PKM, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    from torch.distributed.tensor import DTensor

    if layer.shard.group is None:
        return
    for name in layer.TABLES:
        key = prefix + name
        if key in state_dict and not isinstance(state_dict[key], DTensor):
            state_dict[key] = _as_dtensor(layer, state_dict[key])


def _load_pre_hook(layer: PEER | PKM, state_dict: dict, prefix: str, *args) -> None:
    from torch.distributed.tensor import DTensor, Shard

    shard = layer.shard
    for name in layer.TABLES:
        key = prefix + name
        value = state_dict.get(key)
        if value is None:
            continue
        if isinstance(value, DTensor):
            ours = value.placements == (Shard(1),) and value.device_mesh.size() == shard.ranks
            state_dict[key] = value.to_local() if ours else value.full_tensor()[:, shard.columns]
        elif value.shape == _table_shape(layer) and shard.ranks > 1:
            state_dict[key] = value[:, shard.columns]


def _shard_tables(layer: PEER | PKM, kind: type, group: dist.ProcessGroup | None, grad_reduction: str):
    if type(layer) is not kind:
        raise TypeError(f"expected a peerlm {kind.__name__} layer, got {type(layer).__name__}")
    if layer.shard is not None:
        raise ValueError(f"this {kind.__name__} layer is sharded already")
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
    shard = ColumnShard.of(layer.dim, group)
    for name in layer.TABLES:
        full = getattr(layer, name)
        if full.is_meta:
            local = torch.empty(full.shape[0], shard.cols, dtype=full.dtype, device="meta")
        else:
            local = full.detach()[:, shard.columns].clone()  # contiguous, its own storage
        setattr(layer, name, nn.Parameter(local, requires_grad=full.requires_grad))
    layer.shard, layer.grad_reduction = shard, grad_reduction
    layer.register_state_dict_post_hook(_state_dict_hook)
    layer.register_load_state_dict_pre_hook(_load_pre_hook)
    return layer


def shard_peer(layer: PEER, group: dist.ProcessGroup | None = None, grad_reduction: str = "mean") -> PEER:
    """Column-shard ``layer``'s expert tables over ``group`` (default: the default group), in place;
    returns it. Its tables may be materialised (this rank's columns are kept) or on the meta device.
    ``grad_reduction``: "mean" (default) or "sum" of the ranks' table gradients (``peerlm.parallel.experts``)."""
    return _shard_tables(layer, PEER, group, grad_reduction)


def shard_pkm(layer: PKM, group: dist.ProcessGroup | None = None, grad_reduction: str = "mean") -> PKM:
    """Column-shard a ``PKM``'s value table over ``group``, in place; returns it."""
    return _shard_tables(layer, PKM, group, grad_reduction)


def sharded_peer(dim: int, num_experts: int, group: dist.ProcessGroup | None = None, grad_reduction: str = "mean",
                 device: torch.device | str | None = None, **options) -> PEER:
    """A ``PEER(dim, num_experts, **options)`` with its tables column-sharded over ``group``, built without
    ever allocating the whole tables: on the meta device, sharded, then this rank's columns allocated on
    ``device`` (default CPU) and initialised once; the parameters of a PEER built on meta and then reset,
    as ``build_model`` does, at the same seed."""
    with torch.device("meta"):
        layer = PEER(dim, num_experts, **options)
    shard_peer(layer, group, grad_reduction)
    layer.to_empty(device=device or "cpu")
    layer.reset_parameters()
    return layer


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None,
                  grad_reduction: str = "mean") -> nn.Module:
    """Shard the tables of every PEER (``w_down``, ``w_up``) and PKM (``values``) layer of ``model``
    across ``group``, in place (layers sharded already are left as they are); returns the model.

    Call it on every rank, with the same model, before building the optimizer (the tables become new
    parameters). On a meta-device model, follow with ``to_empty`` and ``init_weights`` as
    ``build_model`` does.
    """
    for layer in [m for m in model.modules() if type(m) in _KINDS and m.shard is None]:
        _shard_tables(layer, type(layer), group, grad_reduction)
    return model


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the column-sharded parameters (to keep them out of DDP / FSDP)."""
    return list(sharded_tables(model))


class ShardedTable:
    """One column-sharded table as persistence sees it: its global ``shape`` and the Shard(1) DTensor of
    a tensor of its local (N, D/P) shape (an optimizer moment, say). What checkpoints need to know of
    sharding, by public names."""

    def __init__(self, layer: PEER | PKM):
        self._layer = layer
        self.shape = _table_shape(layer)

    @property
    def sharded(self) -> bool:
        """False for a layer sharded over no process group (one rank: the local table is the whole)."""
        return self._layer.shard.group is not None

    def to_dtensor(self, local: Tensor):
        """``local`` (this rank's columns, table-shaped) as a DTensor of the global shape; a plain tensor
        where the layer has no process group."""
        from torch.distributed.tensor import DTensor

        if not self.sharded or isinstance(local, DTensor) or local.dim() != 2:
            return local
        return _as_dtensor(self._layer, local)


def sharded_tables(model: nn.Module) -> dict[str, ShardedTable]:
    """Fully qualified parameter name -> ``ShardedTable`` of every column-sharded table of ``model``."""
    return {f"{name}.{t}" if name else t: ShardedTable(m) for name, m in model.named_modules() if _is_sharded(m)
            for t in m.TABLES}
