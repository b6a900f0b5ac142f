"""The format-neutral core of checkpoints: step directories, ``latest``, the manifest, atomic publish,
verification, pruning and the errors. Both formats (``local``: one process, ``distributed``: DCP) write
their files into a directory from ``new_temp_dir`` and hand it to ``publish``; everything else here
reads the manifest and never a format's own files.

Layout under a checkpoint root (``<run>/checkpoints``):

    step_00000200/
        ...                   the format's files (see ``local`` and ``distributed``)
        manifest.json         size and sha256 of every other file, and the format; written last
    latest                    one line, the name of the newest complete checkpoint

Writing: every file goes into a fresh hidden directory beside the final one and is fsynced, the
manifest last; the directory is renamed into place (one atomic rename) and fsynced; only then is
``latest`` replaced atomically (temp file, fsync, ``os.replace``). A kill at any point leaves the
previous checkpoint and pointer intact; a half-written directory is hidden and removed by the next
save. Then all but the newest ``keep`` checkpoints are deleted.

Verification checks the manifest entries of the files a reader needs (so a damaged optimizer state
does not stop evaluation) and raises ``CheckpointDamaged`` naming the newest older checkpoint that is
intact, for the caller to offer as the way out. When ``latest`` names a checkpoint that is not there
(a kill while re-saving that step), the newest complete one is used and the fallback is reported
through ``notes``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from peerlm.fileio import atomic_write_text, fsync_dir, sha256_file, umask

__all__ = [
    "CheckpointError", "CheckpointDamaged", "CheckpointWriteError", "DISTRIBUTED", "step_name", "checkpoint_step",
    "list_checkpoints", "latest_checkpoint", "find_checkpoint", "new_temp_dir", "publish", "point_latest", "prune",
    "write_error", "reason", "fsync_file", "write_text", "checkpoint_format", "verify_checkpoint", "read_config",
    "check_model_config", "check_fits",
]

_STEP_DIR = re.compile(r"^step_(\d{8,})$")
DISTRIBUTED = "dcp"  # the manifest's "format" of a distributed checkpoint; none for the one-process format


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


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_step(ckpt: str | os.PathLike[str]) -> int | None:
    """The step of a checkpoint directory, from its name (None for another name)."""
    m = _STEP_DIR.match(Path(ckpt).name)
    return int(m.group(1)) if m else None


def reason(e: BaseException) -> str:
    """One line saying why an OS or safetensors call failed."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    io = re.search(r"I/O error: (.+?) \(os error \d+\)", text)  # safetensors wraps the OS error
    return io.group(1) if io else text[:160]


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    """Write and fsync a file of a checkpoint being written (atomicity comes from ``publish``)."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------- writing


def list_checkpoints(root: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoint directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / "manifest.json").is_file()]
    return [p for _, p in sorted(found)]


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
    manifest (``DISTRIBUTED`` for a distributed checkpoint)."""
    files = sorted(f.relative_to(tmp).as_posix() for f in tmp.rglob("*") if f.is_file())
    for d in [tmp, *(d for d in tmp.rglob("*") if d.is_dir())]:
        os.chmod(d, 0o777 & ~umask())
    for f in files:
        os.chmod(tmp / f, 0o666 & ~umask())
    manifest: dict[str, Any] = {"step": step}
    if fmt is not None:
        manifest["format"] = fmt
    manifest["files"] = {f: {"bytes": (tmp / f).stat().st_size, "sha256": sha256_file(tmp / f)} for f in files}
    write_text(tmp / "manifest.json", json.dumps(manifest, indent=2) + "\n")
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


def point_latest(root: Path, name: str) -> None:
    atomic_write_text(root / "latest", name + "\n")


def prune(root: Path, keep: int, final: Path) -> None:
    """Delete all but the newest ``keep`` checkpoints under ``root`` (never ``final``)."""
    for old in list_checkpoints(root)[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)


def write_error(root: Path, name: str, e: BaseException, previous: Path | None) -> CheckpointWriteError:
    kept = f"; the previous checkpoint {previous} is as it was" if previous else ""
    return CheckpointWriteError(f"cannot write checkpoint {root / name} ({reason(e)}){kept}", previous)


# ------------------------------------------------------------------------------------------ finding


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


# ------------------------------------------------------------------------------------------ checking


def _manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / "manifest.json").read_text("utf-8"))


def checkpoint_format(ckpt: str | os.PathLike[str]) -> str | None:
    """The format its manifest records (``DISTRIBUTED`` or None); a directory holding a DCP model
    without a readable manifest counts as distributed too."""
    ckpt = Path(ckpt)
    if (ckpt / "model" / ".metadata").is_file():
        return DISTRIBUTED
    try:
        return _manifest(ckpt).get("format")
    except (OSError, ValueError, AttributeError):
        return None


def _problem(ckpt: Path, files: tuple[str, ...]) -> str | None:
    """What is wrong with ``files`` of ``ckpt`` against its manifest; None when they verify. A name
    ``x.safetensors`` of a distributed checkpoint stands for its DCP directory ``x/``."""
    try:
        manifest = _manifest(ckpt)
        listed = manifest["files"]
        if manifest.get("format") == DISTRIBUTED:
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


def verify_checkpoint(ckpt: str | os.PathLike[str], files: tuple[str, ...]) -> None:
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


def check_model_config(ckpt: Path, expected_model: dict[str, Any] | None) -> None:
    """``CheckpointError`` when the model config saved with ``ckpt`` differs from ``expected_model``."""
    if expected_model is not None:
        saved = read_config(ckpt).get("model")
        diffs = _diff(saved, expected_model)
        if diffs:
            shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
            raise CheckpointError(f"{ckpt} was saved for a different model (saved vs this run: {shown})")


def check_fits(ckpt: Path, own: dict[str, tuple], saved: dict[str, tuple]) -> None:
    """``CheckpointError`` unless the saved tensor names and shapes are exactly the model's."""
    missing = sorted(set(own) - set(saved))
    extra = sorted(set(saved) - set(own))
    shapes = [f"{k} {saved[k]} vs {own[k]}" for k in own if k in saved and saved[k] != own[k]]
    if missing or extra or shapes:
        parts = ([f"missing {', '.join(missing[:3])}"] if missing else []) + \
                ([f"unexpected {', '.join(extra[:3])}"] if extra else []) + shapes[:3]
        raise CheckpointError(f"{ckpt} does not fit this model: {'; '.join(parts)}")
