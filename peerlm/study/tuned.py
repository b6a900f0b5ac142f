"""The isoFLOP study's second table: every method tuned at its own optimum by one written protocol.

The first table ("paper settings", ``peerlm.study.isoflop``) gives every method the LR multiplier
swept on the dense model, one expert-table LR ratio per memory method swept once at one point, and
the paper's (h, k), routing LR, query norm and block. Here every (budget, method) is tuned the same way
(``TunedPlan``):

1. Start: the method's compute-optimal size under paper settings (its candidate optimum c) with its
   paper-settings choices. Until the first table's ladder has decided that size (bracketed, or at an
   end of the size grid), nothing is planned for it.
2. Knobs at c, one coordinate pass in this order, each a 1-D sweep (``sweep``: it starts at the
   current value and its neighbours on the knob's grid and grows at the end where its best lies,
   until the best is bracketed or the grid ends; a categorical knob runs every value), each sweep
   starting from the choices of the ones before it:
   - every method: the trunk LR multiplier (``LR_GRID``);
   - ``moe-fine``: its granularity at equal FLOPs and parameters (``GRANULARITY``);
   - ``peer`` and ``pkm``: the expert-table LR ratio (``RATIO_GRID``), the (h, k) split at equal h * k
     (``SPLITS``: equal expert FLOPs), the routing LR ratio (``ROUTING_GRID``), the query norm (every
     one of ``QUERY_NORMS``) and, where the trunk has more than one block, the block holding the
     memory (every block).
   ``dense`` and ``moe`` have the LR only: the report counts every method's tuning runs.
3. Size: c and its neighbours with the tuned knobs, the LR swept again at each (the knob that moves
   most with size, and the one the table and routing LR ratios multiply: at c too, since the knobs
   after it may have moved its best); a best size at an end grows the ladder the same way until it is
   bracketed. A trunk whose LR sweep diverged at every LR counts as worse than any other. The knobs
   are carried to another trunk as they are defined: moe-fine's expert size as a multiple of the
   width, the memory's block by its index.
4. Seeds: ``SEEDS`` at the tuned optimum (size and LR of step 3, knobs of step 2).

At a budget after the last of ``TUNED_BUDGETS`` the knobs but the LR are carried from that budget's
tuned optimum (a full pass there would cost more than the rest of the study) and steps 3-4 run from
that budget's c; nothing runs there for a method until its last tuned budget has its knobs.

A tuning point that is also a run of the first table (the same run id: every knob at its paper value)
is read from the first table's records, not trained again.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from peerlm.config import QUERY_NORMS
from peerlm.data import cache_dir
from peerlm.study.design import (
    BUDGETS,
    LR_GRID,
    METHODS,
    RATIO_GRID,
    ROUTING_LR_RATIO,
    SEEDS,
    SIZES,
    RunSpec,
    budget_name,
    model_config,
    size,
)
from peerlm.study.isoflop import IsoflopPlan, stuck, sweep
from peerlm.study.records import Records, RecordStore
from peerlm.study.report import compute_optimal
from peerlm.study.runner import Runner

__all__ = ["TunedPlan", "tuned_study", "knobs", "grid_ends", "TUNED_BUDGETS", "SPLITS", "GRANULARITY", "ROUTING_GRID"]

TUNED_BUDGETS = BUDGETS[:2]
ROUTING_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)  # 3.0: PEER's 2e12 best was at 1.0, the old end
# (heads, topk) at the paper settings' h * k: PEER 8 x 16, PKM 8 x 32
SPLITS = {
    "peer": ((1, 128), (2, 64), (4, 32), (8, 16), (16, 8), (32, 4)),
    "pkm": ((1, 256), (2, 128), (4, 64), (8, 32), (16, 16), (32, 8)),
}
# moe-fine: (experts, expert hidden as a multiple of the width, top-k), all with the active and total
# parameters of the paper settings' 32 x D, top-4 (which is 4 D active: the dense MLP's). (8, 4.0, 1):
# fine-grained MoE's 8e12 best was at 16 experts, the old end; 8 experts of 4 D is the coarsest point
# (granularity 1: the plain MoE's shape, with moe-fine's token-choice routing)
GRANULARITY = ((8, 4.0, 1), (16, 2.0, 2), (32, 1.0, 4), (64, 0.5, 8), (128, 0.25, 16))


def _text(value: Any) -> str:
    return str(value).replace(" ", "")


def _overrides(spec: RunSpec, **paths: Any) -> RunSpec:
    """``spec`` with config paths (``ffn.heads``, ``placement``) set, and every override (these and
    those it had) that equals its trunk's own value dropped, so that a point at the paper's settings
    has the paper run's id."""
    current = dict(o.split("=", 1) for o in spec.overrides) | {k: _text(v) for k, v in paths.items()}
    default = model_config(spec.method, size(spec.size))
    kept = {}
    for path, value in current.items():
        own: Any = default
        for part in path.split("."):
            own = getattr(own, part)
        if path == "placement" and own == "middle":
            own = default.sparse_blocks()
        if value != _text(own):
            kept[path] = value
    return spec.with_(overrides=tuple(f"{k}={v}" for k, v in sorted(kept.items())))


