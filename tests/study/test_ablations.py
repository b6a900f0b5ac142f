"""Ablations plan from the isoFLOP study's compute-optimal PEER model and report from their records."""

from __future__ import annotations

import json
import math

import pytest
from test_isoflop import B0, finish_pending

from peerlm.cli import main
from peerlm.study import Runner, isoflop_study
from peerlm.study.ablation_report import write_ablation_report
from peerlm.study.ablations import ABLATIONS, ACTIVE, StudyNotReady, ablation_study, placement_refs
from peerlm.study.design import SIZES
from peerlm.study.records import spec_of
from peerlm.study.runner import timing_key

NAMES = [s.name for s in SIZES]


@pytest.fixture
def iso(tmp_path):
    study = isoflop_study(tmp_path / "iso", work=tmp_path / "work" / "isoflop", budgets=(B0,), methods=("peer",),
                  log=lambda s: None)
    finish_pending(study, lambda s: 3.0 + 0.05 * (NAMES.index(s.size) - 2) ** 2 + 0.01 * s.seed
                   + 0.01 * abs(math.log(s.expert_ratio / 3)))  # the study picks expert LR ratio 3
    return study


def test_an_ablation_needs_the_bracketed_peer_ladder(tmp_path):
    empty = isoflop_study(tmp_path / "iso", work=tmp_path / "w")
    with pytest.raises(StudyNotReady, match="not bracketed"):
        ablation_study("experts", tmp_path / "a", empty).pending()
    with pytest.raises(ValueError, match="unknown ablation"):
        ablation_study("nope", tmp_path / "a", empty)


def test_plans_vary_one_thing_at_equal_tokens(iso, tmp_path):
    base = ablation_study("experts", tmp_path / "experts", iso).plan.start().base
    rec = iso.records()[base.run_id]
    assert base.size == NAMES[2]
    for name in (n for n in ABLATIONS if n != "placement"):  # placement has a trunk of its own (below)
        ab = ablation_study(name, tmp_path / name, iso)
        pending = ab.pending()
        assert base.run_id not in {s.run_id for s in pending}  # the unchanged point is the study's run
        assert all(s.tokens == rec["train_tokens"] and s.size == base.size for s in pending)
        assert all(s.train().max_tokens == rec["train_tokens"] and s.train().flops is None for s in pending)
        seeds = [s for s in pending if s.seed == 1]
        assert len(seeds) == (4 if name == "expert-lr" else 2)
    seed = base.with_(phase="seed", seed=1)  # the study's second seed of the base run is the base point's
    for name in ("experts", "active"):
        ab = ablation_study(name, tmp_path / name, iso)
        assert seed.run_id in iso.records() and seed.run_id in ab.records()
        assert seed.run_id in {s.run_id for s in ab.planned()} and seed.run_id not in {s.run_id for s in ab.pending()}
    assert seed.run_id not in {s.run_id for s in ablation_study("querynorm", tmp_path / "qn", iso).planned()}
    experts = ablation_study("experts", tmp_path / "experts", iso).pending()
    assert sorted({s.model().ffn.num_experts for s in experts}) == [128**2, 512**2, 1024**2]
    assert all((s.model().ffn.heads, s.model().ffn.topk) == (8, 16) for s in experts)
    active = ablation_study("active", tmp_path / "active", iso).pending()
    products = {}
    for s in active:
        products.setdefault(s.model().ffn.heads * s.model().ffn.topk, set()).add(s.model().ffn.heads)
    assert sorted(products) == [32, 64, 128, 256, 512]
    # three splits per product (the base run, h 8 k 16, is the study's), the third with half the fewest heads
    assert {p: len(h) for p, h in products.items()} == {32: 3, 64: 3, 128: 3, 256: 4, 512: 3}
    assert all(min(h) * (4 if p in (128, 256) else 2) == min(hk[0] for hk in ACTIVE[p]) for p, h in products.items())
    token = {(s.model().ffn.heads, s.model().ffn.topk) for s in active if s.model().ffn.gate == "softmax-token"}
    assert token == set(ACTIVE[32])  # the smallest product's two splits again, gates normalised per token
    qn = ablation_study("querynorm", tmp_path / "qn", iso).pending()
    peer = [s for s in qn if s.method == "peer" and s.seed == 0]
    assert {(s.model().ffn.num_experts, s.model().ffn.query_norm) for s in peer} == {
        (128**2, "batchnorm"), (128**2, "running"), (128**2, "none"), (256**2, "running"), (256**2, "none")}
    pkm = [s for s in qn if s.method == "pkm"]  # with and without the norm: its own ratio, same trunk and tokens
    assert sorted(s.model().ffn.query_norm for s in pkm) == ["batchnorm", "none"]
    assert all(s.expert_ratio == iso.plan.choices(iso.records())["expert_ratio"]["pkm"] and s.size == base.size
               and s.tokens == rec["train_tokens"] for s in pkm)
    lr = ablation_study("expert-lr", tmp_path / "lr", iso).pending()
    assert {(s.method, s.expert_ratio) for s in lr if s.seed == 0} == {
        ("peer", 1.0), ("peer", 10.0), ("pkm", 1.0), ("pkm", 3.0), ("pkm", 10.0)}


