"""Where cached corpora live, and atomic writes.

The cache directory is `$PEERLM_CACHE` if set, else `$XDG_CACHE_HOME/peerlm`, else `~/.cache/peerlm`.
Every file the data pipeline writes goes through `peerlm.fileio.atomic_writer` (re-exported here), or,
for a prepared directory, into a temporary directory that is renamed into place file by file
(`peerlm.data.prepare`), so a crash or Ctrl-C never leaves a half-written corpus, token array or
tokenizer behind that a later run would trust.
"""

from __future__ import annotations

import os
from pathlib import Path

from peerlm.fileio import atomic_write_bytes, atomic_write_text, atomic_writer, sha256_file

__all__ = ["cache_dir", "atomic_writer", "atomic_write_bytes", "atomic_write_text", "sha256_file"]


def cache_dir() -> Path:
    """The root of the peerlm cache (not created here)."""
    env = os.environ.get("PEERLM_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "peerlm"
    return Path.home() / ".cache" / "peerlm"
