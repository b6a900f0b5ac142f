"""The isoFLOP study's trend: compute-optimal loss against budget per method, a power-law fit, and
what it says at a far larger budget, labelled as the extrapolation it is.

For each method, its compute-optimal val loss L at each budget C (mean over seeds) is fitted by
log L = log a - b log C (least squares in log-log: a power law in the loss itself, with no
irreducible term, which two or three budgets could not pin down). The uncertainty comes from the
seeds: ``draws`` bootstrap resamples of each budget's seeds, each refitted, give a 95% percentile
interval for the exponent, for L at the ``target`` budget and for the perplexity ratio of two methods
there (resampled jointly, budget by budget). With one seed at a budget the interval ignores that
budget's noise; with two budgets the fit passes through both points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["Fit", "fit_power_law", "trend_fits", "ratio_at"]


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


def _draws(seeds: dict[float, list[float]], draws: int, rng: np.random.Generator) -> np.ndarray:
    """(draws, budgets) means of bootstrap resamples of each budget's seed losses."""
    cols = []
    for budget in sorted(seeds):
        x = np.asarray(seeds[budget], dtype=float)
        cols.append(x[rng.integers(0, len(x), size=(draws, len(x)))].mean(axis=1))
    return np.stack(cols, axis=1)


def trend_fits(seeds: dict[str, dict[float, list[float]]], target: float = 2e19, draws: int = 2000,
               seed: int = 0) -> dict[str, Fit]:
    """Per method, the fit over its budgets (``seeds``: method -> budget -> val losses of the seeds of
    its compute-optimal model); methods with fewer than two budgets are left out."""
    out = {}
    for method, by_budget in seeds.items():
        by_budget = {b: v for b, v in by_budget.items() if v}
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


def ratio_at(seeds: dict[str, dict[float, list[float]]], a: str, b: str, target: float = 2e19, draws: int = 2000,
             seed: int = 0) -> tuple[float, float, float] | None:
    """The perplexity ratio ppl_a / ppl_b = exp(L_a - L_b) the two fits give at ``target``, and its 95%
    interval (both methods resampled in the same draws); None without two common budgets."""
    common = sorted(set(seeds.get(a, {})) & set(seeds.get(b, {})))
    common = [c for c in common if seeds[a][c] and seeds[b][c]]
    if len(common) < 2:
        return None
    fa = fit_power_law(common, [float(np.mean(seeds[a][c])) for c in common])
    fb = fit_power_law(common, [float(np.mean(seeds[b][c])) for c in common])
    point = math.exp(_predict(*fa, target) - _predict(*fb, target))
    rng = np.random.default_rng(seed)
    sa = _draws({c: seeds[a][c] for c in common}, draws, rng)
    sb = _draws({c: seeds[b][c] for c in common}, draws, rng)
    r = np.array([math.exp(_predict(*fit_power_law(common, list(x)), target) - _predict(*fit_power_law(common, list(y)),
                                                                                      target))
                  for x, y in zip(sa, sb)])
    return point, float(np.percentile(r, 2.5)), float(np.percentile(r, 97.5))
