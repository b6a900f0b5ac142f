"""A property of the whole command line: over `train`, `eval`, `generate`, `flops` and `data prepare`
with tiny inputs and values drawn from each option's edge cases (zero, negative, non-finite, junk,
missing and wrong paths, valid), every invocation exits 0 or 2, never shows a traceback, and one that
exits 2 says so in one line and leaves the run and data directories byte-identical.

Bounded for the default run: a few dozen examples, derandomized (the same ones every run), runs of
at most a few steps of the tiny presets.
"""

from __future__ import annotations

import contextlib
import io
import itertools
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from peerlm.cli import main

# per option: values a careful user gives, and values a hostile one does
WHOLE = (["1", "2", "1e0"], ["0", "-1", "2.5", "1e400", "nan", "x", ""])
REAL = (["0.5", "1e-3"], ["0", "-1", "nan", "inf", "1e400", "x"])
SETS = (["train.batch_size=2", "train.betas=0.9,0.95", "train.warmup=none", "train.device=cpu",
         "train.ckpt_every=0", "model.n_layers=1", "model.ffn=peer", "train.lr=3e-3"],
        ["train.batch_size=-1", "train.lr=nan", "train.lr=inf", "train.betas=0.9", "train.device=mps",
         "model.dim=abc", "model.dim=-4", "model.context_length=100000", "lr=1", "model.=3", "train.keep=0",
         "train.max_steps=2", "model.vocab_size=100", "model.placement=[7]", "train.dtype=bfloat16",
         "train.device=cuda:3"])


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A text, its prepared directory and a 2-step run, and a counter for fresh output paths."""
    from test_train import write_text

    root = tmp_path_factory.mktemp("world")
    write_text(root / "f.txt", paragraphs=30)
    (root / "empty.txt").write_text("")
    (root / "fresh").mkdir()
    assert main(["data", "prepare", "--text", str(root / "f.txt"), "--out", str(root / "d"), "--vocab-size", "300",
                 "--val-fraction", "0.1", "--quiet"]) == 0
    assert main(["train", "--preset", "tiny", "--data", str(root / "d"), "--out", str(root / "r"), "--max-steps",
                 "2", "--quiet", "--set", "train.device=cpu"]) == 0
    return root, itertools.count()


def _paths(argv: list[str], root: Path, counter: itertools.count) -> list[str]:
    """Replace the placeholders of an invocation by the world's paths; each {fresh} is a new one."""
    places = {"{run}": root / "r", "{data}": root / "d", "{text}": root / "f.txt", "{missing}": root / "missing",
              "{empty}": root / "empty.txt"}
    return [str(root / "fresh" / f"o{next(counter)}") if a == "{fresh}" else str(places.get(a, a)) for a in argv]


def _pick(draw, choices: tuple[list, list], hostile: bool) -> object:
    """A value of (careful, hostile): for a hostile user, either kind."""
    careful, bad = choices
    return draw(st.sampled_from(careful + bad if hostile and bad else careful))


def _options(draw, table: dict[str, tuple[list, list]], hostile: bool, always: tuple[str, ...] = ()) -> list[str]:
    """Options of ``table`` (those in ``always`` and some others), each with a drawn value, in a drawn order."""
    names = list(always) + draw(st.lists(st.sampled_from(sorted(set(table) - set(always))), unique=True,
                                         max_size=3))
    names = draw(st.permutations(names))
    argv = []
    for name in names:
        value = _pick(draw, table[name], hostile)
        argv += [name] if value is None else [name, value]
    return argv


def _sets(draw, hostile: bool) -> list[str]:
    return [a for _ in range(draw(st.integers(0, 2))) for a in ("--set", _pick(draw, SETS, hostile))]


