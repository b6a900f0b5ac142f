"""The tuned table's protocol (``peerlm.study.tuned``) on fake records: every knob swept from the
paper settings in order, each choice carried into the next sweep, the size re-laddered with the LR
swept at every size, seeds at the tuned optimum, and the first table's runs read, not trained again."""

from __future__ import annotations

import math

import pytest
from test_isoflop import B0, B1, finish_pending, write

from peerlm.study import isoflop_study
from peerlm.study.design import SEEDS, SIZES, RunSpec, budget_name, size
from peerlm.study.tuned import SPLITS, TunedPlan, _overrides, knobs, tuned_study

NAMES = [s.name for s in SIZES]


def loss(spec: RunSpec) -> float:
    """One landscape for both tables (a run both need is one run): LR multiplier 4 best; for PEER, the
    expert ratio 3, the split (2, 64), routing ratio 0.3, the running norm and block 2 (not L3d80's
    middle block, but L5d112's), and with h = 2 the best size two rungs above the paper settings'
    (L3d80): L5d112, where block 2 is the default."""
    ffn = spec.model().ffn
    best_size = 4
    out = 3.0 + 0.01 * abs(math.log2(spec.lr_mult) - 2) + 0.001 * spec.seed
    if spec.method == "peer":
        best_size += 2 * (ffn.heads == 2)
        out += 0.3 * abs(math.log2(ffn.heads / 2)) + 0.02 * abs(math.log10((spec.routing_ratio or 0.1) / 0.3))
        out += (ffn.query_norm != "running") * 0.03 + 0.01 * abs(math.log10(spec.expert_ratio / 3))
        out -= 0.004 * (spec.model().sparse_blocks() == [2])
    return out + 0.05 * (NAMES.index(spec.size) - best_size) ** 2


@pytest.fixture
def studies(tmp_path):
    paper = isoflop_study(tmp_path / "paper", work=tmp_path / "work", budgets=(B0,), methods=("dense", "peer"),
                          log=lambda s: None)
    finish_pending(paper, loss)
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=(B0,),
                        methods=("dense", "peer"), log=lambda s: None)
    return paper, tuned


def test_every_knob_is_tuned_in_order_and_the_optimum_gets_seeds(studies):
    paper, tuned = studies
    finish_pending(tuned, loss, limit=400)
    assert tuned.pending() == []
    opt = tuned.plan.optima(tuned.records())
    peer = opt[B0, "peer"]["spec"]
    ffn = peer.model().ffn
    assert (ffn.heads, ffn.topk, ffn.query_norm, peer.routing_ratio) == (2, 64, "running", 0.3)
    assert peer.expert_ratio == 3.0 and peer.lr_mult == 4.0
    assert paper.plan.choices(paper.records())["lr_mult"] == 4.0
    assert opt[B0, "dense"]["spec"].size == NAMES[4]
    assert opt[B0, "peer"]["spec"].size == NAMES[6]  # two rungs past the paper optimum: the ladder grew
    for method in ("dense", "peer"):
        o = opt[B0, method]
        assert [r["spec"]["seed"] for r in o["runs"]] == list(range(SEEDS))
        assert o["tuning_runs"] >= 3
    assert opt[B0, "peer"]["tuning_runs"] > opt[B0, "dense"]["tuning_runs"]
    # a tuning point at paper settings is the paper run: read from the first table, never trained again
    own = {p.stem for p in tuned.runs_dir.glob("*.json")}
    assert own and not own & {p.stem for p in paper.runs_dir.glob("*.json")}
    # every sweep started at the paper value and its neighbours: the split sweep ran (4, 32) .. (1, 128)
    splits = {(r["model"]["ffn"]["heads"], r["model"]["ffn"]["topk"]) for r in tuned.records().values()
              if r["spec"]["method"] == "peer" and r["phase"] == "tune"}
    assert {(1, 128), (2, 64), (4, 32), (8, 16), (16, 8)} <= splits and (32, 4) not in splits


