"""The PEER layer: fused vs reference, gradients, causality, usage, accounting, bad input."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from peerlm import PEER, peer_cost
from peerlm.config import PEERConfig
from peerlm.fused import PEERExperts

SMALL = dict(dim=16, num_experts=64, heads=3, topk=4, dim_key=8)


def make_pair(**kw):
    torch.manual_seed(0)
    cfg = {**SMALL, **kw}
    ref = PEER(**cfg, impl="reference").double()
    fused = PEER(**cfg, impl="fused").double()
    fused.load_state_dict(ref.state_dict())
    return ref, fused


def dense(g):
    return g.to_dense() if g.is_sparse else g


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"activation": "relu"},
        {"activation": "silu", "gate": "sigmoid"},
        {"gate": "softmax-token"},
        {"query_norm": "running"},
        {"query_norm": "none", "shared_keys": False},
        {"sparse_grad": True},
        {"sparse_grad": True, "shared_keys": False, "activation": "relu"},
    ],
)
def test_fused_equals_reference(kw):
    ref, fused = make_pair(**kw)
    x = torch.randn(2, 7, SMALL["dim"], dtype=torch.float64)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fused(xf)
    torch.testing.assert_close(yf, yr)
    dy = torch.randn_like(yr)
    yr.backward(dy)
    yf.backward(dy)
    torch.testing.assert_close(xf.grad, xr.grad)
    names = {"query.weight", "keys.keys", "w_down", "w_up"}
    for (name, pr), (_, pf) in zip(ref.named_parameters(), fused.named_parameters()):
        assert pr.grad is not None and pf.grad is not None, name
        assert pr.grad.is_sparse == pf.grad.is_sparse == (kw.get("sparse_grad", False) and name in {"w_down", "w_up"})
        torch.testing.assert_close(dense(pf.grad), dense(pr.grad), msg=name)
        names.discard(name)
    assert not names


def test_token_softmax_gates_sum_to_one_per_token():
    torch.manual_seed(0)
    head, token = (PEER(**SMALL, gate=g) for g in ("softmax", "softmax-token"))
    token.load_state_dict(head.state_dict())
    x = torch.randn(9, SMALL["dim"])
    scores, _ = token.retrieve(x)
    g_head, g_token = head._gates(scores), token._gates(scores)
    torch.testing.assert_close(g_head.sum(-1), torch.ones(9, SMALL["heads"]))
    torch.testing.assert_close(g_token.sum((-2, -1)), torch.ones(9))
    # the same scores, one normalisation across heads: the ratio within a head is unchanged
    torch.testing.assert_close(g_token / g_token.sum(-1, keepdim=True), g_head)


def test_gradcheck_fused_function():
    torch.manual_seed(0)
    T, K, N, D = 5, 6, 20, 4
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    ids = torch.randint(0, N, (T, K))
    ids[0, :2] = 3  # repeated experts within one token must accumulate
    g = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    w_down = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    w_up = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    for act in ("gelu", "relu", "silu"):
        fn = lambda x, g, a, b, act=act: PEERExperts.apply(x, ids, g, a, b, act, False)
        assert torch.autograd.gradcheck(fn, (x, g, w_down, w_up))


def test_fused_against_plain_loop():
    # the fused function against a per-token python loop written here
    torch.manual_seed(1)
    T, K, N, D = 4, 5, 9, 3
    x, g = torch.randn(T, D, dtype=torch.float64), torch.rand(T, K, dtype=torch.float64)
    ids = torch.randint(0, N, (T, K))
    w_down, w_up = torch.randn(N, D, dtype=torch.float64), torch.randn(N, D, dtype=torch.float64)
    y = PEERExperts.apply(x, ids, g, w_down, w_up, "gelu", False)
    for t in range(T):
        expect = sum(g[t, s] * F.gelu(w_down[ids[t, s]] @ x[t]) * w_up[ids[t, s]] for s in range(K))
        torch.testing.assert_close(y[t], expect)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_every_parameter_gets_a_gradient(impl, sparse_grad):
    torch.manual_seed(0)
    layer = PEER(**SMALL, impl=impl, sparse_grad=sparse_grad)
    layer(torch.randn(3, 5, SMALL["dim"])).pow(2).sum().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, name
        assert dense(p.grad).abs().sum() > 0, name


def test_sparse_grad_holds_only_retrieved_rows_and_feeds_optimizers():
    torch.manual_seed(0)
    layer = PEER(**SMALL, sparse_grad=True)
    x = torch.randn(4, SMALL["dim"])
    _, ids = layer.retrieve(x)
    layer(x).sum().backward()
    rows = layer.w_up.grad.coalesce().indices()[0]
    assert set(rows.tolist()) == set(ids.flatten().tolist())
    before = layer.w_up.detach().clone()
    torch.optim.SparseAdam([layer.w_down, layer.w_up], lr=1e-2).step()
    changed = (layer.w_up.detach() != before).any(-1).nonzero().flatten()
    assert set(changed.tolist()) == set(ids.flatten().tolist())
    torch.optim.SGD([layer.w_down, layer.w_up], lr=1e-2).step()  # SGD takes sparse grads too


def test_sparse_grads_accumulate_like_dense():
    ref, fused = make_pair(sparse_grad=True)
    ref.sparse_grad = False
    for _ in range(2):  # gradient accumulation over two micro-batches
        x = torch.randn(6, SMALL["dim"], dtype=torch.float64)
        ref(x).sum().backward()
        fused(x).sum().backward()
    torch.testing.assert_close(fused.w_down.grad.to_dense(), ref.w_down.grad)
    torch.testing.assert_close(fused.w_up.grad.to_dense(), ref.w_up.grad)


def test_retrieve_is_exact_top_k_over_all_experts():
    torch.manual_seed(0)
    layer = PEER(**SMALL, query_norm="none").double().eval()
    x = torch.randn(10, SMALL["dim"], dtype=torch.float64)
    scores, ids = layer.retrieve(x)
    assert scores.shape == ids.shape == (10, SMALL["heads"], SMALL["topk"])
    n = layer.n
    c, c2 = layer.keys.keys[0, 0], layer.keys.keys[0, 1]
    all_keys = torch.cat([c.repeat_interleave(n, 0), c2.repeat(n, 1)], dim=-1)  # key i*n+j = [C_i; C'_j]
    q = layer.query(x).view(10, SMALL["heads"], SMALL["dim_key"])
    ref_scores, ref_ids = (q @ all_keys.t()).topk(SMALL["topk"], dim=-1)
    torch.testing.assert_close(scores, ref_scores)
    assert torch.equal(ids, ref_ids)
    # and the forward pass really uses those experts: rebuild the output from (scores, ids) by hand
    g = scores.softmax(-1)
    u, v = layer.w_down[ids], layer.w_up[ids]  # (T, H, K, D)
    expect = (g.unsqueeze(-1) * F.gelu((u * x[:, None, None]).sum(-1, keepdim=True)) * v).sum((1, 2))
    torch.testing.assert_close(layer(x), expect)


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("norm,train", [("running", True), ("batchnorm", False), ("running", False), ("none", True)])
def test_causality(impl, norm, train):
    torch.manual_seed(0)
    layer = PEER(**SMALL, impl=impl, query_norm=norm)
    layer.train(train)
    B, T, t = 2, 8, 4
    x = torch.randn(B, T, SMALL["dim"])
    x2 = x.clone()
    x2[:, t + 1] += torch.randn(B, SMALL["dim"])
    y1 = copy.deepcopy(layer)(x)  # copies: each call starts from the same running statistics
    y2 = copy.deepcopy(layer)(x2)
    assert torch.equal(y1[:, : t + 1], y2[:, : t + 1])
    assert not torch.equal(y1[:, t + 1], y2[:, t + 1])


def test_batchnorm_in_training_mixes_future_tokens():
    # the documented caveat: batch statistics see token t+1, so outputs at <= t move
    torch.manual_seed(0)
    layer = PEER(**SMALL, query_norm="batchnorm").train()
    x = torch.randn(1, 8, SMALL["dim"])
    x2 = x.clone()
    x2[:, 5] *= 10.0
    assert not torch.allclose(copy.deepcopy(layer)(x)[:, :5], copy.deepcopy(layer)(x2)[:, :5])


def test_running_norm_learns_statistics_across_batches():
    torch.manual_seed(0)
    layer = PEER(**SMALL, query_norm="running").train()
    for _ in range(60):
        layer(torch.randn(64, SMALL["dim"]) * 3 + 1)
    q = layer.query(torch.randn(4096, SMALL["dim"]) * 3 + 1)
    torch.testing.assert_close(layer.norm.running_mean, q.mean(0).detach(), atol=0.3, rtol=0.1)


def test_usage_metrics_hand_computed():
    layer = PEER(dim=4, num_experts=4, heads=1, topk=2, dim_key=2, track_usage=True)
    # feed known gates through the accumulator: experts 0 and 1 get mass 0.75 and 0.25, 2 and 3 none
    layer._accumulate_usage(torch.tensor([[[0, 1]]]), torch.tensor([[[0.75, 0.25]]]))
    stats = layer.usage()
    assert stats["usage"] == 0.5
    expect = math.log(4) + 0.75 * math.log(0.75) + 0.25 * math.log(0.25)
    assert stats["unevenness"] == pytest.approx(expect)
    assert stats["effective"] == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))))
    layer.reset_usage()
    with pytest.raises(RuntimeError, match="no usage recorded"):
        layer.usage()


def test_usage_tracked_in_forward():
    torch.manual_seed(0)
    layer = PEER(**SMALL, track_usage=True)
    x = torch.randn(20, SMALL["dim"])
    layer(x)
    mass = layer.usage_mass
    assert mass.sum().item() == pytest.approx(20 * SMALL["heads"])  # softmax gates sum to 1 per head
    _, ids = layer.retrieve(x)
    assert set(mass.nonzero().flatten().tolist()) == set(ids.flatten().tolist())
    uniform = PEER(dim=4, num_experts=4, heads=1, topk=2, dim_key=2, track_usage=True)
    uniform._accumulate_usage(torch.arange(4).view(4, 1, 1), torch.ones(4, 1, 1))
    assert uniform.usage() == {"usage": 1.0, "unevenness": pytest.approx(0.0, abs=1e-12), "distinct": 1.0,
                              "effective": 1.0}


def test_distinct_and_effective_experts_per_token():
    layer = PEER(dim=4, num_experts=16, heads=2, topk=2, dim_key=2, track_usage=True)
    ids = torch.tensor([[[0, 1], [1, 2]],    # expert 1 picked by both heads: 3 distinct of 4
                        [[0, 1], [2, 3]]])   # 4 of 4
    layer._accumulate_usage(ids, torch.full(ids.shape, 0.5))
    assert layer.usage()["distinct"] == pytest.approx((3 / 4 + 4 / 4) / 2)
    # token 0 mixes 3 experts with mass 1/4, 1/2, 1/4; token 1 four with 1/4 each
    first = math.exp(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5)))
    assert layer.usage()["effective"] == pytest.approx((first + 4.0) / 2)
    layer.reset_usage()
    layer._accumulate_usage(torch.tensor([[[5, 6], [6, 5]]]), torch.tensor([[[0.9, 0.1], [0.9, 0.1]]]))
    assert layer.usage()["distinct"] == 0.5 and layer.usage()["effective"] == pytest.approx(2.0)  # 1 each
    layer._accumulate_usage(torch.zeros(0, 2, 2, dtype=torch.long), torch.zeros(0, 2, 2))  # no tokens: no change
    assert layer.usage()["distinct"] == 0.5
    layer.reset_usage()
    torch.manual_seed(0)
    layer = PEER(**SMALL, track_usage=True)
    x = torch.randn(30, SMALL["dim"])
    layer(x)
    _, ids = layer.retrieve(x)
    brute = [len(set(t.flatten().tolist())) / t.numel() for t in ids]
    assert layer.usage()["distinct"] == pytest.approx(sum(brute) / len(brute))
    hk = SMALL["heads"] * SMALL["topk"]
    assert 1 <= layer.usage()["effective"] <= hk


def test_accounting():
    layer = PEER(**SMALL, query_norm="batchnorm")
    assert layer.num_params() == sum(p.numel() for p in layer.parameters())
    d, N, h, k, dk = SMALL["dim"], SMALL["num_experts"], SMALL["heads"], SMALL["topk"], SMALL["dim_key"]
    n = math.isqrt(N)
    flops = layer.flops_per_token()
    assert flops["experts"] == 4 * h * k * d
    assert flops["query"] == 2 * d * h * dk
    assert flops["subkey_scores"] == 2 * h * n * dk
    assert flops["candidate_grid"] == h * k * k
    assert flops["total"] == sum(v for key, v in flops.items() if key != "total")
    assert layer.active_params_per_token() == 2 * h * k * d + d * h * dk + n * dk + 2 * h * dk
    per_head = PEER(**SMALL, shared_keys=False, query_norm="none")
    assert per_head.num_params() == sum(p.numel() for p in per_head.parameters())
    # the paper's layer: 1M experts at d=512 is about 1.07e9 parameters; retrieval > experts
    paper = peer_cost(512, 1024**2, 8, 16, 128)
    assert 1.07e9 < paper["params"] < 1.08e9
    assert paper["flops"]["subkey_scores"] > paper["flops"]["experts"]


def test_init_scale_is_sane():
    torch.manual_seed(0)
    layer = PEER(dim=256, num_experts=64 * 64, heads=8, topk=16, dim_key=64).eval()
    x = torch.randn(512, 256)
    ratio = layer(x).pow(2).mean().sqrt() / x.pow(2).mean().sqrt()
    expect = math.sqrt(8 * 0.425 / (16 * 256))  # h E[gelu(z)^2] / (k d), see the module docstring
    assert 0.5 * expect < ratio < 2 * expect
    assert layer.w_down.std().item() == pytest.approx(256**-0.5, rel=0.05)


@pytest.mark.parametrize("query_norm", ["none", "batchnorm"])
def test_queries_start_at_unit_variance_with_or_without_the_norm(query_norm):
    """With unit-variance input the gate scores have about the same spread whether or not the query is
    normalised (nn.Linear's default init gave 1/3 of the variance without the norm)."""
    torch.manual_seed(0)
    layer = PEER(dim=256, num_experts=64 * 64, heads=8, topk=16, dim_key=64, query_norm=query_norm).eval()
    x = torch.randn(2048, 256)
    q = layer.norm(layer.query(x))
    assert q.var().item() == pytest.approx(1.0, rel=0.1)


def test_meta_device_build_then_init():
    with torch.device("meta"):
        layer = PEER(**SMALL)
    assert layer.w_down.is_meta
    layer.to_empty(device="cpu")
    layer.reset_parameters()
    assert torch.isfinite(layer.w_down).all() and layer.w_down.std() > 0
    assert layer.norm.running_var.eq(1).all()
    assert layer(torch.randn(3, SMALL["dim"])).shape == (3, SMALL["dim"])


def test_routing_runs_in_fp32_under_autocast():
    torch.manual_seed(0)
    layer = PEER(**SMALL)
    x = torch.randn(6, SMALL["dim"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores, _ = layer.retrieve(x)
        y = layer(x)
    assert scores.dtype == torch.float32
    assert y.dtype == torch.float32 and torch.isfinite(y).all()


def test_input_shapes_and_empty_batch():
    layer = PEER(**SMALL)
    assert layer(torch.randn(SMALL["dim"])).shape == (SMALL["dim"],)
    assert layer(torch.randn(2, 3, 4, SMALL["dim"])).shape == (2, 3, 4, SMALL["dim"])
    empty = layer(torch.randn(0, 5, SMALL["dim"]))
    assert empty.shape == (0, 5, SMALL["dim"])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 16\)"):
        layer(torch.randn(3, 15))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(3, 16, dtype=torch.long))


@pytest.mark.parametrize("impl,sparse_grad", [("reference", False), ("fused", False), ("fused", True)])
def test_an_empty_batch_is_part_of_the_graph(impl, sparse_grad):
    """backward() through a batch of no tokens works and leaves zero gradients (no error blaming the
    caller for an output cut off from the graph); with usage on, usage() says no tokens were seen."""
    layer = PEER(**SMALL, impl=impl, sparse_grad=sparse_grad, track_usage=True)
    x = torch.randn(0, 5, SMALL["dim"], requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape and y.requires_grad
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert layer.query.weight.grad is not None and not layer.query.weight.grad.any()
    assert layer.w_down.grad is not None and not layer.w_down.grad.to_dense().any()
    with pytest.raises(RuntimeError, match="has seen no tokens since tracking began"):
        layer.usage()
    layer.track_usage = False
    layer.reset_usage()
    with pytest.raises(RuntimeError, match="set track_usage=True"):
        layer.usage()


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"num_experts": 1000}, "perfect square"),
        ({"num_experts": 0}, r"perfect square .* got 0; use e.g. 1 or 4"),
        ({"topk": 9}, r"topk must be in \[1, sqrt\(num_experts\)=8\]"),
        ({"topk": 0}, "topk"),
        ({"dim_key": 7}, "dim_key must be even"),
        ({"heads": 0}, "heads must be"),
        ({"dim": 0}, "dim must be"),
        ({"activation": "tanh"}, "activation must be one of"),
        ({"gate": "relu"}, "gate must be one of"),
        ({"query_norm": "layernorm"}, "query_norm must be one of"),
        ({"impl": "cuda"}, "impl must be one of"),
        ({"topK": 4}, r"unknown PEER option\(s\) 'topK' \(did you mean 'topk'\?\)"),
    ],
)
def test_bad_config(kw, match):
    cfg = {**SMALL, **kw}
    with pytest.raises(ValueError, match=match):
        PEER(**cfg)


