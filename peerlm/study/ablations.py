"""The paper's ablations (He 2024, sec. 3.2, Table 2) as plans the study runner executes.

Each ablation starts from the isoFLOP study's compute-optimal PEER model at its smaller budget (its
trunk, LR multiplier and expert-table LR ratio, read from the study's records) and changes one
thing; every run trains for the same number of tokens as that model did, so that the FLOP charge of
retrieval (which grows with sqrt(N) and h) does not change the data seen.

- ``experts``: N in {128^2, 256^2, 512^2, 1024^2} at h 8, k 16 (h*k = 128).
- ``active``: h*k in {32, 64, 128, 256, 512} at the study's N, two (h, k) splits per product, then a
  third with half the heads of the first (``ACTIVE_FEWER_HEADS``), so that the best head count of
  each product is bracketed from below wherever the split with fewer heads wins (the paper's claim
  is about that best head count), and a fourth with half of those heads again at 128 and 256, where
  the third won by more than the seed spread (``ACTIVE_FEWEST_HEADS``). Last, the two splits of the
  smallest product with the gates normalised over a token's h*k scores instead of each head's k
  (``gate="softmax-token"``): with
  per-head softmax the output's scale grows with h at fixed h*k, and this tells that apart from
  what the (h, k) split does to retrieval.
- ``querynorm``: query BatchNorm (the paper) vs the causal-safe running norm vs none, at N = 128^2
  and 256^2; usage and unevenness over the whole validation split, laid out like Table 2. PKM (its
  study settings, same trunk and tokens) with BatchNorm and without, so that what the norm does to
  PEER can be told from what it does to product-key retrieval in general.
- ``expert-lr``: the expert-table LR ratio {1, 3, 10} for PEER and for PKM (PKM on the same trunk,
  its own study settings).
- ``placement``: which block holds the memory, PEER and PKM each: the first block (the study's
  "middle" of two), the second, or both, on the smallest two-block trunk of the study's ladder
  (L2 d64) with each method's own study settings; every variant trains for the tokens of that
  method's ladder run there (the one-block variant is that run, so both blocks cost more FLOPs).

The runs at the ends of each sweep (the points a conclusion rests on) get a second seed. Records go
to ``results/<ablation>/runs/`` and are resumable exactly like the study's (the same ``Runner``); a
run that another ablation in the same results folder has recorded is read from there, not trained
again.

Each ablation is an ``AblationSpec`` in the registry ``ABLATIONS``: a function that, given where the
ablation starts (``Start``), yields its runs, plus how its report lays them out. Adding an ablation
is one ``register(AblationSpec(...))``; ``peerlm study <name>`` and its report pick it up.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peerlm.config import to_dict
from peerlm.study.design import SIZES, RunSpec, budget_name, model_config, size
from peerlm.study.isoflop import IsoflopPlan, stuck
from peerlm.study.records import Records, RecordStore, diverged, read_record, same_train, spec_of
from peerlm.study.runner import Runner, tokens_of

__all__ = ["ABLATIONS", "AblationSpec", "AblationPlan", "Start", "StudyNotReady", "ablation_study", "register",
           "placement_refs"]

EXPERTS = (128**2, 256**2, 512**2, 1024**2)
ACTIVE = {32: ((2, 16), (8, 4)), 64: ((4, 16), (8, 8)), 128: ((8, 16), (16, 8)), 256: ((8, 32), (16, 16)),
          512: ((16, 32), (32, 16))}
ACTIVE_FEWER_HEADS = {32: (1, 32), 64: (2, 32), 128: (4, 32), 256: (4, 64), 512: (8, 64)}
ACTIVE_FEWEST_HEADS = {128: (2, 64), 256: (2, 128)}  # a fourth split where the third one won, by > 1 ppl
QUERY_NORMS = ("batchnorm", "running", "none")
QUERY_NORM_EXPERTS = (128**2, 256**2)
EXPERT_RATIOS = (1.0, 3.0, 10.0)
PLACEMENTS = ("[1]", "all")  # besides the study's own placement ("middle": block 0 of two)


class StudyNotReady(ValueError):
    """The isoFLOP study has not yet decided what an ablation starts from."""


@dataclass(frozen=True)
class Start:
    """What the ablation ``name`` starts from, read from the isoFLOP study's records ``iso``: the
    study's compute-optimal PEER run at its smaller budget (``base``), the tokens it trained for, and
    the study's choices (LR multiplier, each memory method's expert-table LR ratio)."""

    name: str
    base: RunSpec
    tokens: int
    choices: dict[str, Any]
    iso: Records
    iso_plan: IsoflopPlan
    iso_runs: Path  # where the study's records are, for messages

    def variant(self, spec: RunSpec, method: str = "peer", seed: int = 0, **changes: Any) -> RunSpec:
        """``spec`` (the base run or it with another expert LR ratio) with ffn fields changed, at the
        base run's tokens; the base run itself when that changes nothing."""
        default = model_config(method, size(spec.size)).ffn
        overrides = tuple(f"ffn.{k}={v}" for k, v in sorted(changes.items()) if getattr(default, k) != v)
        base = self.base
        if method == base.method and not overrides and seed == base.seed and spec.expert_ratio == base.expert_ratio:
            return base
        return spec.with_(phase=self.name, method=method, overrides=overrides, tokens=self.tokens, seed=seed)

    def base_seed(self) -> RunSpec | None:
        """The study's second seed of the base run (its ``seed`` phase), where it has a record."""
        seed = self.base.with_(phase="seed", seed=1)
        return seed if seed.run_id in self.iso else None

    def ladder_run(self, method: str, size_name: str) -> RunSpec:
        """The study's ladder run of ``method`` on the trunk ``size_name`` at its smaller budget."""
        return self.iso_plan.ladder_spec(self.iso_plan.budgets[0], method, size_name, self.choices)

    def sweep(self, points: list[dict[str, Any]], ends: list[dict[str, Any]], base_seed: bool) -> Iterator[RunSpec]:
        """The PEER variants ``points``; then, with ``base_seed``, the study's second seed of the base
        run where that is a point and has a record; then a second seed of the ``ends``."""
        for p in points:
            yield self.variant(self.base, **p)
        seed = self.base_seed() if base_seed else None
        if seed is not None and any(self.variant(self.base, **p) == self.base for p in points):
            yield seed
        for p in ends:
            yield self.variant(self.base, seed=1, **p)


