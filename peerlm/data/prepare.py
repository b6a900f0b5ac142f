"""Turn text sources into a prepared directory: a byte-level BPE tokenizer and flat token arrays.

`prepare(sources, out_dir)` writes

    out_dir/tokenizer.json     HF `tokenizers` byte-level BPE, `<|endoftext|>` as the only special token
    out_dir/train.bin          token ids, flat, numpy uint16 (vocab <= 65536) or uint32
    out_dir/val.bin
    out_dir/eval/<name>.bin    one per held-out set
    out_dir/meta.json          vocab_size, dtype, and per split: file, tokens, UTF-8 bytes, pieces

Notable choices:
- Split by text, not by token offset, so no validation text is ever seen in training. Documents are
  cut into segments of about `segment_chars` characters at paragraph (else sentence, else word)
  boundaries; each segment goes to validation when a seeded sha256 of its text falls below
  `val_fraction`. That is deterministic, independent of source order, and sends exact duplicates to
  the same side. Segments (not whole documents) are the unit because a corpus may be a handful of
  books: 18 documents cannot give a 1% split. Consecutive segments of a document that land on the same
  side are joined back into one piece; `<|endoftext|>` follows every piece, so the model never sees two
  unrelated texts glued together.
- The tokenizer is trained on the training pieces only, with all 256 byte symbols in its alphabet, so
  any string round-trips exactly and validation/eval text leaks nothing into the vocabulary. Literal
  `<|endoftext|>` inside a text is encoded as ordinary text.
- `bytes` in meta is the UTF-8 length of the pieces' text (separators excluded): bits per byte is
  `sum of per-token NLL in nats / ln 2 / bytes`.
- Same inputs and arguments -> byte-identical files (nothing time- or order-dependent is recorded).
  Every file is written atomically; `meta.json` last, so its presence means the directory is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from .cache import atomic_write_text, atomic_writer
from .errors import DataError
from .sources import Corpus, Source, as_source

EOT = "<|endoftext|>"
FORMAT_VERSION = 1
_PARAGRAPH = re.compile(r"\n[ \t]*\n\s*")
_SENTENCE = re.compile(r"(?<=[.!?])[\"')\]]*\s+")
_SPACE = re.compile(r"\s+")


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned dtype that holds ids 0..vocab_size-1 (uint16 up to 65536 tokens)."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


def segment(text: str, target: int) -> list[str]:
    """Cut `text` into consecutive pieces of >= `target` characters (the last may be shorter).

    Cuts fall at the first paragraph break past `target`, else (within 4x target) a sentence end,
    else any whitespace. Joining the pieces gives `text` back exactly.
    """
    pieces, pos, n = [], 0, len(text)
    while n - pos > target:
        cut = None
        for pattern, reach in ((_PARAGRAPH, 4), (_SENTENCE, 4), (_SPACE, None)):
            m = pattern.search(text, pos + target, n if reach is None else min(n, pos + reach * target))
            if m:
                cut = m.end()
                break
        if cut is None or cut >= n:
            break
        pieces.append(text[pos:cut])
        pos = cut
    pieces.append(text[pos:])
    return pieces


def _unit_hash(seed: int, text: str) -> float:
    digest = hashlib.sha256(f"{seed}\0".encode() + text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_documents(docs: Iterable[str], val_fraction: float, seed: int = 0,
                    segment_chars: int = 4096) -> tuple[list[str], list[str]]:
    """(train pieces, val pieces): a deterministic held-out split of documents (see module docstring)."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    segs: list[tuple[int, str, float]] = []
    for d, text in enumerate(docs):
        segs.extend((d, s, _unit_hash(seed, s)) for s in segment(text, segment_chars) if s.strip())
    if not segs:
        raise DataError("no text to prepare: every source was empty")
    is_val = [u < val_fraction for _, _, u in segs]
    if val_fraction > 0 and not any(is_val):  # tiny inputs: hold out the lowest-hash segment anyway
        if len(segs) < 2:
            raise DataError("too little text for a validation split (one segment); give more text "
                            "or set the validation fraction to 0")
        is_val[min(range(len(segs)), key=lambda i: segs[i][2])] = True
    if all(is_val):
        is_val[max(range(len(segs)), key=lambda i: segs[i][2])] = False
    train: list[str] = []
    val: list[str] = []
    run: list[str] = []
    for i, (d, s, _) in enumerate(segs):
        run.append(s)
        last = i + 1 == len(segs) or segs[i + 1][0] != d or is_val[i + 1] != is_val[i]
        if last:
            piece = "".join(run).strip()
            if piece:
                (val if is_val[i] else train).append(piece)
            run = []
    return train, val


