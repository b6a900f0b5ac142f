"""Generation: KV-cached decoding equals full recomputation; sampling filters; input errors."""

from __future__ import annotations

import pytest
import torch

from peerlm.config import get_preset
from peerlm.generate import filter_logits, generate, sample_next
from peerlm.model import build_model


@pytest.fixture(scope="module", params=["tiny", "tiny-peer", "tiny-pkm", "tiny-moe"])
def model(request):
    torch.manual_seed(0)
    m = build_model(get_preset(request.param)).eval()
    with torch.no_grad():  # sharpen the output so greedy choices are not near-ties
        m.tok_emb.weight.mul_(4.0)
    return m


def test_greedy_with_cache_equals_without(model):
    prompt = [5, 17, 33, 2, 101]
    n = model.cfg.context_length - len(prompt) - 1  # fill the context exactly
    a = generate(model, prompt, n, temperature=0, stop_id=None, use_cache=True)
    b = generate(model, prompt, n, temperature=0, stop_id=None, use_cache=False)
    assert len(a) == n and a == b


def test_sampling_with_cache_equals_without_for_a_seed(model):
    prompt = [9, 8, 7]
    kw = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3, "stop_id": None}
    cached = generate(model, prompt, 12, use_cache=True, **kw)
    assert cached == generate(model, prompt, 12, use_cache=False, **kw)
    other = generate(model, prompt, 12, **{**kw, "seed": 4})
    assert len(other) == 12


def test_generation_past_the_context_keeps_going(model):
    T = model.cfg.context_length
    out = generate(model, [1, 2, 3], 2 * T, temperature=0, stop_id=None)
    assert len(out) == 2 * T


def test_stops_at_the_stop_token():
    torch.manual_seed(0)
    m = build_model(get_preset("tiny")).eval()
    with torch.no_grad():
        m.norm.weight.zero_()  # all logits equal: argmax is id 0
    assert generate(m, [4, 5], 10, temperature=0, stop_id=0) == []
    assert generate(m, [4, 5], 3, temperature=0, stop_id=None) == [0, 0, 0]


def test_filters():
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    top2 = filter_logits(logits, top_k=2)
    assert torch.isinf(top2[2:]).all() and not torch.isinf(top2[:2]).any()
    p = logits.softmax(-1)  # 0.636, 0.234, 0.086, ...
    kept = ~torch.isinf(filter_logits(logits, top_p=0.8))
    assert kept.tolist() == [True, True, False, False, False] and p[:1].sum() < 0.8 <= p[:2].sum()
    assert (~torch.isinf(filter_logits(logits, top_p=0.1))).sum() == 1  # at least one token survives
    assert sample_next(logits, temperature=0) == 0
    assert sample_next(logits, temperature=1.0, top_k=1, generator=torch.Generator().manual_seed(0)) == 0
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [sample_next(logits, 1.0, generator=g1) for _ in range(20)] == \
           [sample_next(logits, 1.0, generator=g2) for _ in range(20)]


def test_input_errors():
    m = build_model(get_preset("tiny")).eval()
    T, V = m.cfg.context_length, m.cfg.vocab_size
    with pytest.raises(ValueError, match="context"):
        generate(m, list(range(1, T + 1)), 1)  # T tokens + the start token
    with pytest.raises(ValueError, match="vocab_size"):
        generate(m, [V + 3], 1)
    with pytest.raises(ValueError, match="temperature"):
        generate(m, [1], 1, temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        generate(m, [1], 1, top_p=0)
    with pytest.raises(ValueError, match="empty"):
        generate(m, [], 1, bos_id=None)
