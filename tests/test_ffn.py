"""Feed-forward blocks against simpler references: dense MLP, MoE (both routings), PKM."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from peerlm.config import DenseConfig, MoEConfig, PEERConfig, PKMConfig
from peerlm.ffn import PKM, DenseMLP, MoE, build_ffn
from peerlm.peer import PEER

D, HID = 16, 24


def _x(S: int = 20, seed: int = 0) -> torch.Tensor:
    return torch.randn(S, D, generator=torch.Generator().manual_seed(seed))


def _expert_ref(moe: MoE, e: int, x: torch.Tensor) -> torch.Tensor:
    h = x @ moe.w_fc[e].t()
    h = F.silu(x @ moe.w_gate[e].t()) * h if moe.w_gate is not None else F.gelu(h)
    return h @ moe.w_proj[e].t()


# ------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
def test_dense_mlp_formula(act):
    torch.manual_seed(0)
    mlp = DenseMLP(D, HID, act)
    x = _x()
    h = x @ mlp.fc.weight.t()
    h = F.silu(x @ mlp.gate.weight.t()) * h if act == "swiglu" else F.gelu(h)
    torch.testing.assert_close(mlp(x), h @ mlp.proj.weight.t())
    assert mlp(x.view(4, 5, D)).shape == (4, 5, D)


def test_dense_mlp_rejects_activation():
    with pytest.raises(ValueError, match="activation must be 'gelu' or 'swiglu'"):
        DenseMLP(D, HID, "relu")


# --------------------------------------------------------------------------------------------- MoE


@pytest.mark.parametrize("act", ["gelu", "swiglu"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_one_expert_moe_equals_dense_mlp(act, capacity_factor):
    torch.manual_seed(0)
    mlp = DenseMLP(D, HID, act)
    moe = MoE(D, HID, num_experts=1, topk=1, routing="token", capacity_factor=capacity_factor, activation=act)
    with torch.no_grad():
        moe.w_fc[0].copy_(mlp.fc.weight)
        moe.w_proj[0].copy_(mlp.proj.weight)
        if act == "swiglu":
            moe.w_gate[0].copy_(mlp.gate.weight)
    x1 = _x().requires_grad_()
    x2 = x1.detach().clone().requires_grad_()
    y1, y2 = mlp(x1), moe.train()(x2)
    torch.testing.assert_close(y2, y1)
    y1.square().sum().backward()
    y2.square().sum().backward()
    torch.testing.assert_close(x2.grad, x1.grad)
    torch.testing.assert_close(moe.w_fc.grad[0], mlp.fc.weight.grad)
    torch.testing.assert_close(moe.w_proj.grad[0], mlp.proj.weight.grad)


def _token_choice_ref(moe: MoE, x: torch.Tensor, capacity: int | None) -> torch.Tensor:
    probs = F.softmax(x @ moe.router.weight.t(), dim=-1)
    out = torch.zeros_like(x)
    load = [0] * moe.num_experts
    for t in range(x.shape[0]):
        top, ids = probs[t].topk(moe.topk)
        gates = top if moe.topk == 1 else top / top.sum()
        for g, e in zip(gates, ids.tolist()):
            load[e] += 1
            if capacity is None or load[e] <= capacity:
                out[t] += g * _expert_ref(moe, e, x[t:t + 1])[0]
    return out


@pytest.mark.parametrize("topk,cf", [(1, None), (2, None), (2, 0.5), (1, 0.75)])
def test_token_choice_equals_loop(topk, cf):
    torch.manual_seed(1)
    moe = MoE(D, HID, num_experts=4, topk=topk, routing="token", capacity_factor=cf).train()
    x = _x(S=24)
    cap = None if cf is None else math.ceil(cf * 24 * topk / 4)
    torch.testing.assert_close(moe(x), _token_choice_ref(moe, x, cap))
    # eval never drops
    torch.testing.assert_close(moe.eval()(x), _token_choice_ref(moe, x, None))


def test_token_choice_capacity_really_drops():
    torch.manual_seed(1)
    moe = MoE(D, HID, num_experts=4, topk=1, routing="token", capacity_factor=0.25).train()
    x = _x(S=24)
    assert not torch.allclose(moe(x), moe.eval()(x))


def test_expert_choice_equals_loop_and_eval_is_token_choice():
    torch.manual_seed(2)
    E, S, cf = 4, 18, 1.5
    moe = MoE(D, HID, num_experts=E, topk=2, routing="expert", capacity_factor=cf).train()
    x = _x(S=S)
    probs = F.softmax(x @ moe.router.weight.t(), dim=-1)
    C = math.ceil(cf * S / E)
    ref = torch.zeros_like(x)
    for e in range(E):
        gates, tokens = probs[:, e].topk(C)
        for g, t in zip(gates, tokens.tolist()):
            ref[t] += g * _expert_ref(moe, e, x[t:t + 1])[0]
    torch.testing.assert_close(moe(x), ref)
    moe.eval()
    torch.testing.assert_close(moe(x), _token_choice_ref(moe, x, None))


def test_expert_choice_capacity_capped_at_tokens():
    moe = MoE(D, HID, num_experts=2, topk=1, routing="expert", capacity_factor=4.0).train()
    x = _x(S=3)
    y = moe(x)  # C = min(S, ceil(4 * 3 / 2)) = 3: every expert takes every token
    probs = F.softmax(x @ moe.router.weight.t(), dim=-1)
    ref = sum(probs[:, e:e + 1] * _expert_ref(moe, e, x) for e in range(2))
    torch.testing.assert_close(y, ref)


def test_moe_aux_losses_have_the_right_values():
    E = 4
    moe = MoE(D, HID, num_experts=E, topk=2, routing="token", aux_loss_coef=0.5, z_loss_coef=0.25).train()
    with torch.no_grad():
        moe.router.weight.zero_()  # uniform router: balance loss is exactly 1, z-loss (log E)^2
    moe(_x())
    torch.testing.assert_close(moe.aux_loss, torch.tensor(0.5 * 1.0 + 0.25 * math.log(E) ** 2))

    torch.manual_seed(3)
    moe = MoE(D, HID, num_experts=E, topk=1, routing="token", aux_loss_coef=1.0, z_loss_coef=0.0).train()
    x = _x()
    moe(x)
    probs = F.softmax(x @ moe.router.weight.t(), dim=-1)
    frac = F.one_hot(probs.argmax(-1), E).float().mean(0)
    torch.testing.assert_close(moe.aux_loss, E * (frac * probs.mean(0)).sum())
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_expert_choice_has_only_z_loss():
    moe = MoE(D, HID, num_experts=4, topk=1, routing="expert", capacity_factor=1.0, aux_loss_coef=1.0,
              z_loss_coef=1.0).train()
    x = _x()
    moe(x)
    logits = x @ moe.router.weight.t()
    torch.testing.assert_close(moe.aux_loss, logits.logsumexp(-1).pow(2).mean())


@pytest.mark.parametrize("routing", ["token", "expert"])
def test_moe_router_in_fp32_under_autocast(routing):
    moe = MoE(D, HID, num_experts=4, topk=2, routing=routing, capacity_factor=1.0).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(_x())
    assert moe.aux_loss.dtype == torch.float32 and torch.isfinite(y).all()


def test_moe_validates_like_its_config():
    with pytest.raises(ValueError, match="MoEConfig.topk must be in"):
        MoE(D, HID, num_experts=2, topk=3)
    with pytest.raises(ValueError, match="MoEConfig.capacity_factor must be set"):
        MoE(D, HID, num_experts=2, routing="expert", capacity_factor=None)


# --------------------------------------------------------------------------------------------- PKM


def _all_keys(pkm: PKM, head: int) -> torch.Tensor:
    """The (N, Dk) keys of one head, written out one by one: key(i, j) = [C_i ; C'_j]."""
    t = 0 if pkm.shared_keys else head
    n = pkm.keys.n
    C, C2 = pkm.keys.keys[t, 0], pkm.keys.keys[t, 1]
    return torch.cat([C.repeat_interleave(n, 0), C2.repeat(n, 1)], dim=1)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("query_norm", ["batchnorm", "none"])
def test_pkm_retrieval_equals_brute_force(shared, query_norm):
    torch.manual_seed(4)
    pkm = PKM(D, num_keys=64, heads=3, topk=5, dim_key=8, query_norm=query_norm, shared_keys=shared).eval()
    x = _x(S=10)
    scores, ids = pkm.retrieve(x)  # (S, H, K)
    q = pkm.norm(pkm.query(x)).view(10, 3, 8)
    for h in range(3):
        full = q[:, h] @ _all_keys(pkm, h).t()  # (S, N)
        ref_scores, ref_ids = full.topk(5, dim=-1)
        torch.testing.assert_close(scores[:, h], ref_scores)
        assert torch.equal(ids[:, h], ref_ids)


def test_pkm_forward_equals_gather_reference_and_gradients_flow():
    torch.manual_seed(5)
    pkm = PKM(D, num_keys=64, heads=2, topk=4, dim_key=8, query_norm="batchnorm").train()
    x = _x(S=12).requires_grad_()
    _, train_ids = pkm.retrieve(x)  # train mode: batch statistics, as forward uses
    y = pkm(x)
    y.square().sum().backward()
    for name, p in [("x", x), ("query", pkm.query.weight), ("keys", pkm.keys.keys), ("values", pkm.values),
                    ("norm", pkm.norm.weight)]:
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    touched = torch.zeros(64, dtype=torch.bool)
    touched[train_ids.flatten()] = True
    assert torch.equal(pkm.values.grad.abs().sum(-1) > 0, touched)  # exactly the retrieved rows
    pkm.eval()
    scores, ids = pkm.retrieve(x)
    ref = (scores.softmax(-1)[..., None] * pkm.values[ids]).sum(dim=(1, 2))
    torch.testing.assert_close(pkm(x), ref)


def test_pkm_sparse_grad_equals_dense():
    torch.manual_seed(6)
    dense = PKM(D, num_keys=64, heads=2, topk=4, dim_key=8, query_norm="none")
    sparse = PKM(D, num_keys=64, heads=2, topk=4, dim_key=8, query_norm="none", sparse_grad=True)
    sparse.load_state_dict(dense.state_dict())
    x = _x(S=12)
    dense(x).square().sum().backward()
    sparse(x).square().sum().backward()
    assert sparse.values.grad.is_sparse and not dense.values.grad.is_sparse
    torch.testing.assert_close(sparse.values.grad.to_dense(), dense.values.grad)
    torch.testing.assert_close(sparse.query.weight.grad, dense.query.weight.grad)


def test_pkm_usage_tracking():
    torch.manual_seed(6)
    pkm = PKM(D, num_keys=64, heads=2, topk=4, dim_key=8, track_usage=True).eval()
    with pytest.raises(RuntimeError, match="no usage recorded"):
        pkm.usage()
    x = _x(S=50)
    pkm(x)
    _, ids = pkm.retrieve(x)
    u = pkm.usage()
    assert u["usage"] == pytest.approx(ids.unique().numel() / 64)
    assert 0 <= u["unevenness"] <= math.log(64)
    mass = pkm.usage_mass.clone()
    assert mass.sum().item() == pytest.approx(50 * 2)  # softmax gates sum to 1 per head
    pkm.reset_usage()
    assert pkm.usage_mass.sum() == 0
    pkm.track_usage = False
    pkm(x)
    assert pkm.usage_mass.sum() == 0


def test_pkm_under_autocast():
    pkm = PKM(D, num_keys=64, heads=2, topk=4, dim_key=8).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = pkm(_x().bfloat16())
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()


def test_pkm_validates():
    with pytest.raises(ValueError, match="PKMConfig.num_keys must be a perfect square"):
        PKM(D, num_keys=60)
    with pytest.raises(ValueError, match=r"expects input of shape \(\.\.\., 16\)"):
        PKM(D, num_keys=64, topk=4, dim_key=8)(torch.randn(3, 5))


# ----------------------------------------------------------------------------------------- factory


@pytest.mark.parametrize("cfg,cls", [
    (DenseConfig(hidden=HID), DenseMLP),
    (DenseConfig(activation="swiglu"), DenseMLP),
    (PEERConfig(num_experts=64, heads=2, topk=4, dim_key=8), PEER),
    (MoEConfig(num_experts=3, topk=2, routing="token", capacity_factor=None), MoE),
    (PKMConfig(num_keys=64, heads=2, topk=4, dim_key=8), PKM),
])
def test_build_ffn_and_reset_parameters(cfg, cls):
    torch.manual_seed(7)
    m = build_ffn(cfg, D, DenseConfig(hidden=HID))
    assert type(m) is cls
    x = _x()
    m.eval()
    y = m(x)
    assert y.shape == x.shape and torch.isfinite(y).all()
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(float("nan"))
    torch.manual_seed(8)
    m.reset_parameters()
    assert all(torch.isfinite(p).all() for p in m.parameters())
    if cls is MoE:
        assert m.hidden == HID


def test_build_ffn_rejects_unknown_config():
    with pytest.raises(ValueError, match="no feed-forward for config of type dict"):
        build_ffn({"kind": "peer"}, D)
