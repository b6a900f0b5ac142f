"""Perplexity and bits per byte of a trained run on held-out text, with expert usage per memory layer.

The text (a split of a prepared directory, or a UTF-8 file encoded with the run's tokenizer) is read
as one stream preceded by ``<|endoftext|>``, so the first real token is predicted from a document
start as in training. The stream is cut into sequential, non-overlapping windows of the model's
context (each token is a target exactly once; a window's first positions see little context, which
makes the figures slightly pessimistic next to a sliding window, and much cheaper).

Targets that are ``<|endoftext|>`` separators are left out of both sums: they stand for no bytes.
So, over the N text tokens of a text of B UTF-8 bytes:

    loss = nats / N,  perplexity = exp(loss),  bits per byte = nats / (B * ln 2)

Bits per byte does not depend on the tokenizer, so models with different vocabularies compare.
Perplexity does (it is per token of this run's tokenizer).

Expert usage (fraction of experts with non-zero gate mass) and unevenness (KL from uniform), as in
the paper's Table 2, are accumulated over the same tokens for every PEER and PKM layer.

A run is only scored on ids of its own tokenizer (``peerlm.rundir``: the run's tokenizer fingerprint
must match that of a data directory it is scored on and of the tokenizer that encodes a text file).
The run's model comes from ``peerlm.rundir.load_run``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from tqdm import tqdm

from peerlm.data import DataError, TokenDataset, encode_file
from peerlm.ffn import memory_layers
from peerlm.model import Transformer
from peerlm.rundir import RunDir, check_same_tokenizer, load_run, run_fingerprint, run_tokenizer

__all__ = [
    "evaluate_tokens", "memory_usage", "tracking_usage", "head_of", "evaluate_run",
    "format_table", "to_json", "progress_bar",
]


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it") -> tqdm:
    """A tqdm bar on stderr, shown only when ``enabled`` and stderr is a terminal (a log file gets
    no carriage-return noise)."""
    return tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                disable=not enabled or not sys.stderr.isatty())


def _windows(tokens: torch.Tensor, T: int, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) batches of non-overlapping windows; y is x shifted by one; the last window may be short."""
    n_targets = tokens.numel() - 1
    full = max(n_targets, 0) // T
    for first in range(0, full, batch_size):
        rows = range(first, min(first + batch_size, full))
        buf = torch.stack([tokens[r * T : r * T + T + 1] for r in rows])
        yield buf[:, :-1], buf[:, 1:]
    if n_targets - full * T > 0:
        rest = tokens[full * T :]
        yield rest[None, :-1], rest[None, 1:]


