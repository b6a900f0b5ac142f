"""A diverged run (NaN or inf loss) is recorded as such, shown as such, and never chosen or used to
decide a sweep: it counts as worse than any run that did not diverge."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
from pathlib import Path

import pytest
from test_isoflop import B0, fake_record, finish_pending

from peerlm.runconfig import plan_steps
from peerlm.study import isoflop_study
from peerlm.study.ablation_report import ablation_rows, write_ablation_report
from peerlm.study.ablations import StudyNotReady, ablation_study
from peerlm.study.design import LR_GRID, SIZES, RunSpec
from peerlm.study.isoflop import bracket, stuck
from peerlm.study.records import choice_loss, diverged
from peerlm.study.report import compute_optimal, format_table, summary_records, write_report

ROOT = Path(__file__).resolve().parents[2]
NAMES = [s.name for s in SIZES]


def nan_record(spec: RunSpec) -> dict:
    """What a diverged run left before runs were marked: a record whose val loss is NaN."""
    rec = fake_record(spec, 3.0)
    rec["eval"]["val"] |= {"loss": float("nan"), "perplexity": float("nan")}
    return rec


def committed_copy(tmp_path: Path, nan_run: str):
    shutil.copytree(ROOT / "results" / "isoflop" / "runs", tmp_path / "iso" / "runs")
    f = tmp_path / "iso" / "runs" / f"{nan_run}.json"
    rec = json.loads(f.read_text())
    rec["eval"]["val"]["loss"] = rec["eval"]["val"]["perplexity"] = float("nan")
    f.write_text(json.dumps(rec))  # Python writes NaN, as the old runner did
    return isoflop_study(tmp_path / "iso", log=lambda s: None)


@pytest.mark.parametrize("nan_run", ["2e12_peer_L2d64_lr2_x1_s0", "2e12_peer_L1d32_lr2_x3_s0"])
def test_a_nan_record_beside_the_optimum_changes_nothing_but_is_shown(tmp_path, nan_run):
    """A NaN val loss used to win or lose comparisons at random: on the expert-LR sweep's x1 point it
    moved PEER's optimum from L1d48 to L2d64 and added runs to the plan."""
    committed = isoflop_study(ROOT / "results" / "isoflop", log=lambda s: None)
    study = committed_copy(tmp_path, nan_run)
    recs = study.records()
    assert diverged(recs[nan_run]) and choice_loss(recs[nan_run]) == math.inf
    assert [s.run_id for s in study.planned()] == [s.run_id for s in committed.planned()]
    assert [s.run_id for s in study.pending()] == [s.run_id for s in committed.pending()]
    opt = compute_optimal(study.plan, recs)
    assert opt[B0, "peer"]["size"] == "L1d48" and opt[B0, "peer"]["bracketed"]
    assert all(not diverged(r) for o in opt.values() for r in o["runs"] + o["ladder"])
    table = format_table(study, recs, "cmd")
    assert f"| {nan_run} |" in table and "| diverged |" in table.split(f"| {nan_run} |")[1].split("\n")[0]
    assert "1 run(s) diverged" in table and "| nan" not in table.lower()
    rows = summary_records(opt)
    assert all(math.isfinite(r["perplexity"]) for r in rows)


def test_a_diverged_point_is_worse_than_any_finite_one(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "w", budgets=(B0,), methods=("dense",))
    make = lambda m: RunSpec("lr", B0, "dense", "L2d64", lr_mult=m)  # noqa: E731
    recs = {}

    def put(m, rec):
        recs[make(m).run_id] = rec

    put(0.5, fake_record(make(0.5), 3.2))
    put(1.0, fake_record(make(1.0), 3.1))
    put(2.0, nan_record(make(2.0)))  # diverged at the high end: it brackets 1.0 from above
    specs, best = bracket(LR_GRID, (0.5, 1.0, 2.0), make, recs)
    assert best == 1.0 and [s.lr_mult for s in specs] == [0.5, 1.0, 2.0]
    put(0.5, nan_record(make(0.5)))
    put(1.0, nan_record(make(1.0)))  # every point diverged: the sweep grows towards the smaller LR
    specs, best = bracket(LR_GRID, (0.5, 1.0, 2.0), make, recs)
    assert best is None and specs[0].lr_mult == 0.25 and not stuck(specs, best, recs)
    for m in LR_GRID[:2]:
        put(m, dict(fake_record(make(m), 3.0), diverged="loss is nan at step 3"))
    specs, best = bracket(LR_GRID, (0.5, 1.0, 2.0), make, recs)
    assert best is None and stuck(specs, best, recs)  # the grid's low end: no choice at all
    for f in recs.values():
        study.store.write(f)
    assert [s.phase for s in study.pending()] == []  # nothing planned on a choice that was never made
    assert {s.phase for s in study.planned()} == {"lr"}


