"""The isoFLOP driver: what it plans from the records, that a run resumes and is recorded, the reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from peerlm.cli import main
from peerlm.config import to_dict
from peerlm.flops import model_cost
from peerlm.runconfig import RunConfig, data_info, plan_steps
from peerlm.study import Runner, isoflop_study
from peerlm.study.design import (
    EXPERT_LR_RATIOS,
    LR_MULTIPLIERS,
    METHODS,
    SEEDS,
    SIZES,
    RunSpec,
    budget_name,
    initial_window,
    model_config,
    recipe,
    size,
)
from peerlm.study.records import spec_of
from peerlm.study.report import compute_optimal, format_table, summary_records, train_seconds, write_report
from peerlm.study.runner import timing_key
from peerlm.train import train

B0, B1 = 2e12, 8e12


def fake_record(spec: RunSpec, loss: float, seconds: float = 60.0) -> dict:
    cost = model_cost(spec.model())
    ev = {name: {"loss": loss + d, "perplexity": math.exp(loss + d), "bits_per_byte": loss / 2, "tokens": 1000}
          for name, d in (("val", 0.0), ("wiki", 0.3), ("news", 0.4), ("fiction", 0.2), ("web", 0.5))}
    return {"run_id": spec.run_id, "phase": spec.phase, "model": to_dict(spec.model()), "train": to_dict(spec.train()),
            "spec": {"budget": spec.budget, "method": spec.method, "size": spec.size, "lr_mult": spec.lr_mult,
                     "expert_ratio": spec.expert_ratio, "seed": spec.seed, "sparse_optimizer": spec.sparse_optimizer}
            | ({"overrides": list(spec.overrides)} if spec.overrides else {})
            | ({"tokens": spec.tokens} if spec.tokens is not None else {})
            | ({"routing_ratio": spec.routing_ratio} if spec.routing_ratio is not None else {}),
            "params": cost["params"], "active_params": cost["active_params"], "train_tokens": 10**6, "steps": 488,
            "epochs": 0.1, "flops_train_per_token": cost["flops_train"], "train_seconds": seconds,
            "tokens_per_second": 10**6 / seconds, "eval": ev, "git_revision": "abc", "machine": "test"}


def write(study: Runner, spec: RunSpec, loss: float, seconds: float = 60.0) -> None:
    study.runs_dir.mkdir(parents=True, exist_ok=True)
    (study.runs_dir / f"{spec.run_id}.json").write_text(json.dumps(fake_record(spec, loss, seconds)))


def finish_pending(study: Runner, loss_of, phase: str | None = None, limit: int = 200) -> None:
    """Give every pending run (of ``phase``) a record with the loss ``loss_of(spec)``, as runs would."""
    for _ in range(limit):
        pending = [s for s in study.pending() if phase is None or s.phase == phase]
        if not pending:
            return
        write(study, pending[0], loss_of(pending[0]))
    raise AssertionError("the plan did not converge")


def test_methods_share_the_trunk_and_differ_in_the_middle_block():
    sz = size("L4d96")
    cfgs = {m: model_config(m, sz) for m in METHODS}
    for m, cfg in cfgs.items():
        assert (cfg.dim, cfg.n_layers, cfg.vocab_size, cfg.context_length) == (96, 4, 1024, 128)
        assert cfg.sparse_blocks() == ([] if m == "dense" else [1])
    dense = model_cost(cfgs["dense"])["blocks"][1]["ffn"]
    for m in ("moe", "moe-fine"):  # MoE costs what the MLP it replaces costs, plus its router
        ffn = model_cost(cfgs[m])["blocks"][1]["ffn"]
        assert ffn["flops"]["experts"] == dense["flops"]["total"]
    peer, pkm = cfgs["peer"].ffn, cfgs["pkm"].ffn
    assert (peer.dim_key, peer.shared_keys, peer.query_norm) == (pkm.dim_key, pkm.shared_keys, pkm.query_norm)
    # the same recipe for every method except the tables' and the routing's LR ratios
    base, mem = recipe("dense", sz, B0, 1.0, 3.0, 0), recipe("peer", sz, B0, 1.0, 3.0, 0)
    assert base.expert_lr_ratio == 1.0 and mem.expert_lr_ratio == 3.0
    assert {k: v for k, v in vars(base).items() if "ratio" not in k} == {
        k: v for k, v in vars(mem).items() if "ratio" not in k}


def test_budget_names_keep_budgets_apart():
    assert [budget_name(b) for b in (2e12, 8e12, 2.5e13, 1e14, 1.2e14)] == ["2e12", "8e12", "2.5e13", "1e14", "1.2e14"]
    assert RunSpec("ladder", 1.2e14, "dense", "L2d64").run_id == "1.2e14_dense_L2d64_lr1_s0"


def test_initial_window_is_four_consecutive_sizes_around_the_rule_of_thumb():
    names = [s.name for s in SIZES]
    for budget in (B0, B1, 1e14):
        w = initial_window(budget)
        i = names.index(w[0])
        assert w == names[i:i + 4]
    assert names.index(initial_window(B1)[0]) >= names.index(initial_window(B0)[0])


def test_sweeps_choose_the_best_and_later_runs_use_it(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(B0, B1))
    first = study.pending()
    # nothing is planned on a choice not yet made: first the LR sweep alone
    assert [s.phase for s in first] == ["lr"] * 3 and [s.lr_mult for s in first] == list(LR_MULTIPLIERS)
    finish_pending(study, lambda s: 3.0 + 0.1 * abs(math.log2(s.lr_mult) - 1), phase="lr")
    # then the memory methods' ratio sweeps, and the ladders of the methods that need no ratio
    assert {s.method for s in study.pending() if s.phase == "ladder"} == {"dense", "moe", "moe-fine"}
    lr_runs = sorted(r["spec"]["lr_mult"] for r in study.records().values())
    assert lr_runs == [0.5, 1.0, 2.0, 4.0]  # 2 was best at the end of the first sweep: 4 was added
    assert study.plan.choices(study.records())["lr_mult"] == 2.0
    sweep = [s for s in study.pending() if s.phase == "expert-lr"]
    assert {s.lr_mult for s in sweep} == {2.0} and sorted({s.expert_ratio for s in sweep}) == list(EXPERT_LR_RATIOS)
    best = {"peer": 10.0, "pkm": 3.0}
    finish_pending(study, lambda s: 3.0 + 0.01 * abs(math.log(s.expert_ratio / best[s.method])), phase="expert-lr")
    ratios = {m: sorted(r["spec"]["expert_ratio"] for r in study.records().values() if r["spec"]["method"] == m)
              for m in best}
    assert ratios == {"peer": [1.0, 3.0, 10.0, 30.0], "pkm": [1.0, 3.0, 10.0]}
    ch = study.plan.choices(study.records())
    assert ch["expert_ratio"] == {"peer": 10.0, "pkm": 3.0}
    ladder = [s for s in study.pending() if s.phase == "ladder"]
    assert {(s.method, s.expert_ratio) for s in ladder if s.method in ("peer", "pkm")} == {("peer", 10.0), ("pkm", 3.0)}
    assert {s.lr_mult for s in ladder} == {2.0}


def test_the_ladder_grows_until_its_best_is_bracketed_then_seeds_and_the_optimizer_pair(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(B0,), methods=("dense", "peer"))
    names = [s.name for s in SIZES]
    start = names.index(initial_window(B0)[0])
    optimum = start + 5  # past the initial window's top: the ladder must add two sizes

    def loss(spec: RunSpec) -> float:
        return 3.0 + 0.05 * (names.index(spec.size) - optimum) ** 2 + 0.01 * spec.seed

    finish_pending(study, loss)
    recs = study.records()
    opt = compute_optimal(study.plan, recs)
    for method in ("dense", "peer"):
        o = opt[B0, method]
        assert o["size"] == names[optimum] and o["bracketed"]
        assert [r["spec"]["seed"] for r in o["runs"]] == list(range(SEEDS))
        ran = {r["spec"]["size"] for r in o["ladder"]}
        assert names[optimum - 1] in ran and names[optimum + 1] in ran and names[optimum + 2] not in ran
    assert any(r["spec"]["sparse_optimizer"] and r["spec"]["size"] == names[optimum] for r in recs.values())
    assert study.pending() == []
    rows = summary_records(opt)
    val = [r for r in rows if r["eval_set"] == "val"]
    assert {r["method"] for r in val} == {"dense", "peer"}
    assert all(r["perplexity_spread"] > 0 and r["seeds"] == list(range(SEEDS)) for r in val)
    for key in ("budget", "method", "eval_set", "perplexity", "params", "active_params", "train_tokens"):
        assert all(key in r for r in rows)


def test_seeds_go_seed_by_seed_across_methods(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(B0,), methods=("dense", "moe", "peer"))
    names = [s.name for s in SIZES]
    loss = lambda s: 3.0 + 0.05 * (names.index(s.size) - 2) ** 2 + 0.01 * s.seed  # noqa: E731
    for phase in ("lr", "expert-lr", "ladder"):
        finish_pending(study, loss, phase=phase)
    seeds = [(s.seed, s.method) for s in study.pending() if s.phase == "seed"]
    assert seeds == [(seed, m) for seed in range(1, SEEDS) for m in ("dense", "moe", "peer")]


def test_report_files_from_records(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(B0,), methods=("dense", "moe"))
    with pytest.raises(ValueError, match="no run records"):
        write_report(study)
    names = [s.name for s in SIZES]
    finish_pending(study, lambda s: 3.0 + 0.05 * (names.index(s.size) - 2) ** 2 - 0.1 * (s.method == "moe"))
    paths = write_report(study, command="peerlm study isoflop --report")
    assert {p.name for p in paths} == {"summary.json", "table.md", "isoflop.png", "walltime.png"}
    assert all(p.stat().st_size > 0 for p in paths)
    table = (study.results / "table.md").read_text()
    assert "| dense (2e12) |" in table and "| moe (2e12) |" in table
    assert "peerlm study isoflop --report" in table
    ratio = math.exp(-0.1)
    assert f"| moe (2e12) | {ratio:.3f} |" in table  # perplexity ratio to dense on val
    summary = json.loads((study.results / "summary.json").read_text())
    assert summary["meta"]["runs"] == len(study.records())
    held = {r["method"]: r for r in summary["records"] if r["eval_set"] == "heldout"}
    val = {r["method"]: r for r in summary["records"] if r["eval_set"] == "val"}
    for method in ("dense", "moe"):  # fake records: held-out losses are val's + 0.3, 0.4, 0.2, 0.5
        assert held[method]["perplexity"] == pytest.approx(val[method]["perplexity"] * math.exp(0.35))
    assert "| heldout |" in table and "every compute-optimal size stays the same" in table
    best = held["moe"]["size"]
    other = next(r for r in study.records().values() if r["spec"]["method"] == "moe" and r["spec"]["size"] != best
                 and r["phase"] == "ladder")
    for name in ("wiki", "news", "fiction", "web"):  # a neighbour that is worse on val but best held out
        other["eval"][name]["loss"] = 0.0
    (study.runs_dir / f"{other['run_id']}.json").write_text(json.dumps(other))
    table = format_table(study, study.records(), "cmd")
    assert f"sizes change for moe at 2e12: {other['spec']['size']} instead of {best}" in table


def test_equal_wall_time_uses_the_timing_pass(tmp_path):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(B0,), methods=("dense", "moe"),
                  log=lambda s: None)
    names = [s.name for s in SIZES]
    finish_pending(study, lambda s: 3.0 + 0.05 * (names.index(s.size) - 2) ** 2 - 0.1 * (s.method == "moe"))
    recs = study.records()
    before = format_table(study, recs, "cmd")  # every run's own step times sum to 60 s: all count
    assert "own summed step times" in before and "no run that short" not in before
    path = study.time_steps(steps=1)
    timing = json.loads(path.read_text())
    assert set(timing["step_seconds"]) == {timing_key(spec_of(r)) for r in recs.values()}
    assert all(v > 0 for v in timing["step_seconds"].values())
    r = next(iter(recs.values()))
    assert train_seconds(r, timing) == r["steps"] * timing["step_seconds"][timing_key(spec_of(r))] != r["train_seconds"]
    timing["step_seconds"] = {k: (1e-4 if k.startswith("dense") else 1.0) for k in timing["step_seconds"]}
    path.write_text(json.dumps(timing))  # dense far faster per step than any MoE: no MoE run is that short
    table = format_table(study, recs, "cmd")
    assert "| dense | moe |" in table and "no run that short |" in table
    assert "`peerlm study isoflop --time-steps` (1 steps per model" in table


def test_a_run_trains_resumes_and_is_recorded_once(tmp_path, tiny_data):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(3e10,), methods=("peer",),
                          log=lambda s: None)
    study.data_dir = lambda: tiny_data
    spec = RunSpec("ladder", 3e10, "peer", "L1d48")
    run = study.run_config(spec, tiny_data)
    steps, _ = plan_steps(run)
    assert steps >= 4
    train(run, study.work / spec.run_id, stop_at=steps // 2, progress=False, log=lambda s: None)  # interrupted
    rec = study.run_one(spec)
    assert rec["steps"] == steps and rec["train_tokens"] == steps * 16 * 128
    assert rec["eval"]["val"]["tokens"] > 0 and "wiki" in rec["eval"]
    assert rec["eval"]["val"]["usage"]["blocks.0.ffn"]["usage"] > 0
    assert rec["train_seconds"] > 0 and rec["epochs"] > 0
    on_disk = json.loads((study.runs_dir / f"{spec.run_id}.json").read_text())
    assert on_disk["eval"]["val"]["loss"] == rec["eval"]["val"]["loss"]
    assert spec.run_id not in {s.run_id for s in study.pending()}  # a recorded run is not run again
    assert on_disk["data"] == Runner.data_fingerprint(tiny_data)
    assert on_disk["train"]["device"] == "cpu" and "cores" in on_disk["machine"]
    assert on_disk["data"]["tokens"]["train"] == data_info(tiny_data)["splits"]["train"]["tokens"]


def test_a_run_on_other_data_than_the_records_is_refused_before_training(tmp_path, tiny_data):
    study = isoflop_study(tmp_path / "res", work=tmp_path / "work", budgets=(3e10,), methods=("peer",),
                          log=lambda s: None)
    study.data_dir = lambda: tiny_data
    old = RunSpec("ladder", 3e10, "peer", "L1d32")
    rec = fake_record(old, 3.0) | {"data": {**Runner.data_fingerprint(tiny_data), "tokenizer_sha256": "0" * 64}}
    study.runs_dir.mkdir(parents=True)
    (study.runs_dir / f"{old.run_id}.json").write_text(json.dumps(rec))
    spec = RunSpec("ladder", 3e10, "peer", "L1d48")
    with pytest.raises(ValueError, match=f"differs from the data of the record {old.run_id}"):
        study.run_one(spec)
    assert not (study.work / spec.run_id).exists()  # nothing was trained
    (study.runs_dir / f"{old.run_id}.json").write_text(json.dumps(fake_record(old, 3.0)))  # no fingerprint
    assert study.check_data(tiny_data) == Runner.data_fingerprint(tiny_data)  # older records are accepted


def test_cli_plan_and_bad_input(tmp_path, capsys):
    assert main(["study", "isoflop", "--results", str(tmp_path / "r"), "--work", str(tmp_path / "w"),
                 "--plan", "--no-calibrate", "--method", "dense"]) == 0
    out = capsys.readouterr().out
    assert "2e12_dense_L2d64_lr0.5_s0" in out and "runs to go" in out
    assert main(["study", "isoflop", "--budget", "-1", "--plan"]) == 2
    assert "--budget: a budget must be a positive number of FLOPs (e.g. 2e12), got '-1'" in capsys.readouterr().err
    assert main(["study", "isoflop", "--max-runs", "0"]) == 2
    if not torch.cuda.is_available():  # an unusable device fails before any work, with the way out
        assert main(["study", "isoflop", "--results", str(tmp_path / "r"), "--device", "cuda", "--plan"]) == 2
        assert "CUDA is not available; use device=cpu" in capsys.readouterr().err
    assert main(["study", "querynorm", "--device", "gpu0", "--plan"]) == 2
    assert "is not a device name" in capsys.readouterr().err
    assert main(["study", "isoflop", "--results", str(tmp_path / "r"), "--report"]) == 2
    assert "no run records" in capsys.readouterr().err


def test_run_config_round_trips(tmp_path, tiny_data):
    run = RunSpec("ladder", B0, "moe-fine", "L2d64").model()
    cfg = RunConfig(run, recipe("moe-fine", size("L2d64"), B0, 1.0, 1.0, 0), data_info(tiny_data))
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))).to_dict() == cfg.to_dict()
