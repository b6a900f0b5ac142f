"""The transformer: causality for every feed-forward, KV-cache decoding, input checks, init, training."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from peerlm.config import DenseConfig, ModelConfig, MoEConfig, PEERConfig, PKMConfig, get_preset, list_presets
from peerlm.ffn import PKM, MoE
from peerlm.model import Transformer, build_model
from peerlm.peer import PEER

TINY = ["tiny", "tiny-peer", "tiny-moe", "tiny-pkm"]


def _cfg(name: str, **changes) -> ModelConfig:
    return dataclasses.replace(get_preset(name), **changes)


def _ffn(cfg: ModelConfig, **changes) -> ModelConfig:
    return dataclasses.replace(cfg, ffn=dataclasses.replace(cfg.ffn, **changes))


def _idx(cfg: ModelConfig, B: int = 2, T: int | None = None, seed: int = 0) -> torch.Tensor:
    T = cfg.context_length if T is None else T
    return torch.randint(0, cfg.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


def _model(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return build_model(cfg)


def _changed_prefix(model: Transformer, idx: torch.Tensor, t: int) -> float:
    """Max change of logits at positions <= t when token t + 1 changes (each run on a fresh copy, so
    running statistics updated by the first forward do not affect the second)."""
    other = idx.clone()
    other[:, t + 1] = (other[:, t + 1] + 1) % model.cfg.vocab_size
    a, _ = copy.deepcopy(model)(idx)
    b, _ = copy.deepcopy(model)(other)
    assert not torch.equal(a[:, t + 1:], b[:, t + 1:])  # the change is visible downstream
    return (a[:, :t + 1] - b[:, :t + 1]).abs().max().item()


CAUSAL_CASES = [
    ("tiny", "eval", {}), ("tiny-peer", "eval", {}), ("tiny-moe", "eval", {}), ("tiny-pkm", "eval", {}),
    ("tiny", "train", {}),
    ("tiny-peer", "train", {"query_norm": "running"}),
    ("tiny-pkm", "train", {"query_norm": "running"}),
    ("tiny-peer", "train", {"query_norm": "none"}),
    ("tiny-moe", "train", {"routing": "token", "topk": 2, "capacity_factor": None}),
]


@pytest.mark.parametrize("name,mode,ffn", CAUSAL_CASES)
@pytest.mark.parametrize("t", [0, 13, 30])
def test_causal(name, mode, ffn, t):
    cfg = _ffn(get_preset(name), **ffn) if ffn else get_preset(name)
    model = _model(dataclasses.replace(cfg, placement="all") if cfg.ffn else cfg)
    model.train(mode == "train")
    assert _changed_prefix(model, _idx(cfg), t) == 0.0


@pytest.mark.parametrize("name,ffn", [
    ("tiny-peer", {"query_norm": "batchnorm"}),
    ("tiny-pkm", {"query_norm": "batchnorm"}),
    ("tiny-moe", {"routing": "expert"}),
])
def test_documented_train_time_leaks_are_real(name, ffn):
    """Batch-statistics query norm and expert choice see the future in training (see their docs);
    this also shows the causality check above can fail."""
    model = _model(dataclasses.replace(_ffn(get_preset(name), **ffn), placement="all")).train()
    assert _changed_prefix(model, _idx(model.cfg), 13) > 0


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("attn_impl", ["sdpa", "eager"])
def test_kv_cache_decoding_equals_full_forward(name, attn_impl):
    cfg = _cfg(name, attn_impl=attn_impl)
    model = _model(cfg).eval()
    idx = _idx(cfg, B=3)
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_kv_cache(batch=3)
        parts = [model(idx[:, :10], kv_cache=cache)[0]]  # prefill
        parts += [model(idx[:, 10:17], kv_cache=cache)[0]]  # a chunk after a prefix: masked attention
        for t in range(17, cfg.context_length):  # then one token at a time
            parts.append(model(idx[:, t:t + 1], kv_cache=cache)[0])
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == cfg.context_length
    with pytest.raises(ValueError, match="after 32 cached positions does not fit the context of 32"):
        model(idx[:, :1], kv_cache=cache)
    cache.reset()
    torch.testing.assert_close(model(idx[:, :5], kv_cache=cache)[0], full[:, :5], atol=1e-5, rtol=1e-5)


def test_eager_attention_equals_sdpa():
    a, b = _model(_cfg("tiny")), _model(_cfg("tiny", attn_impl="eager"))
    idx = _idx(a.cfg)
    torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-5, rtol=1e-5)


def test_input_errors():
    model = _model(_cfg("tiny"))
    V, T = model.cfg.vocab_size, model.cfg.context_length
    with pytest.raises(ValueError, match="sequence of 33 tokens does not fit the context of 32; crop"):
        model(torch.zeros(1, T + 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"token ids must be in \[0, vocab_size=256\), got range \[0, 256\]"):
        model(torch.tensor([[0, V]]))
    with pytest.raises(ValueError, match=r"got range \[-1, 3\]"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="idx must be an integer tensor"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets .* must have the shape of idx"):
        model(torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="kv_cache was made for batch 2, got batch 1"):
        model(torch.zeros(1, 4, dtype=torch.long), kv_cache=model.new_kv_cache(2))
    with pytest.raises(ValueError, match="max_len must be in"):
        model.new_kv_cache(1, max_len=T + 1)


def test_losses():
    model = _model(_cfg("tiny-moe", n_layers=3)).train()
    idx, tgt = _idx(model.cfg), _idx(model.cfg, seed=1)
    tgt[0, :5] = -1  # ignored positions
    logits, loss = model(idx, tgt)
    assert logits.shape == (2, 32, 256) and logits.dtype == torch.float32
    ce = F.cross_entropy(logits.view(-1, 256), tgt.view(-1), ignore_index=-1)
    (moe_block,) = model.cfg.sparse_blocks()
    aux = model.blocks[moe_block].ffn.aux_loss
    torch.testing.assert_close(model.last_losses["ce"], ce.detach())
    assert aux > 0
    torch.testing.assert_close(loss, ce + aux)
    torch.testing.assert_close(model.last_losses["aux"], aux.detach())
    model.eval()
    _, loss = model(idx, tgt)
    torch.testing.assert_close(loss, model.last_losses["ce"])  # no router losses in eval
    assert model(idx)[1] is None and model.last_losses == {}


@pytest.mark.parametrize("name", TINY)
def test_build_model_initialises_everything_once(name, monkeypatch):
    cfg = dataclasses.replace(get_preset(name), tie_embeddings=False)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for t in list(model.parameters()) + list(model.buffers()):
            t.fill_(float("nan") if t.is_floating_point() else -7)
    model.init_weights()
    for n, t in list(model.named_parameters()) + list(model.named_buffers()):
        assert (torch.isfinite(t).all() if t.is_floating_point() else (t >= 0).all()), n
    calls = []  # initialisations on real memory (construction on the meta device costs nothing)

    def counting(original):
        def reset_parameters(self):
            if not next(self.parameters()).is_meta:
                calls.append(self)
            original(self)
        return reset_parameters

    for cls in (PEER, PKM, MoE):
        monkeypatch.setattr(cls, "reset_parameters", counting(cls.reset_parameters))
    torch.manual_seed(0)
    a = build_model(cfg)
    assert len(calls) == len(cfg.sparse_blocks())  # the big tables are filled once
    torch.manual_seed(0)
    b = build_model(cfg)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("name", [n for n in list_presets() if not n.startswith("paper")])
def test_presets_build(name):
    cfg = get_preset(name)
    model = build_model(cfg).eval()
    with torch.no_grad():
        logits, loss = model(_idx(cfg, B=1, T=8), _idx(cfg, B=1, T=8, seed=1))
    assert logits.shape == (1, 8, cfg.vocab_size) and torch.isfinite(loss)


def test_parameter_groups_and_memory_layers():
    cases = [("tiny", []), ("tiny-moe", []), ("tiny-peer", ["w_down", "w_up"]), ("tiny-pkm", ["values"])]
    for name, expect in cases:
        model = _model(_cfg(name, n_layers=4))
        experts = list(model.expert_parameters())
        other = list(model.other_parameters())
        assert {id(p) for p in experts}.isdisjoint(id(p) for p in other)
        assert len(experts) + len(other) == len(list(model.parameters()))
        named = {id(p): n for n, p in model.named_parameters()}
        assert [named[id(p)] for p in experts] == [f"blocks.1.ffn.{e}" for e in expect]
        layers = model.memory_layers()
        assert [n for n, _ in layers] == (["blocks.1.ffn"] if expect else [])
    model = _model(_cfg("tiny-peer", placement="all"))
    assert [n for n, _ in model.memory_layers()] == ["blocks.0.ffn", "blocks.1.ffn"]
    assert all(isinstance(m, PEER) for _, m in model.memory_layers())


def test_tied_and_untied_head():
    tied = _model(_cfg("tiny"))
    untied = _model(_cfg("tiny", tie_embeddings=False))
    assert tied.head is None and untied.head is not None
    assert untied.num_params() - tied.num_params() == 256 * 32
    for model, weight in [(tied, tied.tok_emb.weight), (untied, untied.head.weight)]:
        seen = {}
        model.norm.register_forward_hook(lambda m, i, o, seen=seen: seen.update(h=o))
        logits, _ = model(_idx(model.cfg))
        torch.testing.assert_close(logits, seen["h"] @ weight.t())


@pytest.mark.parametrize("name,ffn", [
    ("tiny", None),
    ("tiny-peer", {"query_norm": "running"}),
    ("tiny-moe", {}),
    ("tiny-moe", {"routing": "token", "topk": 2, "capacity_factor": 1.25}),
    ("tiny-pkm", {}),
])
def test_loss_drops_on_a_repeated_batch(name, ffn):
    cfg = _ffn(get_preset(name), **ffn) if ffn else get_preset(name)
    model = _model(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = _idx(cfg, B=4, seed=3)
    x, y = idx[:, :-1], idx[:, 1:]
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(model.last_losses["ce"].item())
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.parametrize("name", TINY)
def test_bf16_autocast_forward_backward(name):
    model = _model(_cfg(name, mlp=DenseConfig(activation="swiglu"))).train()
    idx = _idx(model.cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    assert torch.isfinite(loss) and all(torch.isfinite(p.grad).all() for p in model.parameters()
                                        if p.grad is not None)


def test_per_kind_options_reach_the_layers():
    cfg = _cfg("tiny", ffn=PEERConfig(num_experts=64, heads=3, topk=2, dim_key=6, gate="sigmoid",
                                      query_norm="none", shared_keys=False, impl="reference"))
    peer = _model(cfg).blocks[0].ffn
    assert (peer.num_experts, peer.heads, peer.topk, peer.dim_key, peer.gate, peer.impl) == (
        64, 3, 2, 6, "sigmoid", "reference")
    assert not peer.shared_keys and peer.keys.keys.shape[0] == 3
    moe = _model(_cfg("tiny", ffn=MoEConfig(num_experts=3, topk=2, routing="token", capacity_factor=None),
                      mlp=DenseConfig(hidden=40, activation="swiglu"))).blocks[0].ffn
    assert moe.w_fc.shape == (3, 40, 32) and moe.w_gate is not None and moe.routing == "token"
    pkm_cfg = PKMConfig(num_keys=49, heads=1, topk=7, dim_key=4, shared_keys=True)
    pkm = _model(_cfg("tiny", ffn=pkm_cfg)).blocks[0].ffn
    assert pkm.values.shape == (49, 32) and pkm.keys.keys.shape == (1, 2, 7, 2)


def test_model_built_directly_has_rotary_tables():
    model = Transformer(get_preset("tiny"))  # no build_model: rotary buffers must still be filled
    assert torch.isfinite(model.rope_cos).all() and model.rope_cos[0].eq(1).all()
    idx = torch.randint(0, 10, (1, 4), dtype=torch.int32)
    logits, loss = model(idx, idx)  # int32 ids and targets are accepted
    assert torch.isfinite(logits).all() and torch.isfinite(loss)