def test_nothing_is_planned_before_the_paper_optimum_is_bracketed(tmp_path):
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=(B0,),
                        methods=("dense", "peer"), log=lambda s: None)
    assert tuned.pending() == []


def test_a_knob_at_the_trunks_own_value_is_no_override():
    spec = RunSpec("tune", B0, "peer", "L3d80", 2.0, 3.0)
    assert _overrides(spec, placement=[1], **{"ffn.heads": 8, "ffn.query_norm": "batchnorm"}).run_id == spec.run_id
    moved = _overrides(spec, placement=[0], **{"ffn.heads": 4, "ffn.topk": 32})
    assert moved.overrides == ("ffn.heads=4", "ffn.topk=32", "placement=[0]")
    assert moved.model().sparse_blocks() == [0] and moved.model().ffn.heads * moved.model().ffn.topk == 128
    assert [k.name for k in knobs("peer", 3)] == ["lr", "expert-lr", "split", "routing-lr", "query-norm", "block"]
    assert [k.name for k in knobs("peer", 1)][-1] == "query-norm" and [k.name for k in knobs("dense", 2)] == ["lr"]
    assert all(h * k == 128 for h, k in SPLITS["peer"]) and all(h * k == 256 for h, k in SPLITS["pkm"])


def test_moe_fine_granularity_reaches_the_coarsest_split():
    """The grid runs from granularity 1 (8 experts of 4 D, top 1: the plain MoE's shape) to 128 experts
    of D / 4, so a choice of 16 experts of 2 D is bracketed and only the grid's ends are named."""
    from peerlm.study.tuned import GRANULARITY, grid_ends

    assert GRANULARITY[0] == (8, 4.0, 1) and GRANULARITY[-1] == (128, 0.25, 16)
    knob = knobs("moe-fine", 2)[1]
    spec = RunSpec("tune", B0, "moe-fine", "L2d64", 2.0)
    assert grid_ends(knob.put(spec, (16, 2.0, 2))) == []
    assert grid_ends(knob.put(spec, (8, 4.0, 1))) == [f"granularity {(8, 4.0, 1)}"]
    ffn = knob.put(spec, (8, 4.0, 1)).model().ffn
    assert (ffn.num_experts, ffn.expert_hidden, ffn.topk, ffn.routing) == (8, 4 * 64, 1, "token")


def test_moe_fine_granularity_keeps_flops_and_parameters():
    from peerlm.flops import model_cost

    spec = RunSpec("tune", B0, "moe-fine", "L2d64", 2.0)
    knob = knobs("moe-fine", 2)[1]
    base = model_cost(spec.model())
    block = spec.model().sparse_blocks()[0]
    for g in knob.grid:
        cost = model_cost(knob.put(spec, g).model())
        assert cost["params"] == pytest.approx(base["params"], rel=0.02)
        # the experts cost the same; the router grows with the expert count (at 128: 1.5% of the params, 3% of FLOPs)
        experts = cost["blocks"][block]["ffn"]["flops"]["experts"]
        assert experts == base["blocks"][block]["ffn"]["flops"]["experts"]
        assert cost["flops_train"] == pytest.approx(base["flops_train"], rel=0.05)
    assert knob.put(spec, knob.get(spec)).run_id == spec.run_id


def test_bad_tuned_budgets():
    paper = isoflop_study("unused", budgets=(B0,)).plan
    with pytest.raises(ValueError, match="tuned budgets"):
        TunedPlan(paper, dict, budgets=(B0,), tuned_budgets=(8e12,))


