"""The retrofit driver on a tiny plan: its runs and commands, the heal runs starting from the base's weights
at the same training FLOPs, records and table, and resuming from the records."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from safetensors.torch import load_file  # noqa: E402

from peerlm.cli import main  # noqa: E402
from peerlm.data import prepare  # noqa: E402
from peerlm.fileio import sha256_file  # noqa: E402
from peerlm.hf.retrofit import RetrofitPlan, plan_lines, run_retrofit  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import final_weights, write_text  # noqa: E402

TINY = {"dim": 32, "layers": 3, "heads": 2, "hidden": 64, "peer": "num_experts=16**2:heads=2:topk=4:dim_key=16",
        "batch_size": 4}


def test_retrofit_runs_records_and_resumes(tmp_path, capsys):
    data = tmp_path / "d"
    prepare([write_text(tmp_path / "text.txt", paragraphs=200)], data, vocab_size=300, val_fraction=0.1,
            progress=False)
    probe = RetrofitPlan(data, tmp_path / "runs", tmp_path / "res", seeds=(0,), **TINY)
    base, dense, parallel, replace = probe.runs()
    tokens_per_step = 4 * 128
    plan = RetrofitPlan(data, tmp_path / "runs", tmp_path / "res", seeds=(0,), **TINY,
                        base_flops=3.5 * probe.flops_per_token(base) * tokens_per_step,
                        heal_flops=3.5 * probe.flops_per_token(dense) * tokens_per_step)
    assert [r.id for r in plan.runs()] == ["base_s0", "dense_s0", "parallel_s0", "replace_s0"]
    base, dense, parallel, replace = plan.runs()
    lines = plan_lines(plan)
    assert all(" to do" in ln for ln in lines[::2])
    assert "--add-memory 'peer:layers=middle:mode=replace:" in lines[7] and "--add-memory" not in lines[3]
    assert probe.flops_per_token(parallel) > probe.flops_per_token(dense) > probe.flops_per_token(replace)

    assert run_retrofit(plan, log=lambda s: None) == 4
    recs = {r.id: plan.record(r) for r in plan.runs()}
    assert recs["base_s0"]["steps"] == 3 and recs["dense_s0"]["steps"] == 3
    for arm in ("dense_s0", "parallel_s0", "replace_s0"):  # the same extra FLOPs, within one step
        rec = recs[arm]
        assert plan.heal_flops - rec["flops"] / rec["steps"] < rec["flops"] <= plan.heal_flops
        assert rec["eval"]["val"]["perplexity"] > 1 and rec["source"] == str(plan.source(dense))
    assert recs["parallel_s0"]["params"] > recs["dense_s0"]["params"]
    assert "usage" in recs["replace_s0"]["eval"]["val"]

    # every heal run starts from the base's final weights (its export)
    export = plan.source(dense)
    exported = load_file(str(export / "model.safetensors"))
    trained = final_weights(plan.run_dir(base))
    assert all(torch.equal(exported[k.removeprefix("hf.")], v) for k, v in trained.items()
               if k.removeprefix("hf.") in exported)
    for r in (dense, parallel, replace):
        cfg = json.loads((plan.run_dir(r) / "config.json").read_text())
        assert cfg["model"]["source"]["weights"] == {"model.safetensors": sha256_file(export / "model.safetensors")}

    table = (plan.results / "table.md").read_text()
    assert [ln.split("|")[1].strip() for ln in table.splitlines() if ln.startswith("| ") and "arm" not in ln] == \
        ["base", "dense", "parallel", "replace"]

    before = recs["replace_s0"]
    plan.record_path(replace).unlink()
    assert run_retrofit(plan, log=lambda s: None) == 1  # only the run without a record; its run is complete
    after = plan.record(replace)
    assert after["eval"] == before["eval"] and after["steps"] == before["steps"]
    assert run_retrofit(plan, log=lambda s: None) == 0

    capsys.readouterr()
    assert main(["retrofit", "--data", str(data), "--out", str(tmp_path / "runs"), "--results",
                 str(tmp_path / "res"), "--seeds", "0", "--plan"]) == 0
    out = capsys.readouterr().out  # the default budgets are other settings than the records'
    assert "base_s0" in out and "refused: " in out and "other settings (shape.dim, " in out
    bigger = RetrofitPlan(data, tmp_path / "runs", tmp_path / "res", seeds=(0,), **TINY, base_flops=plan.base_flops,
                          heal_flops=2 * plan.heal_flops)
    with pytest.raises(ValueError, match="dense_s0.json was made with other settings"):
        run_retrofit(bigger, log=lambda s: None)
