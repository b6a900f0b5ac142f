"""Scale-out on torch.distributed: PEER expert tables sharded by columns across ranks, never gathered.

- ``arithmetic``: communication per token of column vs row sharding (and why columns), memory per rank.
- ``experts``: the column layout (``ColumnShard``) and the collective expert mixture on a local shard
  (``column_sharded_experts``; ``column_sharded_memory`` for PKM values), the fused embedding-bag path
  with dense or row-sparse gradients.
- ``shard``: ``ShardedPEER``, ``ShardedPKM`` and ``shard_experts(model, group)``, which converts a
  model's PEER and PKM layers in place; DTensor ``Shard(1)`` views of the shards in state dicts, for
  distributed checkpoints.
- ``launch``: run a function on P local processes (tests, benchmarks).
- ``dcp``: distributed checkpoints (``torch.distributed.checkpoint``) of FSDP2 and sharded-table runs,
  which reshard to any number of ranks or one process (imported by ``peerlm.checkpoint``, not here).
- ``runtime``: what the training loop needs to run on P ranks: the process group from torchrun's
  environment, DDP / FSDP2 around the trunk, each rank's rows of a batch, synchronised query norms
  (imported by ``peerlm.train``, not here).
"""

from peerlm.parallel.arithmetic import comm_bytes_per_token, memory_per_rank
from peerlm.parallel.experts import ColumnShard, column_sharded_experts, column_sharded_memory
from peerlm.parallel.shard import (
    ShardedPEER,
    ShardedPKM,
    shard_experts,
    shard_peer,
    shard_pkm,
    sharded_parameter_names,
)

__all__ = [
    "ColumnShard", "ShardedPEER", "ShardedPKM", "column_sharded_experts", "column_sharded_memory",
    "comm_bytes_per_token", "memory_per_rank", "shard_experts", "shard_peer", "shard_pkm",
    "sharded_parameter_names",
]
