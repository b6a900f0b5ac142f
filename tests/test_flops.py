"""FLOP and parameter accounting against built models and torch's FLOP counter."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from peerlm.config import DenseConfig, MoEConfig, PEERConfig, PKMConfig, get_preset, list_presets
from peerlm.ffn import MoE, build_ffn
from peerlm.flops import (
    attention_cost,
    dense_cost,
    ffn_cost,
    format_cost,
    model_cost,
    moe_cost,
    pkm_cost,
    tokens_for_budget,
)
from peerlm.model import Attention, Transformer, build_model
from peerlm.peer import peer_cost


def _counted(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


VARIANTS = [
    ("tiny", {}),
    ("tiny", {"tie_embeddings": False, "mlp": DenseConfig(activation="swiglu")}),
    ("tiny", {"mlp": DenseConfig(hidden=40)}),
    ("tiny-peer", {}),
    ("tiny-peer", {"placement": "all", "ffn": PEERConfig(num_experts=64, heads=3, topk=2, dim_key=6,
                                                         query_norm="none", shared_keys=False)}),
    ("tiny-peer", {"ffn": PEERConfig(num_experts=64, heads=2, topk=4, dim_key=8, query_norm="running")}),
    ("tiny-moe", {}),
    ("tiny-moe", {"mlp": DenseConfig(activation="swiglu"), "ffn": MoEConfig(num_experts=3, topk=2,
                                                                            routing="token")}),
    ("tiny-moe", {"placement": "all", "ffn": MoEConfig(num_experts=16, topk=4, routing="token", expert_hidden=8)}),
    ("tiny-moe", {"mlp": DenseConfig(activation="swiglu"), "ffn": MoEConfig(num_experts=8, capacity_factor=2.0,
                                                                            expert_hidden=12)}),
    ("tiny-pkm", {}),
    ("tiny-pkm", {"tie_embeddings": False, "ffn": PKMConfig(num_keys=49, heads=1, topk=7, dim_key=4,
                                                            query_norm="none", shared_keys=True)}),
]


@pytest.mark.parametrize("name,changes", VARIANTS)
def test_param_counts_of_built_models_equal_formulas(name, changes):
    cfg = dataclasses.replace(get_preset(name), **changes)
    model = build_model(cfg)
    cost = model_cost(cfg)
    assert model.num_params() == cost["params"]
    assert sum(p.numel() for p in model.expert_parameters()) == cost["expert_params"]
    for block, entry in zip(model.blocks, cost["blocks"]):
        assert sum(p.numel() for p in block.attn.parameters()) == entry["attention"]["params"]
        assert sum(p.numel() for p in block.ffn.parameters()) == entry["ffn"]["params"]
        assert entry["kind"] == cfg.block_ffn(entry["block"]).KIND


@pytest.mark.parametrize("name", [n for n in list_presets()])
def test_param_counts_of_every_preset_on_meta(name):
    """Every preset, the paper-sized ones included: built on the meta device, nothing is allocated."""
    cfg = get_preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert sum(p.numel() for p in model.parameters()) == model_cost(cfg)["params"]


def test_paper_peer_accounting_by_hand():
    cfg = get_preset("paper-peer")
    dense = model_cost(get_preset("paper-dense"))
    c = model_cost(cfg)
    D, N, h, k, dk, n = 768, 1024**2, 8, 16, 128, 1024
    peer_params = 2 * N * D + D * h * dk + n * dk + 2 * h * dk
    assert c["params"] == dense["params"] - 2 * D * 4 * D + peer_params
    assert c["expert_params"] == 2 * N * D
    peer_flops = 2 * D * h * dk + 2 * h * n * dk + h * k * k + 4 * h * k * D
    assert c["flops_forward"] == dense["flops_forward"] - 4 * D * 4 * D + peer_flops
    assert c["blocks"][5]["kind"] == "peer" and c["blocks"][5]["ffn"] == peer_cost(D, N, h, k, dk)
    # retrieval costs more than the experts at N = 1024^2 (the paper's setting)
    f = c["blocks"][5]["ffn"]["flops"]
    assert f["query"] + f["subkey_scores"] > f["experts"]


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("tied", [True, False])
def test_dense_model_flops_equal_flop_counter(act, tied):
    """A dense model's forward is all matmuls the counter sees (with the eager attention reference)."""
    cfg = dataclasses.replace(get_preset("tiny"), attn_impl="eager", mlp=DenseConfig(activation=act),
                              tie_embeddings=tied, n_layers=3)
    model = build_model(cfg)
    B, T = 3, 20
    idx = torch.randint(0, cfg.vocab_size, (B, T))
    assert _counted(lambda: model(idx)) == B * T * model_cost(cfg, seq_len=T)["flops_forward"]


