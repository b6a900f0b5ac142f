"""The `peerlm` command: every subcommand's --help, one real invocation each, one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peerlm.cli import main

SUBCOMMANDS = [["data"], ["data", "prepare"], ["data", "fetch"], ["data", "list"], ["train"], ["eval"],
               ["generate"], ["presets"], ["flops"], ["demo"]]


def _text(path: Path, n: int = 40) -> Path:
    from test_train import write_text

    return write_text(path, paragraphs=n)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny text, its prepared directory and a 3-step run, made with the CLI itself."""
    root = tmp_path_factory.mktemp("cli")
    f = _text(root / "f.txt")
    assert main(["data", "prepare", "--text", str(f), "--out", str(root / "d"), "--vocab-size", "300",
                 "--val-fraction", "0.1", "--quiet"]) == 0
    assert main(["train", "--preset", "tiny", "--data", str(root / "d"), "--out", str(root / "r"),
                 "--max-steps", "3", "--quiet", "--set", "train.device=cpu"]) == 0
    return root


def _error(capsys, argv: list[str], match: str) -> str:
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("peerlm: error: "), err
    assert "Traceback" not in err and match in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("cmd", SUBCOMMANDS, ids=" ".join)
def test_help(capsys, cmd):
    assert main([*cmd, "--help"]) == 0
    assert "usage: peerlm" in capsys.readouterr().out


def test_train_eval_generate(workspace, capsys):
    r, f = workspace / "r", workspace / "f.txt"
    for name in ("config.json", "tokenizer.json", "metrics.jsonl"):
        assert (r / name).is_file()
    config = json.loads((r / "config.json").read_text())
    assert config["data"]["dir"] == str((workspace / "d").resolve())
    assert config["data"]["splits"]["train"]["bytes"] > 0 and config["model"]["vocab_size"] == 300
    capsys.readouterr()
    assert main(["eval", str(r), "--text", str(f), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["perplexity"] > 1 and 0 < res["bits_per_byte"] < 20 and res["bytes"] == len(f.read_bytes())
    assert main(["eval", str(r), "--text", str(f)]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert main(["eval", str(r), "--json"]) == 0  # the run's own held-out split
    assert "perplexity" in json.loads(capsys.readouterr().out)
    assert main(["generate", str(r), "--prompt", "hi", "--max-new-tokens", "5", "--seed", "0"]) == 0
    assert capsys.readouterr().out.startswith("hi")


def test_resume_continues_with_the_stored_config(workspace, capsys, tmp_path):
    import shutil

    r = tmp_path / "r"
    shutil.copytree(workspace / "r", r)
    assert main(["train", "--out", str(r), "--resume", "--max-steps", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "step 5/5" in out


def test_presets_and_flops(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "peer-small" in out and "dense-small" in out and "train FLOPs/tok" in out
    assert main(["flops", "--preset", "peer-small"]) == 0
    out = capsys.readouterr().out
    assert "block 1 peer" in out and "train FLOPs/token" in out


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import sys; from peerlm.cli import main; sys.exit(main())",
                           "presets", "--bogus"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "unrecognized" in proc.stderr


def test_user_errors_are_one_line(workspace, capsys, tmp_path):
    d, r, f = str(workspace / "d"), str(workspace / "r"), str(workspace / "f.txt")
    out = str(tmp_path / "new")
    _error(capsys, ["train", "--preset", "nope", "--data", d, "--out", out], "unknown preset 'nope'")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", out, "--bogus"], "unrecognized")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", out, "--set", "model.dim=abc"], "dim")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", out, "--set", "train.lr=x"], "lr")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", out, "--set", "dim=3"], "model.dim")
    missing = str(tmp_path / "missing")
    _error(capsys, ["train", "--preset", "tiny", "--data", missing, "--out", out], "meta.json")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", out, "--flops", "1e9", "--max-steps", "3"],
           "--max-steps and --flops")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", out, "--flops", "1e9",
                    "--set", "train.max_steps=3"], "--flops and --set train.max_steps")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", out], "no run length")
    _error(capsys, ["eval", r, "--device", "cuda:7"], "--device")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", r, "--max-steps", "3"], "--resume")
    _error(capsys, ["train", "--preset", "tiny-peer", "--data", d, "--out", r, "--resume",
                    "--max-steps", "3"], "different model")
    empty, binary = tmp_path / "empty.txt", tmp_path / "bin.txt"
    empty.write_text("")
    binary.write_bytes(b"abc\x00\x01def")
    _error(capsys, ["eval", r, "--text", str(empty)], "empty")
    _error(capsys, ["eval", r, "--text", str(binary)], "binary")
    _error(capsys, ["eval", str(tmp_path / "norun")], "no such run")
    long_prompt = " ".join(["word"] * 200)
    _error(capsys, ["generate", r, "--prompt", long_prompt, "--max-new-tokens", "1"], "context")
    # a data directory with a larger vocabulary than the model: ids out of range
    assert main(["data", "prepare", "--text", f, "--out", str(tmp_path / "d2"), "--vocab-size", "400",
                 "--quiet"]) == 0
    _error(capsys, ["eval", r, "--data", str(tmp_path / "d2")], "token ids")
    # a corrupt checkpoint
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(r, broken)
    ckpt = broken / "checkpoints" / (broken / "checkpoints" / "latest").read_text().strip()
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    _error(capsys, ["eval", str(broken), "--text", f], "truncated")
    _error(capsys, ["generate", str(broken), "--prompt", "hi"], "truncated")


def test_debug_shows_the_traceback(tmp_path, monkeypatch):
    from peerlm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        main(["--debug", "eval", str(tmp_path / "norun")])
    monkeypatch.setenv("PEERLM_DEBUG", "1")
    with pytest.raises(CheckpointError):
        main(["eval", str(tmp_path / "norun")])


def test_demo_end_to_end_offline_and_reused(tmp_path, monkeypatch, capsys):
    """The demo's flow on local text (no download): prepared data is reused, both runs train at one
    FLOP budget, the side-by-side table is printed; a second call reuses everything."""
    import peerlm.demo as demo
    from peerlm.config import apply_overrides, get_preset
    from peerlm.data import prepare
    from peerlm.flops import model_cost

    out = tmp_path / "demo"
    held = _text(tmp_path / "held.txt", n=10)
    prepare([_text(tmp_path / "train.txt", n=80)], out / "data", vocab_size=300, val_fraction=0.1,
            eval_sets={"wiki": held}, progress=False)
    monkeypatch.setattr(demo, "PRESETS", ("tiny", "tiny-peer"))
    monkeypatch.setattr(demo, "VOCAB", 300)
    tokens_per_step = 8 * get_preset("tiny").context_length
    per_token = model_cost(apply_overrides(get_preset("tiny-peer"), ["vocab_size=300"]))["flops_train"]
    monkeypatch.setattr(demo, "DEFAULT_FLOPS", 12.5 * tokens_per_step * per_token)
    result = demo.run_demo(out, progress=False)
    printed = capsys.readouterr().out
    assert "Dense vs PEER at the same training budget" in printed and "wiki" in printed
    assert result["summaries"]["tiny-peer"]["step"] == 12
    assert set(result["results"]["tiny"]) == {"val", "wiki"}
    demo.run_demo(out, progress=False)
    again = capsys.readouterr().out
    assert again.count("reusing") == 3 and "training" not in again.replace("training budget", "")
