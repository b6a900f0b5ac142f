"""The one-process checkpoint format: safetensors weights and state, JSON config and structure.

    step_00000200/
        model.safetensors     weights and persistent buffers (BatchNorm running statistics)
        config.json           the resolved run config (human-readable; never a pickled object)
        state.safetensors     optimizer tensors and torch RNG states
        state.json            everything else: optimizer structure and hyper-parameters, step, data
                              position, metrics so far, numpy and python RNG states
        manifest.json         (``core.publish``) size and sha256 of each file above; written last
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import safetensors
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from peerlm.checkpoint.core import (
    CheckpointError,
    check_fits,
    fsync_file,
    list_checkpoints,
    new_temp_dir,
    point_latest,
    prune,
    publish,
    step_name,
    write_error,
    write_text,
)
from peerlm.checkpoint.state import capture_rng, decode, encode, restore_rng

__all__ = ["FILES", "WEIGHT_FILES", "save", "read_weights", "read_state", "load_weights", "load"]

FILES = ("model.safetensors", "config.json", "state.safetensors", "state.json")
WEIGHT_FILES = ("model.safetensors", "config.json")  # what evaluation and generation read
_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)


def _model_tensors(model: nn.Module) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:  # safetensors refuses aliased tensors
            t = t.clone()
        seen.add(ptr)
        out[name] = t
    return out


def save(root: Path, step: int, model: nn.Module, config: dict[str, Any], optimizer: Any = None,
         state: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``step_<step>`` under ``root`` atomically, point ``latest`` at it, keep the newest ``keep``."""
    name = step_name(step)
    previous = (list_checkpoints(root) or [None])[-1]
    try:
        final = _write(root, name, step, model, config, optimizer, state)
        point_latest(root, name)
    except (OSError, _SafetensorError) as e:
        raise write_error(root, name, e, previous) from None
    prune(root, keep, final)
    return final


def _write(root: Path, name: str, step: int, model: nn.Module, config: dict[str, Any], optimizer: Any,
           state: dict[str, Any] | None) -> Path:
    """Write ``root/name`` atomically (not yet pointed to by ``latest``)."""
    tmp = new_temp_dir(root, name)
    try:
        full_state = {"step": step, "train": state or {}, "rng": capture_rng()}
        if optimizer is not None:
            full_state["optimizer"] = optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        encoded = encode(full_state, tensors, "state")
        save_file(_model_tensors(model), str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        write_text(tmp / "state.json", json.dumps(encoded) + "\n")
        for f in ("model.safetensors", "state.safetensors"):
            fsync_file(tmp / f)
        final = publish(root, name, tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _load_tensors(f: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise CheckpointError(f"{f} is corrupt ({type(e).__name__}: {detail})") from None


def read_weights(ckpt: Path) -> dict[str, Tensor]:
    """The whole tensors of ``model.safetensors``."""
    return _load_tensors(ckpt / "model.safetensors")


def read_state(ckpt: Path) -> dict[str, Any]:
    """The stored state: ``step``, ``train``, ``rng`` and (if saved) ``optimizer``."""
    tensors = _load_tensors(ckpt / "state.safetensors")
    try:
        return decode(json.loads((ckpt / "state.json").read_text("utf-8")), tensors)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}/state.json is corrupt ({e})") from None


def load_weights(ckpt: Path, model: nn.Module) -> None:
    tensors = read_weights(ckpt)
    own = model.state_dict()
    check_fits(ckpt, {k: tuple(t.shape) for k, t in own.items()}, {k: tuple(t.shape) for k, t in tensors.items()})
    model.load_state_dict(tensors, strict=True)


def load(ckpt: Path, model: nn.Module, optimizer: Any = None, rng: bool = True) -> dict[str, Any]:
    """Weights, optimizer state and (with ``rng``) RNG states into a one-process model."""
    load_weights(ckpt, model)
    state = read_state(ckpt)
    if optimizer is not None:
        if "optimizer" not in state:
            raise CheckpointError(f"{ckpt} holds no optimizer state")
        try:
            optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"{ckpt}: optimizer state does not fit this run ({e})") from None
    if rng:
        restore_rng(state["rng"])
    return state
