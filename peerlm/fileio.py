"""Durable file writes and directory locks shared by the data pipeline and training runs.

Everything peerlm writes that a later run trusts (cached corpora, token arrays, tokenizers,
checkpoints, pointers) goes through ``atomic_writer``: the bytes land in a temporary file in the
destination's directory, are fsynced, and are moved into place with ``os.replace`` (then the
directory is fsynced), so a crash, a SIGKILL or Ctrl-C leaves either the old file or the new one,
never half of one.

``DirLock`` makes a directory single-writer: an exclusive ``flock`` on ``<dir>/.peerlm.lock``, which
the kernel releases when the process ends however it ends, so a SIGKILL leaves no stale lock. The
file holds who took the lock, for the message of the process that is refused; it is removed on
release (a SIGKILLed holder leaves the file, which the next holder reuses).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shlex
import socket
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

__all__ = ["umask", "fsync_dir", "atomic_writer", "atomic_write_bytes", "atomic_write_text", "sha256_file",
           "DirectoryBusy", "DirLock", "LOCK_NAME", "probe_writable"]

LOCK_NAME = ".peerlm.lock"


def umask() -> int:
    """The process umask (read without changing it for longer than two calls)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike[str]) -> Iterator[BinaryIO]:
    """Open a binary file that appears at `path` only once the `with` block finishes without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600; peerlm's files should be like any other
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` atomically."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write `text` to `path` atomically, as UTF-8 with `\\n` line endings."""
    atomic_write_bytes(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so large files need no memory."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def probe_writable(directory: str | os.PathLike[str]) -> None:
    """Create, write, fsync and remove a file in ``directory``: OSError (with the path) now, rather
    than when the first checkpoint or array is written."""
    fd, tmp = tempfile.mkstemp(prefix=".peerlm-probe.", suffix=".tmp", dir=directory)
    try:
        os.write(fd, b"\0")
        os.fsync(fd)
    finally:
        os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class DirectoryBusy(Exception):
    """Another process is writing the directory (it holds its ``DirLock``)."""


class DirLock:
    """Hold an exclusive lock on ``directory`` for a ``with`` block; ``DirectoryBusy`` when another
    process holds it. The directory (and missing parents) is created; if the block raises, the
    directories this lock created are removed again when still empty, so a refused command leaves
    no trace. ``what`` says in the refusal what the directory is (e.g. "run directory")."""

    def __init__(self, directory: str | os.PathLike[str], what: str = "directory") -> None:
        self.dir, self.what = Path(directory), what
        self.path = self.dir / LOCK_NAME
        self.fd: int | None = None
        self.created: list[Path] = []

    def _make_dirs(self) -> None:
        missing = []
        p = self.dir
        while not p.exists() and p != p.parent:
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):  # made by another process meanwhile: not ours
                d.mkdir()
                self.created.append(d)
        if not self.dir.is_dir():
            raise NotADirectoryError(20, "not a directory", str(self.dir))

    def _remove_created(self) -> None:
        for d in reversed(self.created):
            with contextlib.suppress(OSError):  # not empty (or gone): keep it
                d.rmdir()

    def __enter__(self) -> DirLock:
        self._make_dirs()
        if fcntl is None:
            return self
        try:
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~umask())
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                    os.close(fd)
                    raise DirectoryBusy(f"{self.dir} is in use: another process is writing this {self.what} "
                                        f"({holder or 'holder unknown'}); wait for it to end or use another "
                                        "directory") from None
                except BaseException:
                    os.close(fd)
                    raise
                # the last holder unlinks the file on release: a lock on an unlinked file locks nothing
                with contextlib.suppress(FileNotFoundError):
                    if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                        break
                os.close(fd)
            self.fd = fd
            command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
            info = (f"pid {os.getpid()} on {socket.gethostname()} since "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {command}")
            os.ftruncate(fd, 0)
            os.pwrite(fd, (info + "\n").encode("utf-8"), 0)
        except BaseException:
            self._remove_created()
            raise
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self.fd is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
            os.close(self.fd)
            self.fd = None
        if exc_type is not None:
            self._remove_created()
