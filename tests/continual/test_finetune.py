"""finetune: frozen parameters stay bitwise, sparse changes only chosen rows, exact resume, eval and
generate on the output, and every bad input refused in one line with nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from peerlm.cli import main
from peerlm.continual.finetune import finetune, finetune_config, plan_finetune
from peerlm.continual.grow import old_rows
from peerlm.fileio import DirLock

from .conftest import checkpoint_weights, tree_state, weights


def run_finetune(base: Path, data: Path, out: Path, method: str, steps: int = 4, stop_at: int | None = None,
                 chosen: list | None = None, **spec) -> dict:
    spec_args = {"method": method, **spec}
    if method == "sparse":
        spec_args.setdefault("optimizer", "sgd")
    s, base_config = plan_finetune(base, data, out, spec_args)
    overrides = {"max_steps": steps, "eval_every": 2, "ckpt_every": 1, "keep": steps + 1, "batch_size": 4}
    if spec_args.get("optimizer") != "sgd":
        overrides["lr"] = 1e-2
    run = finetune_config(s, base_config, data, overrides)
    return finetune(run, out, stop_at=stop_at, progress=False, log=lambda s: None, chosen=chosen)


def _table_names(state: dict) -> set[str]:
    return {k for k in state if k.endswith(("w_down", "w_up", "values"))}


@pytest.mark.parametrize("kind,method", [("peer", "memory"), ("pkm", "memory"), ("peer", "sparse"),
                                         ("pkm", "sparse"), ("peer", "lora"), ("dense", "lora")])
def test_frozen_parameters_stay_bitwise_equal_to_the_base(bases, facts_dir, tmp_path, kind, method):
    base = bases[kind]
    before = tree_state(base)
    extra = {"slots": 40, "background": 3} if method == "sparse" else {}
    run_finetune(base, facts_dir, tmp_path / "ft", method, **extra)
    assert tree_state(base) == before  # the base run is only read
    old, new = weights(base), weights(tmp_path / "ft")
    if method == "lora":
        for k, v in old.items():
            name = k if k in new else k.replace(".weight", ".base_layer.weight")
            assert torch.equal(new[name], v), k
        adapters = [k for k in new if "lora_B" in k]
        assert adapters and any(new[k].abs().sum() > 0 for k in adapters)  # the adapters did train
        return
    assert set(new) == set(old)
    tables = _table_names(old)
    for k in old:
        if k not in tables:
            assert torch.equal(new[k], old[k]), k  # trunk, routing, query-norm statistics
    assert any(not torch.equal(new[k], old[k]) for k in tables)


def test_full_finetuning_moves_the_trunk(bases, facts_dir, tmp_path):
    summary = run_finetune(bases["peer"], facts_dir, tmp_path / "ft", "full")
    assert summary["step"] == 4
    old, new = weights(bases["peer"]), weights(tmp_path / "ft")
    assert not torch.equal(old["blocks.1.attn.qkv.weight"], new["blocks.1.attn.qkv.weight"])


def test_sparse_changes_no_row_outside_the_rows_chosen_at_each_step(bases, facts_dir, tmp_path):
    for kind in ("peer", "pkm"):
        chosen: list = []
        out = tmp_path / kind
        run_finetune(bases[kind], facts_dir, out, "sparse", steps=4, chosen=chosen, slots=25, background=3)
        assert len(chosen) == 4
        prev = weights(bases[kind])
        for step in range(1, 5):
            cur = checkpoint_weights(out, step)
            for k in _table_names(prev):
                layer = k.rsplit(".", 1)[0]
                rows = chosen[step - 1][layer]
                assert 0 < rows.numel() <= 25
                changed = (cur[k] != prev[k]).any(dim=1).nonzero().flatten().tolist()
                assert changed and set(changed) <= set(rows.tolist()), (kind, step, k)
            prev = cur


def test_sparse_with_the_row_sparse_adamw_keeps_the_guarantee(bases, facts_dir, tmp_path):
    chosen: list = []
    run_finetune(bases["peer"], facts_dir, tmp_path / "ft", "sparse", steps=3, chosen=chosen, slots=10,
                 background=3, optimizer="adamw")
    prev = weights(bases["peer"])
    touched: set[int] = set()
    for rec in chosen:
        touched |= set(rec["blocks.0.ffn"].tolist())
    new = weights(tmp_path / "ft")
    changed = (new["blocks.0.ffn.w_up"] != prev["blocks.0.ffn.w_up"]).any(dim=1).nonzero().flatten().tolist()
    assert changed and set(changed) <= touched  # lazy AdamW: a row never chosen is never touched


def test_grow_trains_new_experts_only_and_keeps_old_rows(bases, facts_dir, tmp_path):
    run_finetune(bases["peer"], facts_dir, tmp_path / "ft", "grow", grow=2, key_init="random")
    old, new = weights(bases["peer"]), weights(tmp_path / "ft")
    cfg = json.loads((tmp_path / "ft" / "config.json").read_text())
    n = 16
    assert cfg["model"]["ffn"]["num_experts"] == (n + 2) ** 2
    rows = old_rows(n, 2)
    for k, v in old.items():
        if k.endswith(("w_down", "w_up")):
            assert torch.equal(new[k][rows], v), k
        elif k.endswith("keys.keys"):
            assert torch.equal(new[k][:, :, :n], v)
        else:
            assert torch.equal(new[k], v), k


@pytest.mark.parametrize("method", ["sparse", "lora", "grow"])
def test_resume_reproduces_an_uninterrupted_finetune(bases, facts_dir, tmp_path, method):
    extra = {"sparse": {"slots": 20, "background": 3}, "grow": {"grow": 2}, "lora": {"lora_dropout": 0.1}}[method]
    run_finetune(bases["peer"], facts_dir, tmp_path / "a", method, steps=6, **extra)
    run_finetune(bases["peer"], facts_dir, tmp_path / "b", method, steps=6, stop_at=3, **extra)
    stored = json.loads((tmp_path / "b" / "config.json").read_text())
    from peerlm.runconfig import RunConfig

    finetune(RunConfig.from_dict(stored), tmp_path / "b", resume=True, progress=False, log=lambda s: None)
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    def losses(p: Path) -> list[float]:
        return [r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines()) if "loss" in r]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 6


def test_a_finetuned_run_evaluates_and_generates_like_any_run(bases, data_dir, facts_dir, tmp_path, capsys):
    for method, extra in (("lora", []), ("grow", ["--grow", "2"]), ("sparse", ["--slots", "30", "--background", "3"])):
        out = str(tmp_path / method)
        assert main(["finetune", str(bases["peer"]), "--data", str(facts_dir), "--out", out, "--method", method,
                     "--max-steps", "3", "--quiet", *extra]) == 0
        assert main(["finetune", "--out", out, "--resume", "--max-steps", "4", "--quiet"]) == 0
        capsys.readouterr()
        assert main(["eval", out, "--data", str(data_dir), "--json", "--quiet"]) == 0
        said = capsys.readouterr()
        assert "checkpoint step 4" in said.err and json.loads(said.out)["loss"] > 0
        assert main(["generate", out, "--prompt", "the cat", "--max-new-tokens", "5", "--quiet",
                     "--temperature", "0"]) == 0
        assert capsys.readouterr().out.startswith("the cat")
        assert main(["facts", out, "--data", str(facts_dir), "--json"]) == 0
        assert 0 <= json.loads(capsys.readouterr().out)["exact_match"] <= 1


def _refused(capsys, argv: list[str], match: str, out: Path, base: Path) -> None:
    before = tree_state(base)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peerlm: error:") and match in err, err
    assert not out.exists()
    assert tree_state(base) == before


def test_bad_input_is_refused_in_one_line_with_nothing_written(bases, facts_dir, other_data_dir, tmp_path, capsys):
    out = tmp_path / "ft"

    def argv(base: str, *rest: str, data: Path = facts_dir) -> list[str]:
        return ["finetune", str(bases[base]), "--data", str(data), "--out", str(out), "--max-steps", "2", *rest]

    _refused(capsys, argv("peer", "--method", "full", data=other_data_dir), "another tokenizer", out, bases["peer"])
    _refused(capsys, argv("peer", "--method", "sparse", "--slots", "0"), "--slots", out, bases["peer"])
    _refused(capsys, argv("peer", "--method", "sparse", "--slots", "257"), "more than the 256 slots", out,
             bases["peer"])
    _refused(capsys, argv("pkm", "--method", "sparse", "--slots", "1000"), "more than the 256 slots", out,
             bases["pkm"])
    _refused(capsys, argv("peer", "--method", "sparse"), "needs --slots", out, bases["peer"])
    for method in ("memory", "sparse"):
        _refused(capsys, argv("dense", "--method", method, "--slots", "4"), "has none", out, bases["dense"])
    _refused(capsys, argv("pkm", "--method", "grow", "--grow", "2"), "growing a PKM is not supported", out,
             bases["pkm"])
    _refused(capsys, argv("dense", "--method", "grow", "--grow", "2"), "no PEER layer", out, bases["dense"])
    _refused(capsys, argv("peer", "--method", "grow"), "needs --grow", out, bases["peer"])
    _refused(capsys, argv("peer", "--method", "full", "--optimizer", "sgd"), "--optimizer sgd", out, bases["peer"])
    _refused(capsys, ["finetune", str(bases["peer"]), "--data", str(facts_dir), "--out", str(out), "--method",
                      "full"], "no run length", out, bases["peer"])
    inside = bases["peer"] / "ft"
    _refused(capsys, ["finetune", str(bases["peer"]), "--data", str(facts_dir), "--out", str(inside), "--method",
                      "full", "--max-steps", "2"], "never the base run", inside, bases["peer"])
    with DirLock(bases["peer"], "run directory"):
        _refused(capsys, argv("peer", "--method", "full"), "being written by a training", out, bases["peer"])


def test_an_existing_output_run_needs_resume(bases, facts_dir, tmp_path, capsys):
    out = tmp_path / "ft"
    run_finetune(bases["peer"], facts_dir, out, "memory", steps=2)
    before = tree_state(out)
    assert main(["finetune", str(bases["peer"]), "--data", str(facts_dir), "--out", str(out), "--method", "memory",
                 "--max-steps", "2"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert tree_state(out) == before


def test_a_lora_run_is_a_base_like_any_other(bases, facts_dir, tmp_path):
    run_finetune(bases["peer"], facts_dir, tmp_path / "lora", "lora", steps=2)
    from peerlm.rundir import load_run

    merged, _ = load_run(tmp_path / "lora")
    run_finetune(tmp_path / "lora", facts_dir, tmp_path / "mem", "memory", steps=2)
    new = weights(tmp_path / "mem")
    for k, v in merged.state_dict().items():
        if not k.endswith(("w_down", "w_up")):
            assert torch.equal(new[k], v), k  # the merged LoRA weights, frozen


def test_sigterm_writes_a_checkpoint_and_the_run_resumes(bases, facts_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "ft"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "peerlm", "finetune", str(bases["peer"]), "--data", str(facts_dir),
                             "--out", str(out), "--method", "sparse", "--slots", "20", "--background", "3",
                             "--max-steps", "100000", "--ckpt-every", "0", "--quiet"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while time.time() < deadline and not ((out / "metrics.jsonl").is_file()
                                          and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "peerlm finetune --out" in err and "--resume" in err
    step = int((out / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 3 <= step < 100000
    assert main(["finetune", "--out", str(out), "--resume", "--max-steps", str(step + 2), "--quiet"]) == 0
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{step + 2:08d}"


def test_a_checkpoint_directory_of_a_busy_run_is_refused_too(bases, facts_dir, tmp_path, capsys):
    ckpt = bases["peer"] / "checkpoints" / (bases["peer"] / "checkpoints" / "latest").read_text().strip()
    with DirLock(bases["peer"], "run directory"):
        _refused(capsys, ["finetune", str(ckpt), "--data", str(facts_dir), "--out", str(tmp_path / "ft"),
                          "--method", "full", "--max-steps", "2"], "being written by a training", tmp_path / "ft",
                 bases["peer"])
    summary = run_finetune(ckpt, facts_dir, tmp_path / "ok", "memory", steps=1)
    assert summary["step"] == 1
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())["finetune"]
    assert cfg["base"] == str(bases["peer"].resolve()) and cfg["checkpoint"] == str(ckpt.resolve())


def test_a_base_trained_with_its_tables_updated_in_the_backward_finetunes(bases, facts_dir, tmp_path):
    """The finetune builds its own optimizer: the base's ``expert_update=backward`` (which needs the
    base's ``sparse_optimizer``) is not carried over."""
    s, base_config = plan_finetune(bases["peer"], facts_dir, tmp_path / "ft", {"method": "memory"})
    base_config["train"].update(sparse_optimizer=True, expert_update="backward")
    run = finetune_config(s, base_config, facts_dir, {"max_steps": 2})
    assert run.train.expert_update == "step" and not run.train.sparse_optimizer
