"""User text reading, tokenizer round trip, and `prepare`: determinism, the split modes, meta counts."""

from __future__ import annotations

import functools
import importlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from peerlm.data import EOT, DataError, HFDataset, TextFiles, load_tokenizer, prepare, read_text_file
from peerlm.data.prepare import (
    FORMAT_VERSION,
    MAX_DOC_SHARE,
    _unit_hash,
    resolve_split_by,
    split_documents,
    token_dtype,
    train_tokenizer,
)

WORDS = [
    "the",
    "state",
    "of",
    "union",
    "whale",
    "ship",
    "café",
    "naïve",
    "über",
    "日本",
    "emoji🤖",
    "—",
    "can't",
    "said",
    "and",
    "was",
    "sea",
    "Ahab",
    "truth",
    "law",
]
_rng = random.Random(42)
WORDS += [
    "".join(_rng.choice("abcdefghijklmnopqrstuvwxyzéø") for _ in range(_rng.randint(3, 9)))
    for _ in range(300)
]


def make_doc(rng: random.Random, paragraphs: int = 6) -> str:
    paras = []
    for _ in range(paragraphs):
        sentences = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 15))).capitalize() + "."
            for _ in range(rng.randint(2, 5))
        ]
        paras.append(" ".join(sentences))
    return "\n\n".join(paras)


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    rng = random.Random(0)
    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        (root / ("sub" if i % 3 else "") / f"doc{i:02d}.txt").write_text(make_doc(rng), encoding="utf-8")
    (root / "notes.md").write_text("# Notes\n\nMarkdown counts as text too.\n", encoding="utf-8")
    (root / "skip.bin").write_bytes(b"\x00\x01")  # not a text suffix: ignored in folders
    (root / ".hidden.txt").write_text("hidden", encoding="utf-8")
    return root


def test_read_text_file_errors_name_the_file(tmp_path: Path) -> None:
    cases = {
        "empty.txt": b"",
        "blank.txt": b" \n\t\n",
        "nul.txt": b"text\x00more",
        "latin1.txt": "café".encode("latin-1"),
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    for name, why in [
        ("empty.txt", "empty"),
        ("blank.txt", "empty"),
        ("nul.txt", "binary"),
        ("latin1.txt", "UTF-8"),
    ]:
        with pytest.raises(DataError) as e:
            read_text_file(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and why in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(DataError, match="no such file"):
        read_text_file(tmp_path / "missing.txt")
    (tmp_path / "crlf.txt").write_bytes("\ufeffa\r\nb\r\n".encode())
    assert read_text_file(tmp_path / "crlf.txt") == "a\nb\n"


def test_folder_is_walked_recursively_for_text_files(corpus_dir: Path) -> None:
    ids = [doc_id for doc_id, _ in TextFiles(corpus_dir).documents()]
    assert len(ids) == 31 and "notes.md" in ids and "sub/doc01.txt" in ids
    assert ".hidden.txt" not in ids and "skip.bin" not in ids and ids == sorted(ids)
    (corpus_dir / "empty").mkdir()
    with pytest.raises(DataError, match="no text files"):
        list(TextFiles(corpus_dir / "empty").documents())


@functools.lru_cache(maxsize=1)
def small_tokenizer() -> Tokenizer:
    rng = random.Random(1)
    return train_tokenizer([make_doc(rng) for _ in range(20)], vocab_size=400, progress=False)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200))
def test_tokenizer_round_trips_any_unicode(text: str) -> None:
    tok = small_tokenizer()
    assert tok.decode(tok.encode(text).ids) == text


def test_tokenizer_round_trip_mixed_sample_and_literal_eot() -> None:
    tok = small_tokenizer()
    text = f"Ünïcödé 日本語 🤖 tabs\tand\r\nCRLF {EOT} inside text, \x00 NUL, \u200b zero-width."
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    assert tok.token_to_id(EOT) not in ids  # a literal separator in user text stays text
    assert tok.get_vocab_size() == 400 and tok.token_to_id(EOT) == 0