def _describe_base(start: Start) -> str:
    base = start.base
    return (f"Every run starts from the isoFLOP study's compute-optimal PEER model at {budget_name(base.budget)} "
            f"FLOPs (trunk {base.size}, LR x{base.lr_mult:g}, expert LR ratio {base.expert_ratio:g}) and "
            f"trains for its {start.tokens:,} tokens. ")


@dataclass(frozen=True)
class AblationSpec:
    """One ablation as data: its runs, derived from where it starts, and how its report lays them out.

    ``runs`` yields every run in plan order; ``reuses`` names the isoFLOP study's runs whose records
    it reads instead of training them (a variant that changes nothing is the base run). The report
    plots each validation row at ``point(row)`` (series label, x; a string x is a category) against
    a log x axis of base ``log_base`` (None: categories), and ``describe`` says where the runs start.
    """

    name: str
    help: str
    runs: Callable[[Start], Iterator[RunSpec]]
    xlabel: str
    point: Callable[[dict[str, Any]], tuple[str, Any]]
    log_base: int | None = 2
    reuses: Callable[[Start], list[RunSpec]] = lambda s: [s.base]
    describe: Callable[[Start], str] = _describe_base


ABLATIONS: dict[str, AblationSpec] = {}  # by name, in the order the CLI lists them


def register(spec: AblationSpec) -> AblationSpec:
    if spec.name in ABLATIONS:
        raise ValueError(f"an ablation named {spec.name!r} is registered already")
    ABLATIONS[spec.name] = spec
    return spec


def _with_base_seed(s: Start) -> list[RunSpec]:
    return [s.base] + ([s.base_seed()] if s.base_seed() is not None else [])


def _experts(s: Start) -> Iterator[RunSpec]:
    points = [dict(num_experts=n, heads=8, topk=16) for n in EXPERTS]
    yield from s.sweep(points, [points[0], points[-1]], base_seed=True)