@dataclass(frozen=True)
class Knob:
    """One tuned setting: its grid, whether its values are unordered (every one runs), and how it is
    read from and written into a run."""

    name: str
    grid: tuple
    categorical: bool
    get: Callable[[RunSpec], Any]
    put: Callable[[RunSpec, Any], RunSpec]


def _ffn(spec: RunSpec) -> Any:
    return spec.model().ffn


def _split_put(spec: RunSpec, hk: tuple[int, int]) -> RunSpec:
    return _overrides(spec, **{"ffn.heads": hk[0], "ffn.topk": hk[1]})


def _granularity_get(spec: RunSpec) -> tuple:
    ffn, dim = _ffn(spec), size(spec.size).dim
    return next((g for g in GRANULARITY if g[0] == ffn.num_experts and g[2] == ffn.topk
                 and round(g[1] * dim) == ffn.expert_hidden), (ffn.num_experts, ffn.expert_hidden / dim, ffn.topk))


def _granularity_put(spec: RunSpec, g: tuple) -> RunSpec:
    experts, hidden, topk = g
    return _overrides(spec, **{"ffn.num_experts": experts, "ffn.expert_hidden": round(hidden * size(spec.size).dim),
                               "ffn.topk": topk})


def _block_get(spec: RunSpec) -> int:
    return spec.model().sparse_blocks()[0]


LR = Knob("lr", LR_GRID, False, lambda s: s.lr_mult, lambda s, v: s.with_(lr_mult=v))


def knobs(method: str, n_layers: int) -> list[Knob]:
    """The knobs of ``method`` on a trunk of ``n_layers`` blocks, in the order they are tuned."""
    out = [LR]
    if method == "moe-fine":
        out.append(Knob("granularity", GRANULARITY, False, _granularity_get, _granularity_put))
    if method in ("peer", "pkm"):
        out += [
            Knob("expert-lr", RATIO_GRID, False, lambda s: s.expert_ratio, lambda s, v: s.with_(expert_ratio=v)),
            Knob("split", SPLITS[method], False, lambda s: (_ffn(s).heads, _ffn(s).topk), _split_put),
            Knob("routing-lr", ROUTING_GRID, False,
                 lambda s: ROUTING_LR_RATIO if s.routing_ratio is None else s.routing_ratio,
                 lambda s, v: s.with_(routing_ratio=None if v == ROUTING_LR_RATIO else v)),
            Knob("query-norm", QUERY_NORMS, True, lambda s: _ffn(s).query_norm,
                 lambda s, v: _overrides(s, **{"ffn.query_norm": v})),
        ]
        if n_layers > 1:
            out.append(Knob("block", tuple(range(n_layers)), True, _block_get,
                            lambda s, v: _overrides(s, placement=[v])))
    return out


def grid_ends(spec: RunSpec) -> list[str]:
    """The ordered knobs whose value in ``spec`` is an end of its grid, then the size where it is the
    first or last trunk: a sweep that chose it could not bracket it (the best may lie beyond)."""
    out = []
    for knob in knobs(spec.method, size(spec.size).n_layers):
        value = knob.get(spec)
        if not knob.categorical and value in (knob.grid[0], knob.grid[-1]):
            out.append(f"{knob.name} {value}")
    if spec.size in (SIZES[0].name, SIZES[-1].name):
        out.append(f"size {spec.size}")
    return out


def _start(grid: tuple, value: Any) -> tuple:
    """The first values of a sweep: ``value`` and its neighbours on ``grid``."""
    if value not in grid:
        raise ValueError(f"{value!r} is not on the sweep's grid {grid}")
    i = grid.index(value)
    return grid[max(0, i - 1): i + 2]


def _one(spec: RunSpec) -> tuple[list[RunSpec], RunSpec]:
    return [spec], spec