def test_a_run_two_ablations_share_is_trained_once(iso, tmp_path):
    qn = ablation_study("querynorm", tmp_path / "querynorm", iso)
    finish_pending(qn, lambda s: 3.0 + 0.01 * s.seed)
    shared = {"expert-lr": [s for s in qn.planned() if s.method == "pkm" and s.model().ffn.query_norm == "batchnorm"],
              "experts": [s for s in qn.planned() if s.method == "peer" and s.model().ffn.num_experts == 128**2
                          and s.model().ffn.query_norm == "batchnorm" and s.seed == 0]}
    for name, runs in shared.items():
        assert len(runs) == 1
        ab = ablation_study(name, tmp_path / name, iso)
        assert runs[0].run_id in {s.run_id for s in ab.planned()}  # a point of this sweep too...
        assert runs[0].run_id not in {s.run_id for s in ab.pending()}  # ...read from querynorm's record
        assert ab.records()[runs[0].run_id]["phase"] == "querynorm"
    # a record whose config is not what its run id gives now (older code, edited by hand) is not reused
    f = qn.runs_dir / f"{shared['expert-lr'][0].run_id}.json"
    rec = json.loads(f.read_text())
    rec["train"]["lr"] *= 2
    f.write_text(json.dumps(rec))
    again = ablation_study("expert-lr", tmp_path / "expert-lr", iso).pending()
    assert shared["expert-lr"][0].run_id in {s.run_id for s in again}


def test_ablation_report_from_records(iso, tmp_path, capsys):
    ab = ablation_study("querynorm", tmp_path / "qn", iso)
    finish_pending(ab, lambda s: 3.0 + 0.1 * (s.model().ffn.query_norm == "none") + 0.01 * s.seed)
    paths = write_ablation_report(ab, command="peerlm study querynorm --report")
    assert {p.name for p in paths} == {"summary.json", "table.md", "querynorm.png"}
    rows = json.loads((tmp_path / "qn" / "summary.json").read_text())["records"]
    for key in ("num_experts", "heads", "topk", "query_norm", "expert_lr_ratio", "eval_set", "perplexity",
                "usage", "unevenness", "train_tokens"):
        assert all(key in r for r in rows)
    assert {(r["num_experts"], r["query_norm"]) for r in rows} == {
        (n, q) for n in (128**2, 256**2) for q in ("batchnorm", "running", "none")}
    table = (tmp_path / "qn" / "table.md").read_text()
    assert "| peer | 0 | 65536 | 8 | 16 | 128 | none |" in table and " ± " in table  # two seeds there
    assert "own summed step times" in table


def test_time_steps_feed_an_ablations_train_seconds(iso, tmp_path, monkeypatch, capsys):
    ab = ablation_study("querynorm", tmp_path / "qn", iso)
    finish_pending(ab, lambda s: 3.0 + 0.01 * s.seed)
    timed = []

    def fake_time(self, specs, steps):  # the real timing is tested in test_isoflop
        timed.extend(specs)
        return {timing_key(s): 0.5 for s in specs}

    monkeypatch.setattr(Runner, "time_specs", fake_time)
    assert main(["study", "querynorm", "--results", str(tmp_path / "qn"), "--isoflop-results", str(iso.results),
                 "--work", str(iso.work), "--time-steps"]) == 0
    assert "timing.json" in capsys.readouterr().out
    assert {timing_key(s) for s in timed} == {timing_key(spec_of(r)) for r in ab.records().values()}
    rows = json.loads((tmp_path / "qn" / "summary.json").read_text())["records"]
    assert rows and all(r["train_seconds"] == 488 * 0.5 for r in rows)
    assert "`peerlm study querynorm --time-steps` (10 steps per model" in (tmp_path / "qn" / "table.md").read_text()


def test_bad_ablation_input(tmp_path, capsys):
    assert main(["study", "querynorm", "--isoflop-results", str(tmp_path / "none"), "--plan"]) == 2
    assert f"--isoflop-results {tmp_path / 'none'} does not exist" in capsys.readouterr().err
    (tmp_path / "started").mkdir()  # a study that has no PEER ladder yet
    assert main(["study", "querynorm", "--isoflop-results", str(tmp_path / "started"), "--plan"]) == 2
    assert "not bracketed" in capsys.readouterr().err


