"""Reading a prepared directory: memory-mapped token arrays, reproducible batches, the tokenizer.

`TokenDataset(dir)` memory-maps each split lazily (`np.memmap`, read-only), so a multi-GB array costs
no RAM until its pages are touched. Split names are `train`, `val` and each eval set's name. It reads
meta.json formats 1 and 2 (2 only adds records of how the split was made) and refuses newer ones.
`tokenizer_sha256` is the directory's tokenizer fingerprint (the one meta.json records, checked
against tokenizer.json on opening; hashed from tokenizer.json where meta.json has none). Opening a
split checks, in one pass over the array on first use, that every id is below the vocabulary and
that the array's sha256 is the one meta.json records (where it records one: directories prepared
before that have none and are checked for ids only), so a damaged or edited array is refused before
training or evaluation reads it, not when a batch happens to hit it (about 0.05 s per 25 MB).
A path that is a file, or a directory without meta.json, is refused with what to run instead.

Training batches: `train_batch(batch_size, seq_len, step, seed)` samples without replacement within
an epoch and is a pure function of (seed, step, batch_size, seq_len, data), so a run resumed at step
k sees exactly the batches of the uninterrupted run with no sampler state to checkpoint. An epoch
cuts the split into W = max(1, n // seq_len - 1) windows of seq_len + 1 tokens at stride seq_len
(consecutive windows share their boundary token, so every token of the covered span is a target
exactly once), starting at an offset in [0, seq_len) drawn per epoch so that window starts (tokens
with no context) and the < 2 x seq_len tokens left out at the ends move from epoch to epoch. The W
windows are visited in a permutation drawn per epoch from (seed, split, epoch). Window number
g = step * batch_size + b of the stream is entry g % W of epoch g // W's permutation: batches never
overlap within an epoch, and a batch that straddles an epoch end takes the first windows of the
next. A split with fewer windows than a batch still works: the batch spans several epochs, so a
window repeats only across epochs. The permutation of the epoch in use is cached (W int64s); a call
costs O(batch_size x seq_len) after that. `epochs_seen(tokens, seq_len)` says how many epochs a
number of target tokens amounts to (tokens / (W x seq_len), about tokens / train tokens).

`get_batch` is the older sampler: `batch_size` windows at independent random offsets, drawn with
replacement from a generator seeded with (seed, step, split), also a pure function of those. Windows
may overlap and repeat, so it does not guarantee that a given number of tokens covers the data; keep
it for quick probes, use `train_batch` for training.

`iter_eval` walks a split in order with non-overlapping windows so every token except the first is a
prediction target exactly once; the final short window comes as its own (1, r) batch.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from peerlm.fileio import sha256_file

from .errors import DataError
from .prepare import FORMAT_VERSION
from .sources import read_text_file

Batch = tuple[torch.Tensor, torch.Tensor]


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a prepared directory (or a `tokenizer.json` path)."""
    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise DataError(f"no tokenizer at {file}; run `peerlm data prepare` to build one")
    try:
        tok = Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises its own exception types for a damaged file
        detail = " ".join(str(e).split())[:120]
        raise DataError(f"{file} is not a readable tokenizer ({detail}); prepare the directory again") from None
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
        if self.dir.is_file():  # else reading <file>/meta.json says "Not a directory"
            raise DataError(f"{self.dir} is a file, not a prepared directory; make one from it with "
                            f"`peerlm data prepare --text {shlex.quote(str(self.dir))} --out DIR` and pass DIR")
        if not self.dir.exists():
            raise DataError(f"{self.dir} does not exist, so it has no meta.json; make it with `peerlm data prepare "
                            f"--text FILE --out {shlex.quote(str(self.dir))}`")
        try:
            self.meta: dict[str, Any] = json.loads((self.dir / "meta.json").read_text("utf-8"))
        except FileNotFoundError:
            raise DataError(f"{self.dir}: no meta.json (not a prepared directory, or one whose preparation did "
                            f"not finish); run `peerlm data prepare --out {shlex.quote(str(self.dir))}`") from None
        except ValueError as e:
            raise DataError(f"{self.dir}/meta.json is not valid JSON ({e}); prepare it again") from None
        except OSError as e:
            raise DataError(f"cannot read {self.dir}/meta.json: {e.strerror or e}") from None
        if not isinstance(self.meta, dict) or not all(k in self.meta for k in ("vocab_size", "dtype", "eot_id",
                                                                               "splits")):
            raise DataError(f"{self.dir}/meta.json is not the meta.json of a prepared directory (it lacks "
                            "vocab_size, dtype, eot_id or splits); prepare the directory again")
        fmt = self.meta.get("format", 1)
        if not isinstance(fmt, int) or fmt > FORMAT_VERSION:
            raise DataError(f"{self.dir}/meta.json has format {fmt!r}, newer than this peerlm reads "
                            f"({FORMAT_VERSION}); upgrade peerlm or prepare the directory again")
        self.vocab_size: int = int(self.meta["vocab_size"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.eot_id: int = int(self.meta["eot_id"])
        tok_file = self.dir / self.meta.get("tokenizer", "tokenizer.json")
        self.has_tokenizer = tok_file.is_file()
        recorded = self.meta.get("tokenizer_sha256")
        actual = sha256_file(tok_file) if self.has_tokenizer else None
        if recorded and actual and recorded != actual:
            raise DataError(f"{tok_file} is not the tokenizer meta.json records (sha256 {actual[:12]} vs "
                            f"{recorded[:12]}): the directory was partly re-prepared or edited; prepare it again")
        self.tokenizer_sha256: str | None = actual or recorded
        self._arrays: dict[str, np.ndarray] = {}
        self._epochs: dict[tuple[str, int, int, int], tuple[int, np.ndarray]] = {}

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
            arr = np.memmap(file, dtype=self.dtype, mode="r") if size else np.zeros(0, dtype=self.dtype)
            self._check(file, arr, info.get("sha256"))  # mmap above refuses empty files, hence zeros
            self._arrays[split] = arr
        return self._arrays[split]

    def _check(self, file: Path, arr: np.ndarray, sha256: str | None, chunk: int = 1 << 24) -> None:
        """One pass over `arr`: every id below the vocabulary, and its sha256 the one meta.json records
        (directories prepared before checksums were recorded have none: ids only)."""
        check_ids = np.iinfo(self.dtype).max >= self.vocab_size  # else the dtype cannot hold a bad id
        h = hashlib.sha256() if sha256 else None
        for start in range(0, arr.size, chunk):
            block = arr[start : start + chunk]
            if check_ids and int(block.max()) >= self.vocab_size:
                at = start + int(np.argmax(block >= self.vocab_size))
                raise DataError(f"{file} holds token id {int(arr[at])} at position {at}, past the vocabulary "
                                f"({self.vocab_size}); the file is damaged, prepare the directory again")
            if h is not None:
                h.update(block)
        # ids changed into other valid ids pass the check above; only the checksum sees them
        if h is not None and h.hexdigest() != sha256:
            raise DataError(f"{file} is not the array meta.json records (sha256 {h.hexdigest()[:12]} vs "
                            f"{sha256[:12]}): it was changed or damaged after it was prepared; prepare the "
                            "directory again")

    def num_tokens(self, split: str) -> int:
        return int(self._info(split)["tokens"])

    def num_bytes(self, split: str) -> int:
        """UTF-8 bytes of the split's text (for bits per byte)."""
        return int(self._info(split)["bytes"])

    def tokenizer(self) -> Tokenizer:
        return load_tokenizer(self.dir)

    def windows_per_epoch(self, seq_len: int, split: str = "train") -> int:
        """W, the windows of seq_len + 1 tokens that `train_batch` visits once per epoch of `split`."""
        if seq_len < 1:
            raise ValueError(f"seq_len must be positive, got {seq_len}")
        n = self.num_tokens(split)
        if n < seq_len + 1:
            raise DataError(f"split {split!r} has {n} tokens, need at least seq_len + 1 = {seq_len + 1}")
        return max(1, n // seq_len - 1)

    def epochs_seen(self, tokens: int, seq_len: int, split: str = "train") -> float:
        """Epochs of `split` that `tokens` target tokens drawn by `train_batch` amount to, e.g.
        `epochs_seen(step * batch_size * seq_len, seq_len)`; 1.0 = every window once."""
        return tokens / (self.windows_per_epoch(seq_len, split) * seq_len)

    def _epoch(self, split: str, seq_len: int, seed: int, epoch: int, windows: int) -> tuple[int, np.ndarray]:
        """(offset, permutation of range(windows)) of one epoch, cached: consecutive calls share it."""
        key = (split, seq_len, seed, epoch)
        if key not in self._epochs:
            # the trailing constant keeps this stream apart from get_batch's (seed, step, split) one
            rng = np.random.default_rng([seed, epoch, zlib.crc32(split.encode("utf-8")), 0xE90C])
            offset = int(rng.integers(0, min(seq_len, self.num_tokens(split) - windows * seq_len)))
            perm = rng.permutation(windows)
            if len(self._epochs) >= 2:  # the current epoch and the one a batch may straddle into
                self._epochs.pop(next(iter(self._epochs)))
            self._epochs[key] = (offset, perm)
        return self._epochs[key]

    def train_batch(self, batch_size: int, seq_len: int, step: int, seed: int = 0,
                    device: str | torch.device | None = None, split: str = "train") -> Batch:
        """(x, y), int64 tensors of shape (batch_size, seq_len), y[:, t] = x[:, t + 1] in the data: the
        `step`-th batch of an epoch-wise shuffled walk over `split` (see the module docstring).

        The sampler for training. A pure function of (seed, step, batch_size, seq_len) and the data;
        `step` counts batches drawn (with gradient accumulation, micro-batches: step * accum + micro).
        """
        if batch_size < 1 or seq_len < 1:
            raise ValueError(f"batch_size and seq_len must be positive, got {batch_size}, {seq_len}")
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        windows = self.windows_per_epoch(seq_len, split)
        g = step * batch_size + np.arange(batch_size, dtype=np.int64)  # (B,) window numbers in the stream
        starts = np.empty(batch_size, dtype=np.int64)  # (B,)
        for epoch in np.unique(g // windows).tolist():
            rows = g // windows == epoch
            offset, perm = self._epoch(split, seq_len, seed, epoch, windows)
            starts[rows] = offset + perm[g[rows] % windows] * seq_len
        data = self.tokens(split)
        assert int(starts.max()) + seq_len + 1 <= len(data), (int(starts.max()), seq_len, len(data))
        return self._pair(np.asarray(data[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64), device)

    def get_batch(self, split: str, batch_size: int, seq_len: int, step: int, seed: int = 0,
                  device: str | torch.device | None = None) -> Batch:
        """(x, y), int64 tensors of shape (batch_size, seq_len), y[:, t] = x[:, t + 1] in the data:
        windows at random offsets, drawn with replacement (for training use `train_batch`).

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
