"""Row-sparse AdamW against torch.optim.AdamW, parameter groups, the schedule, clipping of sparse grads."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from peerlm import PEER, optim
from peerlm.config import get_preset
from peerlm.model import build_model
from peerlm.optim import RowSparseAdamW, build_optimizer, clip_grad_norm, coalesced, lr_factor, param_groups


def _sparse(rows: torch.Tensor, values: torch.Tensor, n: int) -> torch.Tensor:
    shape = (n, values.shape[1])
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape, check_invariants=True).coalesce()


@pytest.fixture(params=["ops", "kernel"])
def update_path(request, monkeypatch):
    """RowSparseAdamW's two ways to update rows: PyTorch's ops (bit for bit torch's AdamW) and the CPU
    kernel ``row_adamw_`` (the same arithmetic in one pass, to float rounding); returns the check."""
    if request.param == "ops":
        monkeypatch.setattr(optim, "usable", lambda *t: None)
        return torch.equal
    if optim.usable(torch.zeros(1)) is None:
        pytest.skip("the CPU kernels could not be built here")

    def close(a, b):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        return True
    return close


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_rows_touched_every_step_equal_torch_adamw_and_others_stay(weight_decay, update_path):
    N, D, steps = 40, 7, 12
    torch.manual_seed(0)
    init = torch.randn(N, D)
    always = torch.tensor([1, 5, 6, 30, 39])
    a = nn.Parameter(init.clone())  # row-sparse
    b = nn.Parameter(init[always].clone())  # dense reference on the always-touched rows only
    opt_a = RowSparseAdamW([a], lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay)
    opt_b = torch.optim.AdamW([b], lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=weight_decay,
                              foreach=False)
    touched = set(always.tolist())
    for step in range(steps):
        lr = 3e-2 * (0.5 + 0.5 * math.cos(step))  # a changing lr, as under a schedule
        opt_a.param_groups[0]["lr"] = opt_b.param_groups[0]["lr"] = lr
        g_always = torch.randn(len(always), D)
        extra = torch.tensor([10 + step % 3])  # some rows only now and then
        touched |= set(extra.tolist())
        rows = torch.cat([always, extra])
        a.grad = _sparse(rows, torch.cat([g_always, torch.randn(1, D)]), N)
        b.grad = g_always.clone()
        opt_a.step()
        opt_b.step()
        assert update_path(a.data[always], b.data), f"step {step}"
    never = sorted(set(range(N)) - touched)
    assert torch.equal(a.data[never], init[never])
    assert torch.equal(opt_a.state[a]["exp_avg"][never], torch.zeros(len(never), D))
    assert opt_a.state[a]["step"][always].eq(steps).all()
    assert opt_a.state[a]["step"][10].item() == 4  # touched at steps 0, 3, 6, 9


def test_per_row_bias_correction_matches_a_fresh_adamw(update_path):
    """A row first touched at step 5 must get the bias correction of its first update, not the 6th."""
    N, D = 8, 4
    p = nn.Parameter(torch.zeros(N, D))
    opt = RowSparseAdamW([p], lr=0.1, betas=(0.9, 0.99))
    for _ in range(5):
        p.grad = _sparse(torch.tensor([0]), torch.ones(1, D), N)
        opt.step()
    g = torch.randn(1, D)
    p.grad = _sparse(torch.tensor([3]), g, N)
    opt.step()
    ref = nn.Parameter(torch.zeros(1, D))
    ref_opt = torch.optim.AdamW([ref], lr=0.1, betas=(0.9, 0.99), weight_decay=0.0, foreach=False)
    ref.grad = g.clone()
    ref_opt.step()
    assert update_path(p.data[3:4], ref.data)


def test_dense_gradient_equals_torch_adamw():
    torch.manual_seed(1)
    init = torch.randn(6, 5)
    a, b = nn.Parameter(init.clone()), nn.Parameter(init.clone())
    opt_a = RowSparseAdamW([a], lr=1e-2, weight_decay=0.05)
    opt_b = torch.optim.AdamW([b], lr=1e-2, weight_decay=0.05, foreach=False)
    for _ in range(5):
        g = torch.randn(6, 5)
        a.grad, b.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(a.data, b.data)


def test_uncoalesced_gradient_sums_duplicates():
    N, D = 5, 3
    p, q = nn.Parameter(torch.ones(N, D)), nn.Parameter(torch.ones(N, D))
    rows = torch.tensor([[2, 2, 4]])
    vals = torch.tensor([[1.0, 2, 3], [4, 5, 6], [7, 8, 9]])
    p.grad = torch.sparse_coo_tensor(rows, vals, (N, D), check_invariants=True)  # not coalesced: row 2 twice
    q.grad = torch.sparse_coo_tensor(rows, vals, (N, D), check_invariants=True).coalesce()
    RowSparseAdamW([p], lr=0.1).step()
    RowSparseAdamW([q], lr=0.1).step()
    assert torch.equal(p.data, q.data)


def test_row_sparse_adamw_rejects_bad_options():
    with pytest.raises(ValueError, match="betas"):
        RowSparseAdamW([nn.Parameter(torch.zeros(2, 2))], betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="2-D"):
        RowSparseAdamW([nn.Parameter(torch.zeros(3))])


def test_param_groups_split_experts_norms_and_matrices():
    model = build_model(get_preset("tiny-peer"))
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.1, expert_lr=5e-3, routing_lr=2e-4)}
    names = {id(p): n for n, p in model.named_parameters()}
    got = {k: sorted(names[id(p)] for p in g["params"]) for k, g in groups.items()}
    assert got["experts"] == ["blocks.0.ffn.w_down", "blocks.0.ffn.w_up"]
    assert groups["experts"]["lr"] == 5e-3 and groups["experts"]["weight_decay"] == 0.0
    assert "tok_emb.weight" in got["no_decay"] and "blocks.0.attn_norm.weight" in got["no_decay"]
    assert "blocks.0.attn.qkv.weight" in got["decay"]
    # what picks the experts trains at its own LR; the query projection still decays, keys and norm don't
    assert got["routing"] == ["blocks.0.ffn.query.weight"]
    assert got["routing_no_decay"] == ["blocks.0.ffn.keys.keys", "blocks.0.ffn.norm.bias", "blocks.0.ffn.norm.weight"]
    assert groups["routing"]["lr"] == groups["routing_no_decay"]["lr"] == 2e-4
    assert groups["routing"]["weight_decay"] == 0.1 and groups["routing_no_decay"]["weight_decay"] == 0.0
    every = sorted(n for g in got.values() for n in g)
    assert every == sorted(names.values())  # each parameter exactly once


def test_pkm_values_are_expert_parameters():
    model = build_model(get_preset("tiny-pkm"))
    groups = {g["name"]: g for g in param_groups(model, 1e-3, 0.1)}
    assert [p.shape for p in groups["experts"]["params"]] == [model.blocks[0].ffn.values.shape]


def test_lr_factor_warmup_then_cosine_to_min():
    total, warm = 100, 10
    f = [lr_factor(s, total, warm, 0.1) for s in range(total)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert lr_factor(500, total, warm, 0.1) == pytest.approx(0.1)
    assert lr_factor(0, 1, 0, 0.0) == pytest.approx(1.0)


def test_clip_grad_norm_counts_dense_and_sparse_together():
    torch.manual_seed(2)
    a, b = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(10, 3))
    ga = torch.randn(4, 3)
    rows, vals = torch.tensor([[1, 7, 1]]), torch.randn(3, 3)  # row 1 twice
    a.grad = ga.clone()
    b.grad = torch.sparse_coo_tensor(rows, vals, (10, 3), check_invariants=True)
    dense_b = b.grad.to_dense()
    expected = torch.cat([ga.flatten(), dense_b.flatten()]).norm().item()
    norm = clip_grad_norm([a, b], max_norm=0.5)
    assert norm == pytest.approx(expected, rel=1e-6)
    assert b.grad.is_coalesced()  # scaled in place: the optimizer need not coalesce again
    after = torch.cat([a.grad.flatten(), b.grad.to_dense().flatten()]).norm().item()
    assert after == pytest.approx(0.5, rel=1e-5)
    # the same scaling torch applies to dense gradients
    c = nn.Parameter(torch.zeros(4, 3))
    c.grad = ga.clone()
    d = nn.Parameter(torch.zeros(10, 3))
    d.grad = dense_b.clone()
    torch.nn.utils.clip_grad_norm_([c, d], 0.5)
    assert torch.allclose(a.grad, c.grad) and torch.allclose(b.grad.to_dense(), d.grad)


def test_sparse_and_dense_optimizers_train_a_peer_model_alike():
    """One step on a PEER model: sparse expert gradients + row-sparse AdamW == dense grads + AdamW
    on the rows retrieved (every row retrieved in one step of a tiny model is touched once)."""
    cfg = get_preset("tiny-peer")
    torch.manual_seed(0)
    dense_model = build_model(cfg)
    sparse_model = build_model(cfg)
    sparse_model.load_state_dict(dense_model.state_dict())
    sparse_model.blocks[0].ffn.sparse_grad = True
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    opts = []
    for model, sparse in ((dense_model, False), (sparse_model, True)):
        opt = build_optimizer(model, 1e-2, 0.1, (0.9, 0.95), sparse_experts=sparse)
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opts.append(opt)
    w_dense, w_sparse = dense_model.blocks[0].ffn.w_up, sparse_model.blocks[0].ffn.w_up
    assert not w_dense.grad.is_sparse and w_sparse.grad.is_sparse
    rows = w_sparse.grad.coalesce().indices()[0]
    assert 0 < rows.numel() < cfg.ffn.num_experts
    # retrieved rows got the same update; under dense AdamW the others got exactly-zero grads -> unchanged
    assert torch.allclose(w_dense.data[rows], w_sparse.data[rows], atol=1e-6)
    assert torch.allclose(w_dense.data, w_sparse.data, atol=1e-6)
    sd = opts[1].state_dict()
    assert sd["kinds"] == ["AdamW", "RowSparseAdamW"]


def test_row_sparse_adamw_rejects_gradients_sparse_in_two_dims():
    p = nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.eye(4, 3).to_sparse()  # sparse_dim 2: entries, not rows
    with pytest.raises(ValueError, match="sparse_dim 1"):
        RowSparseAdamW([p]).step()


def test_sparse_grad_layers_get_the_row_sparse_optimizer_without_asking():
    cfg = get_preset("tiny-peer")
    cfg.ffn.sparse_grad = True
    model = build_model(cfg)
    opt = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))  # sparse_experts not set
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    model(idx, idx)[1].backward()
    assert any(p.grad.is_sparse for p in model.expert_parameters())
    opt.step()  # torch's AdamW alone would raise on the sparse gradients
    assert any(isinstance(o, RowSparseAdamW) for o in opt.optimizers)


def test_a_checkpoint_of_the_per_tensor_adamw_resumes_on_that_path():
    """Checkpoints written before the dense groups moved to torch's fused AdamW hold groups with
    foreach=False and fused=None; loading one into today's optimizer restores those options, so the
    resumed run takes the per-tensor path it was trained with and continues bit for bit."""
    from peerlm.optim import GroupedOptimizer

    cfg = get_preset("tiny-peer")
    torch.manual_seed(0)
    old_model, new_model = build_model(cfg), build_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    groups = param_groups(old_model, 1e-2, 0.1, None, 0.0, None)
    old = GroupedOptimizer([torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)])

    def step(model, opt):
        opt.zero_grad()
        model(x, x)[1].backward()
        opt.step()

    step(old_model, old)
    new_model.load_state_dict(old_model.state_dict())
    resumed = build_optimizer(new_model, 1e-2, 0.1, (0.9, 0.95))
    assert all(g["fused"] for g in resumed.param_groups)
    resumed.load_state_dict(copy.deepcopy(old.state_dict()))  # as from a file: no tensor shared with `old`
    assert all(g["fused"] is None and g["foreach"] is False for g in resumed.param_groups)
    step(old_model, old)
    step(new_model, resumed)
    for (name, a), b in zip(old_model.state_dict().items(), new_model.state_dict().values()):
        assert torch.equal(a, b), name


def test_coalesced_marks_ascending_distinct_rows_without_copying_and_sums_the_rest():
    vals = torch.randn(3, 4)
    ascending = torch.sparse_coo_tensor(torch.tensor([[1, 4, 9]]), vals, (10, 4), check_invariants=True)
    assert not ascending.is_coalesced()
    c = coalesced(ascending)
    assert c.is_coalesced() and c._values().data_ptr() == vals.data_ptr()
    assert torch.equal(c.to_dense(), ascending.to_dense())
    for ids in ([4, 1, 9], [1, 4, 4]):  # unsorted, or a duplicate: a real coalesce, duplicates summed
        g = torch.sparse_coo_tensor(torch.tensor([ids]), vals, (10, 4), check_invariants=True)
        c = coalesced(g)
        assert c.is_coalesced() and torch.equal(c._indices(), g.coalesce()._indices())
        torch.testing.assert_close(c.to_dense(), g.to_dense())


def test_peer_sparse_gradients_reach_the_optimizer_coalesced_without_a_sort():
    torch.manual_seed(0)
    layer = PEER(16, 64, heads=2, topk=4, dim_key=8, sparse_grad=True)
    layer(torch.randn(5, 16)).sum().backward()
    g = layer.w_up.grad  # accumulation into .grad drops the coalesced flag; the rows are still ascending
    c = coalesced(g)
    assert c._values().data_ptr() == g._values().data_ptr()
    assert torch.equal(c.to_dense(), g.to_dense())


def _in_backward_pair(make, opt_class, **opt_kwargs):
    """Two copies of a layer: one trained with backward then ``step``, one with its tables' update in
    the backward; returns (reference, in-backward) as (layer, optimizer, tables) each."""
    torch.manual_seed(0)
    a = make()
    b = copy.deepcopy(a)
    out = []
    for layer in (a, b):
        tables = [p for n, p in layer.named_parameters() if n in ("w_down", "w_up", "values")]
        out.append((layer, opt_class(tables, **opt_kwargs), tables))
    optim.update_in_backward(out[1][1])
    return out


def _train_both(pair, steps=3, dim=32):
    (a, opt_a, tab_a), (b, opt_b, tab_b) = pair
    for _ in range(steps):
        x = torch.randn(9, dim)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        a(xa).pow(2).sum().backward()
        b(xb).pow(2).sum().backward()
        assert all(p.grad is None for p in tab_b), "a table updated in the backward gets no gradient"
        assert torch.equal(xa.grad, xb.grad)  # the input's gradient read the tables before their update
        opt_a.step()
        opt_b.step()
        opt_a.zero_grad()
        opt_b.zero_grad()
    return tab_a, tab_b


def _peer():
    return lambda: PEER(32, 256, heads=2, topk=4, dim_key=8, sparse_grad=True)


@pytest.mark.parametrize("sparse", [True, False])
def test_adamw_in_the_backward_equals_adamw_at_step(sparse, update_path):
    """Against sparse gradients and RowSparseAdamW at ``step``; the layer updated in the backward needs
    no ``sparse_grad`` (its tables get no gradient either way)."""
    pair = _in_backward_pair(_peer(), RowSparseAdamW, lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    pair[1][0].sparse_grad = sparse
    tab_a, tab_b = _train_both(pair)
    for p, q in zip(tab_a, tab_b):
        assert torch.equal(p, q)  # the same kernel or ops on the same gradient rows: the same bits
    opt_a, opt_b = pair[0][1], pair[1][1]
    for p, q in zip(tab_a, tab_b):
        assert torch.equal(opt_a.state[p]["step"], opt_b.state[q]["step"])
        assert opt_b.state[q]["step"].max() == 3


def test_pkm_values_update_in_the_backward_as_at_step():
    from peerlm.ffn import PKM

    pair = _in_backward_pair(lambda: PKM(32, 16, heads=2, topk=4, dim_key=8, sparse_grad=True), RowSparseAdamW,
                             lr=1e-2)
    tab_a, tab_b = _train_both(pair)
    assert torch.equal(tab_a[0], tab_b[0])


def test_sgd_in_the_backward_equals_torch_sgd_on_sparse_gradients():
    pair = _in_backward_pair(_peer(), torch.optim.SGD, lr=0.5)
    init = [p.detach().clone() for p in pair[1][2]]
    tab_a, tab_b = _train_both(pair)
    for p, q, p0 in zip(tab_a, tab_b, init):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
        assert not torch.equal(q, p0)


def test_in_backward_update_keeps_only_the_rows_grad_rows_chooses():
    layer = _peer()()
    opt = RowSparseAdamW([layer.w_down, layer.w_up], lr=1e-1)
    optim.update_in_backward(opt)
    chosen = {}

    def keep_even(ids_U, counts_U):
        chosen["rows"] = ids_U[ids_U % 2 == 0]
        return chosen["rows"]
    layer.grad_rows = keep_even
    before = layer.w_up.detach().clone()
    layer(torch.randn(9, 32)).sum().backward()
    changed = (layer.w_up != before).any(1).nonzero().flatten()
    assert changed.numel() > 0 and torch.equal(changed, chosen["rows"])
    assert torch.equal(opt.state[layer.w_up]["step"].nonzero().flatten(), chosen["rows"])


def test_update_in_backward_refuses_what_it_cannot_do_and_is_undone_by_remove():
    layer = _peer()()
    with pytest.raises(ValueError, match="momentum"):
        optim.update_in_backward(torch.optim.SGD([layer.w_up], lr=0.1, momentum=0.9))
    with pytest.raises(TypeError, match="RowSparseAdamW or torch.optim.SGD"):
        optim.update_in_backward(torch.optim.Adam([layer.w_up]))
    with pytest.raises(ValueError, match="2-D"):
        optim.update_in_backward(torch.optim.SGD([nn.Parameter(torch.zeros(3))], lr=0.1))
    opt = RowSparseAdamW([layer.w_up], lr=1e-2)
    handle = optim.update_in_backward(opt)
    layer(torch.randn(4, 32)).sum().backward()
    assert layer.w_up.grad is None and layer.w_down.grad is not None
    handle.remove()
    layer(torch.randn(4, 32)).sum().backward()
    assert layer.w_up.grad is not None


def test_tables_updated_in_the_backward_are_freed_with_their_model_and_optimizer():
    import gc
    import weakref

    from peerlm.bags import row_updates

    before = len(row_updates)
    layer = _peer()()
    opt = RowSparseAdamW([layer.w_down, layer.w_up], lr=1e-2)
    optim.update_in_backward(opt)
    layer(torch.randn(4, 32)).sum().backward()
    assert len(row_updates) == before + 2
    table = weakref.ref(layer.w_up)
    del layer, opt
    gc.collect()
    assert table() is None and len(row_updates) == before
