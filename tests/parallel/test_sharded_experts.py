"""Column-sharded PEER experts (and PKM values) against the unsharded layers: outputs, every gradient,
storage, init.

The distributed tests run 2 gloo processes; each computes the unsharded reference on the union of the
ranks' tokens itself (same seed on every rank), then its own shard's part, and returns the largest
differences. Reference loss: the mean over ranks of each rank's loss, which is what DDP's averaging
optimises, so tables compare directly and per-token gradients (x, gates) compare after a factor P.
"""

import pytest
import torch
import torch.nn.functional as F

from peerlm import PEER
from peerlm.ffn import PKM
from peerlm.fused import peer_experts
from peerlm.parallel import (
    ColumnShard,
    column_sharded_experts,
    column_sharded_memory,
    shard_experts,
    shard_peer,
    shard_pkm,
    sharded_peer,
)
from peerlm.parallel.launch import spawn
from peerlm.tables import normal_columns_

N, D, K = 64, 8, 6
LAYER = dict(dim=16, num_experts=64, heads=3, topk=4, dim_key=8)


def _dense(g):
    return g.to_dense() if g.is_sparse else g


def _gap(a, b) -> float:
    return float((a - b).detach().abs().max()) if a.numel() else 0.0


def _peer_as_build_model_makes_it(**kw) -> PEER:
    """Built on meta, then initialised once (``build_model``'s way), at seed 0."""
    with torch.device("meta"):
        layer = PEER(**kw)
    layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    return layer


def _problem(T: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g, dtype=dtype)
    ids = torch.randint(0, N, (T, K), generator=g)
    gates = torch.rand(T, K, generator=g, dtype=dtype)
    down, up = (torch.randn(N, D, generator=g, dtype=dtype) for _ in range(2))
    w = torch.randn(T, D, generator=g, dtype=dtype)  # upstream gradient
    return x, ids, gates, down, up, w


# ------------------------------------------------------------------------------ one process


@pytest.mark.parametrize("sparse", [False, True])
def test_one_rank_equals_the_fused_path(sparse):
    x, ids, gates, down, up, w = _problem(10, torch.float64)
    ref = [t.clone().requires_grad_() for t in (x, gates, down, up)]
    (peer_experts(ref[0], ids, ref[1], ref[2], ref[3], "gelu", sparse) * w).sum().backward()
    got = [t.clone().requires_grad_() for t in (x, gates, down, up)]
    y = column_sharded_experts(got[0], ids, got[1], got[2], got[3], ColumnShard(D), "gelu", sparse)
    (y * w).sum().backward()
    assert torch.equal(y, peer_experts(x, ids, gates, down, up))
    for a, b in zip(got, ref):
        assert a.grad.is_sparse == b.grad.is_sparse == (sparse and a.shape == (N, D))
        torch.testing.assert_close(_dense(a.grad), _dense(b.grad), rtol=0, atol=1e-12)


@pytest.mark.parametrize("sparse", [False, True])
def test_one_rank_memory_equals_embedding_bag(sparse):
    _, ids, gates, values, _, w = _problem(10, torch.float64)
    ref = [t.clone().requires_grad_() for t in (gates, values)]
    (F.embedding_bag(ids, ref[1], per_sample_weights=ref[0], mode="sum", sparse=sparse) * w).sum().backward()
    got = [t.clone().requires_grad_() for t in (gates, values)]
    (column_sharded_memory(ids, got[0], got[1], ColumnShard(D), sparse) * w).sum().backward()
    for a, b in zip(got, ref):
        assert a.grad.is_sparse == b.grad.is_sparse
        torch.testing.assert_close(_dense(a.grad), _dense(b.grad), rtol=0, atol=1e-12)


