"""Where training and evaluation text comes from: the user's files, a registry corpus, a HF dataset.

Each source is a small frozen dataclass with `documents()` (an iterator of `(id, text)`) and
`describe()` (a JSON-able record written into `meta.json`, so a prepared directory says what it was
built from). A plain `str`/`Path` given where a source is expected means `TextFiles`.

User files are read strictly: UTF-8 only (a BOM is allowed), and an empty file, a file with NUL bytes
or one that does not decode is a `DataError` naming the file, because silently training on a
mis-decoded or binary file wastes a run. Folders are walked recursively in sorted order (hidden files
and folders skipped) for files ending in one of `TEXT_SUFFIXES`; a single file may have any name.

Hugging Face `datasets` is optional (`pip install 'peerlm[hf]'`) and imported only when used.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import DataError

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".rst", ".text")


def read_text_file(path: str | os.PathLike[str]) -> str:
    """The UTF-8 text of `path` with `\\n` newlines; DataError if it is missing, empty or not text."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, expected a text file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    if not data.strip():
        raise DataError(f"{path}: file is empty; remove it or give a file with text")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: binary file (NUL byte at offset {nul}); give UTF-8 text files only")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                        "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_files(path: str | os.PathLike[str]) -> list[Path]:
    """`path` itself if it is a file, else the text files under it (recursive, sorted)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory")
    found = []
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found.extend(Path(dirpath) / f for f in filenames
                     if not f.startswith(".") and f.lower().endswith(TEXT_SUFFIXES))
    if not found:
        raise DataError(f"{path}: folder has no text files (looked for {', '.join(TEXT_SUFFIXES)})")
    return sorted(found, key=lambda p: p.relative_to(path).as_posix())


@dataclass(frozen=True)
class TextFiles:
    """A text file, or a folder of them; each file is one document."""

    path: str | Path

    def documents(self) -> Iterator[tuple[str, str]]:
        root = Path(self.path)
        for f in text_files(root):
            yield (f.name if f == root else f.relative_to(root).as_posix()), read_text_file(f)

    def describe(self) -> dict[str, Any]:
        return {"kind": "text", "path": str(self.path)}


@dataclass(frozen=True)
class Corpus:
    """A corpus of the registry (`peerlm.data.corpora`), fetched and cached on first use."""

    name: str
    downloader: Callable[..., Path] | None = field(default=None, compare=False, repr=False)
    root: Path | None = field(default=None, compare=False)

    def documents(self) -> Iterator[tuple[str, str]]:
        from .corpora import read_corpus

        yield from read_corpus(self.name, downloader=self.downloader, root=self.root)

    def describe(self) -> dict[str, Any]:
        from .corpora import spec

        s = spec(self.name)
        return {"kind": "corpus", "name": self.name, "registry": s.registry, "package": s.requirement,
                "sha256": s.sha256}


@dataclass(frozen=True)
class HFDataset:
    """A Hugging Face dataset, loaded as `load_dataset(name, config, split=..., data_files=...)`, or an
    already loaded `datasets.Dataset` passed as `dataset`. Each row's `text_field` is one document."""

    name: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"
    data_files: Any = None
    cache_dir: str | None = None
    dataset: Any = field(default=None, compare=False, repr=False)

    def _load(self) -> Any:
        if self.dataset is not None:
            return self.dataset
        try:
            import datasets
        except ImportError:
            raise DataError("Hugging Face datasets is not installed: pip install 'peerlm[hf]' "
                            "(or pip install datasets)") from None
        try:
            return datasets.load_dataset(self.name, self.config, split=self.split, data_files=self.data_files,
                                         cache_dir=self.cache_dir)
        except Exception as e:  # the loader raises many types (network, missing split, bad config)
            raise DataError(f"cannot load Hugging Face dataset {self.name!r}: {type(e).__name__}: {e}") \
                from None

    def documents(self) -> Iterator[tuple[str, str]]:
        ds = self._load()
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_field not in columns:
            raise DataError(f"Hugging Face dataset {self.name!r} has no column {self.text_field!r} "
                            f"(columns: {', '.join(columns)}); pick one with --hf-text-field")
        for i, row in enumerate(ds):
            text = row[self.text_field]
            if isinstance(text, str) and text.strip():
                yield f"{self.name}:{i}", text

    def describe(self) -> dict[str, Any]:
        return {"kind": "hf", "name": self.name, "config": self.config, "split": self.split,
                "text_field": self.text_field}


Source = TextFiles | Corpus | HFDataset


def as_source(x: Source | str | os.PathLike[str]) -> Source:
    """A source object; a path means its text files. Any object with ``documents()`` and
    ``describe()`` (e.g. text generated in memory) is a source too."""
    if isinstance(x, TextFiles | Corpus | HFDataset):
        return x
    if callable(getattr(x, "documents", None)) and callable(getattr(x, "describe", None)):
        return x
    if isinstance(x, str | os.PathLike):
        return TextFiles(x)
    raise TypeError(f"not a data source: {x!r} (give a path, TextFiles, Corpus or HFDataset)")