def test_attention_flops_equal_flop_counter():
    D, H, B, T = 48, 4, 2, 16
    attn = Attention(D, H, impl="eager")
    attn.reset_parameters()
    cos, sin = torch.ones(T, D // H // 2), torch.zeros(T, D // H // 2)
    x = torch.randn(B, T, D)
    assert _counted(lambda: attn(x, cos, sin)) == B * T * attention_cost(D, T)["flops"]["total"]
    c = attention_cost(D, T)["flops"]
    assert c["scores"] == c["weighted_sum"] == 2 * T * D and c["qkv"] == 6 * D * D and c["out"] == 2 * D * D


def test_causal_halving():
    full, half = attention_cost(64, 100), attention_cost(64, 100, causal=True)
    assert half["flops"]["scores"] == 101 * 64 and full["flops"]["scores"] == 200 * 64
    assert half["params"] == full["params"]
    cfg = get_preset("dense-small")
    assert model_cost(cfg, causal=True)["flops_forward"] < model_cost(cfg)["flops_forward"]


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_dense_mlp_flops_equal_flop_counter(act):
    mlp = build_ffn(DenseConfig(hidden=40, activation=act), 24)
    x = torch.randn(10, 24)
    assert _counted(lambda: mlp(x)) == 10 * dense_cost(24, 40, act)["flops"]["total"]


@pytest.mark.parametrize("routing,topk,cf", [("token", 1, None), ("token", 2, None), ("expert", 1, 1.0),
                                             ("expert", 1, 2.0)])
def test_moe_flops_equal_flop_counter(routing, topk, cf):
    D, F, E, S = 16, 32, 4, 24  # cf * S / E is whole: expert choice runs exactly cf experts per token
    moe = MoE(D, F, E, topk, routing, cf).train()
    x = torch.randn(S, D)
    cost = moe_cost(D, F, "gelu", MoEConfig(E, topk, routing, cf))
    assert _counted(lambda: moe(x)) == S * cost["flops"]["total"]
    per_token = topk if routing == "token" else cf
    assert cost["active_params"] == D * E + per_token * 2 * D * F
    assert cost["params"] == D * E + E * 2 * D * F


@pytest.mark.parametrize("routing,topk,cf", [("token", 4, None), ("expert", 1, 4.0)])
@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_fine_grained_moe_flops_and_params(routing, topk, cf, act):
    """expert_hidden = F / G with G times the experts and G times topk (or capacity factor): the
    parameters and FLOPs of the coarse MoE, and the FLOP counter agrees (Krajewski et al. 2024)."""
    D, F, E, S, G = 16, 32, 4, 24, 4
    mlp = DenseConfig(hidden=F, activation=act)
    coarse = MoEConfig(E, topk // G if routing == "token" else 1, routing, cf and cf / G)
    fine = MoEConfig(E * G, topk, routing, cf, expert_hidden=F // G)
    moe = build_ffn(fine, D, mlp).train()
    x = torch.randn(S, D)
    cost, base = moe_cost(D, F, act, fine), moe_cost(D, F, act, coarse)
    assert _counted(lambda: moe(x)) == S * cost["flops"]["total"]
    assert sum(p.numel() for p in moe.parameters()) == cost["params"]
    mats = 3 if act == "swiglu" else 2
    assert cost["flops"]["experts"] == base["flops"]["experts"] == 2 * mats * D * F
    assert cost["params"] - D * E * G == base["params"] - D * E == E * mats * D * F  # experts; routers differ
    assert ffn_cost(fine, D, mlp) == cost


def test_pkm_cost_by_hand():
    D = 32
    cfg = PKMConfig(num_keys=256, heads=2, topk=4, dim_key=16, shared_keys=False)
    c = pkm_cost(D, cfg)
    assert c["params"] == D * 32 + 2 * 32 + 2 * 16 * 16 + 256 * D
    assert c["active_params"] == D * 32 + 2 * 32 + 2 * 16 * 16 + 2 * 4 * D
    assert c["flops"] == {"query": 2 * D * 32, "subkey_scores": 2 * 2 * 16 * 16, "candidate_grid": 2 * 16,
                          "values": 2 * 2 * 4 * D, "total": 2048 + 1024 + 32 + 512}
    # the matmul parts of a real PKM: the query projection and the sub-key scores of both halves
    pkm = build_ffn(cfg, D).eval()
    S = 5
    x = torch.randn(S, D)
    assert _counted(lambda: pkm.query(x)) == S * c["flops"]["query"]
    q = torch.randn(S, 2, 16)
    assert _counted(lambda: pkm.keys.half_scores(q)) == S * c["flops"]["subkey_scores"]


def test_ffn_cost_dispatch_and_errors():
    assert ffn_cost(PEERConfig(num_experts=64, topk=4), 32) == peer_cost(32, 64, 8, 4, 128)
    assert ffn_cost(MoEConfig(num_experts=2), 32, DenseConfig(hidden=8)) == moe_cost(32, 8, "gelu",
                                                                                     MoEConfig(num_experts=2))
    with pytest.raises(ValueError, match="no cost model"):
        ffn_cost("dense", 32)


def test_active_params():
    dense = get_preset("dense-small")
    c = model_cost(dense)
    assert c["active_params"] == c["params"]  # tied: the head reads the whole table
    untied = model_cost(dataclasses.replace(dense, tie_embeddings=False))
    assert untied["active_params"] == untied["params"] - dense.vocab_size * dense.dim + dense.dim
    peer = model_cost(get_preset("peer-small"))  # only h*k (u, v) pairs of the tables are touched
    assert peer["active_params"] == peer["params"] - peer["expert_params"] + 2 * 8 * 16 * 256
    pkm = model_cost(get_preset("pkm-small"))
    assert pkm["active_params"] == pkm["params"] - pkm["expert_params"] + 8 * 32 * 256


def test_train_flops_and_budget():
    dense = model_cost(get_preset("dense-small"))
    assert dense["flops_train"] == 3 * dense["flops_forward"]
    cfg = get_preset("peer-small")  # sub-key scoring runs forward only: charged once, the re-scoring 3x
    c = model_cost(cfg)
    scoring = 2 * 8 * 128 * 128  # h * n * d_key multiply-adds over both halves
    assert c["blocks"][1]["ffn"]["flops"]["subkey_scores"] == scoring
    assert c["flops_train"] == 3 * c["flops_forward"] - 2 * scoring + 3 * 2 * 8 * 16 * 128
    assert tokens_for_budget(cfg, 1e15) == int(1e15 // c["flops_train"])
    assert tokens_for_budget(cfg, c["flops_train"] * 7) == 7
    with pytest.raises(ValueError, match="flops must be > 0"):
        tokens_for_budget(cfg, 0)


def test_format_cost_mentions_every_block():
    text = format_cost(get_preset("peer-small"))
    assert "block 1 peer" in text and "block 3 dense" in text and "total" in text and "train FLOPs" in text


def test_expert_choice_active_params_can_be_fractional():
    c = moe_cost(8, 16, "gelu", MoEConfig(num_experts=4, capacity_factor=1.5))
    assert math.isclose(c["active_params"], 8 * 4 + 1.5 * 2 * 8 * 16)