def test_report_of_the_tuned_table(studies):
    from peerlm.study.tuned_report import tuned_ladder, write_tuned_report

    paper, tuned = studies
    with pytest.raises(ValueError, match="no tuned optimum"):
        write_tuned_report(tuned)
    finish_pending(tuned, loss, limit=400)
    paths = write_tuned_report(tuned, command="peerlm study isoflop-tuned --report")
    assert {p.name for p in paths} == {"summary.json", "table.md", "isoflop-tuned.png"}  # no trend from one budget
    table = (tuned.results / "table.md").read_text()
    assert "Trend" not in table
    assert "| peer (2e12) | L5d112 | LR x4, tables x3, h 2 k 64, routing x0.3, running, block 2 |" in table
    assert "| 2e12 | dense | 4 |" in table  # PEER against dense over four common seeds
    import json

    rows = {r["method"]: r for r in json.loads((tuned.results / "summary.json").read_text())["records"]}
    assert rows["peer"]["seeds"] == list(range(SEEDS)) and rows["peer"]["tuning_runs"] > rows["dense"]["tuning_runs"]
    # tuning moved PEER's optimum: better than its paper-settings optimum
    assert rows["peer"]["paper_val_perplexity"] > rows["peer"]["val"]["perplexity"]
    # the plotted ladder: block 2 is carried from the ladder's centre (L3d80) to every trunk; on the
    # optimum's, L5d112, it is the default (no override), so the optimum alone does not say it
    opt = tuned.plan.optima(tuned.records())[B0, "peer"]
    assert opt["center"].size == NAMES[4] and "placement=[2]" in opt["center"].overrides
    assert not any(o.startswith("placement=") for o in opt["spec"].overrides)
    ladder = tuned_ladder(tuned, tuned.records(), opt)
    sizes = [r["spec"]["size"] for r in ladder]
    assert set(NAMES[3:8]) <= set(sizes) and sizes == sorted(sizes, key=NAMES.index)
    for r in ladder:
        n = r["model"]["n_layers"]  # block 2 where the trunk has it and it is not the middle one
        assert r["model"]["placement"] == ([2] if n > 2 and (n - 1) // 2 != 2 else "middle"), r["spec"]["size"]
        same = [q for q in tuned.records().values() if q["spec"]["size"] == r["spec"]["size"]
                and q["spec"]["method"] == "peer" and q["model"] == r["model"] and q["spec"]["seed"] == 0]
        assert r["eval"]["val"]["loss"] == min(q["eval"]["val"]["loss"] for q in same)


def test_the_tuned_report_gives_the_trend_of_the_tuned_optima(tmp_path):
    """From two budgets on, the tuned table's report fits its own optima against budget (table.md's
    trend section, trend.png): from the seeds of the tuned rows, not the first table's, without the
    diverged ones, and only from rows that have all their seeds."""
    pytest.importorskip("matplotlib")
    import json

    from peerlm.study.tuned_report import write_tuned_report

    def landscape(spec: RunSpec) -> float:  # lower at the larger budget; PEER gains more from it
        if (spec.method, spec.budget, spec.phase, spec.seed) == ("peer", B1, "seed", 3):
            return math.nan  # a diverged seed: out of the ratio's pairs
        return loss(spec) - (0.2 if spec.method == "dense" else 0.3) * (spec.budget > B0)

    budgets, methods = (B0, B1), ("dense", "peer")
    paper = isoflop_study(tmp_path / "paper", work=tmp_path / "work", budgets=budgets, methods=methods,
                          log=lambda s: None)
    finish_pending(paper, landscape, limit=400)
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=budgets,
                        methods=methods, log=lambda s: None)
    finish_pending(tuned, landscape, limit=800)
    paths = write_tuned_report(tuned, command="peerlm study isoflop-tuned --report")
    assert {p.name for p in paths} == {"summary.json", "table.md", "isoflop-tuned.png", "trend.png"}
    table = (tuned.results / "table.md").read_text()
    assert "| dense | 2e12, 8e12 |" in table and "| peer | 2e12, 8e12 |" in table
    rows = {(r["budget"], r["method"]): r for r in json.loads((tuned.results / "summary.json").read_text())["records"]}
    assert rows[B0, "peer"]["seeds"] == list(range(SEEDS)) and rows[B1, "peer"]["seeds"] == list(range(SEEDS - 1))
    opt = tuned.plan.optima(tuned.records())
    for b, n in ((B0, SEEDS), (B1, SEEDS - 1)):  # the measured ratio: the tuned rows' common seeds
        mean = {m: sum(r["eval"]["val"]["loss"] for r in opt[b, m]["runs"][:n]) / n for m in methods}
        assert f"{budget_name(b)}: {math.exp(mean['peer'] - mean['dense']):.3f} ({n} seeds)" in table
    assert "PEER/pkm" not in table  # no PKM rows: no ratio to it
    # a row still missing a seed is left out of the trend: dense keeps one budget, so no fit and no extrapolation
    gone = opt[B1, "dense"]["runs"][-1]["run_id"]
    for d in (tuned.runs_dir, paper.runs_dir):
        (d / f"{gone}.json").unlink(missing_ok=True)
    write_tuned_report(tuned, command="peerlm study isoflop-tuned --report")
    table = (tuned.results / "table.md").read_text()
    assert "| peer | 2e12, 8e12 |" in table and "| dense | 2e12" not in table
    line = next(x for x in table.splitlines() if x.startswith("PEER/dense"))
    assert "2e12: " in line and "8e12" not in line and "extrapolated" not in line


