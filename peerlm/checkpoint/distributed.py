"""Distributed checkpoints (``torch.distributed.checkpoint``) for FSDP2 and column-sharded tables.

Layout of ``step_<n>/`` (beside the one-process format, ``local``; the manifest, ``latest`` pointer,
verification and pruning are ``core``'s):

    model/          DCP: the model state dict as the model presents it: FSDP2 parameters as DTensors
                    (Shard(0)), PEER / PKM tables as DTensors (Shard(1)), buffers as plain tensors
    state/          DCP: optimizer tensors keyed ``<parameter name>.<state key>``: the moments of
                    FSDP2 parameters as they are (DTensors), those of sharded tables as Shard(1)
                    DTensors of the table's shape, RowSparseAdamW's per-row step counts and scalar
                    steps as plain (replicated) tensors
    config.json     the run config
    state.json      step, train state, optimizer kinds and hyper-parameters, every rank's RNG states
    manifest.json   size and sha256 of every file above (``"format": "dcp"``, ``core.DISTRIBUTED``); last

Writing (collective, every rank): rank 0 makes the hidden temporary directory and sends its path to
the others; all ranks write their shards into it (DCP fsyncs them); after DCP's final collective,
rank 0 writes the JSON files and the manifest, renames the directory into place and updates
``latest``, then every rank learns whether that worked. A crash at any point leaves the previous
checkpoint and pointer as they were.

Loading builds the state dict of the model and optimizer as they are laid out now and lets DCP fill
it, so a checkpoint written by P ranks loads on any other number of ranks, with or without
FSDP / sharded tables, and in one process without a process group (``peerlm eval`` / ``generate``
read ``model/`` alone). A one-process checkpoint also loads into a distributed model: every rank
reads the whole file and keeps its own part.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, distribute_tensor

from peerlm.checkpoint import local
from peerlm.checkpoint.core import (
    DISTRIBUTED,
    CheckpointError,
    CheckpointWriteError,
    check_fits,
    list_checkpoints,
    new_temp_dir,
    point_latest,
    prune,
    publish,
    step_name,
    write_error,
    write_text,
)
from peerlm.checkpoint.state import capture_rng, restore_rng, rng_from_json, rng_to_json
from peerlm.parallel.shard import ShardedTable, sharded_tables

__all__ = ["save", "load_model", "load"]


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _named(model: nn.Module, optimizer: Any) -> list[tuple[int, str, Tensor]]:
    """(optimizer index, parameter name, parameter) of every parameter an optimizer holds."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [(i, names[id(p)], p) for i, opt in enumerate(optimizer.optimizers)
            for g in opt.param_groups for p in g["params"]]


def _as_global(value: Tensor, fqn: str, tables: dict[str, ShardedTable]) -> Tensor:
    """A sharded table's optimizer tensor of the table's local shape as its Shard(1) DTensor."""
    table = tables.get(fqn)
    return value if table is None else table.to_dtensor(value)


# ------------------------------------------------------------------------------------------- saving


