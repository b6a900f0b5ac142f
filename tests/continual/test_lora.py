"""LoRA through peft: adapters on the trunk only, identity at init, merging into plain weights."""

from __future__ import annotations

import pytest
import torch

from peerlm.config import get_preset
from peerlm.continual.lora import attach_lora, has_lora, merge_lora
from peerlm.model import build_model


def _pair(preset: str = "tiny-peer"):
    torch.manual_seed(0)
    plain = build_model(get_preset(preset)).eval()
    torch.manual_seed(0)
    adapted = attach_lora(build_model(get_preset(preset)), rank=4, alpha=8.0, dropout=0.0).eval()
    return plain, adapted


def test_adapters_sit_on_the_trunk_start_as_identity_and_alone_train():
    plain, adapted = _pair()
    trainable = [n for n, p in adapted.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    assert not any("ffn.query" in n or "tok_emb" in n for n in trainable)  # routing and embedding untouched
    assert any("attn.qkv" in n for n in trainable) and any("ffn.fc" in n for n in trainable)
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(plain(x)[0], adapted(x)[0])  # B = 0 at init


def test_merge_gives_the_adapted_outputs_with_a_plain_state_dict():
    plain, adapted = _pair()
    with torch.no_grad():
        for n, p in adapted.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    x = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        want = adapted(x)[0]
        merged = merge_lora(adapted)
        got = merged(x)[0]
    assert not has_lora(merged)
    assert set(merged.state_dict()) == set(plain.state_dict())
    assert torch.allclose(got, want, atol=1e-5) and not torch.allclose(got, plain(x)[0], atol=1e-3)


def test_bad_settings_are_refused():
    model = build_model(get_preset("tiny-peer"))
    with pytest.raises(ValueError, match="no linear layer"):
        attach_lora(model, 4, 8.0, 0.0, targets=["nothing.here"])
    with pytest.raises(ValueError, match="rank"):
        attach_lora(model, 0, 8.0, 0.0)
    with pytest.raises(ValueError, match="dropout"):
        attach_lora(model, 4, 8.0, 1.0)
