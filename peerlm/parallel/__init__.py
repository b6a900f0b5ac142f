"""Scale-out on torch.distributed: PEER expert tables sharded by columns across ranks, never gathered.

A sharded layer is still a ``PEER`` (a ``PKM``): its ``shard`` (a ``ColumnShard``, ``peerlm.tables``)
says which columns of its tables this rank stores, and its own forward and init take the sharded path
for the expert step and the table draws. This package holds that path and the conversion:

- ``arithmetic``: communication per token of column vs row sharding (and why columns), memory per rank.
- ``experts``: the collective expert mixture on a local column shard (``column_sharded_experts``;
  ``column_sharded_memory`` for PKM values), the fused embedding-bag path with dense or row-sparse
  gradients.
- ``shard``: ``shard_experts(model, group)``, ``shard_peer`` and ``shard_pkm``, which shard a model's
  or a layer's tables in place, ``sharded_peer``, which builds a sharded PEER without the whole table;
  DTensor ``Shard(1)`` views of the shards in state dicts, and ``sharded_tables`` for checkpoints.
- ``launch``: run a function on P local processes (tests, benchmarks).
- ``runtime``: what the training loop needs to run on P ranks: the process group from torchrun's
  environment, DDP / FSDP2 around the trunk, each rank's rows of a batch, synchronised query norms
  (imported by ``peerlm.train``, not here).

Distributed checkpoints of FSDP2 and sharded-table runs are a format of ``peerlm.checkpoint``
(``peerlm.checkpoint.distributed``), which asks this package for ``sharded_tables`` and
``sharded_parameter_names`` and nothing else.
"""

from peerlm.parallel.arithmetic import comm_bytes_per_token, memory_per_rank
from peerlm.parallel.experts import ColumnShard, column_sharded_experts, column_sharded_memory
from peerlm.parallel.shard import (
    ShardedTable,
    shard_experts,
    shard_peer,
    shard_pkm,
    sharded_parameter_names,
    sharded_peer,
    sharded_tables,
)

__all__ = [
    "ColumnShard", "ShardedTable", "column_sharded_experts", "column_sharded_memory", "comm_bytes_per_token",
    "memory_per_rank", "shard_experts", "shard_peer", "shard_pkm", "sharded_parameter_names", "sharded_peer",
    "sharded_tables",
]