def test_vocab_size_is_validated() -> None:
    with pytest.raises(DataError, match="at least 257"):
        train_tokenizer(["abc"], vocab_size=100, progress=False)
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def _files(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _pieces(out: Path, split: str, meta: dict) -> list[str]:
    tok = load_tokenizer(out)
    ids = np.fromfile(out / meta["splits"][split]["file"], dtype=meta["dtype"]).tolist()
    pieces, cur = [], []
    for i in ids:
        if i == meta["eot_id"]:
            pieces.append(tok.decode(cur))
            cur = []
        else:
            cur.append(i)
    assert not cur, "every piece ends with the separator"
    return pieces


def test_prepare_is_deterministic_and_meta_counts_bytes(corpus_dir: Path, tmp_path: Path) -> None:
    notes = tmp_path / "held_out.txt"
    notes.write_text("A held-out note about the sea.\n\nAnd a second paragraph.", encoding="utf-8")
    kw = dict(
        vocab_size=500,
        val_fraction=0.1,
        eval_sets={"notes": TextFiles(notes)},
        seed=0,
        segment_chars=512,
        progress=False,
    )
    meta = prepare([corpus_dir], tmp_path / "a", **kw)
    prepare([corpus_dir], tmp_path / "b", **kw)
    files = _files(tmp_path / "a")
    assert set(files) == {"tokenizer.json", "train.bin", "val.bin", "eval/notes.bin", "meta.json"}
    assert files == _files(tmp_path / "b")  # byte-identical, every file
    assert meta == json.loads(files["meta.json"]) and meta["dtype"] == "uint16" and meta["vocab_size"] == 500
    sources_text = [t for _, t in TextFiles(corpus_dir).documents()]
    for split in ("train", "val", "notes"):
        info = meta["splits"][split]
        pieces = _pieces(tmp_path / "a", split, meta)
        assert info["tokens"] * 2 == len(files[info["file"]]) and info["pieces"] == len(pieces) > 0
        assert info["bytes"] == sum(len(p.encode("utf-8")) for p in pieces)
    train, val = _pieces(tmp_path / "a", "train", meta), _pieces(tmp_path / "a", "val", meta)
    assert all(any(v in doc for doc in sources_text) for v in val)  # val pieces are verbatim source text
    assert not any(v in t for v in val for t in train)  # and never appear in training text
    total = sum(len(t.strip().encode("utf-8")) for t in sources_text)
    assert 0.05 * total < meta["splits"]["val"]["bytes"] < 0.2 * total
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] <= total
    assert _pieces(tmp_path / "a", "notes", meta) == [notes.read_text("utf-8")]
    assert set(val) <= {t.strip() for t in sources_text}  # 31 documents: auto holds out whole ones
    split = {"by": "document", "documents": 31, "val_documents": len(val),
             "train_bytes": meta["splits"]["train"]["bytes"], "val_bytes": meta["splits"]["val"]["bytes"]}
    assert meta["sources"] == [{"kind": "text", "path": str(corpus_dir), "val_split": split}]
    assert meta["format"] == FORMAT_VERSION == 2 and meta["split_by"] == "auto"


@pytest.mark.parametrize("split_by", ["document", "tail", "segment"])
def test_split_depends_on_seed_not_on_order(split_by: str) -> None:
    rng = random.Random(2)
    docs = [make_doc(rng) for _ in range(40)]
    _, val0 = split_documents(docs, 0.2, seed=0, segment_chars=256, split_by=split_by)
    _, val0_rev = split_documents(docs[::-1], 0.2, seed=0, segment_chars=256, split_by=split_by)
    _, val1 = split_documents(docs, 0.2, seed=1, segment_chars=256, split_by=split_by)
    assert sorted(val0) == sorted(val0_rev)
    assert (sorted(val0) == sorted(val1)) == (split_by == "tail")  # tails do not depend on the seed


