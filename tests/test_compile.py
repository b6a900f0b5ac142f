"""torch.compile of PEER and PKM layers, and of a small LM holding both, against eager: outputs and gradients.

``aot_eager`` (Dynamo's graph capture and AOTAutograd's joint forward/backward trace, run by eager
kernels) takes seconds and runs by default; inductor's code generation (a C++ compiler on CPU) takes
about a minute and is marked slow, as is PEER with sparse gradients (a few seconds more). Two training
steps each, so the query norm's running statistics and the usage counters updated in the first are
read in the second.
"""

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from peerlm.config import get_preset
from peerlm.ffn import PKM, build_ffn
from peerlm.model import build_model
from peerlm.peer import PEER

DIM = 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make_layer(kind: str, sparse_grad: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    if kind == "peer":
        layer = PEER(dim=DIM, num_experts=64, heads=2, topk=4, dim_key=8, sparse_grad=sparse_grad)
    else:
        layer = PKM(DIM, 64, 2, 4, 8, sparse_grad=sparse_grad)
    layer.track_usage = True
    return layer


def make_lm() -> torch.nn.Module:
    """The tiny-peer LM with a PKM memory in block 0 and PEER in block 1."""
    torch.manual_seed(0)
    cfg = dataclasses.replace(get_preset("tiny-peer"), placement=[1])
    model = build_model(cfg)
    model.blocks[0].ffn = build_ffn(get_preset("tiny-pkm").ffn, cfg.dim)
    assert [type(b.ffn) for b in model.blocks] == [PKM, PEER]
    return model


def dense(grad):
    return grad.to_dense() if grad.is_sparse else grad


def assert_same_grads(eager, compiled, tol):
    for (name, a), (_, b) in zip(eager.named_parameters(), compiled.named_parameters(), strict=True):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert a.grad.is_sparse == b.grad.is_sparse, name
            torch.testing.assert_close(dense(b.grad), dense(a.grad), rtol=tol, atol=tol, msg=name)
    for (name, a), (_, b) in zip(eager.named_buffers(), compiled.named_buffers(), strict=True):
        torch.testing.assert_close(b, a, rtol=tol, atol=tol, msg=name)


def check_layer(kind, sparse_grad, fullgraph, tol=1e-5):
    # eager runs peerlm's CPU kernels (vector dot products), the compiled graph aten's ops: the same
    # arithmetic summed in another order; gradients near 4 then differ by a few ulps (1.7e-6 seen)
    eager = make_layer(kind, sparse_grad)
    compiled = copy.deepcopy(eager)
    fn = torch.compile(compiled, backend="aot_eager", fullgraph=fullgraph)
    for step in range(2):
        x = torch.randn(3, 5, DIM, generator=torch.Generator().manual_seed(step))
        xe, xc = x.clone().requires_grad_(), x.clone().requires_grad_()
        ye, yc = eager(xe), fn(xc)
        torch.testing.assert_close(yc, ye, rtol=tol, atol=tol)
        ye.square().sum().backward()
        yc.square().sum().backward()
        torch.testing.assert_close(xc.grad, xe.grad, rtol=tol, atol=tol)
        assert_same_grads(eager, compiled, tol)
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)


@pytest.mark.parametrize("kind", ["peer", "pkm"])
def test_layer_compiles_as_one_graph(kind):
    check_layer(kind, sparse_grad=False, fullgraph=True)


@pytest.mark.parametrize("kind", [pytest.param("peer", marks=pytest.mark.slow), "pkm"])
def test_layer_with_sparse_grads_compiles(kind):
    # Dynamo cannot build sparse COO tensors (PEER's backward) nor trace the sparse embedding-bag backward
    # (PKM): those parts run eagerly behind a graph break, with the same results
    check_layer(kind, sparse_grad=True, fullgraph=False)


def check_lm(backend, tol, loss_in_model=True):
    """Two training steps; ``loss_in_model=False``: the model returns logits only and the same
    cross-entropy is taken outside it, in eager, for both."""
    eager = make_lm()
    compiled = copy.deepcopy(eager)
    fn = torch.compile(compiled, backend=backend)
    vocab = eager.cfg.vocab_size
    for step in range(2):
        gen = torch.Generator().manual_seed(step)
        idx = torch.randint(0, vocab, (2, 16), generator=gen)
        targets = torch.randint(0, vocab, (2, 16), generator=gen)
        if loss_in_model:
            (logits_e, loss_e), (logits_c, loss_c) = eager(idx, targets), fn(idx, targets)
        else:
            (logits_e, _), (logits_c, _) = eager(idx), fn(idx)
            loss_e, loss_c = (F.cross_entropy(lg.flatten(0, 1), targets.flatten()) for lg in (logits_e, logits_c))
        torch.testing.assert_close(logits_c, logits_e, rtol=tol, atol=tol)
        torch.testing.assert_close(loss_c, loss_e, rtol=tol, atol=tol)
        loss_e.backward()
        loss_c.backward()
        assert_same_grads(eager, compiled, tol)
        eager.zero_grad(set_to_none=True)
        compiled.zero_grad(set_to_none=True)


def test_lm_with_peer_and_pkm_compiles_equal_to_eager():
    check_lm("aot_eager", tol=1e-6)


@pytest.mark.slow
def test_lm_with_peer_and_pkm_compiles_with_inductor_equal_to_eager():
    check_lm("inductor", tol=1e-5, loss_in_model=False)


@pytest.mark.slow
def test_lm_loss_from_inductor_keeps_its_graph():
    """The loss the model returns stays differentiable under inductor (``last_losses`` holds clones:
    inductor folds ``ce + 0`` into ``ce`` and would otherwise return a detached alias as the loss)."""
    check_lm("inductor", tol=1e-5)


def test_a_compiled_layer_whose_tables_update_in_the_backward_trains_as_eager():
    """Where the compiled backward hands table gradients to the step instead, the tables still get
    the same update (the sparse gradients' part of the backward runs eagerly behind a graph break)."""
    from peerlm.optim import RowSparseAdamW, update_in_backward

    eager = make_layer("peer", sparse_grad=True)
    compiled = copy.deepcopy(eager)
    opts = [RowSparseAdamW([m.w_down, m.w_up], lr=1e-2) for m in (eager, compiled)]
    for opt in opts:
        update_in_backward(opt)
    fn = torch.compile(compiled, backend="aot_eager")
    before = eager.w_up.detach().clone()
    for step in range(2):
        x = torch.randn(3, 5, DIM, generator=torch.Generator().manual_seed(step))
        eager(x).square().sum().backward()
        fn(x).square().sum().backward()
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
    assert not torch.equal(eager.w_up, before)
    for a, b in ((eager.w_down, compiled.w_down), (eager.w_up, compiled.w_up)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