def train_tokenizer(texts: Sequence[str], vocab_size: int, progress: bool = True) -> Tokenizer:
    """A byte-level BPE trained on `texts`, with `EOT` as special token id 0."""
    if vocab_size < 257:
        raise DataError(f"vocab_size must be at least 257 (256 bytes + {EOT}), got {vocab_size}")
    if vocab_size > 1 << 32:
        raise DataError(f"vocab_size must fit uint32, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tok.encode_special_tokens = True
    return tok


def encode_pieces(tok: Tokenizer, pieces: Sequence[str], desc: str = "encoding", progress: bool = True,
                  chunk: int = 256) -> np.ndarray:
    """Token ids of all pieces, each followed by `EOT`, as one flat array of the tokenizer's dtype."""
    eot = tok.token_to_id(EOT)
    dtype = token_dtype(tok.get_vocab_size())
    parts: list[np.ndarray] = []
    bar = tqdm(total=len(pieces), desc=desc, unit=" docs", disable=not progress, leave=False)
    for start in range(0, len(pieces), chunk):
        for enc in tok.encode_batch(list(pieces[start : start + chunk]), add_special_tokens=False):
            parts.append(np.asarray(enc.ids + [eot], dtype=dtype))
        bar.update(min(chunk, len(pieces) - start))
    bar.close()
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _write_split(out_dir: Path, rel: str, tok: Tokenizer, pieces: Sequence[str], progress: bool) -> dict:
    ids = encode_pieces(tok, pieces, desc=f"encoding {rel}", progress=progress)
    with atomic_writer(out_dir / rel) as f:
        ids.tofile(f)
    return {"file": rel, "tokens": int(ids.size), "bytes": sum(len(p.encode("utf-8")) for p in pieces),
            "pieces": len(pieces)}


def _load(source: Source, progress: bool) -> list[str]:
    info = source.describe()
    label = info.get("name") or info.get("path")
    docs = [text for _, text in tqdm(source.documents(), desc=f"reading {label}", unit=" docs",
                                     disable=not progress, leave=False)]
    if not any(t.strip() for t in docs):
        raise DataError(f"source {label} has no text")
    return docs


def prepare(sources: Sequence[Source | str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            vocab_size: int = 8192, val_fraction: float = 0.01,
            eval_sets: Sequence[str] | Mapping[str, Source | str | os.PathLike[str]] = (),
            seed: int = 0, segment_chars: int = 4096, progress: bool = True) -> dict[str, Any]:
    """Build `out_dir` (see the module docstring) and return its meta.

    `sources`: training text (paths, `TextFiles`, `Corpus`, `HFDataset`). `eval_sets`: held-out sets,
    as registry corpus names or a {name: source} mapping; each becomes `eval/<name>.bin`, encoded whole.
    """
    if not sources:
        raise DataError("no training sources given")
    srcs = [as_source(s) for s in sources]
    evals = ({n: as_source(s) for n, s in eval_sets.items()} if isinstance(eval_sets, Mapping)
             else {n: Corpus(n) for n in eval_sets})
    for name in evals:
        if name in ("train", "val") or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise DataError(f"bad eval set name {name!r}: use letters, digits, '-', '_' (not train/val)")
    out = Path(out_dir)
    docs = [text for s in srcs for text in _load(s, progress)]
    train, val = split_documents(docs, val_fraction, seed, segment_chars)
    eval_pieces = {n: [t.strip() for t in _load(s, progress) if t.strip()] for n, s in evals.items()}
    if progress:
        print(f"peerlm: training a {vocab_size}-token byte-level BPE on {len(train)} pieces", file=sys.stderr)
    tok = train_tokenizer(train, vocab_size, progress)
    actual = tok.get_vocab_size()
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "tokenizer.json", tok.to_str())
    splits = {"train": _write_split(out, "train.bin", tok, train, progress),
              "val": _write_split(out, "val.bin", tok, val, progress)}
    for name, pieces in eval_pieces.items():
        splits[name] = {**_write_split(out, f"eval/{name}.bin", tok, pieces, progress), "eval": True}
    meta = {"format": FORMAT_VERSION, "vocab_size": actual, "requested_vocab_size": vocab_size,
            "dtype": token_dtype(actual).name, "eot_token": EOT, "eot_id": tok.token_to_id(EOT),
            "tokenizer": "tokenizer.json", "seed": seed, "val_fraction": val_fraction,
            "segment_chars": segment_chars, "splits": splits,
            "sources": [s.describe() for s in srcs],
            "eval_sources": {n: s.describe() for n, s in evals.items()}}
    atomic_write_text(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    if progress:
        summary = ", ".join(f"{k} {v['tokens']:,} tok / {v['bytes']:,} B" for k, v in splits.items())
        print(f"peerlm: prepared {out} (vocab {actual}): {summary}", file=sys.stderr)
    return meta