@dataclass(frozen=True)
class TunedPlan:
    """The tuned table over ``budgets`` and ``methods``, reading the first table's records through
    ``paper`` (its plan) and ``paper_records`` (a function giving them); see the module docstring."""

    paper: IsoflopPlan
    paper_records: Callable[[], Records]
    budgets: tuple[float, ...] = BUDGETS
    methods: tuple[str, ...] = METHODS
    tuned_budgets: tuple[float, ...] = TUNED_BUDGETS
    seeds: int = SEEDS
    name: str = "isoflop-tuned"
    run_budgets: tuple[float, ...] | None = None  # train only these budgets' runs (None: every budget)

    def __post_init__(self) -> None:
        bad = [m for m in self.methods if m not in METHODS]
        if bad or not self.methods:
            raise ValueError(f"unknown methods {bad}; choose among {', '.join(METHODS)}")
        if not self.tuned_budgets or any(b not in self.budgets for b in self.tuned_budgets):
            raise ValueError(f"tuned budgets {self.tuned_budgets} must be some of the budgets {self.budgets}")
        object.__setattr__(self, "budgets", tuple(sorted(self.budgets)))

    @property
    def report_budgets(self) -> tuple[float, ...]:
        """The budgets the report covers: those whose runs this plan trains."""
        return self.budgets if self.run_budgets is None else self.run_budgets

    def records(self, own: Records) -> Records:
        """This table's records, plus the first table's (a tuning point at paper settings is its run)."""
        return self.paper_records() | own

    def _phase(self, phase: str) -> Callable[[RunSpec], RunSpec]:
        return lambda s: s.with_(phase=phase)

    def _lr_sweep(self, spec: RunSpec, recs: Records, phase: str) -> tuple[list[RunSpec], RunSpec | None]:
        runs, _, best = sweep(LR_GRID, _start(LR_GRID, spec.lr_mult),
                              lambda v: _one(spec.with_(lr_mult=v, phase=phase)), recs)
        return runs, best

    def tune(self, start: RunSpec, recs: Records) -> tuple[list[RunSpec], RunSpec | None, dict[str, int]]:
        """Step 2 at ``start`` (the candidate optimum at paper settings): the runs so far, the tuned
        run (None until every knob is decided) and the number of runs each knob took."""
        spec, runs, counts = start.with_(phase="tune"), [], {}
        for knob in knobs(start.method, size(start.size).n_layers):
            first = knob.grid if knob.categorical else _start(knob.grid, knob.get(spec))
            specs, _, best = sweep(knob.grid, first, lambda v, k=knob, at=spec: _one(k.put(at, v).with_(phase="tune")),
                                   recs)
            runs += specs
            counts[knob.name] = len(specs)
            if best is None:
                return runs, None, counts
            spec = best
        return runs, spec, counts

    def sizes(self, tuned: RunSpec, recs: Records) -> tuple[list[RunSpec], RunSpec | None]:
        """Step 3: the ladder around ``tuned``'s size with its knobs, the LR swept at every size (``tuned``'s
        own included); the runs so far and the best run (None until its size is bracketed)."""
        names = tuple(s.name for s in SIZES)
        i = names.index(tuned.size)

        def at(name: str) -> tuple[list[RunSpec], RunSpec | None]:
            knobbed = tuned if name == tuned.size else self.carry(tuned, name)
            runs, best = self._lr_sweep(knobbed, recs, "tune-size")
            if stuck(runs, best, recs):
                best = runs[0]  # every LR diverged here (the sweep is stuck): a point worse than any other
            return runs, best

        runs, _, best = sweep(names, names[max(0, i - 1): i + 2], at, recs)
        return runs, best

    def carry(self, tuned: RunSpec, name: str) -> RunSpec:
        """``tuned``'s knobs on trunk ``name``; the memory's block by its index, where that trunk has
        it (else the trunk's own middle block), also where the index was ``tuned``'s own middle block and
        so no override; moe-fine's granularity as its (experts, expert size as a multiple of the width,
        top-k), so that it keeps the paper settings' FLOPs and parameters there."""
        spec = tuned.with_(size=name)
        blocks = size(name).n_layers
        kept = tuple(o for o in spec.overrides if not o.startswith("placement="))
        spec = _overrides(spec.with_(overrides=kept))
        if tuned.method in ("peer", "pkm"):
            block = _block_get(tuned)
            if block < blocks:
                spec = _overrides(spec, placement=[block])  # dropped again where it is this trunk's middle
        if tuned.method == "moe-fine":
            spec = _granularity_put(spec, _granularity_get(tuned))
        return spec

    def runs(self, recs: Records) -> Iterator[RunSpec]:
        """Every run the table needs as far as the records decide, budget by budget (of ``run_budgets``)."""
        return (spec for spec, _ in self._walk(recs) if self.run_budgets is None or spec.budget in self.run_budgets)

    def _walk(self, recs: Records) -> Iterator[tuple[RunSpec, RunSpec | None]]:
        """``runs``, each with the spec its size ladder is centred on (the tuned run the ladder carries to
        the other trunks; None for the tuning runs before it)."""
        paper_recs = self.paper_records()
        paper_ch = self.paper.choices(paper_recs)
        optima = compute_optimal(self.paper, paper_recs)
        carried: dict[str, RunSpec] = {}
        for budget in self.budgets:
            for method in self.methods:
                if budget in self.tuned_budgets:  # later budgets carry this one's knobs: none until it has them
                    carried.pop(method, None)
                o = optima.get((budget, method))
                if not o or not o["decided"]:  # at an end of the size grid the ladder is finished too
                    continue
                start = self.paper.ladder_spec(budget, method, o["size"], paper_ch)
                if budget in self.tuned_budgets:
                    runs, tuned, _ = self.tune(start, recs)
                    yield from ((r, None) for r in runs)
                    if tuned is None:
                        continue
                    carried[method] = tuned
                elif method in carried:
                    tuned = self.carry(carried[method], start.size).with_(budget=budget, lr_mult=start.lr_mult)
                    runs, tuned = self._lr_sweep(tuned, recs, "tune-size")
                    yield from ((r, None) for r in runs)
                    if tuned is None:
                        continue
                else:
                    continue
                runs, best = self.sizes(tuned, recs)
                yield from ((r, tuned) for r in runs)
                if best is not None:
                    for seed in range(1, self.seeds):
                        yield best.with_(phase="seed", seed=seed), tuned

    def optima(self, recs: Records) -> dict[tuple[float, str], dict[str, Any]]:
        """(budget, method) -> the tuned optimum's seed-0 run (``spec``), the records of its seeds in
        seed order (``runs``), the number of distinct tuning runs (``tuning_runs``), the spec its size
        ladder was centred on (``center``: ``carry`` of it gives the ladder's knobs on each trunk) and
        the run ids of that ladder (``ladder``: every LR at every size it tried), for every (budget,
        method) whose optimum is decided."""
        planned = list(self._walk(recs))
        out = {}
        for budget in self.budgets:
            for method in self.methods:
                runs = [(s, c) for s, c in planned if s.budget == budget and s.method == method]
                seeds = [(s, c) for s, c in runs if s.phase == "seed"]
                if not seeds:
                    continue
                specs = [seeds[0][0].with_(phase="tune", seed=0), *(s for s, _ in seeds)]
                out[budget, method] = {"spec": specs[0], "runs": [recs[s.run_id] for s in specs if s.run_id in recs],
                                       "tuning_runs": len({s.run_id for s, _ in runs if s.phase != "seed"}),
                                       "center": seeds[0][1],
                                       "ladder": {s.run_id for s, c in runs if c is not None and s.phase != "seed"}}
        return out


