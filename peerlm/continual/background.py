"""Background document frequencies for sparse memory finetuning, computed once per base model and cached.

df(i) of a memory slot is the number of B background batches in which it is retrieved (see
``peerlm.continual.memory``). The batches are the first B batches of the base run's own training
order (``TokenDataset.train_batch`` with the base run's seed, batch size and context), through the
base model in eval mode. The result depends only on the base checkpoint, that data and those
numbers, so it is cached under ``$PEERLM_CACHE/continual/`` keyed by their fingerprints (the
checkpoint's manifest, the token array's sha256, B, batch size, context, seed): a sweep over
finetuning settings of one base computes it once. The cache file is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import Tensor

from peerlm.continual.memory import document_frequencies
from peerlm.data import TokenDataset
from peerlm.data.cache import cache_dir
from peerlm.fileio import atomic_write_bytes, sha256_file
from peerlm.model import Transformer

__all__ = ["background_key", "background_frequencies"]


def background_key(ckpt: str | os.PathLike[str], ds: TokenDataset, batches: int, batch_size: int,
                   context: int, seed: int) -> str:
    """The fingerprint of a background computation (hex sha256)."""
    train = ds.meta["splits"].get("train", {})
    parts = {"checkpoint": sha256_file(Path(ckpt) / "manifest.json"),
             "tokens": train.get("sha256") or f"{ds.tokenizer_sha256}:{train.get('tokens')}",
             "batches": batches, "batch_size": batch_size, "context": context, "seed": seed}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def background_frequencies(model: Transformer, ckpt: str | os.PathLike[str], ds: TokenDataset, batches: int,
                           batch_size: int, context: int, seed: int,
                           log: Callable[[str], None] = lambda s: None) -> dict[str, Tensor]:
    """Per memory layer, df of every slot over ``batches`` background batches of ``ds`` (see the module
    docstring), from the cache when it is there."""
    key = background_key(ckpt, ds, batches, batch_size, context, seed)
    path = cache_dir() / "continual" / f"background-{key[:32]}.safetensors"
    layers = [name for name, _ in model.memory_layers()]
    if path.is_file():
        try:
            cached = load_tensors(path.read_bytes())
        except Exception:  # noqa: BLE001 (a damaged cache file is recomputed)
            cached = {}
        if sorted(cached) == sorted(layers):
            log(f"background frequencies from {path}")
            device = next(model.parameters()).device
            return {k: v.to(device) for k, v in cached.items()}
    log(f"background frequencies: {batches} batches of {batch_size} x {context} tokens of {ds.dir}")
    device = next(model.parameters()).device
    stream = (ds.train_batch(batch_size, context, step, seed, device)[0] for step in range(batches))
    df, counted = document_frequencies(model, stream)
    assert counted == batches
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save_tensors({k: v.to("cpu", torch.int64).contiguous() for k, v in df.items()}))
    return df