def test_a_paper_optimum_at_an_end_of_the_size_grid_is_tuned_too(tmp_path):
    """The first table's ladder cannot grow past the smallest trunk, so its best there is decided though
    not bracketed (marked * in its report); the tuned table starts from it rather than waiting for ever."""
    from peerlm.study.report import compute_optimal

    def landscape(spec: RunSpec) -> float:  # the smaller the better, down to the grid's first trunk
        return 3.0 + 0.01 * abs(math.log2(spec.lr_mult) - 1) + 0.05 * NAMES.index(spec.size) + 0.001 * spec.seed

    paper = isoflop_study(tmp_path / "paper", work=tmp_path / "work", budgets=(B0,), methods=("dense",),
                          log=lambda s: None)
    finish_pending(paper, landscape)
    o = compute_optimal(paper.plan, paper.records())[B0, "dense"]
    assert o["size"] == NAMES[0] and o["decided"] and not o["bracketed"]
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=(B0,),
                        methods=("dense",), log=lambda s: None)
    assert tuned.pending()
    finish_pending(tuned, landscape, limit=100)
    opt = tuned.plan.optima(tuned.records())[B0, "dense"]
    assert opt["spec"].size == NAMES[0] and opt["spec"].lr_mult == 2.0 and len(opt["runs"]) == SEEDS
    from peerlm.study.tuned_report import write_tuned_report

    write_tuned_report(tuned, command="peerlm study isoflop-tuned --report")
    assert f"dense (2e12): size {NAMES[0]}." in (tuned.results / "table.md").read_text()  # named as not bracketed


def test_a_later_budget_waits_for_the_last_tuned_budgets_knobs(tmp_path):
    """At 3.2e13 the knobs come from 8e12's tuned optimum: while 8e12 is still being tuned nothing is
    planned there (not 2e12's knobs, the last that were decided), and then 8e12's are carried."""
    b2 = 3.2e13

    def landscape(spec: RunSpec) -> float:  # PEER's best split is (2, 64) at 2e12 and (4, 32) above
        out = 3.0 + 0.01 * abs(math.log2(spec.lr_mult) - 2) + 0.001 * spec.seed
        out += 0.05 * (NAMES.index(spec.size) - 4) ** 2
        if spec.method == "peer":
            out += 0.3 * abs(math.log2(spec.model().ffn.heads / (2 if spec.budget == B0 else 4)))
        return out

    budgets, methods = (B0, 8e12, b2), ("dense", "peer")
    paper = isoflop_study(tmp_path / "paper", work=tmp_path / "work", budgets=budgets, methods=methods,
                          log=lambda s: None)
    finish_pending(paper, landscape, limit=400)
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=budgets,
                        methods=methods, log=lambda s: None)
    for _ in range(400):  # 2e12 done, 8e12 not begun for PEER
        pending = [s for s in tuned.pending() if s.budget == B0 or s.method == "dense"]
        if not pending:
            break
        write(tuned, pending[0], landscape(pending[0]))
    assert (B0, "peer") in tuned.plan.optima(tuned.records())
    peer_now = [s for s in tuned.pending() if s.method == "peer"]
    assert peer_now and all(s.budget == 8e12 for s in peer_now)  # nothing at 3.2e13 with 2e12's knobs
    finish_pending(tuned, landscape, limit=600)
    opt = tuned.plan.optima(tuned.records())
    assert opt[8e12, "peer"]["spec"].model().ffn.heads == 4
    assert opt[b2, "peer"]["spec"].model().ffn.heads == 4  # carried from 8e12
    mine = {p.stem for p in tuned.runs_dir.glob("*.json")}  # (records() reads the first table's too)
    own = [r for k, r in tuned.records().items() if k in mine and r["spec"]["budget"] == b2
           and r["spec"]["method"] == "peer"]
    assert own and all(r["model"]["ffn"]["heads"] == 4 for r in own)


