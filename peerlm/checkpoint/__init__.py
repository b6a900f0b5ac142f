"""Step-numbered checkpoints that a kill at any moment cannot corrupt, in two formats behind one
``save`` / ``load``.

    core.py          format-neutral: step directories, ``latest``, manifest and sha256, atomic publish,
                     verification, pruning, errors
    state.py         the training state as JSON plus tensors; RNG states
    local.py         the one-process format (safetensors weights and state)
    distributed.py   the distributed format (``torch.distributed.checkpoint``) for FSDP2 and sharded
                     tables; imported on first use (it is slow to import)

``save`` writes the distributed format for a model that holds parts of tensors (FSDP2 DTensors,
column-sharded tables), on every rank (collective), and the one-process format otherwise; with
``main=False`` (a rank other than 0 of a data-parallel run whose ranks hold the same weights) it
writes nothing. ``load`` and ``load_weights`` read either format into a model of either kind: a
distributed checkpoint loads in one process, on any number of ranks, and a one-process one into a
sharded model. Loading checks the manifest entries of the files it reads (weights and config for
``load_weights``, everything for ``load``), the model config against the one expected and every
tensor's name and shape, and raises ``CheckpointError`` with a one-line message naming the problem;
``CheckpointDamaged`` names the newest older checkpoint that is intact; a failed write raises
``CheckpointWriteError`` naming the path and the reason (disk full, read-only, ...).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from peerlm.checkpoint import local
from peerlm.checkpoint.core import (
    DISTRIBUTED,
    CheckpointDamaged,
    CheckpointError,
    CheckpointWriteError,
    check_model_config,
    checkpoint_format,
    checkpoint_step,
    find_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    read_config,
)
from peerlm.checkpoint.core import verify_checkpoint as _verify
from peerlm.checkpoint.local import FILES, WEIGHT_FILES
from peerlm.checkpoint.state import capture_rng, restore_rng
from peerlm.parallel.shard import sharded_parameter_names

__all__ = [
    "CheckpointError", "CheckpointDamaged", "CheckpointWriteError", "save", "load", "load_weights",
    "latest_checkpoint", "find_checkpoint", "list_checkpoints", "checkpoint_step", "verify_checkpoint",
    "read_config", "capture_rng", "restore_rng", "WEIGHT_FILES", "is_distributed", "is_distributed_model",
]


def is_distributed(ckpt: str | os.PathLike[str]) -> bool:
    """Whether ``ckpt`` is in the distributed format."""
    return checkpoint_format(ckpt) == DISTRIBUTED


def is_distributed_model(model: nn.Module) -> bool:
    """Whether ``model`` holds parts of tensors (FSDP2 DTensors, column-sharded tables), and so is
    saved in the distributed format."""
    return bool(sharded_parameter_names(model)) or any(type(p).__name__ == "DTensor" for p in model.parameters())


def verify_checkpoint(ckpt: str | os.PathLike[str], files: tuple[str, ...] = FILES) -> None:
    """Check ``files`` of ``ckpt`` (default: all a resume reads) against its manifest;
    ``CheckpointDamaged`` naming the newest older checkpoint whose same files verify."""
    _verify(ckpt, files)


def save(root: str | os.PathLike[str], step: int, model: nn.Module, config: dict[str, Any], optimizer: Any = None,
         state: dict[str, Any] | None = None, keep: int = 2, group: Any = None, main: bool = True) -> Path | None:
    """Write ``step_<step>`` under ``root`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``config`` is the resolved run config (a JSON-able dict); ``state`` any JSON-able training state
    (tensors allowed; rank 0's counts); the optimizer's state and the RNG states are added to it.
    ``group``: the process group of a distributed save. Returns the checkpoint directory (None on a
    rank that writes nothing).
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    if is_distributed_model(model):  # every rank writes its part
        from peerlm.checkpoint import distributed

        return distributed.save(root, step, model, config, optimizer, state, keep, group)
    if not main:  # the ranks hold the same weights: rank 0 writes them
        return None
    return local.save(root, step, model, config, optimizer, state, keep)


def load_weights(ckpt: str | os.PathLike[str], model: nn.Module, expected_model: dict[str, Any] | None = None,
                 verify: bool = True) -> None:
    """Load a checkpoint's weights into ``model``; ``expected_model`` (a ModelConfig dict) must match
    the saved one."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt, WEIGHT_FILES)
    check_model_config(ckpt, expected_model)
    if is_distributed(ckpt):
        from peerlm.checkpoint import distributed

        distributed.load_model(ckpt, model)
    else:
        local.load_weights(ckpt, model)


def load(ckpt: str | os.PathLike[str], model: nn.Module, optimizer: Any = None,
         expected_model: dict[str, Any] | None = None, rng: bool = True, verify: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer state and (with ``rng``) RNG states; return the stored state dict
    (``step``, ``train``: what ``save`` was given). ``verify=False`` skips the manifest check, for a
    caller that has just run ``verify_checkpoint``."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    check_model_config(ckpt, expected_model)
    if is_distributed(ckpt) or is_distributed_model(model):
        from peerlm.checkpoint import distributed

        return distributed.load(ckpt, model, optimizer, rng, distributed=is_distributed(ckpt))
    return local.load(ckpt, model, optimizer, rng)
