"""PeerLMForCausalLM: peerlm's Transformer behind transformers' interface: init, save and load, the
KV cache through transformers' Cache, generate() against peerlm's generate, labels, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")

from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

from peerlm.config import get_preset  # noqa: E402
from peerlm.generate import generate as peerlm_generate  # noqa: E402
from peerlm.hf import PeerLMConfig, PeerLMForCausalLM  # noqa: E402
from peerlm.model import build_model  # noqa: E402

PRESETS = ["tiny", "tiny-peer", "tiny-pkm", "tiny-moe"]


def _model(preset: str, seed: int = 0) -> PeerLMForCausalLM:
    torch.manual_seed(seed)
    model = PeerLMForCausalLM(PeerLMConfig.from_model_config(get_preset(preset))).eval()
    with torch.no_grad():  # sharpen the output so greedy choices are not near-ties
        model.model.tok_emb.weight.mul_(4.0)
    return model


def test_config_derives_the_standard_fields_and_validates():
    cfg = PeerLMConfig.from_model_config(get_preset("tiny-peer"))
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads,
            cfg.max_position_embeddings) == (256, 32, 2, 2, 32)
    assert cfg.model_config() == get_preset("tiny-peer")
    with pytest.raises(ValueError, match="dim"):
        PeerLMConfig(peerlm={**cfg.peerlm, "dim": 33})


@pytest.mark.parametrize("preset", PRESETS)
def test_a_new_model_has_peerlms_init_not_transformers(preset):
    """post_init must not reset nn.Linear to N(0, 0.02): the init is peerlm's build_model's."""
    model = _model(preset)
    ref = build_model(get_preset(preset))
    got, want = model.model.state_dict(), ref.state_dict()
    assert got.keys() == want.keys()
    for k in want:
        if want[k].is_floating_point() and want[k].numel() > 64 and want[k].std() > 0:
            ratio = float(got[k].std() / want[k].std())
            if k != "tok_emb.weight":  # sharpened by _model
                assert 0.8 < ratio < 1.25, (k, ratio)
        assert torch.isfinite(got[k].float()).all(), k
    assert torch.equal(model.model.rope_cos, ref.rope_cos)
    model.post_init()  # a second pass changes nothing
    assert all(torch.equal(v, got[k]) for k, v in model.model.state_dict().items())


@pytest.mark.parametrize("preset", PRESETS)
def test_save_and_auto_load_give_the_same_model(preset, tmp_path):
    model = _model(preset)
    x = torch.randint(0, 256, (2, 20))
    model.train()
    model(x)  # moves BatchNorm statistics and MoE thresholds, which must be saved and loaded
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is PeerLMForCausalLM
    got, want = loaded.state_dict(), model.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert torch.equal(loaded.model.rope_sin, model.model.rope_sin)  # not saved: recomputed
    assert torch.equal(loaded(x).logits, model(x).logits)
    assert torch.equal(loaded(x).logits, model.model(x)[0])


@pytest.mark.parametrize("preset", PRESETS)
def test_generate_with_and_without_cache_equals_peerlm_generate(preset):
    model = _model(preset)
    prompt = [5, 17, 33, 2, 101]
    n = model.config.max_position_embeddings - len(prompt) - 1  # fill the context exactly
    ids = torch.tensor([[0, *prompt]])  # peerlm starts a document with <|endoftext|>
    kw = {"max_new_tokens": n, "do_sample": False, "eos_token_id": None, "pad_token_id": 0,
          "attention_mask": torch.ones_like(ids)}  # else generate reads the leading id 0 as padding
    cached = model.generate(ids, use_cache=True, **kw)[0, ids.shape[1]:].tolist()
    uncached = model.generate(ids, use_cache=False, **kw)[0, ids.shape[1]:].tolist()
    ours = peerlm_generate(model.model, prompt, n, temperature=0, stop_id=None)
    assert len(cached) == n and cached == uncached == ours


def test_the_cache_is_transformers_and_prefill_then_steps_equal_a_full_forward():
    model = _model("tiny-peer")
    x = torch.randint(0, 256, (3, 12))
    full = model(x, use_cache=False).logits
    out = model(x[:, :7], use_cache=True)
    assert isinstance(out.cache, DynamicCache) and out.cache.get_seq_length() == 7
    steps = [out.logits]
    for t in range(7, 12):
        out = model(x[:, t:t + 1], cache=out.cache)
        steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_labels_give_the_shifted_mean_cross_entropy():
    model = _model("tiny")
    x = torch.randint(1, 256, (2, 10))
    labels = x.clone()
    labels[0, 4] = -100
    out = model(x, labels=labels)
    logits = out.logits[:, :-1].reshape(-1, 256)
    want = F.cross_entropy(logits, labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out.loss, want)
    model.train()
    out = model(x, labels=labels)
    assert out.cache is None  # a training step keeps no keys and values
    out.loss.backward()
    assert model.model.tok_emb.weight.grad.abs().sum() > 0


def test_bad_input_is_one_line_naming_the_fix():
    model = _model("tiny")
    x = torch.randint(1, 256, (2, 6))
    mask = torch.ones_like(x)
    mask[0, 0] = 0
    for kwargs, match in [({"attention_mask": mask}, "does not take padded batches"),
                          ({"position_ids": torch.arange(1, 7)[None]}, "leave position_ids out"),
                          ({"inputs_embeds": torch.zeros(2, 6, 32)}, "takes input_ids")]:
        with pytest.raises(ValueError, match=match) as e:
            model(x, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="33 positions do not fit the model's context of 32"):
        model(torch.randint(1, 256, (1, 33)))
    ids = torch.tensor([[0, 5, 6]])
    with pytest.raises(ValueError, match="keep prompt plus new tokens within 32"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False)


@pytest.mark.slow  # a fresh interpreter importing torch and transformers: about 7 s
def test_trust_remote_code_loads_it_without_importing_peerlm_hf(tmp_path):
    """The directory carries its classes (auto_map): a process that never imports peerlm.hf loads it
    (in this process the registered classes would win over the directory's)."""
    model = _model("tiny-pkm")
    model.save_pretrained(tmp_path / "m")
    x = torch.randint(0, 256, (1, 9))
    torch.save(model(x).logits, tmp_path / "logits.pt")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration.PeerLMConfig",
                                  "AutoModelForCausalLM": "modeling.PeerLMForCausalLM"}
    code = (f"import sys, torch\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'm')!r}, trust_remote_code=True).eval()\n"
            f"assert 'peerlm.hf' not in sys.modules, 'imported peerlm.hf'\n"
            f"assert type(m).__module__.startswith('transformers_modules'), type(m).__module__\n"
            f"assert torch.equal(m(torch.tensor({x.tolist()})).logits, torch.load({str(tmp_path / 'logits.pt')!r}))\n")
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
