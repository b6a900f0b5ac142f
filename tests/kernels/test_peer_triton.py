"""The Triton PEER kernels against gather + einsum written here and against PEER(impl="reference").

Outputs and every gradient (x, gates, both tables, dense and row-sparse), both reductions, fp32 / bf16 /
fp16 storage, and odd shapes: widths that are not powers of two, one token, counts that are not
multiples of the blocks, one expert retrieved by several heads of a token and by every token, one
retrieved by nobody. Each test runs on CPU in Triton's interpreter (marked ``triton``) and on CUDA with
compiled kernels (marked ``gpu``): ``pytest -m triton`` and, on a GPU machine, ``pytest -m gpu``.

Triton chooses between its compiler and its interpreter once per process, when it is first imported,
so that is decided here, at collection (before anything imports torch._dynamo, which imports Triton):
the interpreter where there is no CUDA device. TRITON_INTERPRET=1
is set for that import and again for each CPU test while it runs (Triton reads it as it launches too),
so no other test sees it. On a GPU machine, run the ``triton`` tests with
``TRITON_INTERPRET=1 pytest -m triton`` and the ``gpu`` ones without it, in separate processes.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from peerlm import PEER
from peerlm import kernels as peer_kernels
from peerlm.fused import ACTIVATIONS, peer_experts


def _import_kernels():
    """``peerlm.kernels.peer_triton``, imported for the interpreter when there is no GPU; None without Triton."""
    interpret = ("triton" not in sys.modules and "TRITON_INTERPRET" not in os.environ
                 and not torch.cuda.is_available())
    if interpret:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        if not peer_kernels.triton_available():
            return None
        from peerlm.kernels import peer_triton

        return peer_triton
    finally:
        if interpret:
            del os.environ["TRITON_INTERPRET"]


peer_triton = _import_kernels()
needs_triton = pytest.mark.skipif(peer_triton is None, reason="triton is not installed (pip install 'peerlm[triton]')")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SMALL = dict(dim=16, num_experts=64, heads=3, topk=4, dim_key=8)
# (T tokens, heads, topk, N experts, D width): odd widths; one token; counts off every block
CASES = {
    "odd-width": (5, 2, 3, 20, 24),
    "one-token": (1, 2, 2, 9, 5),
    "ragged-blocks": (37, 1, 5, 30, 33),
}
TOL = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}


@pytest.fixture(params=[
    pytest.param("cpu", marks=[pytest.mark.triton, needs_triton]),
    pytest.param("cuda", marks=[pytest.mark.gpu, needs_triton, needs_cuda]),
])
def device(request, monkeypatch):
    if request.param == "cpu":
        if not peer_triton.INTERPRETED:
            pytest.skip("Triton was imported for its compiler in this process; run TRITON_INTERPRET=1 pytest -m triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton reads it again as it launches; unset after the test
    elif peer_triton.INTERPRETED:
        pytest.skip("Triton runs its interpreter in this process (TRITON_INTERPRET=1); run pytest -m gpu without it")
    return torch.device(request.param)


@pytest.fixture
def small_tiles(monkeypatch):
    """Blocks much smaller than the shapes, so every loop runs several masked iterations."""
    monkeypatch.setattr(peer_triton, "_TILE", 128)  # BLOCK_D 64 for D=33 -> BLOCK_M 2 for M=5
    monkeypatch.setattr(peer_triton, "_REDUCE_BLOCK_D", 16)  # 3 width blocks of 16 for D=33


def make_inputs(T, heads, topk, N, D, dtype, seed=0):
    """Float inputs in ``dtype`` and ids with the odd cases built in."""
    gen = torch.Generator().manual_seed(seed)
    M = heads * topk
    ids = torch.randint(0, N - 1, (T, M), generator=gen)  # expert N - 1: retrieved by nobody
    ids[:, -1] = 1  # by every token
    if M >= 3:
        ids[0, [0, 1, min(topk, M - 2)]] = 2  # by several slots of one token, of two heads where there are two
    x = torch.randn(T, D, generator=gen).to(dtype)
    g = torch.rand(T, M, generator=gen)  # gates stay fp32, as PEER's routing gives them
    w_down = (torch.randn(N, D, generator=gen) / D**0.5).to(dtype)
    w_up = torch.randn(N, D, generator=gen).to(dtype)
    dy = torch.randn(T, D, generator=gen).to(dtype)
    return x, ids, g, w_down, w_up, dy


def gather_einsum(x, ids, g, w_down, w_up, activation):
    """The paper's Algorithm 1 on flattened slots, in fp64: the yardstick."""
    z = torch.einsum("tmd,td->tm", w_down[ids], x)
    return torch.einsum("tm,tmd->td", g * ACTIVATIONS[activation](z), w_up[ids])


