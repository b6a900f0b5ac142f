"""Seed statistics: the paired interval by hand, and verdict words only where it excludes zero."""

from __future__ import annotations

import math
import statistics

import pytest

from peerlm.study.stats import compare, mean_sd


def test_paired_interval_by_hand():
    a = {0: 3.00, 1: 3.10, 2: 2.95, 3: 3.05}
    b = {0: 3.08, 1: 3.15, 2: 3.05, 3: 3.09, 7: 9.0}  # seed 7 has no partner: left out
    c = compare(a, b)
    d = [0.08, 0.05, 0.10, 0.04]
    half = 3.182 * statistics.stdev(d) / math.sqrt(4)  # t(0.975, 3)
    assert c.seeds == (0, 1, 2, 3)
    assert c.diff == pytest.approx(statistics.fmean(d))
    assert (c.low, c.high) == (pytest.approx(c.diff - half), pytest.approx(c.diff + half))
    assert c.verdict == "ahead" and c.ratio[0] == pytest.approx(math.exp(c.diff))
    assert compare(b, a).verdict == "behind"


def test_an_interval_holding_zero_is_a_tie():
    a = {0: 3.0, 1: 3.2}
    b = {0: 3.1, 1: 3.1}
    assert compare(a, b).verdict == "tie"
    one = compare({0: 3.0}, {0: 3.5})
    assert one.verdict == "" and math.isinf(one.low)  # one seed has no interval: no word at all
    assert compare({0: 3.0}, {1: 3.0}) is None


def test_mean_sd():
    assert mean_sd([1.0, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))
    m, s = mean_sd([2.0])
    assert m == 2.0 and math.isnan(s)
    with pytest.raises(ValueError):
        mean_sd([])