def test_document_mode_never_splits_a_document() -> None:
    rng = random.Random(4)
    docs = [make_doc(rng, rng.randint(1, 12)) for _ in range(60)]
    docs += [make_doc(rng, 150), docs[0], docs[1]]  # one large document, two exact duplicates
    total = sum(len(d) for d in docs)
    for seed in range(5):
        train, val = split_documents(docs, 0.05, seed=seed, split_by="document")
        assert sorted(train + val) == sorted(docs)  # every piece is one whole document
        assert (docs[0] in val) == (docs[-2] in val) and (docs[1] in val) == (docs[-1] in val)
        assert docs[-3] not in val  # over 4x the target share: never held out
        held = sum(len(v) for v in val)
        assert 0.05 * total <= held < 0.05 * total + max(len(v) for v in val)
    with pytest.raises(DataError, match="no document is small enough"):
        split_documents([make_doc(rng, 20) for _ in range(3)], 0.05, split_by="document")
    assert MAX_DOC_SHARE * 0.05 < 1 / 3


def test_tail_mode_holds_out_the_end_of_every_document() -> None:
    rng = random.Random(5)
    docs = [make_doc(rng, rng.randint(40, 120)) for _ in range(6)]
    train, val = split_documents(docs, 0.05, split_by="tail")
    assert len(train) == len(val) == len(docs)
    for doc, head, tail in zip(docs, train, val):
        cut = len(doc) - len(tail)
        assert doc.startswith(head) and doc.endswith(tail) and doc[:cut].endswith("\n\n")  # a paragraph break
        assert doc[len(head) : cut].strip() == ""  # nothing lost between them
        assert 0.025 < len(tail) / len(doc) < 0.1
    share = sum(len(t) for t in val) / sum(len(d) for d in docs)
    assert 0.04 < share < 0.06


def _write_docs(root: Path, docs: list[str]) -> Path:
    root.mkdir(parents=True)
    for i, d in enumerate(docs):
        (root / f"d{i:03d}.txt").write_text(d, encoding="utf-8")
    return root


def test_auto_picks_per_source_and_records_it(tmp_path: Path) -> None:
    rng = random.Random(6)
    many = _write_docs(tmp_path / "many", [make_doc(rng, 3) for _ in range(25)])  # 25 short: by document
    few = _write_docs(tmp_path / "few", [make_doc(rng, 40) for _ in range(3)])  # 3 long: their tails
    skewed = _write_docs(tmp_path / "skewed", [make_doc(rng, 1) for _ in range(24)] + [make_doc(rng, 200)])
    sources = [many, few, skewed]
    assert [resolve_split_by([t for _, t in TextFiles(s).documents()], 0.1) for s in sources] == [
        "document", "tail", "tail"]  # skewed: one document holds most of the text
    assert resolve_split_by(["a"], 0.0, "document") == "none"
    kw = dict(vocab_size=300, val_fraction=0.1, progress=False)
    meta = prepare(sources, tmp_path / "a", **kw)
    prepare(sources, tmp_path / "b", **kw)
    assert _files(tmp_path / "a") == _files(tmp_path / "b")
    records = [s["val_split"] for s in meta["sources"]]
    assert [r["by"] for r in records] == ["document", "tail", "tail"]
    assert [r["documents"] for r in records] == [25, 3, 25] and records[1]["val_documents"] == 3
    for r in records:  # each source gives about its own share
        assert 0.05 < r["val_bytes"] / (r["train_bytes"] + r["val_bytes"]) < 0.2
    assert sum(r["val_bytes"] for r in records) == meta["splits"]["val"]["bytes"]
    val = _pieces(tmp_path / "a", "val", meta)
    assert val == sorted(val, key=lambda p: (_unit_hash(0, p), p))  # sources mixed, in hash order
    seg = prepare(sources, tmp_path / "c", split_by="segment", **kw)
    assert [s["val_split"]["by"] for s in seg["sources"]] == ["segment"] * 3 and seg["split_by"] == "segment"
    with pytest.raises(DataError, match="split_by must be one of"):
        prepare(sources, tmp_path / "d", split_by="book", **kw)


