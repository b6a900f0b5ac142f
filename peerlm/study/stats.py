"""Seed statistics of the study's comparisons: mean and standard deviation over seeds, and a paired
95% interval of a difference in loss with a verdict word: ahead or behind only where that interval
excludes zero, tie where it holds zero, none from one seed (no interval).

Two methods' runs with the same seed share the order of the training data, so their losses are
compared seed by seed: for the common seeds s, d_s = loss_b(s) - loss_a(s) (nats; positive: a is
better), and the interval is mean(d) +- t(0.975, n - 1) * sd(d) / sqrt(n) (Student's t, the seeds'
differences taken as normal). In perplexity that is a ratio, ppl_b / ppl_a = exp(d).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["T975", "mean_sd", "Comparison", "compare"]

# two-sided 95% quantiles of Student's t, by degrees of freedom
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}


def _t975(df: int) -> float:
    """The t quantile at ``df`` degrees of freedom (the next smaller tabulated df above 10: wider)."""
    if df < 1:
        raise ValueError(f"an interval needs at least two seeds (df >= 1), got df {df}")
    return T975[max(d for d in T975 if d <= df)] if df <= 30 else 1.96


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (nan for one value)."""
    if not values:
        raise ValueError("no values")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else float("nan")


@dataclass(frozen=True)
class Comparison:
    """a against b over their common seeds: mean loss difference b - a (nats), its 95% interval."""

    seeds: tuple[int, ...]
    diff: float
    low: float
    high: float

    @property
    def verdict(self) -> str:
        """``ahead`` (a's loss lower), ``behind`` or ``tie`` (the interval holds zero); empty with one
        seed, which gives no interval and so decides nothing."""
        if len(self.seeds) < 2:
            return ""
        if self.low <= 0 <= self.high:
            return "tie"
        return "ahead" if self.low > 0 else "behind"

    @property
    def ratio(self) -> tuple[float, float, float]:
        """The perplexity ratio ppl_b / ppl_a and its interval."""
        return math.exp(self.diff), math.exp(self.low), math.exp(self.high)


def compare(a: dict[int, float], b: dict[int, float]) -> Comparison | None:
    """``a`` against ``b``, each {seed: loss}; None without a common seed."""
    seeds = tuple(sorted(a.keys() & b.keys()))
    if not seeds:
        return None
    d = [b[s] - a[s] for s in seeds]
    mean = statistics.fmean(d)
    if len(d) == 1:
        return Comparison(seeds, mean, float("-inf"), float("inf"))
    half = _t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return Comparison(seeds, mean, mean - half, mean + half)