def run(fn, x, ids, g, w_down, w_up, dy, device, **kw):
    leaves = [t.detach().to(device).requires_grad_() for t in (x, g, w_down, w_up)]
    xd, gd, wdd, wud = leaves
    y = fn(xd, ids.to(device), gd, wdd, wud, **kw)
    y.backward(dy.to(device))
    return y.detach(), [p.grad for p in leaves]


def dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


def assert_close(got, want, dtype, msg):
    tol = TOL[dtype]
    want = want.double().cpu()
    torch.testing.assert_close(got.double().cpu(), want, rtol=tol, atol=tol * max(want.abs().max().item(), 1.0),
                               msg=msg)


def check_against_reference(device, case, activation="gelu", dtype=torch.float32, sparse=False,
                            reduction="deterministic", seed=0):
    T, heads, topk, N, D = case
    x, ids, g, w_down, w_up, dy = make_inputs(T, heads, topk, N, D, dtype, seed)
    y, grads = run(peer_triton.peer_experts_triton, x, ids, g, w_down, w_up, dy, device,
                   activation=activation, sparse_grad=sparse, reduction=reduction)
    # the yardstick sees exactly the values the kernels read, in fp64
    y_ref, grads_ref = run(gather_einsum, x.double(), ids, g.double(), w_down.double(), w_up.double(), dy.double(),
                           "cpu", activation=activation)
    assert y.dtype == dtype and y.shape == (T, D)
    assert_close(y, y_ref, dtype, "y")
    for name, got, want, like in zip(("x", "gates", "w_down", "w_up"), grads, grads_ref, (x, g, w_down, w_up)):
        assert got.dtype == like.dtype, name
        assert got.is_sparse == (sparse and name.startswith("w")), name
        assert_close(dense(got), want, dtype, name)
    retrieved = torch.unique(ids)
    for name, got in (("w_down", grads[2]), ("w_up", grads[3])):
        if sparse:  # the fused path's layout: one row per distinct id, ids sorted (coalesced as built)
            assert got.sparse_dim() == 1 and got.shape == (N, D), name
            assert torch.equal(got._indices()[0].cpu(), retrieved), name
        else:
            assert dense(got)[N - 1].abs().max() == 0, f"{name}: a row nobody retrieved must stay zero"
    return y, grads


