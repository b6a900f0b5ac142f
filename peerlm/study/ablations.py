"""The paper's ablations (He 2024, sec. 3.2; SPEC.md "Ablations", Table 2) on the isoFLOP study's machinery.

Each ablation starts from the isoFLOP study's compute-optimal PEER model at its smaller budget (its
trunk, LR multiplier and expert-table LR ratio, read from the study's records) and changes one
thing; every run trains for the same number of tokens as that model did, so that the FLOP charge of
retrieval (which grows with sqrt(N) and h) does not change the data seen.

- ``experts``: N in {128^2, 256^2, 512^2, 1024^2} at h 8, k 16 (h*k = 128).
- ``active``: h*k in {32, 64, 128, 256, 512} at the study's N, two (h, k) splits per product, then a
  third with half the heads of the first (``ACTIVE_FEWER_HEADS``), so that the best head count of
  each product is bracketed from below wherever the split with fewer heads wins (the paper's claim
  is about that best head count), and a fourth with half of those heads again at 128 and 256, where
  the third won by more than the seed spread (``ACTIVE_FEWEST_HEADS``). Last, the two splits of the smallest product with the gates
  normalised over a token's h*k scores instead of each head's k (``gate="softmax-token"``): with
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
to ``results/<ablation>/runs/`` and are resumable exactly like the study's (``Study.run``); a run
that another ablation in the same results folder has recorded is read from there, not trained again.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from peerlm.config import to_dict
from peerlm.study.design import SIZES, RunSpec, budget_name, model_config, size
from peerlm.study.isoflop import Study, spec_of

__all__ = ["ABLATIONS", "Ablation", "StudyNotReady"]

ABLATIONS = ("experts", "active", "querynorm", "expert-lr", "placement")
EXPERTS = (128**2, 256**2, 512**2, 1024**2)
ACTIVE = {32: ((2, 16), (8, 4)), 64: ((4, 16), (8, 8)), 128: ((8, 16), (16, 8)), 256: ((8, 32), (16, 16)),
          512: ((16, 32), (32, 16))}
ACTIVE_FEWER_HEADS = {32: (1, 32), 64: (2, 32), 128: (4, 32), 256: (4, 64), 512: (8, 64)}
ACTIVE_FEWEST_HEADS = {128: (2, 64), 256: (2, 128)}  # a fourth split where the third one won, by > 1 ppl
QUERY_NORMS = ("batchnorm", "running", "none")
QUERY_NORM_EXPERTS = (128**2, 256**2)
EXPERT_RATIOS = (1.0, 3.0, 10.0)
PLACEMENTS = ("[1]", "all")  # besides the study's own placement ("middle": block 0 of two)


def _but_device(train: dict[str, Any]) -> dict[str, Any]:
    """A train config's fields but the device (a run on another device is the same run)."""
    return {k: v for k, v in train.items() if k != "device"}


class StudyNotReady(ValueError):
    """The isoFLOP study has not yet decided what an ablation starts from."""