def test_placement_moves_the_memory_at_the_ladder_runs_tokens(tmp_path):
    study = isoflop_study(tmp_path / "iso", work=tmp_path / "work" / "isoflop", budgets=(B0,), methods=("peer", "pkm"),
                  log=lambda s: None)
    ab = ablation_study("placement", tmp_path / "pl", study)
    with pytest.raises(StudyNotReady):
        ab.pending()
    finish_pending(study, lambda s: 3.0 + 0.05 * (NAMES.index(s.size) - 2) ** 2 + 0.01 * s.seed
                   + 0.01 * abs(math.log(s.expert_ratio / 3)))
    iso, ratios = study.records(), study.plan.choices(study.records())["expert_ratio"]
    pending = ab.pending()
    assert len(pending) == 4 and {s.method for s in pending} == {"peer", "pkm"}
    for spec in pending:
        ref = iso[next(r.run_id for r in placement_refs(ab.plan.start()) if r.method == spec.method)]
        assert spec.size == "L2d64" and spec.tokens == ref["train_tokens"]
        assert spec.expert_ratio == ratios[spec.method] and spec.model().n_layers == 2
    assert sorted(tuple(s.model().sparse_blocks()) for s in pending) == [(0, 1), (0, 1), (1,), (1,)]
    assert all("[" not in s.run_id for s in pending)
    finish_pending(ab, lambda s: 3.0 - 0.05 * len(s.model().sparse_blocks()))
    both = next(r for r in ab.records().values() if r["run_id"].endswith(f"placementall_tok{r['train_tokens']}_s0"))
    both["eval"]["val"]["usage"] = {
        "blocks.0.ffn": {"usage": 0.5, "unevenness": 1.0, "distinct": 1.0, "effective": 60.0},
        "blocks.1.ffn": {"usage": 0.9, "unevenness": 2.0, "distinct": 0.9, "effective": 50.0}}
    (ab.runs_dir / f"{both['run_id']}.json").write_text(json.dumps(both))
    older = next(r for r in ab.records().values() if r["run_id"].endswith(f"placement1_tok{r['train_tokens']}_s0"))
    older["eval"]["val"]["usage"] = {"blocks.1.ffn": {"usage": 0.5, "unevenness": 1.0}}  # before distinct, effective
    (ab.runs_dir / f"{older['run_id']}.json").write_text(json.dumps(older))
    write_ablation_report(ab, command="peerlm study placement --report")
    rows = json.loads((tmp_path / "pl" / "summary.json").read_text())["records"]
    row = next(r for r in rows if r["run_id"] == both["run_id"] and r["eval_set"] == "val")
    assert row["usage"] == pytest.approx(0.7) and row["unevenness"] == pytest.approx(1.5)  # mean over blocks
    assert row["distinct"] == pytest.approx(0.95) and row["effective"] == pytest.approx(55.0)
    old = next(r for r in rows if r["run_id"] == older["run_id"] and r["eval_set"] == "val")
    assert old["usage"] == 0.5 and old["distinct"] is None and old["effective"] is None
    table = (tmp_path / "pl" / "table.md").read_text()
    assert "| 95.0% | 55.0 |" in table
    for method in ("peer", "pkm"):
        for blocks in ("0", "1", "0,1"):
            assert f"| {method} | {blocks} | 65536 |" in table
    assert (tmp_path / "pl" / "placement.png").stat().st_size > 0


def test_active_report_keeps_the_token_softmax_runs_apart(iso, tmp_path):
    ab = ablation_study("active", tmp_path / "active", iso)
    finish_pending(ab, lambda s: 3.0 + 0.1 * (s.model().ffn.gate == "softmax-token") + 0.01 * s.seed)
    write_ablation_report(ab, command="peerlm study active --report")
    rows = [r for r in json.loads((tmp_path / "active" / "summary.json").read_text())["records"]
            if r["eval_set"] == "val" and (r["heads"], r["topk"]) == (2, 16)]
    assert sorted((r["gate"], r["seed"]) for r in rows) == [("softmax", 0), ("softmax", 1), ("softmax-token", 0)]
    table = (tmp_path / "active" / "table.md").read_text()
    assert "| 2 | 16 | 32 | batchnorm | softmax | 3 | 20.19 ± 0.10 |" in table  # e^3.00, e^3.01: two seeds
    assert "| 2 | 16 | 32 | batchnorm | softmax-token | 3 | 22.20 |" in table


def test_a_record_older_than_a_train_field_is_the_same_run_while_it_holds_the_default():
    from peerlm.config import to_dict
    from peerlm.runconfig import TrainConfig
    from peerlm.study.records import same_train

    derived = to_dict(TrainConfig(max_steps=10))
    older = {k: v for k, v in derived.items() if k != "expert_update"}  # written before the field existed
    assert same_train(older, derived) and same_train({**derived, "device": "cuda"}, derived)
    assert not same_train({**older, "lr": 2e-3}, derived)
    assert not same_train(older, {**derived, "expert_update": "backward"})
    assert not same_train({**derived, "unknown": 1}, derived)
