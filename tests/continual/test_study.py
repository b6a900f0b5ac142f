"""The continual study: bases from the isoFLOP records, the plan's runs, and a tiny study run end to end
(records, resumable skip, report)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from peerlm.cli import main
from peerlm.continual.study import Base, ContinualPlan, ContinualRunner, DocsTask, FactsTask, isoflop_bases
from peerlm.continual.study_report import pareto, write_continual_report
from peerlm.data import TextFiles

from .conftest import write_text

ISOFLOP = Path(__file__).resolve().parents[2] / "results" / "isoflop"


def test_bases_are_the_isoflop_optima_at_the_larger_budget(tmp_path):
    bases = isoflop_bases(ISOFLOP, tmp_path / "iso-work", log=lambda s: None)
    assert [(b.kind, b.run_id) for b in bases] == [("peer", "8e12_peer_L3d80_lr2_x3_s0"),
                                                   ("pkm", "8e12_pkm_L3d80_lr2_x10_s0"),
                                                   ("dense", "8e12_dense_L3d80_lr2_s0")]
    assert all(b.path == tmp_path / "iso-work" / b.run_id and b.make is not None for b in bases)
    runs = list(ContinualPlan(bases).runs())
    assert len(runs) == len({r.run_id for r in runs}) == 2 * (16 + 14 + 7)
    # sparse trains at about each base's own table LR
    fixed = ContinualPlan(bases).fixed("sparse")
    assert {r.base: r.lr(fixed) for r in runs if r.method == "sparse"} == {"peer": 3e-2, "pkm": 1e-1}
    assert not any(r.base == "dense" and r.method in ("memory", "sparse", "grow") for r in runs)
    assert not any(r.base == "pkm" and r.method == "grow" for r in runs)


def test_the_plan_command_lists_the_finetunes(tmp_path, capsys):
    assert main(["study", "continual", "--plan", "--results", str(tmp_path / "r"), "--isoflop-work",
                 str(tmp_path / "w"), "--work", str(tmp_path / "cw")]) == 0
    out = capsys.readouterr().out
    assert "74 finetunes to go (0 recorded)" in out and "peer_facts_sparse_t1000_s0" in out
    assert out.index("peer_facts_") < out.index("dense_facts_") < out.index("peer_docs_")  # the facts first
    assert not (tmp_path / "r").exists()  # a plan writes nothing


def test_pareto_front():
    pts = [{"run_id": "a", "learning": 0.5, "forgetting_val_pct": 1.0},
           {"run_id": "b", "learning": 0.4, "forgetting_val_pct": 2.0},  # worse on both
           {"run_id": "c", "learning": 0.9, "forgetting_val_pct": 5.0}]
    assert pareto(pts) == {"a", "c"}
    pts.append({"run_id": "d", "learning": 0.5, "forgetting_val_pct": 0.0})  # no forgetting dominates a
    assert pareto(pts) == {"c", "d"}


def test_a_tiny_study_runs_records_and_reports(bases, tmp_path):
    text = write_text(tmp_path / "docs.txt", seed=3)
    plan = ContinualPlan(
        bases=(Base("peer", "tiny-peer", bases["peer"]), Base("dense", "tiny", bases["dense"])),
        tasks=(FactsTask(people=30, paraphrases=2), DocsTask(source=TextFiles(text))),
        sweeps=(("sparse", ("slots", (10,), {"lr": 1.0, "optimizer": "sgd", "background": 3})),
                ("lora", ("lora_rank", (2,), {"lr": 1e-3}))),
        steps=3, batch=4)
    study = ContinualRunner(plan, tmp_path / "results", tmp_path / "work", log=lambda s: None)
    assert len(study.pending()) == 6 and plan.seeds == 2
    assert study.run(max_runs=3) == 3
    # the facts sweeps are done: their repeats (seed 1 of each sweep's one point) come before the docs
    assert [s.run_id for s in study.pending()] == ["peer_facts_sparse_t10_s1", "peer_facts_lora_r2_s1",
                                                   "dense_facts_lora_r2_s1", "peer_docs_sparse_t10_s0",
                                                   "peer_docs_lora_r2_s0", "dense_docs_lora_r2_s0"]
    assert study.run() == 9 and study.pending() == [] and study.run() == 0
    recs = study.records()
    assert len(recs) == 12 and recs["peer_facts_sparse_t10_s1"]["spec"]["seed"] == 1
    rec = recs["peer_facts_sparse_t10_s0"]
    base = json.loads((tmp_path / "results" / "bases" / "tiny-peer.json").read_text())
    v = rec["forgetting"]["val"]
    assert v["before"] == base["forgetting"]["val"]["loss"] and abs(v["after"] - v["before"] - v["nats"]) < 1e-12
    assert rec["steps"] == 3 and 0 <= rec["learning"]["exact_match"] <= 1 and rec["finetune"]["slots"] == 10
    assert "test_ppl" in recs["dense_docs_lora_r2_s0"]["learning"]
    paths = write_continual_report(study)
    table = (tmp_path / "results" / "table.md").read_text().splitlines()
    rows = [line for line in table if line.startswith(("| peer |", "| dense |"))]
    assert len(rows) == 6 and table[0].startswith("# Continual learning")  # one row per point
    assert all(line.split(" | ")[4] == "2" for line in rows)  # of two seeds each
    assert {p.name for p in paths} >= {"summary.json", "table.md"}
    summary = json.loads((tmp_path / "results" / "summary.json").read_text())
    assert len(summary["runs"]) == 12 and len(summary["points"]) == 6
    # a finetune directory left by another base (the bases changed) is refused, not resumed
    other = ContinualPlan(bases=(Base("peer", "tiny-peer", bases["dense"]),), tasks=plan.tasks, sweeps=plan.sweeps,
                          steps=3, batch=4)
    again = ContinualRunner(other, tmp_path / "results-2", tmp_path / "work", log=lambda s: None)
    spec = next(s for s in again.pending() if s.run_id == "peer_facts_sparse_t10_s0")
    with pytest.raises(ValueError, match="holds a finetune of the base"):
        again.run_one(spec)
    # and one trained with other settings than the plan now has (here the LR) is not resumed either
    other_lr = ContinualPlan(bases=plan.bases, tasks=plan.tasks, steps=3, batch=4,
                             sweeps=(("sparse", ("slots", (10,), {"lr": 2.0, "optimizer": "sgd", "background": 3})),))
    again = ContinualRunner(other_lr, tmp_path / "results-3", tmp_path / "work", log=lambda s: None)
    spec = next(s for s in again.pending() if s.run_id == "peer_facts_sparse_t10_s0")
    with pytest.raises(ValueError, match="the plan now has .'lr': 2.0"):
        again.run_one(spec)
    # records of a task made with other settings measure something else: refused, and the base's own
    # evaluation is made again for the new settings
    changed = ContinualPlan(bases=plan.bases, tasks=(FactsTask(people=20, paraphrases=2), plan.tasks[1]),
                            sweeps=plan.sweeps, steps=3, batch=4)
    moved = ContinualRunner(changed, tmp_path / "results", tmp_path / "work", log=lambda s: None)
    with pytest.raises(ValueError, match="people': 30.*the plan has.*people': 20"):
        moved.pending()
    assert moved.base_eval(plan.bases[0])["task_settings"]["facts"] == {"people": 20, "paraphrases": 2}
    assert moved.task_data(changed.tasks[0], plan.bases[0]) != study.task_data(plan.tasks[0], plan.bases[0])
    # so are records of a method trained with other fixed settings than the plan's sweep now has
    relr = ContinualPlan(bases=plan.bases, tasks=plan.tasks, steps=3, batch=4,
                         sweeps=(plan.sweeps[0], ("lora", ("lora_rank", (2,), {"lr": 3e-3}))))
    with pytest.raises(ValueError, match=r"trained with \{'lr': 0.001\}.*lora sweep has \{'lr': 0.003\}"):
        ContinualRunner(relr, tmp_path / "results", tmp_path / "work", log=lambda s: None).pending()


def test_a_repeat_is_the_best_learning_point_of_a_finished_sweep(tmp_path):
    plan = ContinualPlan(bases=(Base("peer", "p", tmp_path),), tasks=(FactsTask(),),
                         sweeps=(("sparse", ("slots", (10, 20, 30), {})), ("full", ("lr", (1e-3,), {}))), seeds=3)
    recs = {f"peer_facts_sparse_t{t}_s0": {"learning": {"exact_match": em}} for t, em in ((10, 0.1), (20, 0.3))}
    assert plan.repeats(plan.tasks[0], recs) == ([], 4)  # sparse t=30 and full are not recorded yet
    recs |= {"peer_facts_sparse_t30_s0": {"learning": {"exact_match": 0.2}},
             "peer_facts_full_lr0.001_s0": {"learning": {"exact_match": 0.0}}}
    repeats, unknown = plan.repeats(plan.tasks[0], recs)
    assert unknown == 0 and [s.run_id for s in repeats] == ["peer_facts_sparse_t20_s1", "peer_facts_sparse_t20_s2",
                                                            "peer_facts_full_lr0.001_s1", "peer_facts_full_lr0.001_s2"]
    docs = ContinualPlan(bases=plan.bases, tasks=(DocsTask(),), sweeps=(("full", ("lr", (1e-3, 3e-3), {})),))
    recs = {"peer_docs_full_lr0.001_s0": {"learning": {"test_loss": 3.0}},
            "peer_docs_full_lr0.003_s0": {"learning": {"test_loss": 2.5}}}
    assert [s.run_id for s in docs.repeats(docs.tasks[0], recs)[0]] == ["peer_docs_full_lr0.003_s1"]  # lower loss


def test_points_average_the_seeds():
    from peerlm.continual.study_report import learning_shown, points

    def row(seed, learning, forgetting, task="facts"):
        return {"run_id": f"peer_{task}_full_lr0.001_s{seed}", "base": "peer", "task": task, "method": "full",
                "knob": "lr", "value": 1e-3, "seed": seed, "learning": learning, "learning_before": 0.0,
                "forgetting_val_nats": 1.0,
                "forgetting_val_pct": forgetting, "forgetting_heldout_pct": None}

    [p] = points([row(1, 0.5, 30.0), row(0, 0.1, 10.0)])
    assert p["run_id"] == "peer_facts_full_lr0.001" and p["seeds"] == [0, 1]
    assert p["learning"] == pytest.approx(0.3) and p["learning_range"] == [0.1, 0.5]
    assert p["forgetting_val_pct"] == pytest.approx(20.0) and p["forgetting_val_pct_range"] == [10.0, 30.0]
    assert p["forgetting_heldout_pct"] is None and p["forgetting_val_nats_range"] == [1.0, 1.0]
    assert learning_shown(p) == "30.0% (10.0% to 50.0%)"
    [d] = points([row(0, -2.0, 1.0, "docs"), row(1, -3.0, 2.0, "docs")])  # docs: minus the test loss
    assert learning_shown(d) == "12.18 ppl (7.39 ppl to 20.09 ppl)"
    [one] = points([row(0, 0.25, 5.0)])
    assert learning_shown(one) == "25.0%" and one["learning_range"] is None


def test_the_target_compares_at_90_percent_of_full_finetunings_best():
    from peerlm.continual.study_report import target_lines

    def row(method, value, learning, forgetting):
        return {"run_id": f"peer_facts_{method}_{value}", "base": "peer", "task": "facts", "method": method,
                "knob": "lr", "value": value, "learning": learning, "learning_before": 0.0,
                "forgetting_val_pct": forgetting}

    table = [row("full", 1, 0.2, 100.0), row("full", 3, 0.5, 200.0),
             row("sparse", 1, 0.44, 10.0), row("sparse", 2, 0.46, 40.0), row("sparse", 3, 0.6, 70.0),
             row("lora", 1, 0.47, 80.0), row("memory", 1, 0.3, 5.0)]
    lines, rows = target_lines(table)
    by = {r["method"]: r for r in rows}
    assert by["sparse"]["run"] == "peer_facts_sparse_2" and by["sparse"]["forgetting_ratio"] == pytest.approx(0.2)
    assert by["memory"]["run"] is None and by["lora"]["forgetting_ratio"] == pytest.approx(0.4)
    # against full finetuning at the same forgetting: from the base (0, 0) to (100, 0.2) to (200, 0.5)
    assert by["memory"]["full_at_same_forgetting"] == pytest.approx(0.01)  # 5% of the way to lr=1
    assert by["lora"]["full_at_same_forgetting"] == pytest.approx(0.16)
    assert by["sparse"]["full_at_same_forgetting"] == pytest.approx(0.14)  # its best learner forgets 70%
    assert "forgetting (+5.0%) learns 1.0%" in "\n".join(lines)
    assert lines[-1].startswith("  - target for sparse: met (forgetting 0.20x")
    table[3]["forgetting_val_pct"] = 90.0  # now more than LoRA at the bar
    assert "not met" in target_lines(table)[0][-1]


def test_a_base_is_trained_to_its_end_before_use(tmp_path):
    """An interrupted base training leaves checkpoints that are not the base yet: ``make`` (which resumes,
    and returns at once for a finished run) runs whenever the base has one; without it a base must exist."""
    calls = []
    runner = ContinualRunner(ContinualPlan(bases=()), tmp_path / "r", tmp_path / "w", log=lambda s: None)
    base = Base("peer", "b", tmp_path / "b", make=lambda: calls.append(1))
    assert runner.ensure_base(base) == tmp_path / "b" and calls == [1]
    with pytest.raises(ValueError, match="has no checkpoint"):
        runner.ensure_base(Base("peer", "c", tmp_path / "c"))
