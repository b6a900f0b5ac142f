"""Reading a prepared directory: memory-mapped token arrays, reproducible batches, the tokenizer.

`TokenDataset(dir)` memory-maps each split lazily (`np.memmap`, read-only), so a multi-GB array costs
no RAM until its pages are touched. Split names are `train`, `val` and each eval set's name.

Batches are a pure function of `(seed, step, split)`: `get_batch` seeds a fresh numpy generator from
that triple and draws `batch_size` random windows. A run resumed at step k therefore sees exactly the
batches the uninterrupted run would have, with no sampler state to checkpoint.

`iter_eval` walks a split in order with non-overlapping windows so every token except the first is a
prediction target exactly once; the final short window comes as its own (1, r) batch.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from .errors import DataError
from .sources import read_text_file

Batch = tuple[torch.Tensor, torch.Tensor]


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a prepared directory (or a `tokenizer.json` path)."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"no tokenizer at {file}; run `peerlm data prepare` to build one")
    tok = Tokenizer.from_file(str(file))
    tok.encode_special_tokens = True  # literal "<|endoftext|>" in user text is text, not a separator
    return tok


def encode_file(path: str | os.PathLike[str],
                tokenizer: Tokenizer | str | os.PathLike[str]) -> tuple[np.ndarray, int]:
    """(token ids as int64, UTF-8 byte count) of a text file, e.g. to score a model on it in bits/byte."""
    tok = tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(tokenizer)
    text = read_text_file(path)
    ids = np.asarray(tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)
    return ids, len(text.encode("utf-8"))


class TokenDataset:
    """The splits of a directory written by `peerlm.data.prepare`."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.dir = Path(directory)
        try:
            self.meta: dict[str, Any] = json.loads((self.dir / "meta.json").read_text("utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.dir}: no meta.json; run `peerlm data prepare --out {self.dir}`") from None
        except ValueError as e:
            raise DataError(f"{self.dir}/meta.json is not valid JSON ({e}); prepare it again") from None
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.eot_id: int = int(self.meta["eot_id"])
        self._arrays: dict[str, np.ndarray] = {}

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def _info(self, split: str) -> dict[str, Any]:
        try:
            return self.meta["splits"][split]
        except KeyError:
            raise DataError(f"{self.dir}: no split {split!r}; available: {', '.join(self.splits)}") from None

    def tokens(self, split: str) -> np.ndarray:
        """The token ids of `split`, memory-mapped (read-only)."""
        if split not in self._arrays:
            info = self._info(split)
            file = self.dir / info["file"]
            if not file.is_file():
                raise DataError(f"{file} is missing; prepare the directory again")
            size = file.stat().st_size
            if size != info["tokens"] * self.dtype.itemsize:
                raise DataError(f"{file} has {size} bytes but meta.json says {info['tokens']} {self.dtype} "
                                "tokens; the directory is damaged, prepare it again")
            self._arrays[split] = (np.memmap(file, dtype=self.dtype, mode="r") if size
                                   else np.zeros(0, dtype=self.dtype))  # mmap refuses empty files
        return self._arrays[split]

    def num_tokens(self, split: str) -> int:
        return int(self._info(split)["tokens"])

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's text (for bits per byte)."""
        return int(self._info(split)["bytes"])

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir)

    def get_batch(self, split: str, batch_size: int, seq_len: int, step: int, seed: int = 0,
                  device: str | torch.device | None = None) -> Batch:
        """(x, y), int64 tensors of shape (batch_size, seq_len), y[:, t] = x[:, t + 1] in the data.

        A pure function of (split, seed, step): the same call always returns the same batch.
        """
        data = self.tokens(split)
        n = len(data)
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if n < seq_len + 1:
            raise DataError(f"split {split!r} has {n} tokens, need at least seq_len + 1 = {seq_len + 1}")
        rng = np.random.default_rng([seed, step, zlib.crc32(split.encode("utf-8"))])
        starts = rng.integers(0, n - seq_len, size=batch_size)
        return self._pair(np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int64), device)

    def iter_eval(self, split: str, batch_size: int, seq_len: int,
                  device: str | torch.device | None = None) -> Iterator[Batch]:
        """Sequential non-overlapping (x, y) windows covering the whole split, `batch_size` at a time."""
        data = self.tokens(split)
        n_targets = len(data) - 1
        full = max(n_targets, 0) // seq_len
        for first in range(0, full, batch_size):
            rows = range(first, min(first + batch_size, full))
            buf = np.stack([data[r * seq_len : r * seq_len + seq_len + 1] for r in rows]).astype(np.int64)
            yield self._pair(buf, device)
        rest = n_targets - full * seq_len
        if rest > 0:
            yield self._pair(np.asarray(data[full * seq_len :], dtype=np.int64)[None], device)

    @staticmethod
    def _pair(buf: np.ndarray, device: str | torch.device | None) -> Batch:
        t = torch.from_numpy(buf)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        return (x.to(device), y.to(device)) if device is not None else (x, y)
