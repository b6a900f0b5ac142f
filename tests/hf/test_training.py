"""`peerlm train --hf-model`: transformers models (config only or with weights, with PEER added) trained by
peerlm's loop: exact resume and SIGTERM, the source weights, FLOP accounting against torch's counter,
eval / generate / export of the run, and the refusals before any write."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import peerlm.hf as ph  # noqa: E402
from peerlm.cli import main  # noqa: E402
from peerlm.config import PEERConfig  # noqa: E402
from peerlm.data import prepare  # noqa: E402
from peerlm.flops import ffn_cost  # noqa: E402
from peerlm.generate import generate  # noqa: E402
from peerlm.hf.adapter import HFCausalLM, HFModelConfig, build_hf  # noqa: E402
from peerlm.hf.flops import COSTED, hf_cost  # noqa: E402
from peerlm.hf.training import parse_memory, plan_hf_run, train_hf  # noqa: E402
from peerlm.runconfig import RunConfig, TrainConfig, TrainInterrupted  # noqa: E402
from peerlm.rundir import load_run  # noqa: E402
from peerlm.train import StepHooks  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from test_train import final_weights, losses, write_text  # noqa: E402
from tiny_hf import PEER_OPTIONS, tiny_config, tiny_model  # noqa: E402

VOCAB = 320  # the data's tokenizer has 300
PEER = "peer:layers=1:mode=parallel:num_experts=16**2:heads=2:topk=4:dim_key=16"
TRAIN = {"lr": 3e-3, "warmup": 1, "batch_size": 4, "eval_every": 3, "eval_batches": 2, "ckpt_every": 3,
         "seed": 0, "device": "cpu"}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    prepare([write_text(root / "text.txt")], root / "d", vocab_size=300, val_fraction=0.1, progress=False)
    return root / "d"


def config_dir(root: Path, family: str = "llama", vocab: int = VOCAB) -> Path:
    """A config-only transformers directory of a tiny model of ``family``."""
    cfg = tiny_config(family)
    cfg.vocab_size = vocab
    cfg.save_pretrained(root / family)
    return root / family


def plan(model_dir: Path, data_dir: Path, memory=(PEER,), **train) -> RunConfig:
    return plan_hf_run(model_dir, data_dir, memory, 16, TrainConfig(**{**TRAIN, "max_steps": 6, **train}))


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: dropout on, so the RNG state must resume too
def test_resume_and_sigterm_are_bit_equal_to_an_uninterrupted_run(family, data_dir, tmp_path):
    run = plan(config_dir(tmp_path, family), data_dir)
    quiet = {"progress": False, "log": lambda s: None}
    full = train_hf(run, tmp_path / "full", **quiet)
    assert full["step"] == 6 and full["flops"] > 0 and len(full["validations"]) == 2

    train_hf(run, tmp_path / "cut", stop_at=2, **quiet)
    train_hf(RunConfig.from_dict(json.loads((tmp_path / "cut" / "config.json").read_text())), tmp_path / "cut",
             resume=True, **quiet)

    class Term(StepHooks):
        def begin_step(self, model, step):
            if step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainInterrupted):
        train_hf(run, tmp_path / "term", hooks=Term(), **quiet)
    assert (tmp_path / "term" / "checkpoints" / "step_00000004").is_dir()
    train_hf(run, tmp_path / "term", resume=True, **quiet)

    want = final_weights(tmp_path / "full")
    assert any(k.endswith("memory.layer.w_down") for k in want)
    for other in ("cut", "term"):
        assert losses(tmp_path / other) == losses(tmp_path / "full")
        got = final_weights(tmp_path / other)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), other


def test_a_directory_with_weights_starts_from_them_and_memory_starts_silent(data_dir, tmp_path):
    base = tiny_model("llama", seed=3)
    base.config.vocab_size = VOCAB
    base.resize_token_embeddings(VOCAB)
    base.save_pretrained(tmp_path / "w")
    run = plan(tmp_path / "w", data_dir)
    assert list(run.model.source["weights"]) == ["model.safetensors"]
    model = build_hf(run.model, "cpu", tmp_path / "w").eval()
    x = torch.randint(1, 300, (2, 16))
    assert torch.equal(model(x)[0], base.eval()(x).logits.float())  # parallel memory: scale 0
    [(name, layer)] = model.memory_layers()
    assert name == "hf.model.layers.1.mlp.memory.layer" and layer.num_experts == 256
    summary = train_hf(run, tmp_path / "r", progress=False, log=lambda s: None, verified=True)
    assert summary["step"] == 6
    weights = final_weights(tmp_path / "r")  # trained from the directory's weights: they moved, not reset
    start = base.state_dict()["model.embed_tokens.weight"]
    moved = weights["hf.model.embed_tokens.weight"] - start
    assert 0 < float(moved.abs().max()) < 0.1

    (tmp_path / "w" / "model.safetensors").write_bytes(b"changed")  # a fresh start checks the source
    with pytest.raises(ValueError, match="gone or changed"):
        train_hf(run, tmp_path / "r2", progress=False, log=lambda s: None)
    assert not (tmp_path / "r2" / "config.json").exists()


def test_a_directory_saved_with_memory_keeps_it(data_dir, tmp_path):
    model = ph.add_memory(tiny_model("qwen3"), "pkm", layers=[0], mode="replace",
                          **{"num_keys": 16**2, "heads": 2, "topk": 4, "dim_key": 16})
    model.resize_token_embeddings(VOCAB)
    model.save_pretrained(tmp_path / "m")
    run = plan(tmp_path / "m", data_dir, memory=(PEER,))
    assert [(m["kind"], m["mode"], m["layers"]) for m in run.model.memory] == [("pkm", "replace", [0]),
                                                                               ("peer", "parallel", [1])]
    built = build_hf(run.model, "cpu", tmp_path / "m")
    saved = model.state_dict()
    got = built.hf.state_dict()
    assert all(torch.equal(got[k], saved[k]) for k in saved)  # the PKM's trained values come along
    assert {n.split(".")[3] for n, _ in built.memory_layers()} == {"0", "1"}


@pytest.mark.parametrize("family", COSTED)
def test_flops_and_params_match_the_built_model(family):
    spec = HFModelConfig(tiny_config(family).to_dict(), 16)
    cost = hf_cost(spec)
    model = build_hf(spec)
    model.hf.set_attn_implementation("eager")  # its matmuls are what torch's counter sees
    assert cost["params"] == sum(p.numel() for p in model.parameters())
    x = torch.randint(0, 96, (2, 16))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    assert cost["flops_forward"] * x.numel() == counter.get_total_flops()


@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_memory_flops_are_peerlms_accounting(mode):
    dense = HFModelConfig(tiny_config("llama").to_dict(), 16)
    model = ph.add_memory(tiny_model("llama"), "peer", layers=[1], mode=mode, **PEER_OPTIONS)
    spec = HFModelConfig(model.config.to_dict(), 16)
    peer = ffn_cost(PEERConfig(**PEER_OPTIONS), 32)
    mlp = 2 * 3 * 32 * 64 if mode == "replace" else 0
    a, b = hf_cost(dense), hf_cost(spec)
    assert b["flops_forward"] - a["flops_forward"] == peer["flops"]["total"] - mlp
    assert b["expert_params"] == 2 * 256 * 32 and a["expert_params"] == 0
    assert b["params"] == sum(p.numel() for p in build_hf(spec).parameters())
    assert b["active_params"] < b["params"] - 2 * (256 - 2 * 4) * 32 + 1


def test_flops_budget_and_an_unknown_family(data_dir, tmp_path, capsys):
    run = plan(config_dir(tmp_path), data_dir, max_steps=None, flops=3e8)
    per_step = run.flops_per_token() * 4 * 16
    summary = train_hf(run, tmp_path / "r", progress=False, log=lambda s: None)
    assert summary["total_steps"] == int(3e8 // per_step) > 1
    assert summary["flops"] == summary["step"] * per_step <= 3e8

    phi = transformers.PhiConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=64)
    phi.save_pretrained(tmp_path / "phi")
    with pytest.raises(ValueError, match="--flops needs a FLOP model.*'phi'"):
        plan(tmp_path / "phi", data_dir, memory=(), max_steps=None, flops=1e9)
    run = plan(tmp_path / "phi", data_dir, memory=())
    assert run.flops_per_token() is None
    summary = train_hf(run, tmp_path / "p", progress=False, log=lambda s: None)
    assert summary["step"] == 6 and summary["flops"] is None
    assert all(r.get("flops", None) is None for r in map(json.loads, (tmp_path / "p" / "metrics.jsonl").open()))


def test_eval_generate_and_export_of_the_run(data_dir, tmp_path, capsys):
    model_dir = config_dir(tmp_path)
    argv = ["train", "--hf-model", str(model_dir), "--data", str(data_dir), "--out", str(tmp_path / "r"),
            "--max-steps", "4", "--add-memory", PEER, "--set", "model.context_length=16", "--set",
            "train.batch_size=4", "--quiet"]
    assert main(argv) == 0
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["model_kind"] == "hf" and config["model"]["context_length"] == 16
    assert config["model"]["config"]["peerlm_memory"][0]["layers"] == [1]
    assert config["model"]["source"] == {"path": str(model_dir.resolve()), "model_type": "llama", "weights": None}
    capsys.readouterr()

    model_dir.rename(tmp_path / "moved")  # the run needs its own directory only
    model, loaded = load_run(tmp_path / "r")
    assert isinstance(model, HFCausalLM) and loaded["checkpoint_step"] == 4
    assert main(["eval", str(tmp_path / "r"), "--json", "--quiet"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and 1 < result["perplexity"] < VOCAB
    assert "hf.model.layers.1.mlp.memory.layer" in result["usage"]
    # greedy decoding with the transformers cache equals recomputing the whole sequence each step (within the
    # context: past it, the cache restarts from the last half context by design)
    ids = [5, 17, 42]
    assert generate(model, ids, 12, temperature=0, stop_id=None) == \
        generate(model, ids, 12, temperature=0, stop_id=None, use_cache=False)
    assert main(["generate", str(tmp_path / "r"), "--prompt", "the cat", "--max-new-tokens", "5",
                 "--temperature", "0", "--quiet"]) == 0
    assert capsys.readouterr().out.startswith("the cat")

    assert main(["train", "--out", str(tmp_path / "r"), "--resume", "--max-steps", "5", "--quiet"]) == 0
    assert "step 5/5" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "r"), "--hf", str(tmp_path / "x")]) == 0
    exported = ph.from_pretrained(tmp_path / "x").eval()
    generation = json.loads((tmp_path / "x" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["bos_token_id"] == exported.config.pad_token_id == 0
    model, _ = load_run(tmp_path / "r")
    x = torch.tensor([ids])
    assert torch.equal(exported(x).logits.float(), model(x)[0])
    start = torch.tensor([[0, *ids]])  # transformers' generate on the export = peerlm's on the run (greedy)
    out = exported.generate(start, attention_mask=torch.ones_like(start), max_new_tokens=8, do_sample=False)
    new = out[0, start.shape[1]:].tolist()
    assert new[: new.index(0) if 0 in new else None] == generate(model, ids, 8, temperature=0)


def _refused(capsys, argv: list[str], out: Path, match: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("peerlm: error: ") and match in err, err
    assert not out.exists()


def test_refusals_before_any_write(data_dir, tmp_path, capsys):
    llama = config_dir(tmp_path)
    small = config_dir(tmp_path / "small", vocab=200)
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r"
    base = ["train", "--data", str(data_dir), "--out", str(out), "--max-steps", "2", "--hf-model"]
    _refused(capsys, [*base, str(tmp_path / "empty")], out, "has no config.json")
    _refused(capsys, [*base, str(tmp_path / "nowhere")], out, "does not exist")
    _refused(capsys, [*base, str(small)], out, "vocabulary of 200 ids but")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{")
    _refused(capsys, [*base, str(tmp_path / "broken")], out, "is not a transformers config")
    transformers.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64, num_layers=1, num_heads=2).save_pretrained(
        tmp_path / "t5")
    _refused(capsys, [*base, str(tmp_path / "t5")], out, "no causal LM for model type 't5'")
    _refused(capsys, [*base, str(llama), "--add-memory", "moe:layers=1"], out, "one of peer, pkm")
    _refused(capsys, [*base, str(llama), "--add-memory", "peer:num_expert=16"], out, "did you mean 'num_experts'")
    _refused(capsys, [*base, str(llama), "--add-memory", "peer:num_experts=15"], out, "num_experts")
    _refused(capsys, [*base, str(llama), "--add-memory", "peer:layers=3"], out, "layer 3 is out of range")
    _refused(capsys, [*base, str(llama), "--add-memory", "peer:mode=beside"], out, "mode must be one of")
    _refused(capsys, [*base, str(llama), "--add-memory", "peer:layers"], out, "is not OPTION=VALUE")
    _refused(capsys, [*base, str(llama), "--set", "model.context_length=65"], out, "more than the 64 positions")
    _refused(capsys, [*base, str(llama), "--set", "model.dim=64"], out, "takes model.context_length only")
    _refused(capsys, [*base, str(llama), "--preset", "tiny"], out, "give one of them")
    _refused(capsys, ["train", "--preset", "tiny", "--data", str(data_dir), "--out", str(out), "--max-steps", "2",
                      "--add-memory", "peer"], out, "goes with --hf-model")


def test_parse_memory():
    assert parse_memory("peer", 5) == {"kind": "peer", "layers": [2], "mode": "parallel"}
    assert parse_memory("pkm:layers=0,3:mode=replace:num_keys=32**2:query_norm=running", 5) == {
        "kind": "pkm", "layers": [0, 3], "mode": "replace", "num_keys": 1024, "query_norm": "running"}
    with pytest.raises(ValueError, match="layers must be block indices"):
        parse_memory("peer:layers=one", 5)


@pytest.mark.parametrize("method", ["memory", "sparse", "full"])
def test_finetune_takes_a_transformers_run_as_its_base(method, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PEERLM_CACHE", str(tmp_path / "cache"))
    run = plan(config_dir(tmp_path), data_dir, max_steps=3)
    train_hf(run, tmp_path / "base", progress=False, log=lambda s: None)
    extra = ["--slots", "16", "--background", "2"] if method == "sparse" else []
    argv = ["finetune", str(tmp_path / "base"), "--data", str(data_dir), "--out", str(tmp_path / "ft"), "--method",
            method, "--max-steps", "3", "--quiet", *extra]
    assert main(argv) == 0, capsys.readouterr().err
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["model_kind"] == "hf" and config["finetune"]["method"] == method
    before, after = final_weights(tmp_path / "base"), final_weights(tmp_path / "ft")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    tables = {k for k in before if k.endswith(("memory.layer.w_down", "memory.layer.w_up"))}
    if method == "full":
        assert tables < changed and "hf.model.embed_tokens.weight" in changed
    else:  # only the tables move; the trunk, the routing and the query norm's statistics stay bitwise
        assert changed == tables
    assert main(["finetune", "--out", str(tmp_path / "ft"), "--resume", "--max-steps", "4", "--quiet"]) == 0
    model, loaded = load_run(tmp_path / "ft")
    assert isinstance(model, HFCausalLM) and loaded["checkpoint_step"] == 4
    capsys.readouterr()
    assert main(["finetune", str(tmp_path / "base"), "--data", str(data_dir), "--out", str(tmp_path / "lora"),
                 "--method", "lora", "--max-steps", "2"]) == 2
    assert "works on runs of peerlm's own models" in capsys.readouterr().err
    assert not (tmp_path / "lora").exists()


def test_the_optimizer_groups_tables_and_routing_as_peerlm_train(data_dir, tmp_path):
    from peerlm.hf.training import _builder

    run = plan(config_dir(tmp_path), data_dir, lr=1e-3, expert_lr_ratio=3.0, routing_lr_ratio=0.1)
    model, opt = _builder(verified=True)(run.model, run.train, torch.device("cpu"), False)
    groups = {g["name"]: g for g in opt.param_groups}
    layer = model.hf.model.layers[1].mlp.memory.layer
    assert {id(p) for p in groups["experts"]["params"]} == {id(layer.w_down), id(layer.w_up)}
    assert groups["experts"]["base_lr"] == pytest.approx(3e-3)
    routing = {id(p) for name in ("routing", "routing_no_decay") for p in groups[name]["params"]}
    assert id(layer.query.weight) in routing and id(layer.keys.keys) in routing
    assert groups["routing"]["base_lr"] == pytest.approx(1e-4) and groups["decay"]["base_lr"] == 1e-3
    trunk = {id(p) for name in ("decay", "no_decay") for p in groups[name]["params"]}
    assert id(model.hf.model.layers[0].self_attn.q_proj.weight) in trunk
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_flops_command_on_a_transformers_directory(data_dir, tmp_path, capsys):
    model_dir = config_dir(tmp_path)
    run = plan(model_dir, data_dir)
    assert main(["flops", "--hf-model", str(model_dir), "--add-memory", PEER, "--set", "model.context_length=16"]) == 0
    out = capsys.readouterr().out
    assert f"{run.flops_per_token():.4g}" in out and "with memory in block(s) [1]" in out
    assert f"{hf_cost(run.model)['params']:,}" in out
    assert main(["flops", "--preset", "tiny", "--hf-model", str(model_dir)]) == 2
    assert "give one of --preset NAME and --hf-model DIR" in capsys.readouterr().err