class Ablation(Study):
    """One ablation: the ``Study`` driver (records, resume, evaluation) with its own plan."""

    def __init__(self, name: str, results: str, isoflop: Study, **kwargs: Any):
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; known: {', '.join(ABLATIONS)}")
        super().__init__(results, work=isoflop.work.parent / name, budgets=isoflop.budgets,
                         methods=("peer", "pkm"), threads=isoflop.threads, log=isoflop.log,
                         device=str(isoflop.device), **kwargs)
        self.name, self.isoflop = name, isoflop

    def data_dir(self):
        return self.isoflop.data_dir()

    def base(self) -> tuple[RunSpec, dict[str, Any]]:
        """The study's compute-optimal PEER run at its smaller budget, and its record."""
        recs = self.isoflop.records()
        ch = self.isoflop.choices(recs)
        b0 = self.isoflop.budgets[0]
        _, best = self.isoflop.ladder(b0, "peer", recs, ch)
        if best is None:
            raise StudyNotReady(f"the isoFLOP study's PEER ladder at {budget_name(b0)} FLOPs is not bracketed yet "
                                f"({self.isoflop.runs_dir}); run `peerlm study isoflop` first")
        spec = self.isoflop._ladder_spec(b0, "peer", best, ch)
        return spec, recs[spec.run_id]

    def records(self) -> dict[str, dict[str, Any]]:
        """This ablation's records, plus the study's records of the runs it reuses (the base run: a
        variant that changes nothing is that run; for ``placement``, the two ladder runs)."""
        out = super().records()
        try:
            spec, rec = self.base()
        except StudyNotReady:
            return out
        out.setdefault(spec.run_id, rec)
        seed = self._base_seed(spec)
        if seed is not None:
            out.setdefault(seed.run_id, self.isoflop.records()[seed.run_id])
        if self.name == "placement":
            iso = self.isoflop.records()
            for ref in self._placement_refs():
                if ref.run_id in iso:
                    out.setdefault(ref.run_id, iso[ref.run_id])
        return out | self._shared_records({s.run_id for s in self.plan(out)} - out.keys())

    def _shared_records(self, run_ids: set[str]) -> dict[str, dict[str, Any]]:
        """Records of ``run_ids`` that another ablation beside this one has already trained: the same
        run id is the same model, recipe, tokens and seed (the phase only names the ablation), so the
        run is trained once (the PKM run with BatchNorm of ``querynorm`` is the 10x point of
        ``expert-lr``; its N = 128^2 run with BatchNorm a point of ``experts``). A record is reused
        only when the config it holds is the one this code derives from its run id."""
        out: dict[str, dict[str, Any]] = {}
        for other in ABLATIONS:
            runs = self.results.parent / other / "runs"
            if other == self.name or not runs.is_dir() or runs.resolve() == self.runs_dir.resolve():
                continue
            for run_id in sorted(run_ids - out.keys()):
                f = runs / f"{run_id}.json"
                if f.is_file():
                    rec = json.loads(f.read_text("utf-8"))
                    spec = spec_of(rec)
                    if rec["model"] == to_dict(spec.model()) and _but_device(rec["train"]) == _but_device(
                            to_dict(spec.train())):
                        out[run_id] = rec
        return out

    def _base_seed(self, base: RunSpec) -> RunSpec | None:
        """The study's second seed of the base run (its ``seed`` phase), where it has one: the base
        point of ``experts`` and ``active`` then has two seeds like the ends of the sweep."""
        seed = base.with_(phase="seed", seed=1)
        return seed if self.name in ("experts", "active") and seed.run_id in self.isoflop.records() else None

    def _placement_refs(self) -> list[RunSpec]:
        """The study's ladder runs (one per memory method) on the two-block trunk at the smaller budget."""
        trunk = next(s.name for s in SIZES if s.n_layers == 2)
        ch = self.isoflop.choices(self.isoflop.records())
        return [self.isoflop._ladder_spec(self.isoflop.budgets[0], m, trunk, ch) for m in ("peer", "pkm")]

    def _variant(self, base: RunSpec, spec: RunSpec, tokens: int, method: str = "peer", seed: int = 0,
                 **changes: Any) -> RunSpec:
        """``spec`` (the base run or it with another expert LR ratio) with ffn fields changed, at equal
        tokens; the base run itself when that changes nothing."""
        default = model_config(method, size(spec.size)).ffn
        overrides = tuple(f"ffn.{k}={v}" for k, v in sorted(changes.items()) if getattr(default, k) != v)
        if method == base.method and not overrides and seed == base.seed and spec.expert_ratio == base.expert_ratio:
            return base
        return spec.with_(phase=self.name, method=method, overrides=overrides, tokens=tokens, seed=seed)

    def plan(self, recs: dict[str, dict[str, Any]] | None = None) -> Iterator[RunSpec]:
        base, rec = self.base()
        T = rec["train_tokens"]

        def v(spec: RunSpec, *args: Any, **kwargs: Any) -> RunSpec:
            return self._variant(base, spec, *args, **kwargs)

        if self.name == "experts":
            points = [dict(num_experts=n, heads=8, topk=16) for n in EXPERTS]
            ends = [points[0], points[-1]]
        elif self.name == "active":
            points = [dict(heads=h, topk=k) for splits in ACTIVE.values() for h, k in splits]
            ends = [dict(heads=h, topk=k) for h, k in (ACTIVE[min(ACTIVE)][0], ACTIVE[max(ACTIVE)][0])]
        elif self.name == "querynorm":
            points = [dict(num_experts=n, query_norm=q) for n in QUERY_NORM_EXPERTS for q in QUERY_NORMS]
            ends = [dict(num_experts=QUERY_NORM_EXPERTS[-1], query_norm=q) for q in ("batchnorm", "none")]
        elif self.name == "placement":
            iso = self.isoflop.records()
            for ref in self._placement_refs():
                if ref.run_id not in iso:  # the study's ladder runs it; its tokens decide the variants'
                    raise StudyNotReady(f"the isoFLOP study has no record of {ref.run_id} yet "
                                        f"({self.isoflop.runs_dir}); run `peerlm study isoflop` first")
                yield ref
                for where in PLACEMENTS:
                    yield ref.with_(phase=self.name, overrides=(f"placement={where}",),
                                    tokens=iso[ref.run_id]["train_tokens"])
            return
        else:
            for method in ("peer", "pkm"):
                for r in EXPERT_RATIOS:
                    yield v(base.with_(expert_ratio=r), T, method)
            for method in ("peer", "pkm"):
                for r in (EXPERT_RATIOS[0], EXPERT_RATIOS[-1]):
                    yield v(base.with_(expert_ratio=r), T, method, seed=1)
            return
        for p in points:
            yield v(base, T, **p)
        seed = self._base_seed(base)
        if seed is not None and any(v(base, T, **p) == base for p in points):
            yield seed
        for p in ends:
            yield v(base, T, seed=1, **p)
        if self.name == "active":
            for h, k in ACTIVE_FEWER_HEADS.values():
                yield v(base, T, heads=h, topk=k)
            for h, k in ACTIVE_FEWEST_HEADS.values():
                yield v(base, T, heads=h, topk=k)
            for h, k in ACTIVE[min(ACTIVE)]:  # is it the output's scale (it grows with h at fixed h*k)?
                yield v(base, T, heads=h, topk=k, gate="softmax-token")
        if self.name == "querynorm":
            pkm = base.with_(expert_ratio=self.isoflop.choices(self.isoflop.records())["expert_ratio"]["pkm"])
            for q in ("batchnorm", "none"):
                yield v(pkm, T, "pkm", query_norm=q)
