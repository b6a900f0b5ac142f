"""One process per run: a claim file taken before a run trains and removed after it, so that several
processes can work through one study's plan side by side (each takes the next run nobody holds).

A claim is ``<work>/claims/<run_id>.json`` with the holder's pid and host, created atomically (a hard
link of a finished temporary file, which fails if the claim exists). A claim whose process has died on
this host is stale and is taken over; a claim from another host (a work directory on a shared
filesystem) is respected, because its process cannot be seen from here.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["RunClaimed", "claim"]


class RunClaimed(RuntimeError):
    """Another live process holds the claim of a run."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: treated as held, see _held


def _held(holder: dict) -> bool:
    if holder.get("host") != socket.gethostname():
        return True
    pid = holder.get("pid")
    return not isinstance(pid, int) or (pid != os.getpid() and _alive(pid))


@contextlib.contextmanager
def claim(path: Path, what: str) -> Iterator[None]:
    """Hold the claim ``path`` (for the run ``what``) while the block runs; ``RunClaimed`` if another
    live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(me), "utf-8")
    try:
        for _ in range(2):  # a second try after clearing a stale claim
            try:
                os.link(tmp, path)
                break
            except FileExistsError:
                holder = _holder(path)
                if holder is not None and _held(holder):
                    raise RunClaimed(
                        f"{what} is being run by pid {holder.get('pid')} on {holder.get('host')} (claim "
                        f"{path}); wait for it, or delete the claim if that process is gone") from None
                path.unlink(missing_ok=True)  # stale: its process is gone (or it is ours)
        else:
            raise RunClaimed(f"{what}: could not take the claim {path}; another process is taking it too")
    finally:
        tmp.unlink(missing_ok=True)
    try:
        yield
    finally:
        if (_holder(path) or {}).get("pid") == os.getpid():
            path.unlink(missing_ok=True)