def save(root: Path, step: int, model: nn.Module, config: dict[str, Any], optimizer: Any = None,
         state: dict[str, Any] | None = None, keep: int = 2, group: Any = None) -> Path:
    """Write ``step_<step>`` under ``root`` with DCP, on every rank of the default group (collective);
    ``state`` is rank 0's train state (ignored elsewhere). Returns the checkpoint directory."""
    name = step_name(step)
    rank = dist.get_rank() if _active() else 0
    previous = (list_checkpoints(root) or [None])[-1]
    said: list[Any] = [None]
    if rank == 0:
        try:
            said = [str(new_temp_dir(root, name))]
        except OSError as e:
            said = [f"!{write_error(root, name, e, previous)}"]
    if _active():
        dist.broadcast_object_list(said, src=0, group=group)
    if said[0].startswith("!"):
        raise CheckpointWriteError(said[0][1:], previous)
    tmp = Path(said[0])
    tables = sharded_tables(model)
    model_sd = model.state_dict()
    optim_sd = {} if optimizer is None else {
        f"{fqn}.{k}": _as_global(v, fqn, tables) for i, fqn, p in _named(model, optimizer)
        for k, v in optimizer.optimizers[i].state.get(p, {}).items() if isinstance(v, Tensor)}
    rngs: list[Any] = [None] * (dist.get_world_size() if _active() else 1)
    if _active():
        dist.all_gather_object(rngs, rng_to_json(capture_rng()), group=group)
    else:
        rngs[0] = rng_to_json(capture_rng())
    failed: str | None = None
    try:
        with warnings.catch_warnings():  # one process without a process group is what no_dist says
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.save(model_sd, storage_writer=dcp.FileSystemWriter(tmp / "model"), no_dist=not _active())
            dcp.save(optim_sd, storage_writer=dcp.FileSystemWriter(tmp / "state"), no_dist=not _active())
        if rank == 0:
            meta = {"step": step, "train": state or {}, "ranks": len(rngs), "rng": rngs, "optimizer": None}
            if optimizer is not None:
                meta["optimizer"] = {"kinds": [type(o).__name__ for o in optimizer.optimizers],
                                     "param_groups": [[{k: v for k, v in g.items() if k != "params"}
                                                       for g in o.param_groups] for o in optimizer.optimizers]}
            write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
            write_text(tmp / "state.json", json.dumps(meta) + "\n")
            final = publish(root, name, tmp, step, fmt=DISTRIBUTED)
            point_latest(root, name)
            prune(root, keep, final)
    except OSError as e:
        failed = str(write_error(root, name, e, previous))
    except Exception as e:  # noqa: BLE001 (DCP wraps the ranks' errors; every rank must hear of it)
        failed = f"cannot write checkpoint {root / name} ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    if failed is not None and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    verdict = [failed]
    if _active():
        every: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(every, failed, group=group)
        verdict = [m for m in every if m is not None] or [None]
    if verdict[0] is not None:
        raise CheckpointWriteError(verdict[0], previous)
    return root / name


# ------------------------------------------------------------------------------------------ loading


def _metadata(path: Path) -> dict[str, Any]:
    try:
        return dict(dcp.FileSystemReader(path).read_metadata().state_dict_metadata)
    except Exception as e:  # noqa: BLE001 (a damaged or missing .metadata file)
        raise CheckpointError(f"{path}/.metadata is corrupt or missing ({type(e).__name__})") from None


def _load(sd: dict[str, Any], path: Path) -> None:
    try:
        with warnings.catch_warnings():  # one process without a process group is what no_dist says
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(sd, storage_reader=dcp.FileSystemReader(path), no_dist=not _active())
    except Exception as e:  # noqa: BLE001 (DCP wraps read errors of any rank)
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


def _shapes(tensors: dict[str, Tensor]) -> dict[str, tuple]:
    return {k: tuple(t.shape) for k, t in tensors.items()}


def _fill(target: Tensor, full: Tensor) -> None:
    """Copy this rank's part of the whole tensor ``full`` into ``target`` (plain or DTensor)."""
    full = full.to(target.device, target.dtype)
    if isinstance(target, DTensor):
        part = distribute_tensor(full, target.device_mesh, target.placements, src_data_rank=None)
        target.to_local().copy_(part.to_local())
    else:
        target.copy_(full)


def load_model(ckpt: Path, model: nn.Module, full: dict[str, Tensor] | None = None) -> None:
    """Load the weights of a distributed checkpoint (or, given ``full``, of whole tensors) into ``model``
    in its present layout: any number of ranks, or one process without a process group."""
    own = model.state_dict()
    if full is None:
        meta = _metadata(ckpt / "model")
        check_fits(ckpt, _shapes(own), {k: tuple(getattr(m, "size", ())) for k, m in meta.items()})
        _load(own, ckpt / "model")
    else:
        check_fits(ckpt, _shapes(own), {k: tuple(t.shape) for k, t in full.items()})
        with torch.no_grad():
            for k, t in own.items():
                _fill(t, full[k])
    model.load_state_dict(own, strict=True)


def _optimizer_targets(model: nn.Module, optimizer: Any, saved: dict[str, tuple[tuple, torch.dtype]]
                       ) -> dict[str, tuple[int, Tensor, str, Tensor]]:
    """key -> (optimizer index, parameter, state key, empty tensor in this run's layout) for every
    saved optimizer tensor of a parameter of this run."""
    tables = sharded_tables(model)
    out = {}
    for i, fqn, p in _named(model, optimizer):
        for key, (shape, dtype) in saved.items():
            if not key.startswith(fqn + ".") or "." in key[len(fqn) + 1:]:
                continue
            if isinstance(p, DTensor) and shape == tuple(p.shape):
                t = torch.zeros_like(p, dtype=dtype)
            elif fqn in tables and len(shape) == 2 and shape == tuple(tables[fqn].shape):
                t = _as_global(torch.zeros(p.shape, dtype=dtype, device=p.device), fqn, tables)
            else:  # torch's AdamW keeps its scalar step on the CPU
                t = torch.zeros(shape, dtype=dtype, device="cpu" if not shape else p.device)
            out[key] = (i, p, key[len(fqn) + 1:], t)
    return out


