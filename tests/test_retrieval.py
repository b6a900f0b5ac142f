"""Product-key top-k against brute force over all n^2 keys."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peerlm import retrieval
from peerlm.retrieval import ProductKeys, product_key_topk, split_index


def brute_force_topk(scores_a, scores_b, k):
    n = scores_a.shape[-1]
    full = (scores_a.unsqueeze(-1) + scores_b.unsqueeze(-2)).reshape(*scores_a.shape[:-1], n * n)
    return full.topk(k, dim=-1)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 40),
    k_frac=st.floats(0.0, 1.0),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=3),
    seed=st.integers(0, 2**31 - 1),
)
def test_product_key_topk_equals_brute_force(n, k_frac, lead, seed):
    k = max(1, round(k_frac * n))
    g = torch.Generator().manual_seed(seed)
    # float64 continuous scores: ties have probability zero, so ids are unique
    a = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    b = torch.randn(*lead, n, generator=g, dtype=torch.float64)
    values, indices = product_key_topk(a, b, k)
    ref_values, ref_indices = brute_force_topk(a, b, k)
    assert values.shape == indices.shape == (*lead, k)
    torch.testing.assert_close(values, ref_values, rtol=0, atol=1e-12)
    assert torch.equal(indices, ref_indices)
    assert (values[..., :-1] >= values[..., 1:]).all(), "values must be sorted descending"


def test_topk_with_ties_returns_the_right_values():
    # integer-valued scores give many ties; the values (not the ids) must still match brute force
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 3, (50, 8), generator=g).float()
    b = torch.randint(0, 3, (50, 8), generator=g).float()
    values, indices = product_key_topk(a, b, 5)
    ref_values, _ = brute_force_topk(a, b, 5)
    assert torch.equal(values, ref_values)
    i, j = split_index(indices, 8)
    assert torch.equal(a.gather(-1, i) + b.gather(-1, j), values)


def test_index_round_trip():
    n = 37
    i = torch.arange(n).repeat_interleave(n)
    j = torch.arange(n).repeat(n)
    flat = i * n + j
    assert torch.equal(flat, torch.arange(n * n))
    i2, j2 = split_index(flat, n)
    assert torch.equal(i2, i) and torch.equal(j2, j)


def test_index_is_i_times_n_plus_j():
    # a single dominant (i, j) must come back as exactly i * n + j (catches transposed strides)
    n = 16
    a = torch.zeros(n)
    b = torch.zeros(n)
    a[3], b[11] = 5.0, 7.0
    _, indices = product_key_topk(a, b, 1)
    assert indices.item() == 3 * n + 11


def test_values_are_differentiable():
    a = torch.randn(4, 10, requires_grad=True)
    b = torch.randn(4, 10, requires_grad=True)
    values, _ = product_key_topk(a, b, 3)
    values.sum().backward()
    # each selected (i, j) pair sends gradient 1 to a[i] and b[j]: 3 per row in total
    assert torch.allclose(a.grad.sum(-1), torch.full((4,), 3.0))
    assert torch.allclose(b.grad.sum(-1), torch.full((4,), 3.0))


def test_bad_arguments():
    with pytest.raises(ValueError, match="must match"):
        product_key_topk(torch.randn(3, 4), torch.randn(3, 5), 2)
    with pytest.raises(ValueError, match="k must be"):
        product_key_topk(torch.randn(4), torch.randn(4), 5)


@pytest.mark.parametrize("shared", [True, False])
def test_product_keys_module_matches_brute_force(shared):
    torch.manual_seed(0)
    heads, n, dk, k = 3, 9, 8, 4
    pk = ProductKeys(n * n, dk, heads, shared=shared).double()
    q = torch.randn(5, heads, dk, dtype=torch.float64)
    scores, ids = pk(q, k)
    # brute force: materialise every key [C_i ; C'_j] of every head
    for h in range(heads):
        t = 0 if shared else h
        keys = torch.cat([pk.keys[t, 0].repeat_interleave(n, 0), pk.keys[t, 1].repeat(n, 1)], dim=-1)
        ref_scores, ref_ids = (q[:, h] @ keys.t()).topk(k, dim=-1)
        torch.testing.assert_close(scores[:, h], ref_scores)
        assert torch.equal(ids[:, h], ref_ids)
    # the non-differentiable search + differentiable re-scoring gives the same scores and ids
    scores2, ids2 = pk(q, k, differentiable=False)
    assert torch.equal(ids2, ids)
    torch.testing.assert_close(scores2, scores)


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("shared", [True, False])
def test_rescoring_paths_give_the_differentiable_gradients(dense, shared, monkeypatch):
    # the search without autograd + re-scoring of the winners (dense: from the full sub-key scores, with a
    # matmul backward; sparse: embedding-bag dot products) must give the scores and the gradients, in the
    # queries and in both sub-key tables, of differentiating through the full scoring
    import peerlm.retrieval as retrieval

    monkeypatch.setattr(retrieval, "DENSE_RESCORE_RATIO", 10**9 if dense else 0)
    if dense:  # the dense path is taken only without the CPU kernels (peerlm.kernels.cpu)
        monkeypatch.setattr(retrieval, "usable", lambda *t: None)
    torch.manual_seed(1)
    heads, n, dk, k = 3, 12, 8, 5
    pk = ProductKeys(n * n, dk, heads, shared=shared).double()
    q = torch.randn(2, 7, heads, dk, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 7, heads, k, dtype=torch.float64)
    grads = []
    for differentiable in (True, False):
        scores, ids = pk(q, k, differentiable=differentiable)
        (scores * w).sum().backward()
        grads.append((scores.detach(), ids, q.grad.clone(), pk.keys.grad.clone()))
        q.grad, pk.keys.grad = None, None
    (s1, i1, gq1, gk1), (s2, i2, gq2, gk2) = grads
    assert torch.equal(i1, i2)
    torch.testing.assert_close(s2, s1)
    torch.testing.assert_close(gq2, gq1)
    torch.testing.assert_close(gk2, gk1)
    assert gk1.abs().sum() > 0 and gq1.abs().sum() > 0


@pytest.mark.parametrize("shared", [True, False])
def test_search_in_blocks_of_tokens_gives_the_same_ids_and_gradients(shared, monkeypatch):
    """The non-differentiable search scores a block of tokens at a time (``SCORE_BLOCK``); any block
    size gives the same ids, scores and gradients as the whole batch at once."""
    monkeypatch.setattr(retrieval, "DENSE_RESCORE_RATIO", 0)  # the blocked search even without the kernels
    torch.manual_seed(0)
    pk = ProductKeys(16**2, 8, heads=3, shared=shared)
    q = torch.randn(2, 11, 3, 8, requires_grad=True)
    out = {}
    for block in (10**9, 2 * 16 * 3 * 2, 1):  # one block; two tokens a block; one token a block
        monkeypatch.setattr(retrieval, "SCORE_BLOCK", block)
        q.grad = pk.keys.grad = None
        scores, ids = pk(q, 4, differentiable=False)
        scores.square().sum().backward()
        out[block] = (scores.detach(), ids, q.grad.clone(), pk.keys.grad.clone())
    first = out[10**9]
    for block, got in out.items():
        assert all(torch.equal(a, b) for a, b in zip(first, got)), block
