"""The trend fit: an exact power law is recovered, the intervals hold the truth and shrink with less
seed noise, and the ratio of two methods at the target follows their fits."""

from __future__ import annotations

import math

import numpy as np
import pytest

from peerlm.study.trend import fit_power_law, ratio_at, trend_fits

BUDGETS = (2e12, 8e12, 3.2e13)


def law(a: float, b: float, c: float) -> float:
    return a * c ** -b


def test_an_exact_power_law_is_recovered():
    log_a, b = fit_power_law(list(BUDGETS), [law(20.0, 0.08, c) for c in BUDGETS])
    assert b == pytest.approx(0.08) and math.exp(log_a) == pytest.approx(20.0)
    with pytest.raises(ValueError, match="two or more budgets"):
        fit_power_law([2e12], [3.0])


def test_intervals_hold_the_truth_and_narrow_with_less_noise():
    rng = np.random.default_rng(1)
    wide, narrow = {}, {}
    for noise, out in ((0.05, wide), (0.005, narrow)):
        out["peer"] = {c: list(law(20.0, 0.08, c) + noise * rng.standard_normal(4)) for c in BUDGETS}
    fw, fn = trend_fits(wide)["peer"], trend_fits(narrow)["peer"]
    for f in (fw, fn):
        assert f.b_interval[0] <= f.b <= f.b_interval[1]
        assert f.loss_interval[0] <= f.loss_at <= f.loss_interval[1]
    assert fn.b_interval[0] < 0.08 < fn.b_interval[1]
    assert fn.b_interval[1] - fn.b_interval[0] < fw.b_interval[1] - fw.b_interval[0]
    assert trend_fits({"dense": {2e12: [3.0]}}) == {}  # one budget: no fit


def test_ratio_of_two_methods_at_the_target():
    seeds = {"peer": {c: [law(20.0, 0.09, c)] * 2 for c in BUDGETS},
             "dense": {c: [law(20.0, 0.07, c)] * 2 for c in BUDGETS}}
    r, lo, hi = ratio_at(seeds, "peer", "dense", target=2e19)
    assert r == pytest.approx(math.exp(law(20.0, 0.09, 2e19) - law(20.0, 0.07, 2e19)))
    assert lo == pytest.approx(r) and hi == pytest.approx(r)  # no seed noise: no width
    assert r < 1 and ratio_at(seeds, "peer", "pkm") is None
    fit = trend_fits(seeds)["peer"]
    assert fit.log_a == pytest.approx(math.log(20.0)) and fit.b == pytest.approx(0.09)


def test_the_ratio_is_paired_by_seed():
    """Each resample draws the same seeds for both methods: two methods with the same loss at every
    seed, however noisy the seeds, are exactly at 1 with no width; the same losses with one method's
    seeds shuffled (no pairs left) are not; seeds of one method alone take no part."""
    rng = np.random.default_rng(0)
    noisy = {c: {s: law(20.0, 0.08, c) + 0.05 * rng.standard_normal() for s in range(4)} for c in BUDGETS}
    seeds = {"peer": noisy, "pkm": {c: dict(v) for c, v in noisy.items()}}
    assert ratio_at(seeds, "peer", "pkm") == (1.0, 1.0, 1.0)
    shuffled = {"peer": noisy, "pkm": {c: dict(zip((1, 2, 3, 0), v.values())) for c, v in noisy.items()}}
    r, lo, hi = ratio_at(shuffled, "peer", "pkm")
    assert r == pytest.approx(1.0) and hi / lo > 1.02
    seeds["pkm"][BUDGETS[0]][9] = 100.0  # a seed peer lacks
    assert ratio_at(seeds, "peer", "pkm") == (1.0, 1.0, 1.0)
    seeds["pkm"][BUDGETS[1]] = {9: 3.0}  # no common seed at a budget: the other two are fitted
    assert ratio_at(seeds, "peer", "pkm") == (1.0, 1.0, 1.0)
    seeds["pkm"][BUDGETS[2]] = {9: 3.0}
    assert ratio_at(seeds, "peer", "pkm") is None  # one budget with pairs: no fit


def test_the_trend_plot_needs_two_budgets(tmp_path):
    """trend.png from the compute-optimal models' seeds: written from two budgets on, none below."""
    pytest.importorskip("matplotlib")
    from peerlm.study.report import trend_plot

    def opt(budgets):
        return {(c, m): {"runs": [{"spec": {"seed": s}, "eval": {"val": {"loss": law(20.0, b, c) + 0.01 * s}}}
                                  for s in range(3)]}
                for c in budgets for m, b in (("dense", 0.07), ("pkm", 0.085), ("peer", 0.09))}

    methods = ("dense", "pkm", "peer")
    assert trend_plot(opt(BUDGETS[:1]), BUDGETS[:1], methods, tmp_path) is None
    path = trend_plot(opt(BUDGETS), BUDGETS, methods, tmp_path)
    assert path == tmp_path / "trend.png" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