def test_a_diverged_ladder_run_is_never_the_optimum_nor_grows_the_ladder(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "w", budgets=(B0,), methods=("dense",))
    lo = NAMES.index(study.plan.ladder(B0, "dense", {}, study.plan.choices({}))[0][0].size)
    smallest = NAMES[lo]

    def loss(spec):  # the best finite size is the window's second; its smallest diverges
        return float("nan") if spec.phase == "ladder" and spec.size == smallest and spec.seed == 0 else \
            3.0 + 0.05 * (NAMES.index(spec.size) - lo - 1) ** 2

    for _ in range(100):
        pending = study.pending()
        if not pending:
            break
        spec = pending[0]
        rec = fake_record(spec, loss(spec))
        if math.isnan(loss(spec)):
            rec = dict(fake_record(spec, 3.0), eval={}, diverged="loss is nan at step 7; lower train.lr")
        study.store.write(rec)
    recs = study.records()
    ladder = {r["spec"]["size"] for r in recs.values() if r["phase"] == "ladder"}
    assert NAMES[lo - 1] not in ladder  # the diverged end did not pull the ladder further down
    opt = compute_optimal(study.plan, recs)[B0, "dense"]
    assert opt["size"] == NAMES[lo + 1] and opt["bracketed"]
    paths = write_report(study, command="cmd")
    table = (study.results / "table.md").read_text()
    assert "| diverged |" in table and "isoflop.png" in {p.name for p in paths}


def test_a_run_that_diverges_in_training_is_recorded_diverged_and_not_retried(tmp_path, tiny_data):  # noqa: F811
    lines = []
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(3e10,), methods=("dense",),
                          log=lines.append)
    study.data_dir = lambda: tiny_data
    plain = study.run_config

    def absurd_lr(spec, data):  # an LR no weights survive: the loss becomes NaN within a few steps
        run = plain(spec, data)
        return dataclasses.replace(run, train=dataclasses.replace(run.train, lr=1e30))

    study.run_config = absurd_lr
    spec = study.pending()[0]
    assert study.run(max_runs=1) == 1  # no TrainError escapes
    rec = json.loads((study.runs_dir / f"{spec.run_id}.json").read_text())  # strict JSON: no NaN in it
    assert rec["diverged"].startswith("loss is ") and rec["eval"] == {} and diverged(rec)
    assert rec["steps"] < plan_steps(plain(spec, tiny_data))[0] and rec["train_seconds"] >= 0
    assert spec.run_id not in {s.run_id for s in study.pending()}
    assert any("diverged" in line and "move the record aside" in line for line in lines)
    assert "| diverged |" in format_table(study, study.records(), "cmd")


def test_a_run_whose_val_loss_is_not_finite_is_recorded_diverged(tmp_path, tiny_data, monkeypatch):  # noqa: F811
    import peerlm.study.runner as runner

    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(3e10,), methods=("dense",),
                          log=lambda s: None)
    study.data_dir = lambda: tiny_data
    evaluate = runner.evaluate_run

    def nan_val(out, splits, **kw):
        res = evaluate(out, splits=splits, **kw)
        if "val" in res:
            res["val"] |= {"loss": float("inf"), "perplexity": float("inf")}
        return res

    monkeypatch.setattr(runner, "evaluate_run", nan_val)
    spec = study.pending()[0]
    rec = study.run_one(spec)
    assert rec["diverged"].startswith("the validation loss is inf")
    on_disk = json.loads((study.runs_dir / f"{spec.run_id}.json").read_text())
    assert on_disk["eval"]["val"]["loss"] is None and on_disk["eval"]["wiki"]["loss"] > 0
    assert diverged(study.records()[spec.run_id]) and spec.run_id not in {s.run_id for s in study.pending()}


@pytest.fixture
def iso(tmp_path):
    study = isoflop_study(tmp_path / "iso", work=tmp_path / "work" / "isoflop", budgets=(B0,), methods=("peer",),
                          log=lambda s: None)
    finish_pending(study, lambda s: 3.0 + 0.05 * (NAMES.index(s.size) - 2) ** 2 + 0.01 * s.seed
                   + 0.01 * abs(math.log(s.expert_ratio / 3)))
    return study


def test_an_ablation_shows_a_diverged_run_and_plots_the_rest(iso, tmp_path):
    ab = ablation_study("experts", tmp_path / "experts", iso)
    pending = ab.pending()
    finish_pending(ab, lambda s: 3.0)
    gone = pending[0]
    ab.store.write(dict(fake_record(gone, 3.0), eval={}, diverged="loss is nan at step 9; lower train.lr"))
    rows = ablation_rows(ab)
    mine = [r for r in rows if r["run_id"] == gone.run_id]
    assert len(mine) == 1 and mine[0]["perplexity"] is None and mine[0]["diverged"].startswith("loss is nan")
    paths = write_ablation_report(ab, command="cmd")
    table = (ab.results / "table.md").read_text()
    assert "diverged" in table and f"{ab.plan.name}.png" in {p.name for p in paths}


def test_an_ablation_cannot_start_from_a_sweep_that_all_diverged(tmp_path):
    study = isoflop_study(tmp_path / "iso", work=tmp_path / "w", budgets=(B0,), methods=("peer",),
                          log=lambda s: None)
    for _ in range(100):
        pending = study.pending()
        if not pending:
            break
        if pending[0].method == "dense":  # the LR sweep every run needs: decided
            study.store.write(fake_record(pending[0], 3.0 + abs(pending[0].lr_mult - 2)))
        else:
            study.store.write(nan_record(pending[0]) | {"diverged": "loss is nan at step 1"})
    ratios = sorted(r["spec"]["expert_ratio"] for r in study.records().values() if r["spec"]["method"] == "peer")
    assert ratios == [0.3, 1.0, 3.0, 10.0]  # grown to the grid's low end, then nothing more is planned
    assert "peer" in study.plan.choices(study.records())["stuck"]
    with pytest.raises(StudyNotReady, match="every run of the isoFLOP study's expert-LR sweep of PEER at 2e12 FLOPs "
                                            "diverged"):
        ablation_study("experts", tmp_path / "experts", study).pending()