@pytest.mark.parametrize("reduction", ["deterministic", "atomic"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
@pytest.mark.parametrize("case", list(CASES))
def test_kernels_match_gather_einsum(device, small_tiles, case, sparse, reduction):
    check_against_reference(device, CASES[case], sparse=sparse, reduction=reduction)


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("reduction", ["deterministic", "atomic"])
def test_activations(device, activation, reduction):
    check_against_reference(device, CASES["odd-width"], activation=activation, reduction=reduction,
                            sparse=reduction == "atomic")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["deterministic", "atomic"])
def test_half_precision_accumulates_in_fp32(device, small_tiles, dtype, reduction):
    for case in ("odd-width", "ragged-blocks"):
        check_against_reference(device, CASES[case], dtype=dtype, reduction=reduction, sparse=case == "odd-width")


def test_deterministic_reduction_is_bitwise_reproducible_and_agrees_with_atomics(device, small_tiles):
    case = CASES["ragged-blocks"]
    first = check_against_reference(device, case, reduction="deterministic", sparse=True)
    again = check_against_reference(device, case, reduction="deterministic", sparse=True)
    atomic = check_against_reference(device, case, reduction="atomic", sparse=True)
    for a, b, c in zip(first[1], again[1], atomic[1]):
        assert torch.equal(dense(a), dense(b))
        torch.testing.assert_close(dense(c), dense(a))


@pytest.mark.parametrize("reduction", ["deterministic", "atomic"])
def test_gradcheck(device, reduction):
    torch.manual_seed(0)
    T, M, N, D = 3, 4, 6, 3
    ids = torch.randint(0, N, (T, M), device=device)
    ids[0, :2] = 4
    x = torch.randn(T, D, dtype=torch.float64, device=device, requires_grad=True)
    g = torch.rand(T, M, dtype=torch.float64, device=device, requires_grad=True)
    w_down = torch.randn(N, D, dtype=torch.float64, device=device, requires_grad=True)
    w_up = torch.randn(N, D, dtype=torch.float64, device=device, requires_grad=True)
    for act in ("gelu", "silu"):
        fn = lambda x, g, a, b, act=act: peer_triton.PEERExpertsTriton.apply(x, ids, g, a, b, act, False, reduction)
        assert torch.autograd.gradcheck(fn, (x, g, w_down, w_up))


def make_layers(device, **kw):
    torch.manual_seed(0)
    cfg = {**SMALL, **kw}
    ref = PEER(**cfg, impl="reference").double()
    tri = PEER(**cfg, impl="triton").double()
    tri.load_state_dict(ref.state_dict())
    return ref, tri.to(device)


@pytest.mark.parametrize("kw", [{}, {"sparse_grad": True}, {"activation": "relu", "shared_keys": False,
                                                            "query_norm": "running"}, {"gate": "softmax-token"}])
@pytest.mark.parametrize("reduction", ["deterministic", "atomic"])
def test_layer_equals_reference(device, kw, reduction, monkeypatch):
    monkeypatch.setattr(peer_kernels, "_reduction", reduction)  # what set_triton_reduction sets
    ref, tri = make_layers(device, **kw)
    assert tri.resolved_impl() == "triton"
    x = torch.randn(2, 7, SMALL["dim"], dtype=torch.float64)
    xr, xt = x.clone().requires_grad_(), x.clone().to(device).requires_grad_()
    yr, yt = ref(xr), tri(xt)
    torch.testing.assert_close(yt.cpu(), yr)
    dy = torch.randn_like(yr)
    yr.backward(dy)
    yt.backward(dy.to(device))
    torch.testing.assert_close(xt.grad.cpu(), xr.grad)
    names = {"query.weight", "keys.keys", "w_down", "w_up"}
    for (name, pr), (_, pt) in zip(ref.named_parameters(), tri.named_parameters()):
        assert pr.grad is not None and pt.grad is not None, name
        assert pt.grad.is_sparse == pr.grad.is_sparse, name
        torch.testing.assert_close(dense(pt.grad).cpu(), dense(pr.grad), msg=name)
        names.discard(name)
    assert not names


def test_sparse_grads_feed_row_sparse_adamw_and_clipping_like_fused(device):
    # imported here, not with the module: peerlm.optim imports peerlm.ffn, whose torch.compiler use imports
    # torch._dynamo and with it Triton, before _import_kernels could choose the interpreter
    from peerlm.optim import RowSparseAdamW, clip_grad_norm

    torch.manual_seed(0)
    fused = PEER(**SMALL, impl="fused", sparse_grad=True)
    tri = PEER(**SMALL, impl="triton", sparse_grad=True)
    tri.load_state_dict(fused.state_dict())
    tri.to(device)
    params = {}
    for name, layer, dev in (("fused", fused, "cpu"), ("triton", tri, device)):
        opt = RowSparseAdamW([layer.w_down, layer.w_up], lr=1e-2)
        for step in range(2):  # two accumulated micro-batches, then clip and step, twice
            for micro in range(2):
                x = torch.randn(6, SMALL["dim"], generator=torch.Generator().manual_seed(10 * step + micro))
                layer(x.to(dev)).square().sum().backward()
            clip_grad_norm([layer.w_down, layer.w_up], max_norm=0.5)
            opt.step()
            opt.zero_grad(set_to_none=True)
        params[name] = (layer.w_down.detach().cpu(), layer.w_up.detach().cpu())
    for a, b in zip(params["triton"], params["fused"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_triton
@pytest.mark.triton
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setattr(peer_triton, "INTERPRETED", False)  # as in a process that imported Triton compiled
    x, ids, g, w_down, w_up, _ = make_inputs(*CASES["odd-width"], torch.float32)
    with pytest.raises(RuntimeError, match="impl='fused'.*TRITON_INTERPRET=1"):
        peer_triton.peer_experts_triton(x, ids, g, w_down, w_up)
    with pytest.raises(ValueError, match="reduction must be one of"):
        peer_triton.peer_experts_triton(x, ids, g, w_down, w_up, reduction="sorted")


@needs_triton
@pytest.mark.triton
def test_kernels_compile_for_cuda_without_a_gpu_and_do_not_spill():
    # Triton's compiler down to sm_80 and sm_90 machine code, in a process of its own (this one may hold
    # the interpreter): it rejects what the interpreter lets through. Registers and spills come from
    # ptxas's log; a spill at a width up to 2048 fails (fp64, for gradcheck only, may spill).
    # benchmarks/triton_registers.py compiles every variant, at 4096 too.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    widths = ["256", "512", "1024", "2048", "33"]
    proc = subprocess.run([sys.executable, str(script), "bf16", "fp32", "fp64", "--widths", *widths,
                           "--variants", "compact", "--jobs", "2"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compiled 150 kernel variants for sm_80 and sm_90" in proc.stdout
    lines = [m.groupdict() for m in re.finditer(
        r"^sm_(?P<target>\d+) +(?P<storage>\w+) D=(?P<D>\d+) +(?P<variant>.+?) +tile=.* regs=(?P<regs>\d+) "
        r"spill=(?P<stores>\d+)/(?P<loads>\d+)", proc.stdout, re.M)]
    assert len(lines) == 150
    assert {(x["target"], x["storage"], x["D"]) for x in lines} == {
        (t, s, d) for t in ("80", "90") for s in ("bf16", "fp32", "fp64") for d in widths}
    spilling = [x for x in lines if x["storage"] != "fp64" and (x["stores"], x["loads"]) != ("0", "0")]
    assert not spilling
    assert all(0 < int(x["regs"]) <= 255 for x in lines)


@pytest.mark.gpu
@needs_triton
@needs_cuda
@pytest.mark.parametrize("reduction", ["deterministic", "atomic"])
def test_cuda_realistic_shape_matches_fused(reduction):
    # the default tiles at a width of the paper's layer, bf16 tables, against the embedding-bag path in fp32
    if peer_triton.INTERPRETED:
        pytest.skip("Triton runs its interpreter in this process (TRITON_INTERPRET=1); run pytest -m gpu without it")
    x, ids, g, w_down, w_up, dy = make_inputs(1000, 8, 16, 4096, 512, torch.bfloat16)  # T, h, k, N, D
    y, grads = run(peer_triton.peer_experts_triton, x, ids, g, w_down, w_up, dy, "cuda", sparse_grad=True,
                   reduction=reduction)
    y_ref, grads_ref = run(peer_experts, x.float(), ids, g, w_down.float(), w_up.float(), dy.float(), "cuda",
                           sparse_grad=True)
    assert_close(y, y_ref, torch.bfloat16, "y")
    for name, got, want in zip(("x", "gates", "w_down", "w_up"), grads, grads_ref):
        assert_close(dense(got), dense(want), torch.bfloat16, name)


@pytest.mark.gpu
@needs_triton
@needs_cuda
def test_auto_picks_triton_on_cuda():
    layer = PEER(**SMALL).cuda()
    assert layer.resolved_impl() == "triton"
    assert layer(torch.randn(4, SMALL["dim"], device="cuda")).shape == (4, SMALL["dim"])


# ------------------------------------------------------------------ without Triton (default run)


def test_auto_stays_fused_on_cpu_and_peerlm_imports_without_triton():
    code = (
        "import sys, torch\n"
        "from peerlm import PEER\n"
        "layer = PEER(dim=8, num_experts=16, heads=2, topk=2, dim_key=4)\n"
        "assert layer.resolved_impl() == 'fused', layer.resolved_impl()\n"
        "layer(torch.randn(3, 8)).sum().backward()\n"
        "assert 'triton' not in sys.modules, 'triton imported on a CPU-only path'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_missing_triton_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # what an absent package looks like to import
    monkeypatch.delitem(sys.modules, "peerlm.kernels.peer_triton", raising=False)
    layer = PEER(**SMALL, impl="triton")
    with pytest.raises(ImportError, match=r"pip install 'peerlm\[triton\]'"):
        layer(torch.randn(3, SMALL["dim"]))


def test_reduction_setting_is_validated():
    with pytest.raises(ValueError, match="triton reduction must be one of"):
        peer_kernels.set_triton_reduction("sorted")
    previous = peer_kernels.set_triton_reduction("atomic")
    try:
        assert previous == "deterministic" and peer_kernels.triton_reduction() == "atomic"
    finally:
        peer_kernels.set_triton_reduction(previous)
