"""PEER (and PKM) layers whose tables are column-sharded across ranks, and the helper that converts a model.

``shard_experts(model, group)`` turns every ``PEER`` of a built (or meta-device) model into a
``ShardedPEER`` in place, as ``fully_shard`` converts modules in place, and every ``PKM`` into a
``ShardedPKM`` (its ``values`` sharded the same way): the same module, its routing
(query projection, query norm, sub-keys) untouched and replicated, its ``w_down`` and ``w_up``
replaced by this rank's (N, D/P) column shards (layout and math: ``peerlm.parallel.experts``). Its
forward routes as ``PEER`` does and computes the experts with ``column_sharded_experts``, the fused
embedding-bag path on the local shard, with dense or row-sparse (``sparse_grad``) table gradients.
The whole table never exists on any rank: a materialised table is sliced (and dropped with the old
parameter), a meta-device one gets only its shard allocated.

Initialisation without the whole table: ``reset_parameters`` draws the table's rows in chunks of
whole rows from the default generator, in the order and with the distribution of
``PEER.reset_parameters`` (``PKM.reset_parameters``), and keeps this rank's columns. The table is
then the same for every P; on CPU it is bit for bit the table the unsharded layer draws at the same
seed (torch's CPU normal sampler gives the same stream for chunks of 16-element multiples; tested),
so that a meta-built, sharded, then initialised model equals ``build_model``'s. Every rank must hold
the same generator state.

State dicts: the shards appear as DTensors of the global (N, D) shape with placement ``Shard(1)``
over the group, aliasing the parameters, so ``torch.distributed.checkpoint`` can save with P ranks
and load with any other number (or into an unsharded model in one process). ``load_state_dict``
accepts such DTensors, or full (N, D) tensors (e.g. an unsharded checkpoint), and keeps this rank's
columns. The parameters themselves stay plain tensors: DTensor's ``to_local`` cannot carry a sparse
COO gradient, and plain (N, D/P) tables keep peerlm's row-sparse AdamW and the fused kernels as they are.

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
from peerlm.parallel.experts import GRAD_REDUCTIONS, ColumnShard, column_sharded_experts, column_sharded_memory
from peerlm.peer import PEER

__all__ = ["ShardedPEER", "ShardedPKM", "shard_peer", "shard_pkm", "shard_experts", "sharded_parameter_names",
           "sharded_tables", "ShardedTable"]

_CHUNK_ELEMENTS = 1 << 22  # rows drawn at a time at init: 16 MiB of fp32, whatever N


@torch.no_grad()
def normal_columns_(local_NC: Tensor, dim: int, columns: slice, std: float) -> Tensor:
    """Fill ``local_NC`` with ``columns`` of an (N, dim) N(0, std^2) draw made row chunk by row chunk.

    Chunks hold a multiple of 16 rows, and the last is merged into the one before when it would hold
    fewer than 16 elements: torch's CPU sampler draws 16 at a time and a shorter tensor on its scalar
    path, so the stream then matches one draw of the whole table.
    """
    N = local_NC.shape[0]
    rows = max(16, _CHUNK_ELEMENTS // dim // 16 * 16)
    start = 0
    while start < N:
        end = min(start + rows, N)
        if (N - end) * dim < 16:
            end = N
        block = torch.empty(end - start, dim, dtype=local_NC.dtype, device=local_NC.device)
        nn.init.normal_(block, std=std)
        local_NC[start:end].copy_(block[:, columns])
        start = end
    return local_NC


class _ColumnSharded:
    """What a layer with column-sharded tables shares: the layout, DTensor views in state dicts."""

    TABLES: tuple[str, ...]
    shard: ColumnShard
    grad_reduction: str

    def _table_shape(self) -> torch.Size:
        return torch.Size((self.usage_slots, self.dim))  # rows: N experts or N memory slots

    def _shard_repr(self) -> str:
        cols = self.shard.columns
        return (f"ranks={self.shard.ranks}, rank={self.shard.rank}, columns={cols.start}:{cols.stop}, "
                f"grad_reduction={self.grad_reduction}")

    def _mesh(self, device_type: str):
        from torch.distributed.device_mesh import DeviceMesh

        meshes = self.__dict__.setdefault("_meshes", {})
        if device_type not in meshes:
            meshes[device_type] = DeviceMesh.from_group(self.shard.group, device_type)
        return meshes[device_type]

    def _tables_to_dtensor(self, state_dict: dict, prefix: str) -> None:
        from torch.distributed.tensor import DTensor, Shard

        if self.shard.group is None:
            return
        shape = self._table_shape()
        for name in self.TABLES:
            key = prefix + name
            if key in state_dict and not isinstance(state_dict[key], DTensor):
                local = state_dict[key]
                state_dict[key] = DTensor.from_local(local, self._mesh(local.device.type), [Shard(1)],
                                                     run_check=False, shape=shape, stride=(shape[1], 1))

    def _tables_from_state(self, state_dict: dict, prefix: str) -> None:
        from torch.distributed.tensor import DTensor, Shard

        for name in self.TABLES:
            key = prefix + name
            value = state_dict.get(key)
            if value is None:
                continue
            if isinstance(value, DTensor):
                ours = value.placements == (Shard(1),) and value.device_mesh.size() == self.shard.ranks
                state_dict[key] = value.to_local() if ours else value.full_tensor()[:, self.shard.columns]
            elif value.shape == self._table_shape() and self.shard.ranks > 1:
                state_dict[key] = value[:, self.shard.columns]


class ShardedPEER(_ColumnSharded, PEER):
    """A PEER layer with column-sharded expert tables; see the module docstring.

    ``ShardedPEER(dim, num_experts, group=..., **PEER options)`` builds one on the meta device and
    initialises it once, never allocating the whole table (the same parameters as a ``PEER`` built on
    meta and then reset, as ``build_model`` does, at the same seed); ``shard_peer(layer, group)``
    converts an existing ``PEER`` in place. ``impl`` is kept for the record; the experts always run on
    the fused embedding-bag path over the local shard.
    """

    TABLES = ("w_down", "w_up")

    def __init__(self, dim: int, num_experts: int, group: dist.ProcessGroup | None = None,
                 grad_reduction: str = "mean", device: torch.device | str | None = None, **options):
        with torch.device("meta"):
            super().__init__(dim, num_experts, **options)
        _shard_tables(self, ShardedPEER, group, grad_reduction)
        self.to_empty(device=device or "cpu")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.w_down.is_meta:
            return
        std = self.dim**-0.5  # PEER.reset_parameters' draws, in its order, so that the streams agree
        normal_columns_(self.w_down, self.dim, self.shard.columns, std)
        normal_columns_(self.w_up, self.dim, self.shard.columns, std)
        nn.init.normal_(self.query.weight, std=std)
        self.keys.reset_parameters()
        if hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()
        self.reset_usage()

    def resolved_impl(self) -> str:
        return "fused"

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._shard_repr()}"

    def forward(self, x: Tensor) -> Tensor:
        # no early return for an empty input: this rank still takes part in the collectives
        self._check_input(x)
        x_TD = x.reshape(-1, self.dim)
        scores_THK, ids_THK = self._route(x_TD, differentiable=False)
        g_THK = self._gates(scores_THK)
        if self.track_usage:
            self._accumulate_usage(ids_THK, g_THK)
        y_TD = column_sharded_experts(x_TD, ids_THK.flatten(1), g_THK.flatten(1), self.w_down, self.w_up,
                                      self.shard, self.activation, self.sparse_grad, self.grad_reduction)
        return y_TD.view(x.shape)


class ShardedPKM(_ColumnSharded, PKM):
    """A product-key memory with a column-sharded value table (``shard_pkm`` converts a ``PKM``)."""

    TABLES = ("values",)

    def reset_parameters(self) -> None:
        if self.values.is_meta:
            return
        std = self.dim**-0.5  # PKM.reset_parameters' draws, in its order
        nn.init.normal_(self.query.weight, std=std)
        if hasattr(self.norm, "reset_parameters"):
            self.norm.reset_parameters()
        self.keys.reset_parameters()
        normal_columns_(self.values, self.dim, self.shard.columns, std)
        self.reset_usage()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self._shard_repr()}"

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"PKM expects input of shape (..., {self.dim}), got {tuple(x.shape)}")
        x_SD = x.reshape(-1, self.dim)
        scores_SHK, ids_SHK = self._route(x_SD, differentiable=False)
        g_SHK = scores_SHK.softmax(dim=-1)
        if self.track_usage:
            self._accumulate_usage(ids_SHK, g_SHK)
        y_SD = column_sharded_memory(ids_SHK.flatten(1), g_SHK.flatten(1), self.values, self.shard,
                                     self.sparse_grad, self.grad_reduction, out_dtype=x.dtype)
        return y_SD.view(x.shape)


def _state_dict_hook(module: _ColumnSharded, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    module._tables_to_dtensor(state_dict, prefix)


def _load_pre_hook(module: _ColumnSharded, state_dict: dict, prefix: str, *args) -> None:
    module._tables_from_state(state_dict, prefix)


def _shard_tables(layer: nn.Module, cls: type, group: dist.ProcessGroup | None, grad_reduction: str) -> nn.Module:
    if grad_reduction not in GRAD_REDUCTIONS:
        raise ValueError(f"grad_reduction must be one of {GRAD_REDUCTIONS}, got {grad_reduction!r}")
    shard = ColumnShard.of(layer.dim, group)
    for name in cls.TABLES:
        full = getattr(layer, name)
        if full.is_meta:
            local = torch.empty(full.shape[0], shard.cols, dtype=full.dtype, device="meta")
        else:
            local = full.detach()[:, shard.columns].clone()  # contiguous, its own storage
        setattr(layer, name, nn.Parameter(local, requires_grad=full.requires_grad))
    layer.__class__ = cls
    layer.shard, layer.grad_reduction = shard, grad_reduction
    layer.register_state_dict_post_hook(_state_dict_hook)
    layer.register_load_state_dict_pre_hook(_load_pre_hook)
    return layer


def _check_unsharded(layer: nn.Module, kind: type) -> None:
    if isinstance(layer, _ColumnSharded):
        raise ValueError(f"this {kind.__name__} layer is sharded already")
    if type(layer) is not kind:
        raise TypeError(f"expected a peerlm {kind.__name__} layer, got {type(layer).__name__}")


def shard_peer(layer: PEER, group: dist.ProcessGroup | None = None, grad_reduction: str = "mean") -> ShardedPEER:
    """Convert ``layer`` in place into a ``ShardedPEER`` over ``group`` (default: the default group);
    returns it. Its tables may be materialised (this rank's columns are kept) or on the meta device."""
    _check_unsharded(layer, PEER)
    return _shard_tables(layer, ShardedPEER, group, grad_reduction)


def shard_pkm(layer: PKM, group: dist.ProcessGroup | None = None, grad_reduction: str = "mean") -> ShardedPKM:
    """Convert a ``PKM`` in place into a ``ShardedPKM`` (its value table column-sharded); returns it."""
    _check_unsharded(layer, PKM)
    return _shard_tables(layer, ShardedPKM, group, grad_reduction)


def shard_experts(model: nn.Module, group: dist.ProcessGroup | None = None,
                  grad_reduction: str = "mean") -> nn.Module:
    """Shard the tables of every PEER (``w_down``, ``w_up``) and PKM (``values``) layer of ``model``
    across ``group``, in place; returns the model.

    Call it on every rank, with the same model, before building the optimizer (the tables become new
    parameters). On a meta-device model, follow with ``to_empty`` and ``init_weights`` as
    ``build_model`` does.
    """
    for layer in [m for m in model.modules() if type(m) in (PEER, PKM)]:
        (shard_peer if type(layer) is PEER else shard_pkm)(layer, group, grad_reduction)
    return model


def sharded_parameter_names(model: nn.Module) -> list[str]:
    """Fully qualified names of the column-sharded parameters (to keep them out of DDP / FSDP)."""
    return [f"{name}.{t}" if name else t for name, m in model.named_modules() if isinstance(m, _ColumnSharded)
            for t in m.TABLES]


class ShardedTable:
    """One column-sharded table as persistence sees it: its global ``shape`` and the Shard(1) DTensor of
    a tensor of its local (N, D/P) shape (an optimizer moment, say). What checkpoints need to know of
    sharding, by public names."""

    def __init__(self, layer: _ColumnSharded):
        self._layer = layer
        self.shape = layer._table_shape()

    @property
    def sharded(self) -> bool:
        """False for a layer sharded over no process group (one rank: the local table is the whole)."""
        return self._layer.shard.group is not None

    def to_dtensor(self, local: Tensor):
        """``local`` (this rank's columns, table-shaped) as a DTensor of the global shape; a plain tensor
        where the layer has no process group."""
        from torch.distributed.tensor import DTensor, Shard

        if not self.sharded or isinstance(local, DTensor) or local.dim() != 2:
            return local
        shape = self.shape
        return DTensor.from_local(local, self._layer._mesh(local.device.type), [Shard(1)], run_check=False,
                                  shape=shape, stride=(shape[1], 1))


def sharded_tables(model: nn.Module) -> dict[str, ShardedTable]:
    """Fully qualified parameter name -> ``ShardedTable`` of every column-sharded table of ``model``."""
    return {f"{name}.{t}" if name else t: ShardedTable(m) for name, m in model.named_modules()
            if isinstance(m, _ColumnSharded) for t in m.TABLES}