@torch.no_grad()
def evaluate_tokens(model: Transformer, tokens: np.ndarray | torch.Tensor | Sequence[int],
                    batch_size: int = 8, num_bytes: int | None = None, eot_id: int | None = 0,
                    device: torch.device | str | None = None, amp: torch.dtype | None = None,
                    progress: bool = False, desc: str = "eval") -> dict[str, Any]:
    """Nats, token count, loss, perplexity and (given ``num_bytes``) bits per byte of a token stream.

    ``eot_id`` is prepended as the start of the stream and excluded as a target (None: neither).
    The model is put in eval mode and left there. ``progress``: a bar over the tokens.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model.eval()
    device = device or next(model.parameters()).device
    ids = torch.as_tensor(np.asarray(tokens, dtype=np.int64))
    if eot_id is not None:
        ids = torch.cat([torch.tensor([eot_id]), ids])
    V = model.cfg.vocab_size
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= V):
        raise ValueError(f"token ids must be in [0, vocab_size={V}), got range [{int(ids.min())}, "
                         f"{int(ids.max())}]; the tokenizer does not match this model")
    nats, count = 0.0, 0
    autocast = torch.autocast(torch.device(device).type, dtype=amp) if amp else contextlib.nullcontext()
    bar = progress_bar(max(ids.numel() - 1, 0), desc, progress, unit="tok")
    for x, y in _windows(ids, model.cfg.context_length, batch_size):
        bar.update(y.numel())
        x, y = x.to(device), y.to(device)
        if eot_id is not None:
            y = y.masked_fill(y == eot_id, -1)
        with autocast:
            logits, _ = model(x)
        nll = F.cross_entropy(logits.float().reshape(-1, V), y.reshape(-1), ignore_index=-1, reduction="sum")
        nats += float(nll.double())
        count += int((y >= 0).sum())
    bar.close()
    loss = nats / count if count else float("nan")
    ppl = math.exp(loss) if count else float("nan")
    out = {"tokens": count, "nats": nats, "loss": loss, "perplexity": ppl}
    if num_bytes is not None:
        out["bytes"] = num_bytes
        out["bits_per_byte"] = nats / (num_bytes * math.log(2)) if num_bytes else float("nan")
    return out


@contextlib.contextmanager
def tracking_usage(model: torch.nn.Module) -> Iterator[None]:
    """Record expert usage of every PEER/PKM layer inside the block, from zero; off and reset after."""
    layers = [m for _, m in memory_layers(model)]
    before = [m.track_usage for m in layers]
    for m in layers:
        m.track_usage = True
        m.reset_usage()
    try:
        yield
    finally:
        for m, on in zip(layers, before):
            m.reset_usage()
            m.track_usage = on


def memory_usage(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """``usage()`` (usage, unevenness, distinct, effective) of every PEER/PKM layer since tracking began
    (layers that saw nothing skipped)."""
    out = {}
    for name, m in memory_layers(model):
        if m.usage_mass is not None and float(m.usage_mass.sum()) > 0:
            out[name] = m.usage()
    return out


def head_of(ids: np.ndarray, max_tokens: int, eot_id: int, tokenizer: Tokenizer) -> tuple[np.ndarray, int]:
    """The first ``max_tokens`` ids of a stream, cut after its last separator when there is one in the
    second half (so no document is cut), and the UTF-8 bytes of their text (decoded, separators skipped)."""
    head = np.asarray(ids[:max_tokens])
    cuts = np.flatnonzero(head == eot_id)
    if cuts.size and cuts[-1] >= max_tokens // 2:
        head = head[: cuts[-1] + 1]
    text = tokenizer.decode(head.tolist(), skip_special_tokens=True)
    return head, len(text.encode("utf-8"))


def evaluate_run(run_dir: str | os.PathLike[str], data_dir: str | os.PathLike[str] | None = None,
                 texts: Sequence[str | os.PathLike[str]] = (), splits: Sequence[str] | None = None,
                 batch_size: int = 8, device: torch.device | str = "cpu", usage: bool = True,
                 max_tokens: int | None = None, model: Transformer | None = None,
                 progress: bool = False, config: dict | None = None) -> dict[str, dict[str, Any]]:
    """Results by name: each held-out set of ``data_dir`` (``val`` and every eval set; ``splits`` picks
    some) and each text file (by file name). Without ``data_dir`` and ``texts``, the run's own data.

    ``max_tokens`` evaluates only the head of each set and text file (see ``head_of``), to bound the
    cost of large sets; bits per byte then divides by the bytes of that head. ``model`` skips loading
    the run's (``config``: the run config it came from, by default the run's config.json). The data
    directory and the tokenizer must be the run's (``run_fingerprint``), else DataError.
    ``progress``: a bar per set.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    run_dir = Path(run_dir)
    if model is None:
        model, config = load_run(run_dir, device)
    elif config is None:
        config = RunDir(run_dir).read_config()
    if data_dir is None and not texts:
        data_dir = config.get("data", {}).get("dir")
        if not data_dir:
            raise DataError(f"{run_dir} records no data directory; pass --data DIR or --text FILE")
    results: dict[str, dict[str, Any]] = {}
    eot = config.get("data", {}).get("eot_id", 0)
    run_fp = run_fingerprint(run_dir, config)

    def run_one(name: str, ids: np.ndarray, num_bytes: int) -> None:
        with tracking_usage(model):
            res = evaluate_tokens(model, ids, batch_size, num_bytes, eot, device, progress=progress,
                                  desc=f"eval {name}")
            if usage:
                res["usage"] = memory_usage(model)
        results[name] = res

    ds = None
    if data_dir is not None:
        ds = TokenDataset(data_dir)
        check_same_tokenizer(run_fp, ds.tokenizer_sha256, str(data_dir),
                             "evaluate on the data directory the run was trained on, or on --text files")
        if ds.vocab_size > model.cfg.vocab_size:
            raise DataError(f"{data_dir} has {ds.vocab_size} token ids, the model only "
                            f"{model.cfg.vocab_size}; it was prepared with another tokenizer")
    tok = run_tokenizer(run_dir, config, data_dir) if texts or max_tokens is not None else None
    if ds is not None:
        eot = ds.eot_id
        names = [s for s in ds.splits if s != "train"] if splits is None else list(splits)
        for name in names:
            if not ds.num_tokens(name):
                continue
            ids, num_bytes = ds.tokens(name), ds.num_bytes(name)
            if max_tokens is not None and len(ids) > max_tokens:
                ids, num_bytes = head_of(ids, max_tokens, eot, tok)
            run_one(name, np.asarray(ids), num_bytes)
    for path in texts:
        ids, num_bytes = encode_file(path, tok)
        if max_tokens is not None and len(ids) > max_tokens:
            ids, num_bytes = head_of(ids, max_tokens, eot, tok)
        name = Path(path).name
        while name in results:
            name += "'"
        run_one(name, ids, num_bytes)
    return results


def format_table(results: dict[str, dict[str, Any]], title: str | None = None) -> str:
    """A terminal table: one row per set with tokens, bytes, loss, perplexity, bits/byte, usage."""
    head = (f"{'set':<14}{'tokens':>10}{'bytes':>11}{'loss':>8}{'ppl':>10}{'bits/byte':>11}"
            "  usage / unevenness / distinct / effective")
    rows = ([title] if title else []) + [head, "-" * len(head)]
    for name, r in results.items():
        usage = ", ".join(f"{layer.removeprefix('blocks.')} {u['usage']:.1%}/{u['unevenness']:.2f}"
                          + (f"/{u['distinct']:.1%}/{u['effective']:.1f}" if "distinct" in u else "")
                          for layer, u in r.get("usage", {}).items())
        rows.append(f"{name:<14}{r['tokens']:>10,}{r.get('bytes', 0):>11,}{r['loss']:>8.3f}"
                    f"{r['perplexity']:>10.2f}{r.get('bits_per_byte', float('nan')):>11.4f}  {usage}")
    return "\n".join(rows)


def to_json(results: dict[str, dict[str, Any]]) -> str:
    """JSON of one result (a single set) or of the mapping by name (several)."""
    if len(results) == 1:
        return json.dumps(next(iter(results.values())), indent=2)
    return json.dumps(results, indent=2)
