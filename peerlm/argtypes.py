"""argparse types for the numbers a user gives on the command line: each checks its range where the
value enters, so a bad number is a usage error naming the flag and the accepted form, never a NaN,
an empty result or a long run on nonsense.

Whole numbers are read by ``peerlm.config.parse_int`` and real numbers by ``parse_float``, the same
parsers ``--set`` uses, so ``--max-tokens 1e6`` and ``--set train.max_tokens=1e6`` agree. NaN and inf
are refused everywhere. ``setting`` is the type of ``--set SECTION.FIELD=VALUE``: it checks the form;
the value goes through the same parsers, by its field's type, where the override is applied.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from peerlm.config import parse_float, parse_int

__all__ = ["whole", "real", "positive_int", "nonnegative_int", "seed", "positive_float", "nonnegative_float",
           "fraction", "probability", "setting"]

SEED_LIMIT = 2**63  # torch generators take seeds below this


def whole(lo: int | None = None, hi: int | None = None, example: str = "8",
          hi_text: str | None = None) -> Callable[[str], int]:
    """A type for whole numbers in [lo, hi) (an end is open when None)."""
    bounds = (f">= {lo}" if lo is not None else "", f"< {hi_text or hi}" if hi is not None else "")
    rng = " and ".join(p for p in bounds if p)
    form = f"a whole number{' ' + rng if rng else ''} (e.g. {example})"

    def convert(text: str) -> int:
        try:
            value = parse_int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value >= hi):
            raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
        return value

    convert.__name__ = "whole number"
    return convert


def real(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
         example: str = "1.0") -> Callable[[str], float]:
    """A type for finite numbers between lo and hi (ends closed unless ``*_open``; None: unbounded)."""
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"{'<' if hi_open else '<='} {hi:g}")
    form = f"a number{' ' + ' and '.join(parts) if parts else ''} (e.g. {example})"

    def convert(text: str) -> float:
        try:
            value = parse_float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}") from None
        low_bad = lo is not None and (value <= lo if lo_open else value < lo)
        high_bad = hi is not None and (value >= hi if hi_open else value > hi)
        if low_bad or high_bad:
            raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
        return value

    convert.__name__ = "number"
    return convert


positive_int = whole(1)
nonnegative_int = whole(0, example="0")
seed = whole(0, SEED_LIMIT, example="0", hi_text="2**63")
positive_float = real(0, lo_open=True, example="2.5")
nonnegative_float = real(0, example="0.8")
fraction = real(0, 1, hi_open=True, example="0.01")
probability = real(0, 1, lo_open=True, example="0.9")


def setting(*sections: str) -> Callable[[str], tuple[str, str]]:
    """The argparse type of ``--set``: ``SECTION.FIELD=VALUE`` -> (section, "FIELD=VALUE"). The value
    itself is parsed by ``peerlm.config.apply_overrides``, by the field's type, so every ``--set``
    goes through one parser and a bad value gets its field's range or accepted form."""
    examples = {"model": "model.dim=256", "train": "train.lr=1e-3"}
    form = f"SECTION.FIELD=VALUE with SECTION {' or '.join(sections)}, e.g. " + \
        " or ".join(examples[s] for s in sections)

    def convert(text: str) -> tuple[str, str]:
        path, eq, _ = text.partition("=")
        section, _, field = path.strip().partition(".")
        if not eq or section not in sections or not field.strip():
            raise argparse.ArgumentTypeError(f"expected {form}, got {text!r}")
        return section, text.strip()[len(section) + 1 :]

    convert.__name__ = "setting"
    return convert
