"""Every registered plan, computed from the committed records, is the one pinned in
``data/committed_plans.json``: the runs (every RunSpec field, in order) the study driver planned from
these records before plans became data, and the runs it left pending once the newest records of each
study were removed. A change to a plan, the registry or the runner that moves a run fails here."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from peerlm.cli import main
from peerlm.study import ABLATIONS, AblationSpec, RunSpec, ablation_study, isoflop_study
from peerlm.study.ablations import register

ROOT = Path(__file__).resolve().parents[2]
PINNED = json.loads((Path(__file__).parent / "data" / "committed_plans.json").read_text("utf-8"))
STUDIES = ("isoflop", "experts", "active", "querynorm", "expert-lr", "placement")
FIRST_PASS = {"budgets": (2e12, 8e12), "seeds": 2}  # the isoFLOP study the committed records finished


def studies(results: Path) -> dict:
    iso = isoflop_study(results / "isoflop", log=lambda s: None, **FIRST_PASS)
    return {"isoflop": iso} | {name: ablation_study(name, results / name, iso) for name in ABLATIONS}


def fields(spec: RunSpec) -> dict:
    d = dataclasses.asdict(spec) | {"run_id": spec.run_id}
    if d["routing_ratio"] is None:  # a field newer than the pins: unset, the runs are the pinned ones
        del d["routing_ratio"]
    return json.loads(json.dumps(d))  # tuples as lists


def test_the_registry_holds_every_ablation_in_order():
    assert tuple(ABLATIONS) == STUDIES[1:] and tuple(PINNED) == tuple(sorted(STUDIES))
    assert all(isinstance(a, AblationSpec) and a.name == name and a.help for name, a in ABLATIONS.items())
    with pytest.raises(ValueError, match="registered already"):
        register(ABLATIONS["experts"])


def test_plans_from_the_committed_records_are_the_pinned_ones():
    for name, study in studies(ROOT / "results").items():
        assert [fields(s) for s in study.planned()] == PINNED[name]["plan"], name
        assert study.pending() == [], name


def test_pending_runs_without_the_newest_records_are_the_pinned_ones(tmp_path):
    for name in STUDIES:
        shutil.copytree(ROOT / "results" / name / "runs", tmp_path / name / "runs")
        for run_id in PINNED[name]["removed"]:
            (tmp_path / name / "runs" / f"{run_id}.json").unlink()
    for name, study in studies(tmp_path).items():
        assert [s.run_id for s in study.pending()] == PINNED[name]["pending_after_removal"], name


def test_an_ablation_is_a_registry_entry(tmp_path, capsys):
    """A new ablation is one ``register`` call: the runner plans it, the CLI lists and runs it."""
    def runs(start):
        yield start.variant(start.base, num_experts=128**2)

    entry = AblationSpec("tiny-n", "N = 128^2 only", runs, "number of experts N", lambda r: ("PEER", r["num_experts"]))
    register(entry)
    try:
        iso = isoflop_study(ROOT / "results" / "isoflop", log=lambda s: None)
        planned = list(ablation_study("tiny-n", tmp_path / "tiny-n", iso).planned())
        assert [s.run_id for s in planned] == ["2e12_peer_L1d48_lr2_x3_numexperts16384_tok2725888_s0"]
        assert planned[0].phase == "tiny-n" and planned[0].model().ffn.num_experts == 128**2
        assert main(["study", "tiny-n", "--results", str(tmp_path / "tiny-n"), "--isoflop-results",
                     str(ROOT / "results" / "isoflop"), "--plan", "--no-calibrate"]) == 0
        assert "numexperts16384_tok2725888_s0" in capsys.readouterr().out
    finally:
        del ABLATIONS["tiny-n"]
