"""The isoFLOP study's plan: which runs it needs, decided from the records present (``IsoflopPlan``),
and ``isoflop_study``, which hands that plan to the runner (``peerlm.study.runner``).

Phases, in order; each later phase reads the choices of the earlier ones from the records:

1. ``lr``: the dense model at the smaller budget on the second rung of its window, LR multiplier in
   ``LR_MULTIPLIERS``, extended along ``LR_GRID`` while the best (lowest full-val loss) is at an end;
   that best multiplier is used for every run after.
2. ``expert-lr``: PEER and PKM at the same point, expert-table LR ratio in ``EXPERT_LR_RATIOS``
   (extended along ``RATIO_GRID`` likewise); each method keeps its best ratio.
3. ``ladder``: every method at every budget over the initial window of sizes; while the best size of
   a (budget, method) is at an end of what was run and a further size exists, the ladder grows.
4. ``seed``: the compute-optimal model of every (budget, method) again with seeds 1 .. ``seeds`` - 1,
   once its budget's ladders are bracketed (phases 3 and 4 go budget by budget, smallest first), seed
   by seed across the methods.
5. ``optimizer``: the compute-optimal PEER model of the smaller budget with the row-sparse AdamW.

A diverged run (``peerlm.study.records.diverged``) is recorded, so it is not trained again, and counts
as worse than any run that did not diverge (``bracket``): it is never a sweep's choice or a compute-
optimal size. A sweep whose runs all diverged has no choice, and the runs that would use it are not
planned.

Runs are chosen deterministically, so two machines working from the same records agree on the next
one. Checkpoints live in the user cache (``$PEERLM_CACHE/study/isoflop/<run_id>``) by default.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from peerlm.data import cache_dir
from peerlm.study.design import (
    BUDGETS,
    EXPERT_LR_RATIOS,
    LR_GRID,
    LR_MULTIPLIERS,
    METHODS,
    RATIO_GRID,
    SEEDS,
    SIZES,
    RunSpec,
    initial_window,
)
from peerlm.study.records import Records, RecordStore, choice_loss
from peerlm.study.runner import Runner

__all__ = ["IsoflopPlan", "isoflop_study", "bracket", "stuck", "sweep"]


def stuck(specs: list[RunSpec], best: Any, recs: Records) -> bool:
    """Whether a sweep (``bracket``'s result) has every run recorded and still no best: all diverged."""
    return best is None and all(s.run_id in recs for s in specs)


def sweep(grid: tuple, first: tuple, evaluate: Callable[[Any], tuple[list[RunSpec], RunSpec | None]],
          recs: Records) -> tuple[list[RunSpec], Any, RunSpec | None]:
    """A 1-D sweep over ``grid`` that starts at the values ``first`` and grows by one value at the end
    where its best point lies, until the best has a neighbour on both sides (or the grid ends). A
    point may be one run or a sweep itself: ``evaluate(value)`` gives its runs and its best run (None
    while undecided). Returns every run so far, the best value and its best run (both None until
    the best is bracketed).

    Runs compare by ``choice_loss``: a diverged run counts as worse than any run that did not diverge,
    so it is never the best while the sweep has a finite point, and it brackets a best beside it as
    any worse run does. While every point diverged, the sweep grows at its low end (the smaller LR,
    ratio or model: the side that more often trains stably); once that end of the grid is reached it
    has no best, and the result stays None with every run recorded (``stuck``)."""
    lo, hi = grid.index(first[0]), grid.index(first[-1])
    while True:
        runs, bests = [], []
        for v in grid[lo:hi + 1]:
            specs, best = evaluate(v)
            runs += specs
            bests.append(best)
        if any(b is None or b.run_id not in recs for b in bests):
            return runs, None, None
        losses = [choice_loss(recs[b.run_id]) for b in bests]
        i = min(range(len(bests)), key=losses.__getitem__)
        if math.isinf(losses[i]):  # every point diverged
            if lo == 0:
                return runs, None, None
            lo -= 1
        elif i == 0 and lo > 0:
            lo -= 1
        elif i == len(bests) - 1 and hi < len(grid) - 1:
            hi += 1
        else:
            return runs, grid[lo + i], bests[i]


def bracket(grid: tuple, first: tuple, make: Callable[[Any], RunSpec], recs: Records) -> tuple[list[RunSpec], Any]:
    """``sweep`` over single runs ``make(value)``: the runs so far and the best value (None before)."""
    runs, best, _ = sweep(grid, first, lambda v: ([make(v)], make(v)), recs)
    return runs, best


@dataclass(frozen=True)
class IsoflopPlan:
    """The isoFLOP study over ``budgets`` (sorted) and ``methods``; see the module docstring."""

    budgets: tuple[float, ...] = BUDGETS
    methods: tuple[str, ...] = METHODS
    name: str = "isoflop"
    seeds: int = SEEDS

    def __post_init__(self) -> None:
        if len(self.budgets) < 1 or any(not b > 0 for b in self.budgets):
            raise ValueError(f"budgets must be positive FLOP counts, got {self.budgets}")
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown methods {bad}; choose among {', '.join(METHODS)}")
        object.__setattr__(self, "budgets", tuple(sorted(self.budgets)))
        object.__setattr__(self, "methods", tuple(self.methods))
        if self.seeds < 1:
            raise ValueError(f"seeds must be at least 1, got {self.seeds}")

    def records(self, own: Records) -> Records:
        return own

    def choices(self, recs: Records) -> dict[str, Any]:
        """The sweeps' runs and their choices: the LR multiplier and each memory method's expert-table
        LR ratio (1.0 while a sweep is unfinished), ``stuck``: the sweeps ("lr", "peer", "pkm") whose
        runs all diverged, so that they have no choice, and ``open``: those still undecided."""
        b0 = self.budgets[0]
        mid = initial_window(b0)[1]
        lr_specs, best_lr = bracket(LR_GRID, LR_MULTIPLIERS, lambda m: RunSpec("lr", b0, "dense", mid, lr_mult=m), recs)
        lr_mult = 1.0 if best_lr is None else best_lr
        ratios, ratio_specs = {}, {}
        stalled = {"lr"} if stuck(lr_specs, best_lr, recs) else set()
        undecided = {"lr"} if best_lr is None and not stalled else set()
        for method in ("peer", "pkm"):
            ratio_specs[method], best = bracket(
                RATIO_GRID, EXPERT_LR_RATIOS, lambda r, m=method: RunSpec("expert-lr", b0, m, mid, lr_mult, r), recs)
            ratios[method] = 1.0 if best is None else best
            if stuck(ratio_specs[method], best, recs):
                stalled.add(method)
            elif best is None:
                undecided.add(method)
        return {"lr_mult": lr_mult, "expert_ratio": ratios, "lr_specs": lr_specs, "ratio_specs": ratio_specs,
                "stuck": stalled, "open": undecided}

    def ladder_spec(self, budget: float, method: str, size: str, ch: dict[str, Any], seed: int = 0) -> RunSpec:
        """The ladder run (seed 0) or another seed of (budget, method, size) under the choices ``ch``."""
        return RunSpec("ladder" if seed == 0 else "seed", budget, method, size, ch["lr_mult"],
                       ch["expert_ratio"].get(method, 1.0), seed)

    def ladder(self, budget: float, method: str, recs: Records, ch: dict[str, Any]) -> tuple[list[RunSpec], str | None]:
        """The ladder of (budget, method) as far as the records decide it, and its best size when
        that best is bracketed (None while it is not, or while runs are missing)."""
        names = tuple(s.name for s in SIZES)
        return bracket(names, tuple(initial_window(budget)), lambda sz: self.ladder_spec(budget, method, sz, ch), recs)

    def runs(self, recs: Records) -> Iterator[RunSpec]:
        """Every run the study needs as far as the records decide, in the order they will run. Nothing
        is planned on a choice not yet made: until the LR sweep has its best (whatever the methods: every
        run uses it) only its runs; until a memory method's ratio sweep has its best, none of that
        method's ladder runs. A sweep whose runs all diverged decides nothing, so the same holds for
        good."""
        b0 = self.budgets[0]
        ch = self.choices(recs)
        yield from ch["lr_specs"]
        if {"lr"} & (ch["stuck"] | ch["open"]):
            return
        for method in ("peer", "pkm"):
            if method in self.methods:
                yield from ch["ratio_specs"][method]
        best: dict[tuple[float, str], str | None] = {}
        for budget in self.budgets:
            for method in self.methods:
                if method in ch["stuck"] | ch["open"]:
                    continue
                specs, best[budget, method] = self.ladder(budget, method, recs, ch)
                yield from specs
            # seed by seed: every method's next seed before any method's seed after it, so that the paired
            # comparisons gain a seed at a time instead of waiting for the last method's seeds
            optimal = [m for m in self.methods if best.get((budget, m)) is not None]
            for seed in range(1, self.seeds):
                for method in optimal:
                    yield self.ladder_spec(budget, method, best[budget, method], ch, seed=seed)
        if "peer" in self.methods and best.get((b0, "peer")):
            yield self.ladder_spec(b0, "peer", best[b0, "peer"], ch).with_(phase="optimizer", sparse_optimizer=True)


def isoflop_study(results: str | os.PathLike[str], work: str | os.PathLike[str] | None = None,
                  budgets: tuple[float, ...] = BUDGETS, methods: tuple[str, ...] = METHODS, threads: int = 1,
                  log: Callable[[str], None] = print, device: str = "cpu", seeds: int = SEEDS) -> Runner:
    """The runner of the isoFLOP study over ``results`` (records, reports) and ``work`` (data beside
    it, checkpoints in it; default ``$PEERLM_CACHE/study/isoflop``)."""
    work = work if work is not None else cache_dir() / "study" / "isoflop"
    plan = IsoflopPlan(tuple(budgets), tuple(methods), seeds=seeds)
    return Runner(plan, RecordStore(results), work, threads=threads, log=log, device=device)