@pytest.mark.parametrize("kw", [{"num_experts": 1000}, {"topk": 9}, {"heads": 0}, {"dim_key": 7},
                                {"activation": "tanh"}, {"gate": "relu"}, {"impl": "cuda"}, {"sparse_grad": "yes"}])
def test_the_layer_validates_its_options_as_its_config_does(kw):
    """One validation: a bad option fails the layer with the config's own message."""
    options = {k: v for k, v in {**SMALL, **kw}.items() if k != "dim"}
    with pytest.raises(ValueError) as from_config:
        PEERConfig(**options)
    with pytest.raises(ValueError) as from_layer:
        PEER(**{**SMALL, **kw})
    assert str(from_layer.value) == str(from_config.value)


def test_bad_config_fails_before_allocating():
    # these tables would need 32 GiB: an odd dim_key must fail before they are allocated
    with pytest.raises(ValueError, match="dim_key"):
        PEER(dim=4096, num_experts=1024**2, dim_key=127)


@pytest.mark.parametrize("norm", ["batchnorm", "running"])
def test_layer_cast_to_other_dtypes_runs(norm):
    torch.manual_seed(0)
    x = torch.randn(2, 5, SMALL["dim"])
    bf16 = PEER(**SMALL, query_norm=norm).to(torch.bfloat16)
    for layer in (bf16, PEER(**SMALL, query_norm=norm, dtype=torch.float64)):
        dtype = layer.w_down.dtype
        y = layer(x.to(dtype))
        assert y.dtype == dtype and torch.isfinite(y.float()).all()
        y.float().sum().backward()
        assert layer.norm.weight.grad is not None