def test_gradcheck_one_rank():
    x, ids, gates, down, up, _ = _problem(4, torch.float64)
    inputs = [t.requires_grad_() for t in (x, gates, down, up)]
    fn = lambda x, g, d, u: column_sharded_experts(x, ids, g, d, u, ColumnShard(D), "silu")
    assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("shape", [(64, 16), (1001, 3), (17, 1), (5, 4), (4099, 48)])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_streamed_init_is_the_columns_of_one_draw(shape, ranks):
    Nr, Dr = shape[0], shape[1] * ranks
    torch.manual_seed(3)
    full = torch.empty(Nr, Dr).normal_(std=0.5)
    after = torch.rand(2)  # the generator must also end where one draw leaves it
    for rank in range(ranks):
        cols = ColumnShard(Dr, rank, ranks).columns
        torch.manual_seed(3)
        local = normal_columns_(torch.empty(Nr, Dr // ranks), Dr, cols, 0.5)
        assert torch.equal(local, full[:, cols])
        assert torch.equal(torch.rand(2), after)


def test_sharded_layer_on_one_process_is_the_peer_layer():
    ref = _peer_as_build_model_makes_it(**LAYER, query_norm="running")
    torch.manual_seed(0)
    built = sharded_peer(**LAYER, query_norm="running")  # never allocates the whole table
    converted = shard_peer(_peer_as_build_model_makes_it(**LAYER, query_norm="running"))
    x = torch.randn(2, 5, LAYER["dim"])
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    y_ref = ref(x)  # a training-mode forward moves the running statistics: once per layer
    for layer in (built, converted):
        assert type(layer) is PEER and layer.shard.ranks == 1
        assert all(torch.equal(a, b) for a, b in zip(layer.state_dict().values(), state.values()))
        torch.testing.assert_close(layer(x), y_ref, rtol=0, atol=1e-6)


def test_sharded_pkm_on_one_process_is_the_pkm():
    torch.manual_seed(0)
    ref = PKM(16, 64, heads=2, topk=4, dim_key=8, query_norm="none")
    layer = shard_pkm(PKM(16, 64, heads=2, topk=4, dim_key=8, query_norm="none"))
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 16)
    assert type(layer) is PKM and layer.shard.ranks == 1
    torch.testing.assert_close(layer(x), ref(x), rtol=0, atol=1e-6)


def test_a_sharded_layer_is_the_layer_with_its_forward_and_init():
    """Sharding is a way to store the tables: no subclass, no second forward or init."""
    peer, pkm = shard_peer(PEER(**LAYER)), shard_pkm(PKM(16, 64, heads=2, topk=4, dim_key=8))
    built = sharded_peer(**LAYER)
    for layer, kind in ((peer, PEER), (built, PEER), (pkm, PKM)):
        assert type(layer) is kind and layer.shard is not None
        assert type(layer).forward is kind.forward and type(layer).reset_parameters is kind.reset_parameters
        assert "forward" not in vars(layer) and "reset_parameters" not in vars(layer)
    assert "ranks=1, rank=0, columns=0:16, grad_reduction=mean" in repr(peer)
    model = torch.nn.Sequential(PEER(**LAYER), PKM(16, 64, heads=2, topk=4, dim_key=8))
    assert [type(m) for m in shard_experts(model)] == [PEER, PKM]
    assert all(m.shard is not None for m in model)
    tables = (model[0].w_down, model[1].values)
    assert shard_experts(model) is model  # layers sharded already are left as they are
    assert model[0].w_down is tables[0] and model[1].values is tables[1]


def test_bad_layouts():
    with pytest.raises(ValueError, match="not divisible by 3 ranks"):
        ColumnShard(16, 0, 3)
    with pytest.raises(ValueError, match="sharded already"):
        shard_peer(shard_peer(PEER(**LAYER)))
    with pytest.raises(ValueError, match="grad_reduction"):
        shard_peer(PEER(**LAYER), grad_reduction="max")


# ---------------------------------------------------------------------------------- 2 ranks


def _experts_worker(rank: int, ranks: int) -> list[dict]:
    out = []
    cases = [  # (tokens per rank, dtype, sparse_grad, grad_reduction, activation)
        ([5, 3], torch.float64, False, "mean", "gelu"),
        ([5, 3], torch.float64, True, "mean", "relu"),
        ([8, 0], torch.float64, True, "sum", "silu"),  # a rank without tokens still takes part
        ([6, 6], torch.float32, False, "mean", "gelu"),
    ]
    for counts, dtype, sparse, reduction, act in cases:
        x, ids, gates, down, up, w = _problem(sum(counts), dtype)
        ref = [t.clone().requires_grad_() for t in (x, gates, down, up)]
        y_ref = peer_experts(ref[0], ids, ref[1], ref[2], ref[3], act)
        ((y_ref * w).sum() / ranks).backward()
        shard = ColumnShard.of(D)
        rows = slice(sum(counts[:rank]), sum(counts[:rank + 1]))
        cols = shard.columns
        mine = [x[rows], gates[rows], down[:, cols], up[:, cols]]
        mine = [t.clone().requires_grad_() for t in mine]
        y = column_sharded_experts(mine[0], ids[rows], mine[1], mine[2], mine[3], shard, act, sparse, reduction)
        (y * w[rows]).sum().backward()
        table_scale = ranks if reduction == "sum" else 1
        out.append({
            "case": (counts, str(dtype), sparse, reduction, act),
            "y": _gap(y, y_ref[rows]),
            "dx": _gap(mine[0].grad, ranks * ref[0].grad[rows]),
            "dg": _gap(mine[1].grad, ranks * ref[1].grad[rows]),
            "d_down": _gap(_dense(mine[2].grad), table_scale * ref[2].grad[:, cols]),
            "d_up": _gap(_dense(mine[3].grad), table_scale * ref[3].grad[:, cols]),
            "sparse": mine[2].grad.is_sparse and mine[3].grad.is_sparse,
            "storage": (mine[2].numel() + mine[3].numel()) * ranks == 2 * N * D,
        })
        # PKM's value lookup on the same problem: `down` plays the value table
        ref = [t.clone().requires_grad_() for t in (gates, down)]
        y_ref = F.embedding_bag(ids, ref[1], per_sample_weights=ref[0], mode="sum")
        ((y_ref * w).sum() / ranks).backward()
        mine = [t.clone().requires_grad_() for t in (gates[rows], down[:, cols])]
        y = column_sharded_memory(ids[rows], mine[0], mine[1], shard, sparse, reduction)
        (y * w[rows]).sum().backward()
        out.append({
            "case": (counts, str(dtype), sparse, reduction, "pkm"),
            "y": _gap(y, y_ref[rows]), "dx": 0.0,
            "dg": _gap(mine[0].grad, ranks * ref[0].grad[rows]),
            "d_down": _gap(_dense(mine[1].grad), table_scale * ref[1].grad[:, cols]), "d_up": 0.0,
            "sparse": mine[1].grad.is_sparse, "storage": mine[1].numel() * ranks == N * D,
        })
    return out


@pytest.mark.distributed
def test_two_ranks_equal_one_process_for_the_expert_mixture():
    for rank, results in enumerate(spawn(_experts_worker, 2)):
        for r in results:
            counts, dtype, sparse = r["case"][:3]
            tol = 1e-12 if dtype == "torch.float64" else 2e-5
            for key in ("y", "dx", "dg", "d_down", "d_up"):
                assert r[key] <= tol, (rank, r["case"], key, r[key])
            assert r["sparse"] == sparse and r["storage"], (rank, r)


def _layer_worker(rank: int, ranks: int) -> dict:
    """A whole sharded PEER (routing included) against PEER: different tokens per rank."""
    ref = _peer_as_build_model_makes_it(**LAYER, query_norm="running")
    torch.manual_seed(0)
    built = sharded_peer(**LAYER, query_norm="running")  # init on the shard only
    cols, sd = built.shard.columns, built.state_dict()
    init_equal = all(torch.equal(sd[k].to_local(), v[:, cols]) if k in ("w_down", "w_up") else torch.equal(sd[k], v)
                     for k, v in ref.state_dict().items())
    layer = shard_peer(PEER(**LAYER, query_norm="running"))
    layer.load_state_dict(ref.state_dict())  # full tables in, this rank's columns kept
    x = torch.randn(2 * ranks, 3, LAYER["dim"], generator=torch.Generator().manual_seed(1))
    w = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y_ref = ref(x)
    (y_ref * w).sum(-1).mean().backward()
    mine = slice(2 * rank, 2 * rank + 2)
    y = layer(x[mine])
    (y * w[mine]).sum(-1).mean().backward()
    gaps = {"y": _gap(y, y_ref[mine])}
    for name, p in layer.named_parameters():
        full = dict(ref.named_parameters())[name].grad
        if name in ("w_down", "w_up"):
            gaps[name] = _gap(p.grad, full[:, layer.shard.columns])
        else:  # replicated routing: its gradient is averaged over ranks, as DDP would
            g = p.grad.clone()
            torch.distributed.all_reduce(g)
            gaps[name] = _gap(g / ranks, full)
    layer.norm.load_state_dict(ref.norm.state_dict())  # the forwards above moved them by different batches
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # x, y move in bf16 here
        y16, y16_ref = layer(x[mine].bfloat16()), ref(x.bfloat16())[mine]
    gaps["y_bf16"] = _gap(y16.float(), y16_ref.float())
    return {"init_equal": init_equal, "gaps": gaps, "local_rows": layer.w_down.shape, "bf16": y16.dtype}


@pytest.mark.distributed
def test_two_ranks_equal_one_process_for_the_whole_layer():
    for r in spawn(_layer_worker, 2):
        assert r["init_equal"]
        assert r["local_rows"] == (LAYER["num_experts"], LAYER["dim"] // 2)
        assert r["bf16"] == torch.bfloat16
        assert set(r["gaps"]) >= {"y", "w_down", "w_up", "query.weight", "keys.keys"}
        for name, gap in r["gaps"].items():
            assert gap < (1e-2 if name == "y_bf16" else 1e-5), (name, gap)
