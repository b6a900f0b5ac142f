"""Step-numbered checkpoints that a kill at any moment cannot corrupt.

Layout under a checkpoint root (``<run>/checkpoints``):

    step_00000200/
        model.safetensors     weights and persistent buffers (BatchNorm running statistics)
        config.json           the resolved run config (human-readable; never a pickled object)
        state.safetensors     optimizer tensors and torch RNG states
        state.json            everything else: optimizer structure and hyper-parameters, step, data
                              position, metrics so far, numpy and python RNG states
        manifest.json         size and sha256 of each file above; written last
    latest                    one line, the name of the newest complete checkpoint

Writing: every file goes into a fresh hidden directory beside the final one, is fsynced, the manifest
last; the directory is renamed into place (one atomic rename) and fsynced; only then is ``latest``
replaced atomically (temp file, fsync, ``os.replace``). A kill at any point leaves the previous
checkpoint and pointer intact; a half-written directory is hidden and removed by the next save.
Then all but the newest ``keep`` checkpoints are deleted.

Loading checks the manifest entries of the files it reads (weights and config for ``load_weights``,
everything for ``load_checkpoint``; so a damaged optimizer state does not stop evaluation), the model
config against the one expected and every tensor's name and shape, and raises ``CheckpointError``
with a one-line message naming the problem. A damaged checkpoint raises ``CheckpointDamaged``, which
names the newest older checkpoint that is intact, for the caller to offer as the way out. A failed
write raises ``CheckpointWriteError`` naming the path and the reason (disk full, read-only, ...).
When ``latest`` names a checkpoint that is not there (a kill while re-saving that step), the newest
complete one is used and the fallback is reported through ``notes``.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from peerlm.fileio import atomic_write_text, fsync_dir, sha256_file, umask

__all__ = [
    "CheckpointError", "CheckpointDamaged", "CheckpointWriteError", "save_checkpoint", "latest_checkpoint",
    "find_checkpoint", "list_checkpoints", "checkpoint_step", "verify_checkpoint", "read_config",
    "load_weights", "load_checkpoint", "capture_rng", "restore_rng", "WEIGHT_FILES", "is_distributed",
    "is_distributed_model",
]

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
_FILES = ("model.safetensors", "config.json", "state.safetensors", "state.json")
WEIGHT_FILES = ("model.safetensors", "config.json")  # what evaluation and generation read
_SafetensorError = getattr(safetensors, "SafetensorError", RuntimeError)


class CheckpointError(Exception):
    """A checkpoint that cannot be used: missing, truncated, corrupt, or for a different model."""


class CheckpointDamaged(CheckpointError):
    """A checkpoint whose files do not match its manifest (or that has none). ``intact`` is the newest
    older checkpoint under the same root whose needed files verify, or None."""

    def __init__(self, message: str, ckpt: Path, intact: Path | None) -> None:
        super().__init__(message)
        self.ckpt, self.intact = ckpt, intact


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (an OS or library error); ``previous`` is the newest complete
    checkpoint, which the failed write left as it was (None if there is none)."""

    def __init__(self, message: str, previous: Path | None) -> None:
        super().__init__(message)
        self.previous = previous


def checkpoint_step(ckpt: str | os.PathLike[str]) -> int | None:
    """The step of a checkpoint directory, from its name (None for another name)."""
    m = _STEP_DIR.match(Path(ckpt).name)
    return int(m.group(1)) if m else None


