"""How a PEER or PKM layer stores its (N, D) tables (``w_down`` and ``w_up``; ``values``): whole, or
column-sharded across the ranks of a process group.

A layer's ``shard`` is None (the whole table) or a ``ColumnShard``: in a group of P ranks, rank r holds
columns [r C, (r+1) C), C = D/P, of every row, as a contiguous (N, C) parameter (DTensor's ``Shard(1)``
local chunk). Sharding is a way to store and compute the same layer: its forward, init and validation
are the layer's own; only the expert step runs on the local shard (``peerlm.parallel.experts``) and the
table draws keep this rank's columns (``normal_table_``). ``peerlm.parallel.shard`` converts layers and
presents the shards as DTensors in state dicts.

Initialisation without the whole table: ``normal_columns_`` draws the table's rows in chunks of whole
rows from the default generator and keeps this rank's columns, so the table is the same for every P; on
CPU it is bit for bit the table one draw of the whole gives at the same seed (torch's CPU normal sampler
gives the same stream for chunks of 16-element multiples; tested), and a meta-built, sharded, then
initialised model equals the unsharded one. Every rank must hold the same generator state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from peerlm.kernels.cpu import advise_huge_pages

__all__ = ["ColumnShard", "GRAD_REDUCTIONS", "normal_columns_", "normal_table_", "shard_repr"]

GRAD_REDUCTIONS = ("mean", "sum")
_CHUNK_ELEMENTS = 1 << 22  # rows drawn at a time at init: 16 MiB of fp32, whatever N


@dataclass(frozen=True)
class ColumnShard:
    """Which columns of a (N, dim) table this rank holds, and the group it shares the table with.

    ``group`` None with ``ranks == 1`` is one process without torch.distributed: no communication.
    """

    dim: int
    rank: int = 0
    ranks: int = 1
    group: dist.ProcessGroup | None = None
    _meshes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.dim % self.ranks:
            raise ValueError(f"d_model {self.dim} is not divisible by {self.ranks} ranks: column sharding gives "
                             f"every rank d_model / ranks columns; use a number of ranks that divides {self.dim}")
        assert 0 <= self.rank < self.ranks

    @classmethod
    def of(cls, dim: int, group: dist.ProcessGroup | None = None) -> ColumnShard:
        """The shard of ``group`` (default: the default group when torch.distributed is initialised)."""
        if group is None and not (dist.is_available() and dist.is_initialized()):
            return cls(dim)
        group = group or dist.group.WORLD
        return cls(dim, dist.get_rank(group), dist.get_world_size(group), group)

    def __deepcopy__(self, memo: dict) -> ColumnShard:
        return self  # a copied layer lives on the same ranks; process groups cannot be copied

    @property
    def cols(self) -> int:
        return self.dim // self.ranks

    @property
    def columns(self) -> slice:
        return slice(self.rank * self.cols, (self.rank + 1) * self.cols)

    def mesh(self, device_type: str):
        """The group as a one-dimensional ``DeviceMesh`` of ``device_type`` (for DTensor views); made once."""
        from torch.distributed.device_mesh import DeviceMesh

        if device_type not in self._meshes:
            self._meshes[device_type] = DeviceMesh.from_group(self.group, device_type)
        return self._meshes[device_type]


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


def normal_table_(table: Tensor, std: float, shard: ColumnShard | None) -> Tensor:
    """Initialise a layer's table N(0, std^2) from the default generator: the whole (N, D) table, or this
    rank's columns of the same draw when ``shard`` is set. A large CPU table is first advised onto huge
    pages (``peerlm.kernels.cpu.advise_huge_pages``): its rows are read at random every step."""
    advise_huge_pages(table.data)
    if shard is None:
        return nn.init.normal_(table, std=std)
    return normal_columns_(table, shard.dim, shard.columns, std)


def shard_repr(layer: nn.Module) -> str:
    """What a layer's ``extra_repr`` adds for its ``shard`` (nothing for whole tables)."""
    shard = layer.shard
    if shard is None:
        return ""
    cols = shard.columns
    return (f", ranks={shard.ranks}, rank={shard.rank}, columns={cols.start}:{cols.stop}, "
            f"grad_reduction={layer.grad_reduction}")