def test_tiny_inputs(tmp_path: Path) -> None:
    one = tmp_path / "one.txt"
    one.write_text("Just one short line.", encoding="utf-8")
    with pytest.raises(DataError, match="too little text"):
        prepare([one], tmp_path / "x", vocab_size=300, progress=False)
    meta = prepare([one], tmp_path / "y", vocab_size=300, val_fraction=0.0, progress=False)
    assert meta["splits"]["val"]["tokens"] == 0 and (tmp_path / "y" / "val.bin").stat().st_size == 0
    assert meta["sources"][0]["val_split"]["by"] == "none"
    two = tmp_path / "two.txt"
    two.write_text("First paragraph here.\n\nSecond paragraph there.", encoding="utf-8")
    for split_by in ("auto", "tail", "segment"):  # 1% of one short text: its last paragraph anyway
        train, val = split_documents([two.read_text()], 0.01, segment_chars=20, split_by=split_by)
        assert train == ["First paragraph here."] and val == ["Second paragraph there."]
    with pytest.raises(DataError, match="one distinct document"):
        split_documents([two.read_text()], 0.01, split_by="document")
    # neither source gives 1% on its own: the larger one (two.txt) gives the validation text
    meta = prepare([one, two], tmp_path / "z", vocab_size=300, progress=False)
    assert [s["val_split"]["val_bytes"] for s in meta["sources"]] == [0, len("Second paragraph there.")]


