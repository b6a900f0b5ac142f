"""Fixtures of the study tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from peerlm.data import prepare


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """A prepared data directory of a few hundred short repetitive documents (vocabulary 300)."""
    root = tmp_path_factory.mktemp("study")
    text = root / "t.txt"
    words = "the cat sat on a mat and then it ran to the dog who was big or small".split()
    text.write_text("\n\n".join(" ".join(words[(i + j) % len(words)] for j in range(50)) for i in range(300)))
    prepare([text], root / "d", vocab_size=300, val_fraction=0.05, eval_sets={"wiki": text}, progress=False)
    return root / "d"
