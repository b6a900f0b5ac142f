"""One process per run: a claim taken before a run trains and dropped after it, so that several
processes can work through one study's plan side by side (each takes the next run nobody holds).

A claim is an exclusive ``flock`` on ``<dir>/<run_id>.claim``, held while the run lasts. The kernel
drops it when its process ends, however it ends, so a crashed lane leaves nothing to clean up and
there is no stale claim to judge. The file holds the holder's pid, host and start time, for the
message others get. A process that already holds a claim may take it again (nested use). Claims
rely on ``flock`` reaching every process that may run the study: processes on one machine, or on
machines whose shared filesystem supports it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RunClaimed", "claim"]

_HELD: set[Path] = set()  # claims this process holds (nested claim() calls pass through)


class RunClaimed(RuntimeError):
    """Another process holds the claim of a run."""


def _holder(path: Path) -> str:
    try:
        h = json.loads(path.read_text("utf-8"))
        age = time.time() - float(h["since"])
        return f"pid {h['pid']} on {h['host']}, for {age / 60:.0f} min"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not written its details yet"


@contextlib.contextmanager
def claim(path: Path, what: str) -> Iterator[None]:
    """Hold the claim ``path`` (for the run ``what``) while the block runs; ``RunClaimed`` at once if
    another process holds it."""
    path = path.absolute()
    if path in _HELD:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RunClaimed(f"{what} is being run by {_holder(path)} (claim {path}); a lane takes another "
                             "run meanwhile, or wait for that process to end") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder before us removed the file after we opened it: take the new one
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        _HELD.add(path)
        yield
    finally:
        _HELD.discard(path)
        path.unlink(missing_ok=True)  # while still locked: a process waiting on this inode retries
        os.close(fd)
