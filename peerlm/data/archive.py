"""Read files straight out of package archives, without installing or unpacking them to disk.

Three formats carry the corpora: npm tarballs (`.tgz`, members under `package/`), Python wheels (zip)
and Debian packages (`.deb`: an `ar` archive whose `data.tar.*` member holds the file system). The
format is told from the file's magic bytes, not its name, so a renamed or temporary file still works.
The `ar` container is parsed here in Python (it is a 60-byte header per member); only a `data.tar.zst`
member, which Python's `tarfile` cannot decompress, falls back to `dpkg-deb --fsys-tarfile`.
Member names are returned without a leading `./`.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

from tqdm import tqdm

from .errors import DataError

AR_MAGIC = b"!<arch>\n"
AR_HEADER = 60


def archive_format(path: Path) -> str:
    """'zip', 'deb' or 'tar', from the first bytes of the file."""
    with open(path, "rb") as f:
        head = f.read(8)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head == AR_MAGIC:
        return "deb"
    try:
        with tarfile.open(path, "r:*"):
            return "tar"
    except tarfile.TarError:
        pass
    raise DataError(f"{path}: not a zip/wheel, .deb or tar archive; was the right file downloaded?")


def ar_members(data: bytes) -> Iterator[tuple[str, bytes]]:
    """(name, content) of each member of an `ar` archive (the container format of `.deb`)."""
    if not data.startswith(AR_MAGIC):
        raise DataError("not an ar archive (bad magic); the .deb file is corrupt")
    pos = len(AR_MAGIC)
    while pos + AR_HEADER <= len(data):
        header = data[pos : pos + AR_HEADER]
        if header[58:60] != b"`\n":
            raise DataError(f"corrupt ar member header at byte {pos}; the .deb file is damaged")
        name = header[:16].decode("ascii").strip().rstrip("/")
        size = int(header[48:58].decode("ascii").strip())
        start = pos + AR_HEADER
        if start + size > len(data):
            raise DataError(f"ar member {name!r} is truncated; the .deb file is incomplete")
        yield name, data[start : start + size]
        pos = start + size + (size % 2)  # members are padded to an even offset


def _deb_data_tar(path: Path) -> tarfile.TarFile:
    for name, content in ar_members(path.read_bytes()):
        if not name.startswith("data.tar"):
            continue
        if name.endswith(".zst"):
            if shutil.which("dpkg-deb") is None:
                raise DataError(f"{path}: data.tar.zst needs dpkg-deb to read; install dpkg")
            out = subprocess.run(["dpkg-deb", "--fsys-tarfile", str(path)], capture_output=True, check=False)
            if out.returncode != 0:
                err = out.stderr.decode(errors="replace").strip()
                raise DataError(f"dpkg-deb --fsys-tarfile {path} failed: {err}")
            content = out.stdout
        return tarfile.open(fileobj=io.BytesIO(content), mode="r:*")
    raise DataError(f"{path}: no data.tar member; not a Debian binary package")


def _tar_members(tf: tarfile.TarFile, match: Callable[[str], bool]) -> Iterator[tuple[str, bytes]]:
    with tf:
        for m in tf:  # sequential: a compressed tar is read in one pass
            name = m.name.removeprefix("./")
            if m.isfile() and match(name):
                f = tf.extractfile(m)
                assert f is not None
                yield name, f.read()


def iter_members(
    path: str | Path, match: Callable[[str], bool], desc: str | None = None, progress: bool = True
) -> Iterator[tuple[str, bytes]]:
    """Yield (name, bytes) for every regular file in the archive whose name satisfies `match`.

    Order is the archive's own order, which is fixed for a pinned package; callers that care sort.
    """
    path = Path(path)
    fmt = archive_format(path)
    if fmt == "zip":
        zf = zipfile.ZipFile(path)

        def gen() -> Iterator[tuple[str, bytes]]:
            with zf:
                for info in zf.infolist():
                    if not info.is_dir() and match(info.filename):
                        yield info.filename, zf.read(info)

        members = gen()
    elif fmt == "deb":
        members = _tar_members(_deb_data_tar(path), match)
    else:
        members = _tar_members(tarfile.open(path, "r:*"), match)
    yield from tqdm(members, desc=desc or f"reading {path.name}", unit=" files", disable=not progress,
                    leave=False)
