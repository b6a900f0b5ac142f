"""Tiny transformers models of every family ``peerlm.hf.add_memory`` knows, built from configs alone
(no download), and the checks of a memory layer's init shared by the tests of peerlm.hf."""

from __future__ import annotations

import dataclasses

import pytest
import torch

transformers = pytest.importorskip("transformers")

from peerlm.config import get_preset  # noqa: E402
from peerlm.hf import MemoryFFN, PeerLMConfig  # noqa: E402
from peerlm.peer import PEER  # noqa: E402

VOCAB = 96
_LLAMA_LIKE = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 3,
               "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 64}


def _configs() -> dict:
    t = transformers
    return {
        "llama": lambda: t.LlamaConfig(**_LLAMA_LIKE),
        "mistral": lambda: t.MistralConfig(**_LLAMA_LIKE),
        "qwen2": lambda: t.Qwen2Config(**_LLAMA_LIKE),
        "qwen3": lambda: t.Qwen3Config(**_LLAMA_LIKE, head_dim=16),
        "olmo2": lambda: t.Olmo2Config(**_LLAMA_LIKE),
        "gpt2": lambda: t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=3, n_head=2, n_positions=64),
        "gpt_neox": lambda: t.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=3, num_attention_heads=2, max_position_embeddings=64),
        "peerlm": lambda: PeerLMConfig.from_model_config(dataclasses.replace(get_preset("tiny"), n_layers=3)),
    }


FAMILIES = list(_configs())
PEER_OPTIONS = {"num_experts": 16**2, "heads": 2, "topk": 4, "dim_key": 16}
PKM_OPTIONS = {"num_keys": 16**2, "heads": 2, "topk": 4, "dim_key": 16}
OPTIONS = {"peer": PEER_OPTIONS, "pkm": PKM_OPTIONS}


def tiny_config(family: str):
    return _configs()[family]()


def tiny_model(family: str, seed: int = 0):
    """A freshly initialised causal LM of ``family``, in eval mode (dropout off, query norms on running stats)."""
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(tiny_config(family)).eval()


def tokens(seed: int = 0, batch: int = 2, length: int = 12) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def memory_layers(model) -> list[MemoryFFN]:
    return [m for m in model.modules() if isinstance(m, MemoryFFN)]


@torch.no_grad()
def assert_memory_init(model) -> None:
    """Every memory layer holds its own init: tables, query projection N(0, 1/dim) (not transformers'
    0.02), sub-keys N(0, 2/d_key), a fresh BatchNorm, a zero parallel scale; all finite."""
    layers = memory_layers(model)
    assert layers
    for mem in layers:
        layer = mem.layer
        for name, t in layer.named_parameters():
            assert torch.isfinite(t).all(), name
        tables = [layer.w_down, layer.w_up] if isinstance(layer, PEER) else [layer.values]
        expected = [(t, layer.dim**-0.5) for t in tables]
        expected += [(layer.query.weight, layer.dim**-0.5), (layer.keys.keys, (2 / layer.dim_key) ** 0.5)]
        for t, std in expected:
            assert abs(float(t.std()) / std - 1) < 0.15, (tuple(t.shape), float(t.std()), std)
        assert torch.equal(layer.norm.running_mean, torch.zeros_like(layer.norm.running_mean))
        assert torch.equal(layer.norm.running_var, torch.ones_like(layer.norm.running_var))
        assert torch.equal(layer.norm.weight, torch.ones_like(layer.norm.weight))
        if mem.mode == "parallel":
            assert torch.equal(mem.scale, torch.zeros_like(mem.scale))