def _active(s: Start) -> Iterator[RunSpec]:
    points = [dict(heads=h, topk=k) for splits in ACTIVE.values() for h, k in splits]
    ends = [dict(heads=h, topk=k) for h, k in (ACTIVE[min(ACTIVE)][0], ACTIVE[max(ACTIVE)][0])]
    yield from s.sweep(points, ends, base_seed=True)
    for h, k in ACTIVE_FEWER_HEADS.values():
        yield s.variant(s.base, heads=h, topk=k)
    for h, k in ACTIVE_FEWEST_HEADS.values():
        yield s.variant(s.base, heads=h, topk=k)
    for h, k in ACTIVE[min(ACTIVE)]:  # is it the output's scale (it grows with h at fixed h*k)?
        yield s.variant(s.base, heads=h, topk=k, gate="softmax-token")


def _querynorm(s: Start) -> Iterator[RunSpec]:
    points = [dict(num_experts=n, query_norm=q) for n in QUERY_NORM_EXPERTS for q in QUERY_NORMS]
    ends = [dict(num_experts=QUERY_NORM_EXPERTS[-1], query_norm=q) for q in ("batchnorm", "none")]
    yield from s.sweep(points, ends, base_seed=False)
    pkm = s.base.with_(expert_ratio=s.choices["expert_ratio"]["pkm"])
    for q in ("batchnorm", "none"):
        yield s.variant(pkm, "pkm", query_norm=q)


def _expert_lr(s: Start) -> Iterator[RunSpec]:
    for method in ("peer", "pkm"):
        for r in EXPERT_RATIOS:
            yield s.variant(s.base.with_(expert_ratio=r), method)
    for method in ("peer", "pkm"):
        for r in (EXPERT_RATIOS[0], EXPERT_RATIOS[-1]):
            yield s.variant(s.base.with_(expert_ratio=r), method, seed=1)


def placement_refs(s: Start) -> list[RunSpec]:
    """The study's ladder runs (one per memory method) on the two-block trunk at the smaller budget."""
    trunk = next(sz.name for sz in SIZES if sz.n_layers == 2)
    return [s.ladder_run(m, trunk) for m in ("peer", "pkm")]


def _placement(s: Start) -> Iterator[RunSpec]:
    for ref in placement_refs(s):
        if ref.run_id not in s.iso:  # the study's ladder runs it; its tokens decide the variants'
            raise StudyNotReady(f"the isoFLOP study has no record of {ref.run_id} yet "
                                f"({s.iso_runs}); run `peerlm study isoflop` first")
        yield ref
        rec = s.iso[ref.run_id]
        # a diverged reference stopped early: its variants train for the tokens it was planned for
        tokens = rec["train_tokens"] if not diverged(rec) else tokens_of(ref.model(), ref.train())
        for where in PLACEMENTS:
            yield ref.with_(phase=s.name, overrides=(f"placement={where}",), tokens=tokens)


def _describe_placement(s: Start) -> str:
    refs = placement_refs(s)
    return (f"Each method starts from its isoFLOP ladder run on the two-block trunk {refs[0].size} at "
            f"{budget_name(s.base.budget)} FLOPs (its study settings: LR x{s.base.lr_mult:g}, expert LR ratio "
            + ", ".join(f"{r.method} {r.expert_ratio:g}" for r in refs)
            + "), which holds the memory in block 0, and trains every variant for that run's tokens. ")


def _active_point(r: dict[str, Any]) -> tuple[str, Any]:
    return f"h = {r['heads']}" + (f", gate {r['gate']}" if r["gate"] != "softmax" else ""), r["heads"] * r["topk"]


register(AblationSpec("experts", "PEER perplexity against the number of experts N at fixed h*k", _experts,
                      "number of experts N", lambda r: ("PEER h8 k16", r["num_experts"]), reuses=_with_base_seed))
register(AblationSpec("active", "PEER perplexity against the active experts h*k, three or four (h, k) splits each",
                      _active, "active experts h*k", _active_point, reuses=_with_base_seed))
register(AblationSpec("querynorm", "query BatchNorm vs running norm vs none: perplexity, usage, unevenness",
                      _querynorm, "number of experts N",
                      lambda r: (f"{r['method']}, query norm {r['query_norm']}", r["num_experts"])))
register(AblationSpec("expert-lr", "expert-table LR ratio 1, 3, 10 for PEER and PKM", _expert_lr,
                      "expert-table LR ratio", lambda r: (r["method"], r["expert_lr_ratio"]), log_base=10))
