"""The training state of a checkpoint as JSON plus tensors, and the RNG states it carries.

``encode`` turns a nest of dicts, lists, tuples, numbers, strings and tensors (an optimizer's state
dict, the trainer's own state) into a JSON-able tree whose tensors are set aside by path, for a
safetensors file; ``decode`` reverses it. ``rng_to_json`` packs the RNG states into pure JSON (tensor
bytes in base64), for a format that keeps tensors elsewhere.
"""

from __future__ import annotations

import base64
import random
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["encode", "decode", "capture_rng", "restore_rng", "rng_to_json", "rng_from_json"]


def encode(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """JSON-able form of a state structure; tensors go to ``tensors`` under their path."""
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    """Inverse of ``encode``."""
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(decode(v, tensors) for v in obj["__tuple__"])
        return {k: decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, tensors) for v in obj]
    return obj


def capture_rng() -> dict[str, Any]:
    """The torch (CPU and CUDA), numpy and python RNG states, as checkpointable values."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(gauss)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of ``capture_rng``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], np.asarray(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))


def rng_to_json(state: Any) -> Any:
    """RNG states (``capture_rng``) as pure JSON."""
    tensors: dict[str, Tensor] = {}
    enc = encode(state, tensors, "rng")
    return {"tree": enc, "bytes": {k: base64.b64encode(t.numpy().tobytes()).decode() for k, t in tensors.items()}}


def rng_from_json(obj: Any) -> Any:
    """Inverse of ``rng_to_json``."""
    tensors = {k: torch.from_numpy(np.frombuffer(base64.b64decode(v), dtype=np.uint8).copy())
               for k, v in obj["bytes"].items()}
    return decode(obj["tree"], tensors)
