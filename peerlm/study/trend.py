"""The isoFLOP study's trend: compute-optimal loss against budget per method, a power-law fit, and
what it says at a far larger budget, labelled as the extrapolation it is.

For each method, its compute-optimal val loss L at each budget C (mean over seeds) is fitted by
log L = log a - b log C (least squares in log-log: a power law in the loss itself, with no
irreducible term, which two or three budgets could not pin down). The uncertainty comes from the
seeds: ``draws`` bootstrap resamples of each budget's seeds, each refitted, give a 95% percentile
interval for the exponent and for L at the ``target`` budget. The perplexity ratio of two methods
there is paired by seed, as the study's comparisons are (the same seed is the same data order): at
each budget both methods' losses over their common seeds, and one resample of seed ids for both. With
one seed at a budget the interval ignores that budget's noise; with two budgets the fit passes
through both points.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["Fit", "fit_power_law", "trend_fits", "paired_means", "ratio_at"]

# method -> budget -> the val losses of the seeds of its compute-optimal model, {seed: loss} (a plain
# list counts its positions as seeds)
Seeds = Mapping[str, Mapping[float, "Mapping[int, float] | Sequence[float]"]]


def _by_seed(losses: Mapping[int, float] | Sequence[float]) -> dict[int, float]:
    return dict(losses) if isinstance(losses, Mapping) else dict(enumerate(losses))


@dataclass(frozen=True)
class Fit:
    """log L = log_a - b log C for one method; ``at`` the target budget: L and its 95% interval."""

    method: str
    budgets: tuple[float, ...]
    log_a: float
    b: float
    b_interval: tuple[float, float]
    target: float
    loss_at: float
    loss_interval: tuple[float, float]


def fit_power_law(budgets: list[float], losses: list[float]) -> tuple[float, float]:
    """(log_a, b) of the least-squares line log L = log_a - b log C; needs two or more budgets."""
    if len(budgets) < 2 or len(budgets) != len(losses):
        raise ValueError(f"a power law needs losses at two or more budgets, got {len(budgets)} and {len(losses)}")
    if any(not x > 0 for x in (*budgets, *losses)):
        raise ValueError("budgets and losses must be positive")
    slope, intercept = np.polyfit(np.log(budgets), np.log(losses), 1)
    return float(intercept), float(-slope)


def _predict(log_a: float, b: float, budget: float) -> float:
    return math.exp(log_a - b * math.log(budget))


def _draws(seeds: Mapping[float, list[float]], draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, budgets) means of bootstrap resamples of each budget's seed losses."""
    cols = []
    for budget in sorted(seeds):
        x = np.asarray(seeds[budget], dtype=float)
        cols.append(x[rng.integers(0, len(x), size=(draws, len(x)))].mean(axis=1))
    return np.stack(cols, axis=1)


def trend_fits(seeds: Seeds, target: float = 2e19, draws: int = 2000, seed: int = 0) -> dict[str, Fit]:
    """Per method, the fit over its budgets (``seeds``: method -> budget -> val losses of the seeds of
    its compute-optimal model); methods with fewer than two budgets are left out."""
    out = {}
    for method, by_budget in seeds.items():
        by_budget = {b: list(_by_seed(v).values()) for b, v in by_budget.items() if v}
        if len(by_budget) < 2:
            continue
        budgets = sorted(by_budget)
        log_a, b = fit_power_law(budgets, [float(np.mean(by_budget[c])) for c in budgets])
        rng = np.random.default_rng(seed)
        sample = _draws(by_budget, draws, rng)
        fits = [fit_power_law(budgets, list(row)) for row in sample]
        bs = np.array([f[1] for f in fits])
        at = np.array([_predict(la, bb, target) for la, bb in fits])
        out[method] = Fit(method, tuple(budgets), log_a, b,
                          (float(np.percentile(bs, 2.5)), float(np.percentile(bs, 97.5))),
                          target, _predict(log_a, b, target),
                          (float(np.percentile(at, 2.5)), float(np.percentile(at, 97.5))))
    return out


def paired_means(seeds: Seeds, a: str, b: str) -> dict[float, tuple[np.ndarray, np.ndarray]]:
    """Per budget where both have one, the val losses of ``a`` and ``b`` over their common seeds, in
    seed order (the pairs the ratio is taken over)."""
    out = {}
    for budget in sorted(set(seeds.get(a, {})) & set(seeds.get(b, {}))):
        la, lb = _by_seed(seeds[a][budget]), _by_seed(seeds[b][budget])
        common = sorted(la.keys() & lb.keys())
        if common:
            out[budget] = (np.array([la[s] for s in common], float), np.array([lb[s] for s in common], float))
    return out


def ratio_at(seeds: Seeds, a: str, b: str, target: float = 2e19, draws: int = 2000,
             seed: int = 0) -> tuple[float, float, float] | None:
    """The perplexity ratio ppl_a / ppl_b = exp(L_a - L_b) that the two fits over their common seeds
    give at ``target``, and its 95% interval (each budget's common seeds resampled as pairs); None
    without two budgets with a common seed."""
    pairs = paired_means(seeds, a, b)
    if len(pairs) < 2:
        return None
    budgets = sorted(pairs)

    def at(la: list[float], lb: list[float]) -> float:
        return math.exp(_predict(*fit_power_law(budgets, la), target) - _predict(*fit_power_law(budgets, lb), target))

    point = at([float(pairs[c][0].mean()) for c in budgets], [float(pairs[c][1].mean()) for c in budgets])
    rng = np.random.default_rng(seed)
    sa, sb = [], []
    for c in budgets:  # one draw of seed ids serves both methods
        x, y = pairs[c]
        idx = rng.integers(0, len(x), size=(draws, len(x)))
        sa.append(x[idx].mean(axis=1))
        sb.append(y[idx].mean(axis=1))
    r = np.array([at(list(xa), list(xb)) for xa, xb in zip(np.stack(sa, axis=1), np.stack(sb, axis=1))])
    return point, float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))
