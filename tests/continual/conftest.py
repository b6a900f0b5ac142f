"""Shared fixtures of the continual-learning tests: a tiny text, trained tiny base runs, a fact set."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peerlm.config import apply_overrides, get_preset
from peerlm.continual.facts import prepare_facts
from peerlm.data import prepare
from peerlm.runconfig import RunConfig, TrainConfig, data_info
from peerlm.train import train

WORDS = ("the cat sat on a mat and then it ran to the dog who was big or small but never late for "
         "tea while birds sang songs of old kings").split()


def write_text(path: Path, paragraphs: int = 80, seed: int = 0) -> Path:
    rng = random.Random(seed)
    paras = []
    for _ in range(paragraphs):
        start = rng.randrange(len(WORDS))
        paras.append(" ".join(WORDS[(start + i + rng.randrange(2)) % len(WORDS)] for i in range(60)) + ".")
    path.write_text("\n\n".join(paras))
    return path


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    """Background frequencies are cached under $PEERLM_CACHE: one cache for the session, never ~/.cache."""
    monkeypatch.setenv("PEERLM_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([write_text(root / "text.txt")], root / "d", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "d"


@pytest.fixture(scope="session")
def other_data_dir(tmp_path_factory) -> Path:
    """Data prepared with another tokenizer (another vocabulary size)."""
    root = tmp_path_factory.mktemp("other")
    prepare([write_text(root / "text.txt", seed=1)], root / "d", vocab_size=280, val_fraction=0.1, progress=False)
    return root / "d"


def base_run(root: Path, data_dir: Path, preset: str, steps: int = 12) -> Path:
    info = data_info(data_dir)
    model = apply_overrides(get_preset(preset), [f"vocab_size={info['vocab_size']}", "context_length=64"])
    t = TrainConfig(lr=3e-3, warmup=2, batch_size=4, max_steps=steps, eval_every=6, eval_batches=2, ckpt_every=6,
                    seed=0, device="cpu")
    train(RunConfig(model, t, info), root, progress=False, log=lambda s: None)
    return root


@pytest.fixture(scope="session")
def bases(tmp_path_factory, data_dir) -> dict[str, Path]:
    """Trained base runs: PEER, PKM and dense tiny models."""
    root = tmp_path_factory.mktemp("bases")
    return {kind: base_run(root / kind, data_dir, preset)
            for kind, preset in (("peer", "tiny-peer"), ("pkm", "tiny-pkm"), ("dense", "tiny"))}


@pytest.fixture(scope="session")
def facts_dir(tmp_path_factory, bases) -> Path:
    out = tmp_path_factory.mktemp("facts") / "f"
    prepare_facts(out, (bases["peer"] / "tokenizer.json").read_bytes(), people=60, paraphrases=3, progress=False)
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    """The newest checkpoint's weights of a run."""
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run / "checkpoints" / latest / "model.safetensors"))


def checkpoint_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(run / "checkpoints" / f"step_{step:08d}" / "model.safetensors"))


def tree_state(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``path`` with its size and mtime, to show a directory was not written."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.rglob("*"))}