def _reason(e: BaseException) -> str:
    """One line saying why an OS or safetensors call failed."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    io = re.search(r"I/O error: (.+?) \(os error \d+\)", text)  # safetensors wraps the OS error
    return io.group(1) if io else text[:160]


# ------------------------------------------------------------------------------------------- helpers


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _encode(obj: Any, tensors: dict[str, Tensor], path: str) -> Any:
    """JSON-able form of a state structure; tensors go to ``tensors`` under their path."""
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous().clone()
        return {"__tensor__": path}
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            return {k: _encode(v, tensors, f"{path}.{k}") for k, v in obj.items()}
        return {"__items__": [[k, _encode(v, tensors, f"{path}.{k}")] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path} in a checkpoint")


def _decode(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__items__" in obj:
            return {k: _decode(v, tensors) for k, v in obj["__items__"]}
        if "__tuple__" in obj:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
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


# ------------------------------------------------------------------------------------------- saving


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "manifest.json").is_file()]
    return [p for _, p in sorted(found)]


def save_checkpoint(root: str | os.PathLike[str], step: int, model: nn.Module, config: dict[str, Any],
                    optimizer: Any = None, state: dict[str, Any] | None = None, keep: int = 2) -> Path:
    """Write ``step_<step>`` under ``root`` atomically, point ``latest`` at it, keep the newest ``keep``.

    ``config`` is the resolved run config (a JSON-able dict); ``state`` any JSON-able training state
    (tensors allowed); the optimizer's state dict and the RNG states are added to it.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    root = Path(root)
    name = f"step_{step:08d}"
    previous = (list_checkpoints(root) or [None])[-1]
    try:
        final = _write_checkpoint(root, name, step, model, config, optimizer, state)
        atomic_write_text(root / "latest", name + "\n")
    except (OSError, _SafetensorError) as e:
        raise write_error(root, name, e, previous) from None
    prune(root, keep, final)
    return final


def _write_checkpoint(root: Path, name: str, step: int, model: nn.Module, config: dict[str, Any],
                      optimizer: Any, state: dict[str, Any] | None) -> Path:
    """Write ``root/name`` atomically (not yet pointed to by ``latest``)."""
    tmp = new_temp_dir(root, name)
    try:
        full_state = {"step": step, "train": state or {}, "rng": capture_rng()}
        if optimizer is not None:
            full_state["optimizer"] = optimizer.state_dict()
        tensors: dict[str, Tensor] = {}
        encoded = _encode(full_state, tensors, "state")
        save_file(_model_tensors(model), str(tmp / "model.safetensors"))
        save_file(tensors, str(tmp / "state.safetensors"))
        _write_text(tmp / "config.json", json.dumps(config, indent=2) + "\n")
        _write_text(tmp / "state.json", json.dumps(encoded) + "\n")
        for f in ("model.safetensors", "state.safetensors"):
            _fsync_file(tmp / f)
        final = publish(root, name, tmp, step)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def new_temp_dir(root: Path, name: str) -> Path:
    """A fresh hidden directory under ``root`` to write checkpoint ``name`` into; stale ones left by a
    killed write are removed first."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".tmp", dir=root))


def publish(root: Path, name: str, tmp: Path, step: int, fmt: str | None = None) -> Path:
    """Write the manifest of every file under ``tmp`` (written and fsynced already), then rename
    ``tmp`` to ``root/name`` in one step; ``latest`` is not touched. ``fmt`` is recorded in the
    manifest (``"dcp"``: a distributed checkpoint, see ``peerlm.parallel.dcp``)."""
    files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
    for d in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
        os.chmod(d, 0o777 & ~umask())
    for f in files:
        os.chmod(tmp / f, 0o666 & ~umask())
    manifest: dict[str, Any] = {"step": step}
    if fmt is not None:
        manifest["format"] = fmt
    manifest["files"] = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
    _write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    for d in [*(d for d in tmp.rglob("*") if d.is_dir()), tmp]:
        fsync_dir(d)
    final = root / name
    if final.exists():  # saving the same step again: move the old one aside first
        old = Path(tempfile.mkdtemp(prefix=f".{name}.old.", suffix=".tmp", dir=root))
        os.replace(final, old / name)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(root)
    return final


def prune(root: Path, keep: int, final: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints under ``root`` (never ``final``)."""
    for old in list_checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def write_error(root: Path, name: str, e: BaseException, previous: Path | None) -> CheckpointWriteError:
    kept = f"; the previous checkpoint {previous} is as it was" if previous else ""
    return CheckpointWriteError(f"cannot write checkpoint {root / name} ({_reason(e)}){kept}", previous)