@st.composite
def invocations(draw) -> list[str]:
    command = draw(st.sampled_from(["train", "eval", "generate", "flops", "prepare"]))
    hostile = draw(st.booleans())  # half the users only give values that make sense
    if command == "train":
        argv = ["train", "--quiet", "--out", _pick(draw, (["{fresh}", "{run}"], ["{data}", "{text}"]), hostile)]
        length = draw(st.sampled_from(["--max-steps", "--max-tokens", "--flops"]))
        argv += _options(draw, {
            "--preset": (["tiny", "tiny-peer"], ["nope"]), "--data": (["{data}"], ["{missing}", "{run}"]),
            "--resume": ([None], []), "--max-steps": (["1", "3"], ["0", "-3", "x", "nan"]),
            "--max-tokens": (["512", "1e3"], ["64", "0", "-1", "1e400"]),
            "--flops": (["3e8"], ["1e3", "0", "-1", "nan", "inf"])}, hostile, always=("--preset", "--data", length))
        argv += _sets(draw, hostile)
    elif command == "eval":
        argv = ["eval", _pick(draw, (["{run}"], ["{missing}", "{data}"]), hostile), "--quiet"]
        argv += _options(draw, {"--data": (["{data}"], ["{missing}", "{run}"]),
                                "--text": (["{text}"], ["{missing}", "{empty}", "{data}"]),
                                "--batch-size": WHOLE, "--max-tokens": WHOLE, "--split": (["val"], ["nope"]),
                                "--json": ([None], []), "--device": (["cpu", "auto"], ["mps", "cuda:x"])}, hostile)
    elif command == "generate":
        argv = ["generate", _pick(draw, (["{run}"], ["{missing}", "{data}"]), hostile), "--quiet",
                "--prompt", _pick(draw, (["hi", ""], [" ".join(["word"] * 60)]), hostile)]
        argv += _options(draw, {"--max-new-tokens": (["0", "3"], ["-1", "x"]),
                                "--temperature": (["0", "0.8"], REAL[1]), "--top-k": WHOLE,
                                "--top-p": (["0.9", "1"], ["1.5", *REAL[1]]),
                                "--seed": (["0", "7"], ["-1", str(2**64), "x"])}, hostile)
    elif command == "flops":
        argv = ["flops", "--preset", _pick(draw, (["tiny", "paper-peer"], ["nope"]), hostile)]
        argv += _options(draw, {"--seq-len": WHOLE}, hostile) + _sets(draw, hostile)
    else:
        argv = ["data", "prepare", "--quiet", "--text", _pick(draw, (["{text}"], ["{missing}", "{empty}", "{run}"]),
                                                              hostile),
                "--out", _pick(draw, (["{fresh}", "{data}"], ["{run}"]), hostile)]
        argv += _options(draw, {"--vocab-size": (["300", "257"], ["100", "-1", "x", "1e400"]),
                                "--val-fraction": (["0.1", "0"], ["1", *REAL[1]]),
                                "--seed": (["0", "3"], ["-1", "x"]),
                                "--split-by": (["tail", "segment"], ["bogus"])}, hostile)
    return argv


def _tree(root: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(argv=invocations())
# cases a hostile user tried, always run: a resume refused for another preset, an infinite budget, a
# zero batch, a device this build lacks
@example(argv=["train", "--quiet", "--out", "{run}", "--resume", "--preset", "tiny-peer", "--data", "{data}",
               "--max-steps", "3"])
@example(argv=["train", "--quiet", "--out", "{fresh}", "--preset", "tiny", "--data", "{data}", "--flops", "inf"])
@example(argv=["eval", "{run}", "--quiet", "--batch-size", "0"])
@example(argv=["train", "--quiet", "--out", "{fresh}", "--preset", "tiny", "--data", "{data}", "--max-steps", "2",
               "--set", "train.device=mps"])
def test_every_invocation_exits_0_or_2_and_a_refusal_changes_nothing(world, argv):
    root, counter = world
    argv = _paths(argv, root, counter)
    before = _tree(root)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    err = err.getvalue()
    assert rc in (0, 2), (rc, err[-2000:])
    assert "Traceback" not in err, err[-2000:]
    if rc == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("peerlm: error: "), err
        assert _tree(root) == before, lines[0]