def test_moe_fine_granularity_is_carried_relative_to_the_width():
    """Carried to another trunk, a tuned granularity keeps its experts, top-k and expert size as a
    multiple of the width (so the paper settings' FLOPs and parameters), not its hidden units."""
    from peerlm.flops import model_cost

    plan = isoflop_study("unused", budgets=(B0,)).plan
    tuned = TunedPlan(plan, dict, budgets=(B0,), tuned_budgets=(B0,))
    knob = knobs("moe-fine", 2)[1]
    at_c = knob.put(RunSpec("tune", B0, "moe-fine", "L2d64", 2.0), (64, 0.5, 8))
    for name in ("L1d48", "L3d80", "L4d96"):
        moved = tuned.carry(at_c, name)
        ffn, dim = moved.model().ffn, size(name).dim
        assert (ffn.num_experts, ffn.expert_hidden, ffn.topk) == (64, dim // 2, 8)
        paper = model_cost(RunSpec("tune", B0, "moe-fine", name, 2.0).model())
        assert model_cost(moved.model())["params"] == pytest.approx(paper["params"], rel=0.02)
    default = tuned.carry(RunSpec("tune", B0, "moe-fine", "L2d64", 2.0), "L3d80")
    assert default.overrides == ()  # the paper granularity stays the paper run


@pytest.mark.parametrize("method", ["pkm", "peer"])
def test_the_memory_block_is_carried_by_its_index_also_where_it_was_the_middle_one(method):
    """A tuned block that is its trunk's own middle block (so no override) is carried by its index all
    the same: block 1 of L3d80 stays block 1 on L2d64 (whose middle is block 0) and on L5d112 (middle 2);
    a trunk without that block gets its own middle block."""
    plan = isoflop_study("unused", budgets=(B0,)).plan
    tuned = TunedPlan(plan, dict, budgets=(B0,), tuned_budgets=(B0,))
    at_c = RunSpec("tune", B0, method, "L3d80", 2.0)
    assert at_c.overrides == () and at_c.model().sparse_blocks() == [1]
    want = {"L1d48": [0], "L2d64": [1], "L4d96": [1], "L5d112": [1], "L6d128": [1]}
    for name, blocks in want.items():
        moved = tuned.carry(at_c, name)
        assert moved.model().sparse_blocks() == blocks, name
        # an override only where the block is not that trunk's middle one: the paper run keeps its id
        assert any(o.startswith("placement=") for o in moved.overrides) == (blocks != [(size(name).n_layers - 1) // 2])
    at_2 = knobs(method, 3)[-1].put(at_c, 2)  # the block knob: a block that is not the middle one
    assert [tuned.carry(at_2, n).model().sparse_blocks() for n in ("L2d64", "L4d96", "L5d112")] == [[0], [2], [2]]


def test_the_lr_is_swept_again_at_the_centre_with_the_tuned_knobs(tmp_path):
    """The LR is the first knob; when a later one moves its best (here PEER's best LR is x4 with the
    paper's split and x1 with h = 2), the size step sweeps it again at the centre too."""
    def landscape(spec: RunSpec) -> float:
        out = 3.0 + 0.05 * (NAMES.index(spec.size) - 4) ** 2 + 0.001 * spec.seed
        if spec.method == "peer":
            h = spec.model().ffn.heads
            out += 0.3 * abs(math.log2(h / 2)) + 0.02 * abs(math.log2(spec.lr_mult) - (0 if h == 2 else 2))
        return out + (0.01 * abs(math.log2(spec.lr_mult) - 2) if spec.method == "dense" else 0.0)

    paper = isoflop_study(tmp_path / "paper", work=tmp_path / "work", budgets=(B0,), methods=("dense", "peer"),
                          log=lambda s: None)
    finish_pending(paper, landscape)
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=(B0,),
                        methods=("dense", "peer"), log=lambda s: None)
    finish_pending(tuned, landscape, limit=400)
    peer = tuned.plan.optima(tuned.records())[B0, "peer"]["spec"]
    assert peer.model().ffn.heads == 2 and peer.lr_mult == 1.0 and peer.size == NAMES[4]


def test_a_trunk_where_every_lr_diverged_is_worse_than_any_other(tmp_path):
    """The size ladder goes on when a neighbour's LR sweep diverged everywhere (else it would wait
    for that trunk forever)."""
    def landscape(spec: RunSpec) -> float:
        return math.nan if spec.size == NAMES[5] else loss(spec)

    paper = isoflop_study(tmp_path / "paper", work=tmp_path / "work", budgets=(B0,), methods=("dense",),
                          log=lambda s: None)
    finish_pending(paper, landscape)
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=(B0,),
                        methods=("dense",), log=lambda s: None)
    finish_pending(tuned, landscape, limit=400)
    opt = tuned.plan.optima(tuned.records())[B0, "dense"]
    assert opt["spec"].size == NAMES[4] and len(opt["runs"]) == SEEDS


def test_a_subset_of_budgets_reads_every_budget(tmp_path):
    """`--budget 2e12 --budget 3.2e13`: 3.2e13 still waits for 8e12's knobs (not run here), rather than
    carrying 2e12's; the plan reads the first table at every budget."""
    b2 = 3.2e13
    paper = isoflop_study(tmp_path / "paper", work=tmp_path / "work", budgets=(B0, 8e12, b2),
                          methods=("dense", "peer"), log=lambda s: None)
    finish_pending(paper, loss, limit=400)
    said = []
    tuned = tuned_study(tmp_path / "tuned", tmp_path / "paper", work=tmp_path / "work", budgets=(B0, b2),
                        methods=("dense", "peer"), log=said.append)
    assert any("add --budget 8e12" in line for line in said)  # why 3.2e13 will wait, said up front
    finish_pending(tuned, loss, limit=400)
    opt = tuned.plan.optima(tuned.records())
    assert (B0, "peer") in opt and (B0, "dense") in opt
    assert tuned.pending() == []  # nothing at 8e12 (not asked for), so nothing yet at 3.2e13
    assert not any(b == b2 for b, _ in opt)
    assert tuned.plan.report_budgets == (B0, b2)
    off_grid = tuned_study(tmp_path / "t2", tmp_path / "paper", work=tmp_path / "work", budgets=(4e12,),
                           methods=("dense",), log=lambda s: None)
    assert 4e12 in off_grid.plan.tuned_budgets  # below 8e12: a full pass, not 2e12's knobs carried


def test_choices_at_an_end_of_their_grid_are_named():
    from peerlm.study.tuned import ROUTING_GRID, grid_ends

    spec = RunSpec("tune", B0, "peer", "L3d80", 2.0, 3.0)
    assert grid_ends(spec) == []  # the paper settings sit inside every grid
    edge = _overrides(spec.with_(routing_ratio=ROUTING_GRID[-1]), **{"ffn.heads": 1, "ffn.topk": 128})
    assert grid_ends(edge) == [f"split {(1, 128)}", f"routing-lr {ROUTING_GRID[-1]}"]
    assert grid_ends(_overrides(spec, placement=[0])) == []  # a categorical knob has no ends
    assert grid_ends(spec.with_(size=NAMES[0])) == [f"size {NAMES[0]}"]  # the ladder cannot grow past it
