"""``peerlm.bags``' reusable storage for table gradients (``GradBuffers``): a buffer is written again
only once nothing else holds it (gradients kept by a caller, accumulation over micro-batches), and
free buffers too small for a request are dropped."""

import pytest
import torch

from peerlm import PEER
from peerlm import bags as bags_mod
from peerlm.kernels.cpu import cpu_kernels


@pytest.mark.skipif(cpu_kernels() is None, reason="the pool serves the CPU kernels' path, not built here")
@pytest.mark.parametrize("sparse_grad", [False, True])
def test_table_gradients_reuse_storage_only_once_nobody_holds_it(sparse_grad):
    torch.manual_seed(0)
    layer = PEER(16, 256, heads=2, topk=4, dim_key=8, sparse_grad=sparse_grad, impl="fused")
    x1, x2 = torch.randn(9, 16), torch.randn(9, 16)

    def grad_of(x):
        layer.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        g = layer.w_up.grad
        return g.to_dense() if sparse_grad else g

    ref1, ref2 = grad_of(x1).clone(), grad_of(x2).clone()
    held = layer.w_up.grad  # kept by the caller: the next backward must not write into it
    held_copy = held.clone()
    layer.w_up.grad = None
    layer(x1).square().sum().backward()
    assert torch.equal(held.to_dense() if sparse_grad else held, held_copy.to_dense() if sparse_grad else held_copy)
    assert torch.equal(grad_of(x1), ref1)
    # accumulation over two micro-batches: the second gradient gets its own storage, the sum is right
    layer.zero_grad(set_to_none=True)
    layer(x1).square().sum().backward()
    layer(x2).square().sum().backward()
    acc = layer.w_up.grad.to_dense() if sparse_grad else layer.w_up.grad
    torch.testing.assert_close(acc, ref1 + ref2)
    # once nothing holds the earlier gradients, the next ones are written into the pool's storage
    del held, held_copy, acc
    layer.zero_grad(set_to_none=True)
    pool = [b.data_ptr() for b, _ in bags_mod.grad_buffers._bufs[(16, torch.float32)]]
    layer(x2).square().sum().backward()
    for p in (layer.w_down, layer.w_up):
        assert (p.grad._values() if sparse_grad else p.grad).untyped_storage().data_ptr() in pool
    assert torch.equal(layer.w_up.grad.to_dense() if sparse_grad else layer.w_up.grad, ref2)


def test_grad_buffers_drop_free_buffers_too_small_and_keep_held_ones():
    pool = bags_mod.GradBuffers(keep=3)
    a = pool.take(10, 4, torch.float32)
    assert a.shape == (12, 4)
    held = pool.take(10, 4, torch.float32)[:10]  # a's storage is free again, so this is a
    assert held.data_ptr() == a.data_ptr()
    del a
    b = pool.take(10, 4, torch.float32)  # the first is held (by `held`): a second buffer
    assert b.data_ptr() != held.data_ptr()
    del b
    big = pool.take(40, 4, torch.float32)  # too big for the free second buffer: it is dropped, the held one stays
    ptrs = [t.data_ptr() for t, _ in pool._bufs[(4, torch.float32)]]
    assert ptrs == [held.data_ptr(), big.data_ptr()]
