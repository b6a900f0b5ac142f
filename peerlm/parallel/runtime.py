"""Data-parallel training on torch.distributed: the process group from torchrun, the model wrapped in
DDP or FSDP2, each rank's share of a batch, and the reductions that keep losses rank-count free.

- ``init_from_env``: joins the group torchrun describes (``WORLD_SIZE`` > 1 only): ``gloo`` on CPU,
  ``nccl`` on CUDA (rank r on ``cuda:LOCAL_RANK``), with a collective timeout, so that a rank left
  waiting for a dead one gives up instead of hanging.
- ``Parallel``: this rank's place (``rank``, ``ranks``, ``is_main``) and the process groups: the
  default one for DDP / FSDP, one for the sharded expert tables and one for everything else the loop
  reduces (query-norm statistics, losses, usage, the gradient norm), so that no two kinds of
  collectives interleave on one group.
- ``build_model``: ``peerlm.model.build_model``'s meta / to_empty / init_weights, with the PEER and
  PKM tables column-sharded in between when ``shard_experts`` (never materialised whole).
- ``ddp``: DDP over the trunk (sharded tables excluded); ``fully_shard_model``: FSDP2 ``fully_shard``
  per block and at the root (sharded tables as ``ignored_params``). Both average gradients over ranks, as the sharded
  tables do (``grad_reduction="mean"``).

Data: ``rows`` gives rank r the rows r::P of the global batch, so the global batch, and so the
loss, does not change with P (``batch_size`` must be a multiple of P).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peerlm.config import ModelConfig
from peerlm.model import Transformer
from peerlm.norms import BatchNorm, RunningNorm
from peerlm.parallel.shard import shard_experts, sharded_parameter_names

__all__ = ["MODES", "Parallel", "init_from_env", "build_model", "sync_query_norms", "sharded_parameters", "ddp",
           "fully_shard_model"]

MODES = ("none", "ddp", "fsdp")


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def init_from_env(device_type: str, timeout_s: float) -> bool:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 and none is initialised; True when this
    call initialised it (and so the caller should destroy it)."""
    if world_size_from_env() <= 1 or dist.is_initialized():
        return False
    backend = "nccl" if device_type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        kwargs["device_id"] = torch.device("cuda", local)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)
    return True


@dataclass
class Parallel:
    """This rank's place in data-parallel training; ``Parallel()`` is one process."""

    mode: str = "none"
    rank: int = 0
    ranks: int = 1
    experts_group: Any = None
    stats_group: Any = None

    @classmethod
    def setup(cls, mode: str) -> Parallel:
        """The groups of an initialised default group (call on every rank, in the same order)."""
        if mode == "none" or not dist.is_initialized():
            return cls()
        return cls(mode, dist.get_rank(), dist.get_world_size(), dist.new_group(), dist.new_group())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.ranks > 1 or self.mode != "none"

    def rows(self) -> slice:
        """This rank's rows of a global batch."""
        return slice(self.rank, None, self.ranks)

    def sum(self, values: list[float], device: torch.device | str = "cpu") -> list[float]:
        """The sums over ranks of a few numbers (one collective)."""
        if not self.active:
            return list(values)
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t, group=self.stats_group)
        return t.tolist()

    def agree(self, error: BaseException | None, kind: type[Exception] = RuntimeError) -> None:
        """Raise on every rank when any rank failed a check (the others would wait for it forever):
        ``error`` itself on the rank that had it, ``kind`` naming the first failed rank elsewhere."""
        if not self.active:
            if error is not None:
                raise error
            return
        said: list[Any] = [None] * self.ranks
        dist.all_gather_object(said, None if error is None else f"{error}", group=self.stats_group)
        if error is not None:
            raise error
        for r, msg in enumerate(said):
            if msg is not None:
                raise kind(f"rank {r} failed: {msg}")

    def barrier(self) -> None:
        if self.active:
            dist.barrier(group=self.stats_group)

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module, last: bool) -> Iterator[None]:
        """Skip the gradient reduction of a micro-batch that is not the step's last."""
        if last or self.mode == "none":
            yield
        elif self.mode == "ddp":
            with model.no_sync():
                yield
        else:
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)


def build_model(cfg: ModelConfig, device: torch.device | str, par: Parallel, shard: bool) -> Transformer:
    """``peerlm.model.build_model``, with the expert tables column-sharded over ``par.experts_group``
    before they are materialised when ``shard``; query norms synchronised over ``par.stats_group``."""
    with torch.device("meta"):
        model = Transformer(cfg)
    if shard:
        shard_experts(model, par.experts_group)
    model.to_empty(device=device)
    model.init_weights()
    if par.active:
        sync_query_norms(model, par.stats_group)
    return model


def sync_query_norms(model: nn.Module, group: Any) -> int:
    """Give every query BatchNorm / RunningNorm the group's statistics (``peerlm.norms``); returns how many."""
    norms = [m for m in model.modules() if isinstance(m, (BatchNorm, RunningNorm))]
    for m in norms:
        m.group = group
    return len(norms)


def sharded_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The column-sharded expert tables of ``model`` (their gradients are per-rank parts)."""
    params = dict(model.named_parameters())
    return [params[n] for n in sharded_parameter_names(model)]


def ddp(model: Transformer, par: Parallel, device: torch.device) -> nn.Module:
    """DDP around ``model``'s trunk, the sharded tables left out (their gradients are reduced already)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    DDP._set_params_and_buffers_to_ignore_for_model(model, sharded_parameter_names(model))
    moe = any(type(b.ffn).__name__ == "MoE" for b in model.blocks)  # experts no token chose get no gradient
    ids = [device.index] if device.type == "cuda" else None
    # buffers: query-norm statistics are the group's already; usage counts are each rank's own
    return DDP(model, device_ids=ids, forward_sync_buffers=False, find_unused_parameters=moe)


def fully_shard_model(model: Transformer) -> Transformer:
    """FSDP2 in place: ``fully_shard`` on every block, then the root, the sharded tables ignored."""
    from torch.distributed.fsdp import fully_shard

    skip = set(sharded_parameters(model))
    for block in model.blocks:
        fully_shard(block, ignored_params=skip & set(block.parameters()) or None)
    fully_shard(model, ignored_params=skip or None)
    return model