def tuned_study(results: str | os.PathLike[str], paper_results: str | os.PathLike[str],
                work: str | os.PathLike[str] | None = None, budgets: tuple[float, ...] = BUDGETS,
                methods: tuple[str, ...] = METHODS, threads: int = 1, log: Callable[[str], None] = print,
                device: str = "cpu") -> Runner:
    """The runner of the tuned table: records in ``results``, the first table's in ``paper_results``;
    checkpoints in ``work`` (default ``$PEERLM_CACHE/study/isoflop``, the first table's, so that a
    run both tables need trains once). ``budgets`` picks which budgets' runs are trained; the plan
    always reads every budget, since a later budget's knobs come from the tuned budgets before it."""
    work = work if work is not None else cache_dir() / "study" / "isoflop"
    every = tuple(sorted(set(BUDGETS) | set(budgets)))
    # a budget off the standard grid gets the full pass below the last tuned budget, as those do
    tuned = tuple(b for b in every if b in TUNED_BUDGETS or b < max(TUNED_BUDGETS))
    paper = IsoflopPlan(every, METHODS)
    paper_store = RecordStore(paper_results)
    plan = TunedPlan(paper, paper_store.records, every, tuple(methods), tuned,
                     run_budgets=None if set(budgets) == set(every) else tuple(sorted(budgets)))
    for b in sorted(budgets):
        source = max((t for t in tuned if t < b), default=None)
        if b not in tuned and source is not None and source not in budgets:
            log(f"study: {budget_name(b)} carries the knobs of the {budget_name(source)} tuned optimum, so it waits "
                f"for that budget's tuning: add --budget {budget_name(source)}, or run it in another lane")
    return Runner(plan, RecordStore(results), work, threads=threads, log=log, device=device)