def _full_optimizer_state(model: nn.Module, optimizer: Any, state: dict[str, Any]) -> dict[str, Tensor]:
    """A one-process checkpoint's optimizer state (indexed by position) keyed by parameter name."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for opt, saved in zip(optimizer.optimizers, state["optimizers"]):
        params = [p for g in opt.param_groups for p in g["params"]]
        for idx, entry in saved["state"].items():
            for k, v in entry.items():
                if isinstance(v, Tensor):
                    out[f"{names[id(params[int(idx)])]}.{k}"] = v
    return out


def load(ckpt: Path, model: nn.Module, optimizer: Any = None, rng: bool = True,
         distributed: bool = True) -> dict[str, Any]:
    """Load a distributed checkpoint, or (``distributed=False``) a one-process one into a distributed
    model (FSDP2 / sharded tables): weights, optimizer state, this rank's RNG states; returns
    ``{"step", "train", ...}``."""
    if distributed:
        try:
            state = json.loads((ckpt / "state.json").read_text("utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{ckpt}/state.json is corrupt ({e})") from None
        load_model(ckpt, model)
        rngs = [rng_from_json(r) for r in state["rng"]]
        saved_opt = state.get("optimizer")
    else:
        state = local.read_state(ckpt)
        load_model(ckpt, model, local.read_weights(ckpt))
        rngs = [state["rng"]]
        saved_opt = state.get("optimizer")
        if saved_opt is not None:
            saved_opt = {"kinds": saved_opt.get("kinds"), "full": saved_opt,
                         "param_groups": [[{k: v for k, v in g.items() if k != "params"} for g in o["param_groups"]]
                                          for o in saved_opt["optimizers"]]}
    if optimizer is not None:
        _load_optimizer(ckpt, model, optimizer, saved_opt, distributed)
    if rng:
        rank = dist.get_rank() if _active() else 0
        restore_rng(rngs[rank] if rank < len(rngs) else rngs[0])
    return state


def _load_optimizer(ckpt: Path, model: nn.Module, optimizer: Any, saved: dict[str, Any] | None,
                    distributed: bool) -> None:
    kinds = [type(o).__name__ for o in optimizer.optimizers]
    if saved is None:
        raise CheckpointError(f"{ckpt} holds no optimizer state")
    if saved.get("kinds") != kinds:
        raise CheckpointError(f"{ckpt}: optimizer state does not fit this run (optimizer state is for "
                              f"{saved.get('kinds')}, this run uses {kinds})")
    if distributed:
        meta = _metadata(ckpt / "state")
        shapes = {k: (tuple(m.size), m.properties.dtype) for k, m in meta.items() if hasattr(m, "size")}
        targets = _optimizer_targets(model, optimizer, shapes)
        _load({k: t for k, (_, _, _, t) in targets.items()}, ckpt / "state")
    else:
        full = _full_optimizer_state(model, optimizer, saved["full"])
        targets = _optimizer_targets(model, optimizer, {k: (tuple(v.shape), v.dtype) for k, v in full.items()})
        with torch.no_grad():
            for k, (_, _, _, t) in targets.items():
                _fill(t, full[k])
    tables = sharded_tables(model)
    names = {id(p): n for n, p in model.named_parameters()}
    for i, p, key, t in targets.values():
        opt = optimizer.optimizers[i]
        value = t.to_local() if names[id(p)] in tables and isinstance(t, DTensor) else t
        if key == "step":
            rows = type(opt).__name__ == "RowSparseAdamW"
            if (value.dim() == 1 and value.shape[0] == p.shape[0]) != rows:
                raise CheckpointError(f"{ckpt}: optimizer state does not fit this run (step of "
                                      f"{names[id(p)]} has shape {tuple(value.shape)})")
        opt.state[p][key] = value
    for opt, groups in zip(optimizer.optimizers, saved["param_groups"]):
        if len(groups) != len(opt.param_groups):
            raise CheckpointError(f"{ckpt}: optimizer state does not fit this run ({len(groups)} parameter "
                                  f"groups saved, {len(opt.param_groups)} here)")
        for g, s in zip(opt.param_groups, groups):
            g.update({k: tuple(v) if isinstance(v, list) else v for k, v in s.items()})
