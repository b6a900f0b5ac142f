"""add_memory on tiny models of every family: the same function at step 0 (parallel), the memory's own
init after post_init and from_pretrained, exact reload, the optimizer groups, one-line errors."""

from __future__ import annotations

import pytest
import torch
from tiny_hf import (
    FAMILIES,
    OPTIONS,
    PEER_OPTIONS,
    PKM_OPTIONS,
    assert_memory_init,
    memory_layers,
    tiny_model,
    tokens,
)
from transformers import AutoModelForCausalLM

import peerlm.hf as ph
from peerlm.ffn import PKM
from peerlm.hf.memory import MemoryFFN
from peerlm.peer import PEER


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_parallel_memory_keeps_the_function_and_gets_its_own_init(family, kind):
    model = tiny_model(family)
    x = tokens()
    before = model(x).logits
    base = type(model)
    out = ph.add_memory(model, kind, layers=[1], mode="parallel", **OPTIONS[kind])
    assert out is model and type(model) is ph.memory_class(base) and issubclass(type(model), base)
    assert type(model).__name__ == base.__name__ and type(model).__module__ == "peerlm.hf.memory"
    assert torch.equal(model(x).logits, before)  # the scale starts at zero
    [mem] = memory_layers(model)
    assert isinstance(mem.layer, PEER if kind == "peer" else PKM)
    path = ph.FAMILY_MLP_PATHS[family].format(i=1)
    assert model.get_submodule(path).memory is mem
    assert_memory_init(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.post_init()  # transformers' init pass (nn.Linear -> N(0, 0.02)) must leave the memory alone
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert model.config.peerlm_memory[0]["layers"] == [1] and model.config.peerlm_memory[0]["kind"] == kind


@pytest.mark.parametrize("family", FAMILIES)
def test_replace_swaps_the_mlp_and_trains(family):
    model = tiny_model(family).train()
    x = tokens()
    with torch.no_grad():
        before = model(x).logits
    ph.add_memory(model, "peer", layers=[0, 1], mode="replace", **PEER_OPTIONS)
    path = ph.FAMILY_MLP_PATHS[family]
    assert all(isinstance(model.get_submodule(path.format(i=i)), MemoryFFN) for i in (0, 1))
    assert not isinstance(model.get_submodule(path.format(i=2)), MemoryFFN)
    assert not torch.allclose(model(x).logits, before)
    model(x, labels=x).loss.backward()
    for mem in memory_layers(model):
        for p in (mem.layer.w_down, mem.layer.w_up, mem.layer.query.weight, mem.layer.keys.keys):
            assert p.grad is not None and p.grad.abs().sum() > 0


def test_a_new_memory_model_is_initialised_by_the_layers_own_init():
    """The class from memory_class, built from a config that records memory (post_init included)."""
    model = ph.add_memory(tiny_model("llama"), "pkm", layers=[2], mode="parallel", **PKM_OPTIONS)
    fresh = type(model)(model.config).eval()
    assert_memory_init(fresh)
    assert fresh.model.layers[2].mlp.memory.layer.values.shape == (256, 32)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gpt_neox", "peerlm"])
@pytest.mark.parametrize("mode", ["parallel", "replace"])
def test_save_and_from_pretrained_rebuild_the_memory_exactly(family, mode, tmp_path):
    model = ph.add_memory(tiny_model(family), "peer", layers=[1], mode=mode, **PEER_OPTIONS)
    ph.add_memory(model, "pkm", layers=[0], mode="parallel", **PKM_OPTIONS)
    with torch.no_grad():  # the memory matters for the comparison
        for mem in memory_layers(model):
            if mem.scale is not None:
                mem.scale.fill_(0.5)
    model.train()
    model(tokens())  # BatchNorm running statistics move
    model.eval()
    model.save_pretrained(tmp_path)
    expected = model.state_dict()
    loaders = [ph.from_pretrained, type(model).from_pretrained]
    if family != "peerlm":  # a transformers family: the Auto class builds the memory too, given trust_remote_code
        assert (tmp_path / f"{ph.memory.MEMORY_MODULE}.py").is_file()
        loaders.append(lambda p: AutoModelForCausalLM.from_pretrained(p, trust_remote_code=True))
    for loaded in (load(tmp_path) for load in loaders):
        loaded.eval()
        assert type(loaded) is type(model)
        got = loaded.state_dict()
        assert got.keys() == expected.keys()
        assert all(torch.equal(got[k], expected[k]) for k in expected), [k for k in expected
                                                                         if not torch.equal(got[k], expected[k])]
        assert torch.equal(loaded(tokens()).logits, model(tokens()).logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_plain_checkpoint_loads_into_a_memory_model_with_the_memorys_own_init(family, tmp_path):
    base = tiny_model(family)
    base.save_pretrained(tmp_path)
    x = tokens()
    model = ph.from_pretrained(tmp_path, memory={"kind": "peer", "layers": [1], "mode": "parallel",
                                                 **PEER_OPTIONS}).eval()
    assert_memory_init(model)  # not NaN / 1e31 from the meta device, not 0.02 from transformers' init
    assert torch.equal(model(x).logits, base(x).logits)
    got, want = model.state_dict(), base.state_dict()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_two_memories_from_a_plain_checkpoint(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path)
    model = ph.from_pretrained(tmp_path, memory=[{"kind": "pkm", "layers": [0], "mode": "replace", **PKM_OPTIONS},
                                                 {"kind": "peer", "layers": [2], **PEER_OPTIONS}])
    assert [m.mode for m in memory_layers(model)] == ["replace", "parallel"]
    assert_memory_init(model)


def test_param_groups_are_peerlm_trains():
    model = ph.add_memory(tiny_model("llama"), "peer", layers=[1], **PEER_OPTIONS)
    groups = {g["name"]: g for g in ph.param_groups(model, 1e-3, 0.1, expert_lr=3e-3, routing_lr=2e-4)}
    layer = model.model.layers[1].mlp.memory.layer
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["experts"] == {id(layer.w_down), id(layer.w_up)} and groups["experts"]["lr"] == 3e-3
    assert ids["routing"] == {id(layer.query.weight)} and groups["routing"]["lr"] == 2e-4
    assert ids["routing_no_decay"] == {id(p) for p in (layer.keys.keys, layer.norm.weight, layer.norm.bias)}
    assert groups["routing_no_decay"]["weight_decay"] == 0 and groups["decay"]["weight_decay"] == 0.1
    assert id(model.model.layers[1].mlp.memory.scale) in ids["no_decay"]
    assert id(model.model.layers[0].mlp.gate_proj.weight) in ids["decay"]
    every = [i for s in ids.values() for i in s]
    assert sorted(every) == sorted(id(p) for p in model.parameters())  # each parameter in exactly one group
    opt = torch.optim.AdamW(ph.param_groups(model, 1e-2))
    x = tokens()
    model.train()
    model(x, labels=x).loss.backward()
    opt.step()
    assert torch.isfinite(layer.w_down).all()


def test_another_family_by_path_pattern():
    model = tiny_model("llama")
    model.config.model_type = "my_llama"  # a family add_memory does not know
    with pytest.raises(ValueError, match="no known MLP path for model type 'my_llama'.*pass mlp_path"):
        ph.add_memory(model, "peer", layers=[1], **PEER_OPTIONS)
    ph.add_memory(model, "peer", layers=[1], mlp_path="model.layers.{i}.mlp", **PEER_OPTIONS)
    assert_memory_init(model)


def _one_line_error(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(ValueError, match=match) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_bad_input_is_one_line_naming_the_fix():
    model = tiny_model("llama")
    add = ph.add_memory
    assert "use indices in [0, 3)" in _one_line_error("layer 3 is out of range", add, model, layers=[3], **PEER_OPTIONS)
    _one_line_error("layer -1 is out of range", add, model, layers=[-1], **PEER_OPTIONS)
    assert "leave dim out" in _one_line_error("dim=64 does not match the model's hidden size 32", add, model,
                                              layers=[1], dim=64, **PEER_OPTIONS)
    _one_line_error("unknown peer option 'num_expert' \\(did you mean 'num_experts'\\?\\)", add, model, layers=[1],
                    num_expert=256)
    _one_line_error("num_experts must be a perfect square.*use e.g. 256 or 289", add, model, layers=[1],
                    num_experts=260)
    _one_line_error("kind must be one of \\('peer', 'pkm'\\)", add, model, "moe", layers=[1])
    _one_line_error("mode must be one of", add, model, layers=[1], mode="beside", **PEER_OPTIONS)
    _one_line_error("layers must be a non-empty list", add, model, layers=[], **PEER_OPTIONS)
    _one_line_error("has no module 'model.blocks.1.mlp'.*pass mlp_path", add, model, layers=[1],
                    mlp_path="model.blocks.{i}.mlp", **PEER_OPTIONS)
    _one_line_error("must contain '\\{i\\}'", add, model, layers=[1], mlp_path="model.layers.mlp", **PEER_OPTIONS)
    assert not memory_layers(model)  # nothing was added by a refused call
    add(model, layers=[1], **PEER_OPTIONS)
    _one_line_error("block\\(s\\) \\[1\\] already have memory; pick other layers", add, model, layers=[1],
                    **PEER_OPTIONS)


def test_peft_lora_beside_trainable_memory():
    """The retrofit recipe: LoRA on attention, the memory trained whole (peft's modules_to_save)."""
    peft = pytest.importorskip("peft")
    model = ph.add_memory(tiny_model("llama"), "peer", layers=[1], **PEER_OPTIONS)
    x = tokens()
    before = model(x).logits
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      modules_to_save=["memory"]))
    assert torch.equal(lora(x).logits, before)  # LoRA's B and the memory's scale start at zero
    groups = {g["name"]: g for g in ph.param_groups(lora, 1e-2, expert_lr=3e-2)}
    [trained] = [m.layer for m in memory_layers(lora) if m.layer.w_down.requires_grad]
    assert {id(p) for p in groups["experts"]["params"]} == {id(trained.w_down), id(trained.w_up)}
    trainable = {id(p) for p in lora.parameters() if p.requires_grad}
    assert {id(p) for g in groups.values() for p in g["params"]} == trainable
    lora.train()
    lora(input_ids=x, labels=x).loss.backward()
    torch.optim.AdamW(list(groups.values())).step()
    lora.eval()
    assert not torch.equal(lora(x).logits, before)
