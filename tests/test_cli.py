"""The `peerlm` command: every subcommand's --help, one real invocation each, one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from peerlm.cli import main

SUBCOMMANDS = [["data"], ["data", "prepare"], ["data", "fetch"], ["data", "list"], ["train"], ["eval"],
               ["generate"], ["export"], ["presets"], ["flops"], ["demo"], ["retrofit"]]


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


# ------------------------------------------------------------------------------------- hardening


def _tree(root: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and directory under ``root``: what a refused command must not change."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def _run_with_checkpoints(root: Path, data: Path, steps: int = 4, every: int = 2) -> Path:
    out = root / "run"
    assert main(["train", "--preset", "tiny", "--data", str(data), "--out", str(out), "--max-steps", str(steps),
                 "--quiet", "--set", "train.device=cpu", "--set", f"train.ckpt_every={every}"]) == 0
    return out


def test_a_refused_command_changes_nothing(workspace, capsys, tmp_path):
    """Resuming with another preset, a changed model field or a context the data cannot fill is refused
    before anything is written: the run stays resumable, byte for byte as it was."""
    import shutil

    r, d = tmp_path / "r", str(workspace / "d")
    shutil.copytree(workspace / "r", r)
    before = _tree(r)
    _error(capsys, ["train", "--preset", "tiny-peer", "--data", d, "--out", str(r), "--resume",
                    "--max-steps", "5"], "different model")
    _error(capsys, ["train", "--out", str(r), "--resume", "--max-steps", "5", "--set", "model.dim=64"],
           "different model")
    _error(capsys, ["train", "--out", str(r), "--resume", "--max-steps", "5",
                    "--set", "model.context_length=100000"], "need at least seq_len")
    assert _tree(r) == before
    fresh = tmp_path / "new" / "run"
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", str(fresh), "--max-steps", "2",
                    "--set", "model.context_length=100000"], "need at least seq_len")
    assert not fresh.exists() and not fresh.parent.exists()
    assert main(["train", "--out", str(r), "--resume", "--max-steps", "5", "--quiet"]) == 0  # still resumable
    assert "step 5/5" in capsys.readouterr().out


def test_runs_and_data_know_their_tokenizer(capsys, tmp_path):
    """A data directory prepared again from other text (same vocabulary size) is refused by --resume and
    eval; a directory without tokenizer.json cannot start a run; an id past the vocabulary is caught
    when the array is opened, not when a batch happens to hit it."""
    import shutil

    import numpy as np

    f, g = _text(tmp_path / "f.txt"), _text(tmp_path / "g.txt")
    g.write_text(g.read_text().replace("the", "a").replace("cat", "fish"))
    d = tmp_path / "d"
    prep = ["data", "prepare", "--out", str(d), "--vocab-size", "300", "--val-fraction", "0.1", "--quiet"]
    assert main([*prep, "--text", str(f)]) == 0
    meta = json.loads((d / "meta.json").read_text())
    r = _run_with_checkpoints(tmp_path, d, steps=2)
    assert json.loads((r / "config.json").read_text())["data"]["tokenizer_sha256"] == meta["tokenizer_sha256"]
    assert main([*prep, "--text", str(g)]) == 0  # same vocabulary size, another tokenizer
    assert json.loads((d / "meta.json").read_text())["vocab_size"] == meta["vocab_size"]
    capsys.readouterr()
    _error(capsys, ["train", "--out", str(r), "--resume", "--max-steps", "4"], "another tokenizer")
    _error(capsys, ["eval", str(r)], "another tokenizer")
    assert main(["eval", str(r), "--text", str(f), "--json"]) == 0  # text is encoded with the run's own
    capsys.readouterr()

    bare = tmp_path / "bare"
    shutil.copytree(d, bare)
    (bare / "tokenizer.json").unlink()
    _error(capsys, ["train", "--preset", "tiny", "--data", str(bare), "--out", str(tmp_path / "r2"),
                    "--max-steps", "2"], "no tokenizer.json")
    assert not (tmp_path / "r2").exists()

    broken = tmp_path / "broken"
    shutil.copytree(d, broken)
    ids = np.fromfile(broken / "train.bin", dtype=np.uint16)
    ids[len(ids) // 2] = 999  # vocabulary 300
    ids.tofile(broken / "train.bin")
    _error(capsys, ["train", "--preset", "tiny", "--data", str(broken), "--out", str(tmp_path / "r3"),
                    "--max-steps", "2"], "token id 999 at position")


NUMBER_ERRORS = [
    (["eval", "{r}", "--batch-size", "0"], "--batch-size: expected a whole number >= 1"),
    (["eval", "{r}", "--batch-size", "-2"], "--batch-size: expected a whole number >= 1"),
    (["eval", "{r}", "--max-tokens", "0"], "--max-tokens: expected a whole number >= 1"),
    (["train", "--out", "{r}", "--resume", "--max-tokens", "-5"], "--max-tokens: expected a whole number >= 1"),
    (["train", "--out", "{r}", "--resume", "--flops", "nan"], "--flops: expected a number > 0"),
    (["train", "--out", "{r}", "--resume", "--max-steps", "3", "--set", "train.batch_size=-1"],
     "TrainConfig.batch_size must be >= 1, got -1"),
    (["train", "--out", "{r}", "--resume", "--max-steps", "3", "--set", "train.lr=inf"], "give a number"),
    (["train", "--out", "{r}", "--resume", "--max-steps", "3", "--set", "train.betas=0.9"],
     "2 comma-separated values such as 0.9,0.95"),
    (["train", "--out", "{r}", "--resume", "--set", "lr=1"], "expected SECTION.FIELD=VALUE"),
    (["generate", "{r}", "--prompt", "hi", "--top-p", "0"], "--top-p: expected a number > 0 and <= 1"),
    (["generate", "{r}", "--prompt", "hi", "--temperature", "-1"], "--temperature: expected a number >= 0"),
    (["generate", "{r}", "--prompt", "hi", "--seed", "-1"], "--seed: expected a whole number >= 0"),
    (["flops", "--preset", "tiny", "--seq-len", "0"], "--seq-len: expected a whole number >= 1"),
    (["flops", "--preset", "tiny", "--set", "train.lr=1"], "with SECTION model"),
    (["demo", "--out", "{r}/demo", "--minutes", "-1"], "--minutes: expected a number > 0"),
    (["data", "prepare", "--text", "{f}", "--out", "{r}/d", "--vocab-size", "100"], "--vocab-size: expected"),
    (["data", "prepare", "--text", "{f}", "--out", "{r}/d", "--val-fraction", "1"], "--val-fraction: expected"),
]


def test_numbers_are_validated_where_they_enter(workspace, capsys, tmp_path):
    """Zero, negative and non-finite numbers are usage errors naming the flag and the accepted form
    (through --set too, with the range rather than "cannot parse"); --max-tokens applies to --text."""
    import shutil

    r, f = tmp_path / "r", workspace / "f.txt"
    shutil.copytree(workspace / "r", r)
    before = _tree(r)
    for argv, match in NUMBER_ERRORS:
        _error(capsys, [a.format(r=r, f=f) for a in argv], match)
    assert _tree(r) == before
    assert main(["eval", str(r), "--text", str(f), "--max-tokens", "20", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["tokens"] == 20 and res["bytes"] < len(f.read_bytes()) / 5
    assert main(["flops", "--preset", "tiny", "--set", "model.n_layers=1e0"]) == 0  # ints in float notation


def test_damaged_checkpoint_names_the_intact_one_and_the_command(workspace, capsys, tmp_path):
    """A damaged optimizer state does not stop eval (it reads weights only); a damaged newest checkpoint
    is refused with the intact older one and the command that works; a fallback is announced; every
    command that reads a checkpoint says which step it used."""
    import re

    r, f = _run_with_checkpoints(tmp_path, workspace / "d"), str(workspace / "f.txt")
    newest, older = r / "checkpoints" / "step_00000004", r / "checkpoints" / "step_00000002"
    state = newest / "state.safetensors"
    data = bytearray(state.read_bytes())
    data[-3] ^= 0xFF
    state.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["eval", str(r), "--text", f, "--json"]) == 0
    assert "checkpoint step 4" in capsys.readouterr().err
    line = _error(capsys, ["train", "--out", str(r), "--resume", "--max-steps", "6"], "state.safetensors is corrupt")
    assert str(older) in line and f"mv {newest} {newest}.damaged" in line
    assert f"peerlm train --out {r} --resume" in line and "from step 2" in line

    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    line = _error(capsys, ["eval", str(r), "--text", f, "--json"], "truncated")
    command = re.search(r"`(peerlm eval [^`]+)`", line).group(1)
    assert command == f"peerlm eval {older} --text {f} --json"
    assert main(command.split()[1:]) == 0
    assert "checkpoint step 2" in capsys.readouterr().err
    _error(capsys, ["generate", str(r), "--prompt", "hi"], f"peerlm generate {older} --prompt hi")

    newest.rename(newest.with_name(newest.name + ".damaged"))  # the way out train's message gives
    assert main(["generate", str(r), "--prompt", "hi", "--max-new-tokens", "2", "--seed", "0"]) == 0
    err = capsys.readouterr().err
    assert "names step_00000004, which is missing or incomplete; using step_00000002" in err
    assert "generate: checkpoint step 2" in err


def test_machine_failures_are_one_line_errors(workspace, capsys, tmp_path, monkeypatch):
    """A device this build lacks, a checkpoint write the disk refuses, a run directory whose checkpoints
    cannot be written: one line naming the device or path (and how to resume), never a traceback, and
    the unwritable case is caught before the first step."""
    import safetensors

    import peerlm.checkpoint.local as ckpt_mod

    d = str(workspace / "d")
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", str(tmp_path / "m"), "--max-steps", "2",
                    "--set", "train.device=mps"], "'mps'")
    _error(capsys, ["eval", str(workspace / "r"), "--device", "mps"], "mps")
    assert not (tmp_path / "m").exists()

    def disk_full(tensors, path):
        raise safetensors.SafetensorError(f"Error while serializing: I/O error: No space left on device "
                                          f"(os error 28) at path {path}")

    monkeypatch.setattr(ckpt_mod, "save_file", disk_full)
    out = tmp_path / "full"
    line = _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", str(out), "--max-steps", "2",
                           "--quiet", "--set", "train.device=cpu"], "No space left on device")
    assert f"{out / 'checkpoints' / 'step_00000002'}" in line and f"peerlm train --out {out} --resume" in line
    assert not list((out / "checkpoints").glob(".step_*"))
    monkeypatch.undo()

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "checkpoints").write_text("not a directory")
    before = _tree(blocked)
    _error(capsys, ["train", "--preset", "tiny", "--data", d, "--out", str(blocked), "--max-steps", "3",
                    "--set", "train.ckpt_every=0"], "checkpoints is not a directory")
    assert _tree(blocked) == before  # refused before the first step: no metrics, no config


def test_eval_shows_progress_unless_quiet(workspace, capsys, monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    argv = ["eval", str(workspace / "r"), "--text", str(workspace / "f.txt"), "--batch-size", "1"]
    for quiet in (False, True):
        term = Terminal()
        monkeypatch.setattr(sys, "stderr", term)
        assert main(argv + ["--quiet"] * quiet) == 0
        monkeypatch.undo()
        assert ("eval f.txt" in term.getvalue() and "tok" in term.getvalue()) != quiet, term.getvalue()


def test_debug_anywhere_and_presets_stay_aligned(capsys, tmp_path):
    import re

    from peerlm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError):
        main(["eval", str(tmp_path / "norun"), "--debug"])
    with pytest.raises(CheckpointError):
        main(["eval", "--debug", str(tmp_path / "norun")])
    assert main(["presets"]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = lines[: lines.index("")]
    assert "table params" in table[0] and any("PEER expert" in line for line in lines)
    cells = [[m.span() for m in re.finditer(r"\S+(?: \S+)*", line)] for line in table]
    assert len({len(c) for c in cells}) == 1, table  # no two columns run together
    for col in range(1, 5):  # the number columns are right-aligned: every cell ends where the header's does
        assert len({c[col][1] for c in cells}) == 1, (col, table)


def test_version_and_a_closed_pipe():
    r = subprocess.run([sys.executable, "-m", "peerlm", "--version"], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip().startswith("peerlm ")
    # a reader that stops early (`peerlm presets | head -1`): no error, exit 0
    p = subprocess.Popen([sys.executable, "-m", "peerlm", "presets"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.readline()
    p.stdout.close()
    assert p.wait(timeout=60) == 0 and p.stderr.read() == b""


def test_seed_must_not_be_negative(workspace, capsys, tmp_path):
    _error(capsys, ["train", "--preset", "tiny", "--data", str(workspace / "d"), "--out", str(tmp_path / "r"),
                    "--max-steps", "2", "--set", "train.seed=-1"], "seed must be a whole number in [0, 2**63)")
    assert not (tmp_path / "r").exists()


def test_generate_refuses_a_prompt_that_is_not_utf8(workspace, capsys):
    # argv decodes bytes of another encoding to lone surrogates
    _error(capsys, ["generate", str(workspace / "r"), "--prompt", "caf\udce9", "--max-new-tokens", "2"],
           "--prompt is not UTF-8")


def test_resume_past_the_run_length_and_at_its_end(workspace, capsys, tmp_path):
    """A run at step 4 resumed with --max-steps 2 is refused before any write; resumed at its own length
    it says there was nothing to train."""
    r = _run_with_checkpoints(tmp_path, workspace / "d", steps=4)
    capsys.readouterr()
    before = _tree(r)
    _error(capsys, ["train", "--out", str(r), "--resume", "--max-steps", "2", "--quiet"], "past the 2 steps")
    assert _tree(r) == before
    assert main(["train", "--out", str(r), "--resume", "--quiet"]) == 0
    assert "nothing to train" in capsys.readouterr().out


def test_resume_without_config_json_reads_the_checkpoint(workspace, capsys, tmp_path):
    r = _run_with_checkpoints(tmp_path, workspace / "d", steps=2)
    (r / "config.json").unlink()
    assert main(["train", "--out", str(r), "--resume", "--max-steps", "4", "--quiet"]) == 0
    assert "step 4/4" in capsys.readouterr().out and (r / "config.json").is_file()


def test_interrupted_rank_prints_the_torchrun_resume_command(monkeypatch):
    from peerlm.cli import _resume_command

    assert _resume_command("runs/x") == "peerlm train --out runs/x --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _resume_command("runs/x") == "torchrun --nnodes=2 --nproc_per_node=2 -m peerlm train --out runs/x --resume"