# ------------------------------------------------------------------------------------------ loading


def latest_checkpoint(root: str | os.PathLike[str], notes: list[str] | None = None) -> Path | None:
    """The checkpoint ``latest`` points to (else the newest complete one); None if there is none.
    When ``latest`` names a checkpoint that is not complete, a line saying which one is used instead
    is appended to ``notes``."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text("utf-8").strip()
        if not _STEP_DIR.match(name):
            raise CheckpointError(f"{pointer} is corrupt (holds {name[:40]!r}); delete it to use the newest "
                                  "complete checkpoint")
        path = root / name
        if (path / "manifest.json").is_file():
            return path
        # a kill while re-saving that same step leaves this, or a checkpoint moved aside by hand
        found = list_checkpoints(root)
        if not found:
            raise CheckpointError(f"{pointer} names {name}, which does not exist under {root}")
        if notes is not None:
            notes.append(f"note: {pointer} names {name}, which is missing or incomplete; using "
                         f"{found[-1].name}, the newest complete checkpoint")
        return found[-1]
    found = list_checkpoints(root)
    return found[-1] if found else None


def find_checkpoint(path: str | os.PathLike[str], notes: list[str] | None = None) -> Path:
    """A checkpoint directory from a run dir, a checkpoint root or a checkpoint directory itself
    (``notes``: see ``latest_checkpoint``)."""
    p = Path(path)
    if (p / "manifest.json").is_file() or _STEP_DIR.match(p.name):
        return p
    for root in (p / "checkpoints", p):
        if root.is_dir():
            found = latest_checkpoint(root, notes)
            if found is not None:
                return found
    if not p.exists():
        raise CheckpointError(f"{p}: no such run or checkpoint directory")
    raise CheckpointError(f"{p}: no checkpoint found (train first, or check the path)")


def _problem(ckpt: Path, files: tuple[str, ...]) -> str | None:
    """What is wrong with ``files`` of ``ckpt`` against its manifest; None when they verify."""
    try:
        manifest = json.loads((ckpt / "manifest.json").read_text("utf-8"))
        listed = manifest["files"]
        if manifest.get("format") == "dcp":  # each .safetensors file is a DCP directory of the same stem
            files = tuple(f for n in files for f in (
                [m for m in listed if m.startswith(n.split(".")[0] + "/")] or [n.split(".")[0] + "/.metadata"]
                if n.endswith(".safetensors") else [n]))
        entries = {n: (int(listed[n]["bytes"]), str(listed[n]["sha256"])) for n in files if n in listed}
    except FileNotFoundError:
        return f"{ckpt} is incomplete (no manifest.json); it was not fully written"
    except (ValueError, KeyError, TypeError):
        return f"{ckpt}/manifest.json is corrupt"
    for name in files:
        f = ckpt / name
        if name not in entries or not f.is_file():
            return f"{ckpt} is incomplete: {name} is missing"
        size, digest = entries[name]
        if f.stat().st_size != size:
            return f"{f} is truncated or corrupt ({f.stat().st_size} bytes, expected {size})"
        if sha256_file(f) != digest:
            return f"{f} is corrupt (sha256 does not match its manifest)"
    return None


def verify_checkpoint(ckpt: str | os.PathLike[str], files: tuple[str, ...] = _FILES) -> None:
    """Check ``files`` of ``ckpt`` against its manifest; ``CheckpointDamaged`` naming the newest
    older checkpoint whose same files verify."""
    ckpt = Path(ckpt)
    problem = _problem(ckpt, files)
    if problem is None:
        return
    step = checkpoint_step(ckpt)
    intact = None
    if step is not None:
        older = [p for p in list_checkpoints(ckpt.parent) if checkpoint_step(p) < step]
        intact = next((p for p in reversed(older) if _problem(p, files) is None), None)
    hint = (f"; the older checkpoint {intact} is intact" if intact is not None
            else "; no older checkpoint is intact")
    raise CheckpointDamaged(problem + hint, ckpt, intact)


def read_config(ckpt: str | os.PathLike[str]) -> dict[str, Any]:
    """The run config stored with a checkpoint."""
    f = Path(ckpt) / "config.json"
    try:
        return json.loads(f.read_text("utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{f} is missing") from None
    except ValueError as e:
        raise CheckpointError(f"{f} is corrupt ({e})") from None


def _diff(saved: Any, expected: Any, path: str = "") -> list[str]:
    if isinstance(saved, dict) and isinstance(expected, dict):
        out = []
        for k in sorted(set(saved) | set(expected), key=str):
            out += _diff(saved.get(k), expected.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if saved == expected else [f"{path} {saved!r} vs {expected!r}"]


def _load_tensors(f: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(f))
    except Exception as e:  # safetensors raises its own error types for a damaged header or body
        detail = str(e).splitlines()[0][:120] if str(e) else ""
        raise CheckpointError(f"{f} is corrupt ({type(e).__name__}: {detail})") from None


def _check_model_config(ckpt: Path, expected_model: dict[str, Any] | None) -> None:
    if expected_model is not None:
        saved = read_config(ckpt).get("model")
        diffs = _diff(saved, expected_model)
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise CheckpointError(f"{ckpt} was saved for a different model (saved vs this run: {shown})")


def is_distributed(ckpt: str | os.PathLike[str]) -> bool:
    """Whether ``ckpt`` was written with ``torch.distributed.checkpoint`` (``peerlm.parallel.dcp``)."""
    return (Path(ckpt) / "model" / ".metadata").is_file()


def is_distributed_model(model: nn.Module) -> bool:
    """Whether ``model`` holds parts of tensors (FSDP2 DTensors, column-sharded tables), and so needs a
    distributed checkpoint (``peerlm.parallel.dcp``; not imported here, it is slow to import)."""
    from peerlm.parallel.shard import sharded_parameter_names

    return bool(sharded_parameter_names(model)) or any(type(p).__name__ == "DTensor" for p in model.parameters())


def load_weights(ckpt: str | os.PathLike[str], model: nn.Module, expected_model: dict[str, Any] | None = None,
                 verify: bool = True) -> None:
    """Load a checkpoint's weights into ``model``; ``expected_model`` (a ModelConfig dict) must match
    the saved one."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt, WEIGHT_FILES)
    _check_model_config(ckpt, expected_model)
    if is_distributed(ckpt):
        from peerlm.parallel import dcp

        dcp.load_model(ckpt, model)
        return
    tensors = _load_tensors(ckpt / "model.safetensors")
    own = model.state_dict()
    missing = sorted(set(own) - set(tensors))
    extra = sorted(set(tensors) - set(own))
    shapes = [f"{k} {tuple(tensors[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in tensors and tensors[k].shape != own[k].shape]
    if missing or extra or shapes:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + shapes[:3]
        raise CheckpointError(f"{ckpt} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(tensors, strict=True)


def load_checkpoint(ckpt: str | os.PathLike[str], model: nn.Module, optimizer: Any = None,
                    expected_model: dict[str, Any] | None = None, rng: bool = True,
                    verify: bool = True) -> dict[str, Any]:
    """Restore weights, optimizer state and (with ``rng``) RNG states; return the stored state dict
    (``step``, ``train``: what ``save_checkpoint`` was given). ``verify=False`` skips the manifest
    check, for a caller that has just run ``verify_checkpoint``."""
    ckpt = Path(ckpt)
    if verify:
        verify_checkpoint(ckpt)
    if is_distributed(ckpt) or is_distributed_model(model):
        from peerlm.parallel import dcp

        _check_model_config(ckpt, expected_model)
        return dcp.load_checkpoint(ckpt, model, optimizer, rng)
    load_weights(ckpt, model, expected_model, verify=False)
    tensors = _load_tensors(ckpt / "state.safetensors")
    try:
        state = _decode(json.loads((ckpt / "state.json").read_text("utf-8")), tensors)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{ckpt}/state.json is corrupt ({e})") from None
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