register(AblationSpec("placement", "PEER and PKM in the first, the second or both blocks of a two-block trunk",
                      _placement, "blocks holding the memory", lambda r: (r["method"], r["blocks"]), log_base=None,
                      reuses=lambda s: [s.base, *placement_refs(s)], describe=_describe_placement))


@dataclass(frozen=True)
class AblationPlan:
    """The plan of the ablation ``spec``, read from the isoFLOP study (its plan and record store)
    and, for runs two ablations share, from the ablations beside ``results``."""

    spec: AblationSpec
    iso_plan: IsoflopPlan
    iso_store: RecordStore
    results: Path

    @property
    def name(self) -> str:
        return self.spec.name

    def start(self) -> Start:
        """Where the ablation starts; ``StudyNotReady`` while the study's PEER ladder at its smaller
        budget is not bracketed."""
        recs = self.iso_store.records()
        ch = self.iso_plan.choices(recs)
        b0 = self.iso_plan.budgets[0]
        specs, best = self.iso_plan.ladder(b0, "peer", recs, ch)
        if "peer" in ch["stuck"] or stuck(specs, best, recs):
            sweep = "expert-LR sweep" if "peer" in ch["stuck"] else "ladder"
            raise StudyNotReady(f"every run of the isoFLOP study's {sweep} of PEER at {budget_name(b0)} FLOPs "
                                f"diverged ({self.iso_store.runs_dir}): it has no compute-optimal model to start from")
        if best is None:
            raise StudyNotReady(f"the isoFLOP study's PEER ladder at {budget_name(b0)} FLOPs is not bracketed yet "
                                f"({self.iso_store.runs_dir}); run `peerlm study isoflop` first")
        base = self.iso_plan.ladder_spec(b0, "peer", best, ch)
        return Start(self.name, base, recs[base.run_id]["train_tokens"], ch, recs, self.iso_plan,
                     self.iso_store.runs_dir)

    def runs(self, recs: Records) -> Iterator[RunSpec]:
        """The ablation's runs (they depend on the study's records only, not on ``recs``)."""
        return self.spec.runs(self.start())

    def records(self, own: Records) -> Records:
        """This ablation's records, plus the study's records of the runs it reuses (the base run: a
        variant that changes nothing is that run; for ``placement``, the two ladder runs)."""
        out = dict(own)
        try:
            start = self.start()
        except StudyNotReady:
            return out
        for spec in self.spec.reuses(start):
            if spec.run_id in start.iso:
                out.setdefault(spec.run_id, start.iso[spec.run_id])
        return out | self._shared_records({s.run_id for s in self.spec.runs(start)} - out.keys())

    def _shared_records(self, run_ids: set[str]) -> Records:
        """Records of ``run_ids`` that another ablation beside this one has already trained: the same
        run id is the same model, recipe, tokens and seed (the phase only names the ablation), so the
        run is trained once (the PKM run with BatchNorm of ``querynorm`` is the 10x point of
        ``expert-lr``; its N = 128^2 run with BatchNorm a point of ``experts``). A record is reused
        only when the config it holds is the one this code derives from its run id."""
        out: Records = {}
        own = (self.results / "runs").resolve()
        for other in ABLATIONS:
            runs = self.results.parent / other / "runs"
            if other == self.name or not runs.is_dir() or runs.resolve() == own:
                continue
            for run_id in sorted(run_ids - out.keys()):
                f = runs / f"{run_id}.json"
                if f.is_file():
                    rec = read_record(f)
                    spec = spec_of(rec)
                    if rec["model"] == to_dict(spec.model()) and same_train(rec["train"], to_dict(spec.train())):
                        out[run_id] = rec
        return out


def ablation_study(name: str, results: str | Path, iso: Runner) -> Runner:
    """The runner of the ablation ``name`` over ``results``, starting from the isoFLOP study that
    ``iso`` runs; its checkpoints go beside the study's (``<iso work>/../<name>``)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
    if not isinstance(iso.plan, IsoflopPlan):
        raise TypeError(f"an ablation starts from the isoFLOP study, not from {iso.plan.name!r}")
    store = RecordStore(results)
    plan = AblationPlan(ABLATIONS[name], iso.plan, iso.store, store.results)
    return Runner(plan, store, iso.work.parent / name, threads=iso.threads, log=iso.log, device=str(iso.device))
