"""Growing PEER's product keys: the id remap, output unchanged at step 0, only new rows train."""

from __future__ import annotations

import pytest
import torch

from peerlm.config import get_preset
from peerlm.continual.grow import GrowRows, grow_model, grown_config, new_rows_mask, old_rows
from peerlm.data import TokenDataset
from peerlm.optim import RowSparseAdamW
from peerlm.rundir import load_run


def test_old_rows_remap_ids_and_the_mask_marks_the_rest():
    n, m = 5, 2
    rows = old_rows(n, m)
    assert rows.tolist() == [i * (n + m) + j for i in range(n) for j in range(n)]
    mask = new_rows_mask(n, m)
    assert int(mask.sum()) == (n + m) ** 2 - n**2 and not mask[rows].any()


def test_grown_config_refuses_models_without_peer_layers():
    assert grown_config(get_preset("tiny-peer"), 3).ffn.num_experts == 19**2
    with pytest.raises(ValueError, match="pkm layers"):
        grown_config(get_preset("tiny-pkm"), 3)
    with pytest.raises(ValueError, match="no memory layer"):
        grown_config(get_preset("tiny"), 3)


def _positive_old_scores(layer, x_TD: torch.Tensor) -> torch.Tensor:
    """(T,) True where every head has at least k old sub-keys scoring > 0 in both halves: then no
    zero-initialised new sub-key can enter a half's top-k."""
    with torch.no_grad():
        q = layer.norm(layer.query(x_TD)).view(-1, layer.heads, layer.dim_key)
        s_a, s_b = layer.keys.half_scores(q)
    k = layer.topk
    return (((s_a > 0).sum(-1) >= k) & ((s_b > 0).sum(-1) >= k)).all(-1)


@pytest.fixture(scope="module")
def base_peer(bases):
    model, _ = load_run(bases["peer"])
    return model


def test_grown_layer_retrieves_and_computes_what_the_base_did(base_peer):
    torch.manual_seed(0)
    grown = grow_model(base_peer, 3)
    (_, old), (_, new) = base_peer.memory_layers()[0], grown.memory_layers()[0]
    assert new.n == old.n + 3
    # every old expert's rows moved to its new id; new experts' v rows are zero
    rows = old_rows(old.n, 3)
    assert torch.equal(new.w_down[rows], old.w_down) and torch.equal(new.w_up[rows], old.w_up)
    assert not new.w_up[new_rows_mask(old.n, 3)].any()
    x = torch.randn(256, old.dim)
    ok = _positive_old_scores(old, x)
    assert ok.float().mean() > 0.5
    with torch.no_grad():
        _, ids_old = old.retrieve(x)
        _, ids_new = new.retrieve(x)
        assert torch.equal(rows[ids_old[ok]], ids_new[ok])
        assert torch.equal(old(x)[ok], new(x)[ok])


def test_grown_model_gives_the_base_logits_at_step_0(base_peer, data_dir):
    torch.manual_seed(0)
    grown = grow_model(base_peer, 3).eval()
    x, _ = TokenDataset(data_dir).train_batch(8, base_peer.cfg.context_length, 0, 0)
    name, layer = base_peer.memory_layers()[0]
    seen = {}
    h = layer.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        a, _ = base_peer(x)
        b, _ = grown(x)
    h.remove()
    ok = _positive_old_scores(layer, seen["x"].reshape(-1, layer.dim)).view(x.shape).all(-1)  # whole sequences
    assert ok.float().mean() >= 0.5
    assert torch.equal(a[ok], b[ok])


def test_random_key_init_lets_new_experts_compete(base_peer):
    torch.manual_seed(0)
    grown = grow_model(base_peer, 3, key_init="random")
    layer = grown.memory_layers()[0][1]
    with torch.no_grad():
        _, ids = layer.retrieve(torch.randn(256, layer.dim))
    assert new_rows_mask(layer.n - 3, 3)[ids].any()


def test_training_a_grown_model_moves_only_new_rows_and_new_sub_keys(base_peer):
    torch.manual_seed(0)
    grown = grow_model(base_peer, 2, key_init="random")
    name, layer = grown.memory_layers()[0]
    layer.sparse_grad = True
    trainable = [layer.w_down, layer.w_up, layer.keys.keys]
    for p in grown.parameters():
        p.requires_grad = any(p is q for q in trainable)
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    hooks = GrowRows(grown, {name: layer.n - 2})
    opts = [RowSparseAdamW([layer.w_down, layer.w_up], lr=1e-2),
            torch.optim.AdamW([layer.keys.keys], lr=1e-2, weight_decay=0.0)]  # sub-keys take no decay
    for step in range(3):
        grown.train()
        hooks.begin_step(grown, step)
        x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(step))
        _, loss = grown(x, x)
        loss.backward()
        hooks.before_update(grown, step)
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    after = grown.state_dict()
    n = layer.n - 2
    new = new_rows_mask(n, 2)
    for k, v in after.items():
        if k.endswith(("w_down", "w_up")):
            assert torch.equal(v[~new], before[k][~new]), k
        elif k.endswith("keys.keys"):
            assert torch.equal(v[:, :, :n], before[k][:, :, :n])
            assert not torch.equal(v[:, :, n:], before[k][:, :, n:])
        else:
            assert torch.equal(v, before[k]), k  # trunk, routing and the query norm's statistics
    assert not torch.equal(after[f"{name}.w_up"][new], before[f"{name}.w_up"][new])


def test_growing_past_the_dense_rescoring_bound_keeps_the_experts_and_rounds_only(base_peer, monkeypatch):
    """Where growing moves n past ``DENSE_RESCORE_RATIO * k`` the grown layer re-scores its winners on
    the other (gather) path: the same experts, the same output up to float rounding."""
    import peerlm.retrieval as retrieval

    layer = base_peer.memory_layers()[0][1]
    monkeypatch.setattr(retrieval, "DENSE_RESCORE_RATIO", layer.n // layer.topk)  # the base is at the bound
    monkeypatch.setattr(retrieval, "usable", lambda *t: None)  # with the CPU kernels both would gather
    torch.manual_seed(0)
    new = grow_model(base_peer, 3).memory_layers()[0][1]
    bound = retrieval.DENSE_RESCORE_RATIO * layer.topk
    assert layer.n <= bound < new.n  # the base re-scores densely, the grown layer by gathers
    x = torch.randn(256, layer.dim)
    ok = _positive_old_scores(layer, x)
    with torch.no_grad():
        _, ids_old = layer.retrieve(x)
        _, ids_new = new.retrieve(x)
        assert torch.equal(old_rows(layer.n, 3)[ids_old[ok]], ids_new[ok])
        torch.testing.assert_close(layer(x)[ok], new(x)[ok], rtol=1e-5, atol=1e-6)