def test_prepare_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError, match="empty.txt: file is empty"):
        prepare([tmp_path / "empty.txt"], tmp_path / "out", progress=False)
    (tmp_path / "ok.txt").write_text("Fine text.\n\nMore text.", encoding="utf-8")
    with pytest.raises(DataError, match="bad eval set name"):
        prepare(
            [tmp_path / "ok.txt"], tmp_path / "out", eval_sets={"val": tmp_path / "ok.txt"}, progress=False
        )
    with pytest.raises(DataError, match="no training sources"):
        prepare([], tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()


def test_hf_missing_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as if not installed
    with pytest.raises(DataError, match=r"pip install 'peerlm\[hf\]'"):
        list(HFDataset("anything").documents())


def test_hf_datasets_source(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    rng = random.Random(3)
    rows = [make_doc(rng, 2) for _ in range(20)] + [""]
    ds = datasets.Dataset.from_dict({"body": rows, "n": list(range(len(rows)))})
    src = HFDataset("local", text_field="body", dataset=ds)
    assert [t for _, t in src.documents()] == rows[:-1]  # empty rows skipped
    with pytest.raises(DataError, match="no column 'text'"):
        list(HFDataset("local", dataset=ds).documents())
    f = tmp_path / "lines.txt"
    f.write_text("\n".join(rows[:-1]).replace("\n\n", " "), encoding="utf-8")
    loaded = HFDataset("text", data_files=str(f), cache_dir=str(tmp_path / "hf"))
    assert len(list(loaded.documents())) == 20
    meta = prepare([src, loaded], tmp_path / "out", vocab_size=300, val_fraction=0.1, progress=False)
    assert {k: v for k, v in meta["sources"][0].items() if k != "val_split"} == {
        "kind": "hf",
        "name": "local",
        "config": None,
        "split": "train",
        "text_field": "body",
    }
    assert meta["sources"][0]["val_split"]["by"] == "document"  # 20 rows
    assert meta["splits"]["train"]["tokens"] > 0


def test_vocab_size_the_text_cannot_fill_is_said(corpus_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from peerlm.data.cli import main_data

    prep = ["data", "prepare", "--text", str(corpus_dir), "--vocab-size", "100000000"]
    assert main_data([*prep, "--out", str(tmp_path / "big")]) == 0
    meta = json.loads((tmp_path / "big" / "meta.json").read_text())
    actual = meta["vocab_size"]
    assert 257 <= actual < 100_000_000 == meta["requested_vocab_size"] and meta["dtype"] == "uint16"
    note = f"note: the text gives only {actual:,} tokens; vocab_size is {actual:,}, not 100,000,000"
    assert note in capsys.readouterr().err.splitlines()
    assert main_data([*prep, "--out", str(tmp_path / "quiet"), "--quiet"]) == 0  # said in its one line
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"prepared {tmp_path / 'quiet'} (vocab_size is {actual:,}, not 100,000,000: "
                                f"the text gives only {actual:,} tokens)"] and err == ""
    prepare([corpus_dir], tmp_path / "small", vocab_size=300)
    assert "note:" not in capsys.readouterr().err  # a vocabulary the text fills: nothing to say


def _full_disk_at(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make prepare's write of file `name` fail as a full disk does, after half of it was written."""
    module = importlib.import_module("peerlm.data.prepare")  # `peerlm.data.prepare` is the function
    real = module._write_file

    def write(path: Path, data) -> None:
        if Path(path).name != name:
            return real(path, data)
        view = memoryview(data).cast("B")
        Path(path).write_bytes(view[: len(view) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(module, "_write_file", write)


def test_full_disk_is_one_line_and_leaves_nothing(corpus_dir: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    kw = dict(vocab_size=300, val_fraction=0.1, progress=False)
    old = tmp_path / "old"
    prepare([corpus_dir], old, **kw)
    (old / "mine.txt").write_text("a file of the user's")
    before = _files(old)
    with monkeypatch.context() as m:
        _full_disk_at("val.bin", m)  # tokenizer.json and train.bin written, val.bin half
        for out in (tmp_path / "new" / "nested", old):
            with pytest.raises(DataError) as e:
                prepare([corpus_dir], out, **{**kw, "seed": 1})
            msg = str(e.value)
            assert "No space left on device" in msg and str(out / "val.bin") in msg and "\n" not in msg
        assert not (tmp_path / "new").exists()  # the directories this call made are gone again
        assert _files(old) == before  # the directory the user had is as it was
        assert sorted(p.name for p in old.iterdir()) == ["meta.json", "mine.txt", "tokenizer.json", "train.bin",
                                                         "val.bin"]
    from peerlm.data import TokenDataset

    assert TokenDataset(old).tokens("train").size == json.loads(before["meta.json"])["splits"]["train"]["tokens"]


def test_full_disk_through_the_cli(corpus_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from peerlm.data.cli import main_data

    _full_disk_at("tokenizer.json", monkeypatch)
    out = tmp_path / "out"
    assert main_data(["data", "prepare", "--text", str(corpus_dir), "--out", str(out), "--vocab-size", "300",
                      "--quiet"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: could not write {out / 'tokenizer.json'}: No space left on device; nothing was "
                   "written (free space on that disk or choose another --out)"]
    assert not out.exists()


def test_output_that_cannot_be_a_directory_is_refused_before_any_work(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    prepare_module = importlib.import_module("peerlm.data.prepare")
    (tmp_path / "ok.txt").write_text("Fine text.\n\nMore text.", encoding="utf-8")
    (tmp_path / "afile").write_text("x")
    monkeypatch.setattr(prepare_module, "_load", lambda *a: pytest.fail("read the sources first"))
    for out in (tmp_path / "afile", tmp_path / "afile" / "sub"):
        with pytest.raises(DataError, match=f"{tmp_path / 'afile'} is a file, not a directory"):
            prepare([tmp_path / "ok.txt"], out, progress=False)
    assert (tmp_path / "afile").read_text() == "x"
