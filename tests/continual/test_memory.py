"""Retrieval counting, TF-IDF ranking and row-sparse gradient masks, against plain loops."""

from __future__ import annotations

import math

import torch

from peerlm.config import get_preset
from peerlm.continual.memory import (
    RetrievalCounter,
    SparseRows,
    document_frequencies,
    idf,
    keep_mask,
    keep_rows,
    table_parameters,
    top_tfidf,
)
from peerlm.model import build_model


def _model(preset: str = "tiny-peer", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(get_preset(preset))


def test_idf_is_the_formula():
    df = torch.tensor([0, 1, 5, 10])
    assert torch.allclose(idf(df, 10), torch.tensor([math.log(11 / (d + 1)) for d in (0, 1, 5, 10)]))


def test_top_tfidf_equals_a_sorted_loop_with_ties_to_the_lower_id():
    g = torch.Generator().manual_seed(0)
    for trial in range(50):
        N = 200
        ids = torch.randperm(N, generator=g)[: 5 + trial].sort().values
        counts = torch.randint(1, 4, ids.shape, generator=g)
        df = torch.randint(0, 3, (N,), generator=g)  # few distinct values: many ties
        w = idf(df, 8)
        t = 1 + trial % 7
        scored = sorted(((-float(c) * float(w[i]), int(i)) for i, c in zip(ids, counts)))
        expect = sorted(i for _, i in scored[:t])
        assert top_tfidf(ids, counts, w, t).tolist() == expect


def test_keep_rows_and_keep_mask_equal_dense_masking():
    N, D = 30, 4
    idx = torch.tensor([[3, 7, 3, 12, 29]])
    grad = torch.sparse_coo_tensor(idx, torch.randn(5, D), (N, D), check_invariants=True)
    rows = torch.tensor([3, 12, 20])
    dense = grad.to_dense()
    expect = torch.zeros_like(dense)
    expect[rows] = dense[rows]
    assert torch.equal(keep_rows(grad, rows).to_dense(), expect)
    assert torch.equal(keep_rows(dense, rows).to_dense(), expect)
    mask = torch.zeros(N, dtype=torch.bool)
    mask[[7, 29]] = True
    expect = dense * mask[:, None]
    assert torch.equal(keep_mask(grad, mask).to_dense(), expect)
    assert torch.equal(keep_mask(dense, mask), expect)


def test_counter_sees_the_ids_forward_uses_and_only_in_training_mode():
    for preset in ("tiny-peer", "tiny-pkm"):
        model = _model(preset)
        name, layer = model.memory_layers()[0]
        x = torch.randint(0, 256, (2, 16))
        with RetrievalCounter(model) as counter:
            model.eval()
            model(x)
            assert counter.take()[name][0].numel() == 0  # eval: not counted
            model.train()
            captured = {}
            h = layer.register_forward_pre_hook(lambda m, a, c=captured: c.setdefault("x", a[0].detach()))
            model(x)
            h.remove()
            ids_U, counts_U = counter.take()[name]
        with torch.no_grad():  # in training mode the query norm uses the batch's statistics, as forward did
            _, ids = layer.retrieve(captured["x"])
        expect = torch.bincount(ids.flatten(), minlength=layer.keys.n ** 2)
        assert torch.equal(ids_U, expect.nonzero().flatten())
        assert torch.equal(counts_U, expect[ids_U])
        assert int(counts_U.sum()) == x.numel() * layer.heads * layer.topk


def test_document_frequencies_count_batches_not_retrievals():
    model = _model()
    name, layer = model.memory_layers()[0]
    batches = [torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    df, count = document_frequencies(model, batches)
    assert count == 4
    expect = torch.zeros(layer.num_experts, dtype=torch.int64)
    model.eval()
    for x in batches:
        captured = {}
        h = layer.register_forward_pre_hook(lambda m, a, c=captured: c.setdefault("x", a[0].detach()))
        with torch.no_grad():
            model(x)
        h.remove()
        _, ids = layer.retrieve(captured["x"])
        expect[ids.flatten().unique()] += 1
    assert torch.equal(df[name], expect)


def test_a_sparse_step_changes_only_the_chosen_rows():
    for preset in ("tiny-peer", "tiny-pkm"):
        model = _model(preset)
        name, layer = model.memory_layers()[0]
        layer.sparse_grad = True
        for p in model.parameters():
            p.requires_grad = False
        tables = table_parameters(layer)
        for p in tables:
            p.requires_grad = True
        df = {name: torch.randint(0, 5, (layer.keys.n ** 2,), generator=torch.Generator().manual_seed(1))}
        chosen: list = []
        hooks = SparseRows(model, df, 8, slots=7, chosen=chosen)
        before = [p.detach().clone() for p in tables]
        opt = torch.optim.SGD(tables, lr=10.0)
        model.train()
        hooks.begin_step(model, 0)
        assert not layer.norm.training  # routing statistics frozen
        x = torch.randint(0, 256, (2, 16))
        _, loss = model(x, x)
        loss.backward()
        hooks.before_update(model, 0)
        opt.step()
        rows = chosen[0][name]
        assert 0 < rows.numel() <= 7
        for b, p in zip(before, tables):
            changed = (b != p.detach()).any(dim=1).nonzero().flatten()
            assert set(changed.tolist()) <= set(rows.tolist())
            assert changed.numel() > 0
        hooks.counter.close()


def _sparse_grads(micro_batches: int, impl: str = "fused") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """One sparse step's table gradients on tiny-peer, with the rows chosen in backward (one micro-batch)
    or only after it (two); and the rows chosen."""
    model = _model("tiny-peer")
    name, layer = model.memory_layers()[0]
    layer.sparse_grad, layer.impl = True, impl
    tables = table_parameters(layer)
    for p in model.parameters():
        p.requires_grad = any(p is q for q in tables)
    df = {name: torch.randint(0, 5, (layer.keys.n ** 2,), generator=torch.Generator().manual_seed(1))}
    chosen: list = []
    hooks = SparseRows(model, df, 8, slots=7, chosen=chosen, micro_batches=micro_batches)
    assert (layer.grad_rows is not None) == (micro_batches == 1)
    model.train()
    hooks.begin_step(model, 0)
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    _, loss = model(x, x)
    loss.backward()
    in_backward = [p.grad.coalesce() for p in tables]
    hooks.before_update(model, 0)
    hooks.counter.close()
    return in_backward, [p.grad.coalesce() for p in tables], chosen[0][name]


def test_rows_chosen_in_backward_give_the_gradient_kept_after_it():
    """With one micro-batch the fused backward sums only the chosen rows: the gradient it hands out is
    the one the after-backward choice keeps from the full row-sparse gradient, row for row."""
    raw, kept, rows = _sparse_grads(micro_batches=1)
    full, reference, rows_after = _sparse_grads(micro_batches=2)
    assert torch.equal(rows, rows_after)
    for g_raw, g, ref, f in zip(raw, kept, reference, full):
        assert torch.equal(g_raw.indices()[0], rows)  # restricted before before_update ran
        assert f.indices().shape[1] > rows.numel()  # without it, every retrieved row had a gradient
        assert torch.equal(g.indices(), ref.indices())
        torch.testing.assert_close(g.values(), ref.values(), rtol=1e-6, atol=1e-7)
    # the reference path has no backward restriction: the after-backward choice alone does it
    _, ref_kept, _ = _sparse_grads(micro_batches=1, impl="reference")
    for g, ref in zip(kept, ref_kept):
        assert torch.equal(g.indices(), ref.indices())
        torch.testing.assert_close(g.values(), ref.values(), rtol=1e-5, atol=1e-6)


def test_table_grads_restricted_rows_equal_the_full_rows():
    from peerlm.bags import bags, table_grads

    g = torch.Generator().manual_seed(0)
    T, K, N, D = 12, 6, 40, 5
    ids = torch.randint(0, N, (T, K), generator=g)
    rows_TD, w_TK = torch.randn(T, D, generator=g), torch.randn(T, K, generator=g)
    _, offset2bag, sizes = bags(T, K, ids.device)
    (full,) = table_grads(ids, N, True, offset2bag, sizes, [(rows_TD, w_TK)])
    for keep in (lambda u, c: u[::3], lambda u, c: u[c > 1], lambda u, c: u[:0], lambda u, c: u):
        (part,) = table_grads(ids, N, True, offset2bag, sizes, [(rows_TD, w_TK)], grad_rows=keep)
        want = keep_rows(full, keep(*torch.unique(ids, return_counts=True)))
        assert torch.equal(part.indices(), want.indices())
        torch.testing.assert_close(part.values(), want.values())
