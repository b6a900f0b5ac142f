"""The compiled CPU kernels (``peerlm/kernels/cpu.cpp``, ``cpu_optim.cpp``) against brute force and
PyTorch's own ops.

Product-key top-k against the top-k of all n^2 sums (exact values; the same ids except among exactly
tied sums; with many ties, valid distinct ids from each half's top k); the embedding-bag sums against
aten's kernels they replace, in float32 and float64; bad ids; the fallback when the kernels are off.
Where the kernels cannot be built here (no compiler), these tests are skipped with the reason.
"""

import os
import subprocess
import sys

import pytest
import torch

from peerlm import bags as bags_mod
from peerlm import retrieval
from peerlm.kernels.cpu import cpu_kernels, usable

kernels = cpu_kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="the CPU kernels could not be built here")


def _grid(k: int):
    return retrieval._grid_candidates(k, torch.device("cpu"))


def _brute_topk(a: torch.Tensor, b: torch.Tensor, k: int):
    """Top-k of every sum, ties to the lower flat index (a stable sort of the negated sums)."""
    n = a.shape[-1]
    sums = (a[..., :, None] + b[..., None, :]).reshape(*a.shape[:-1], n * n)
    order = torch.sort(-sums, dim=-1, stable=True).indices[..., :k]
    return sums.gather(-1, order), order


@pytest.mark.parametrize("n,k", [(256, 16), (256, 24), (256, 32), (64, 64), (37, 5), (8, 1), (100, 30), (512, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pk_topk_equals_brute_force(n, k, dtype):
    g = torch.Generator().manual_seed(n * 100 + k)
    a, b = torch.randn(300, n, generator=g, dtype=dtype), torch.randn(300, n, generator=g, dtype=dtype)
    a_P, b_P = _grid(k)
    v, i = kernels.pk_topk(a, b, k, a_P, b_P)
    v_ref, i_ref = _brute_topk(a, b, k)
    assert torch.equal(v, v_ref)
    sums = (a[:, :, None] + b[:, None, :]).reshape(300, -1)
    assert torch.equal(sums.gather(-1, i), v)
    # ids differ from the lowest-flat-index order only within exactly tied sums (rare, but float32 sums
    # of 256^2 pairs do tie): the kernel orders ties by grid position
    off = i != i_ref
    tied = torch.zeros_like(off)
    tied[:, 1:] |= v[:, 1:] == v[:, :-1]
    tied[:, :-1] |= v[:, 1:] == v[:, :-1]
    tied |= v == v[:, -1:]  # a tie with a sum just outside the top k
    assert not (off & ~tied).any()
    assert off.sum() <= 0.01 * off.numel()


def test_pk_topk_with_many_ties_keeps_exact_values_and_lowest_ids():
    g = torch.Generator().manual_seed(0)
    n, k = 64, 16
    a = torch.randint(0, 4, (500, n), generator=g).float()  # four distinct values: ties everywhere
    b = torch.randint(0, 4, (500, n), generator=g).float()
    a_P, b_P = _grid(k)
    v, i = kernels.pk_topk(a, b, k, a_P, b_P)
    v_ref, _ = _brute_topk(a, b, k)
    assert torch.equal(v, v_ref)
    sums = (a[:, :, None] + b[:, None, :]).reshape(500, -1)
    assert torch.equal(sums.gather(-1, i), v)  # every id scores what it claims
    assert all(len(set(row)) == k for row in i.tolist())  # no id twice
    # whichever of tied sub-keys is kept, every chosen i is among its half's k best (< k strictly better)
    ia, ja = i // n, i % n
    ranks_a = (a[:, None, :] > a.gather(-1, ia)[:, :, None]).sum(-1)  # how many strictly better
    assert (ia < n).all() and (ranks_a < k).all() and (ja < n).all()


@pytest.mark.parametrize("k", [1, 4, 16, 24, 32, 48])
def test_pk_topk_float32_and_float64_agree_id_for_id_under_ties(k):
    """float32 takes the vector selection where the CPU has AVX-512 (up to 64 candidates), float64 the
    scalar one; on sums exact in both (multiples of 1/8, 40 levels: ties in most rows) the ids must be
    the same, tie order included, and the values those of brute force."""
    g = torch.Generator().manual_seed(k)
    n = 256
    a = torch.randint(-20, 20, (400, n), generator=g).double() / 8
    b = torch.randint(-20, 20, (400, n), generator=g).double() / 8
    a_P, b_P = _grid(k)
    v64, i64 = kernels.pk_topk(a, b, k, a_P, b_P)
    v32, i32 = kernels.pk_topk(a.float(), b.float(), k, a_P, b_P)
    assert torch.equal(i32, i64) and torch.equal(v32.double(), v64)
    assert torch.equal(v64, _brute_topk(a, b, k)[0])
    assert all(len(set(row)) == k for row in i64.tolist())


def test_nan_scores_give_valid_ids_and_carry_the_nan():
    a, b = torch.randn(3, 64), torch.randn(3, 64)
    a[1, 5] = float("nan")
    v, i = kernels.pk_topk(a, b, 8, *_grid(8))
    assert ((0 <= i) & (i < 64 * 64)).all()
    assert torch.isnan(v[1]).any() and not torch.isnan(v[[0, 2]]).any()
    torch.testing.assert_close(v[[0, 2]], _brute_topk(a[[0, 2]], b[[0, 2]], 8)[0])


def test_product_key_topk_uses_the_kernels_and_agrees_with_torch(monkeypatch):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 7, 8, 256, generator=g), torch.randn(2, 7, 8, 256, generator=g)
    v, i = retrieval.product_key_topk(a, b, 16)
    assert v.shape == i.shape == (2, 7, 8, 16)
    monkeypatch.setattr(retrieval, "usable", lambda *t: None)  # PyTorch's ops
    v0, i0 = retrieval.product_key_topk(a, b, 16)
    assert torch.equal(v, v0) and torch.equal(i, i0)


def test_usable_only_without_autograd_on_cpu_floats():
    x = torch.randn(3, 4)
    assert usable(x) is kernels
    assert usable(x.half()) is None and usable(x, x.double()) is None
    w = torch.randn(3, 4, requires_grad=True)
    assert usable(w) is None
    with torch.no_grad():
        assert usable(w) is kernels


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("D", [1, 7, 48, 130])
def test_bag_kernels_equal_aten(dtype, D, monkeypatch):
    g = torch.Generator().manual_seed(D)
    T, K, N = 33, 12, 50
    rows = torch.randn(T, D, generator=g, dtype=dtype)
    table = torch.randn(N, D, generator=g, dtype=dtype)
    ids = torch.randint(0, N, (T, K), generator=g)
    ids[0] = 3  # one row retrieved by every slot of a token
    w = torch.randn(T, K, generator=g, dtype=dtype)
    offsets, offset2bag, sizes = bags_mod.bags(T, K, rows.device)
    dot = bags_mod.bag_dot(rows, table, ids, offsets, offset2bag)
    grad = bags_mod.bag_table_grad(rows, ids, offset2bag, sizes, N, w)
    monkeypatch.setattr(bags_mod, "usable", lambda *t: None)
    dot0 = bags_mod.bag_dot(rows, table, ids, offsets, offset2bag)
    grad0 = bags_mod.bag_table_grad(rows, ids, offset2bag, sizes, N, w)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-12, "atol": 1e-12}
    torch.testing.assert_close(dot, dot0, **tol)
    torch.testing.assert_close(grad, grad0, **tol)
    untouched = torch.ones(N, dtype=torch.bool)
    untouched[ids.flatten()] = False
    assert (grad[untouched] == 0).all()


def test_bag_scatter_is_the_same_for_any_thread_count():
    g = torch.Generator().manual_seed(2)
    rows, ids, w = torch.randn(64, 96, generator=g), torch.randint(0, 10, (64, 16), generator=g), torch.randn(64, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kernels.bag_scatter(rows, ids, w, 10)
        torch.set_num_threads(2)
        two = kernels.bag_scatter(rows, ids, w, 10)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bad_ids_are_refused():
    rows, table = torch.randn(2, 4), torch.randn(5, 4)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.bag_dot(rows, table, torch.tensor([[0, 5]]).expand(2, 2).contiguous())
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.bag_scatter(rows, torch.tensor([[0, -1], [1, 2]]), torch.ones(2, 2), 5)


def test_switched_off_falls_back_to_torch():
    code = ("from peerlm.kernels.cpu import cpu_kernels; import torch; from peerlm.retrieval import "
            "product_key_topk as f; assert cpu_kernels() is None; a = torch.randn(4, 16); "
            "print(f(a, a, 4)[0].shape)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "PEERLM_CPU_KERNELS": "0"}, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "(4, 4)" in out.stdout.replace("torch.Size([4, 4])", "(4, 4)") and out.stderr == ""


def test_bag_scatter_into_a_used_buffer_equals_a_fresh_result():
    g = torch.Generator().manual_seed(3)
    rows, ids, w = torch.randn(40, 24, generator=g), torch.randint(0, 30, (40, 6), generator=g), torch.randn(40, 6)
    fresh = kernels.bag_scatter(rows, ids, w, 30)
    buf = torch.full((37, 24), float("nan"))  # roomier than needed, and dirty
    out = kernels.bag_scatter(rows, ids, w, 30, buf)
    assert out.data_ptr() == buf.data_ptr() and out.shape == (30, 24)
    assert torch.equal(out, fresh) and not out.isnan().any()
    with pytest.raises(RuntimeError, match="out must be"):
        kernels.bag_scatter(rows, ids, w, 30, torch.empty(29, 24))


def _advised(t: torch.Tensor) -> bool:
    """Whether a mapping that overlaps ``t``'s memory carries the huge-page advice (``hg`` in its
    VmFlags, /proc/self/smaps): what madvise(MADV_HUGEPAGE) sets, whether or not the kernel then finds
    free huge pages."""
    lo_t, hi_t = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    overlaps, advised = False, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head, *rest = line.split()
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                overlaps = lo < hi_t and hi > lo_t
            elif overlaps and head == "VmFlags:":
                advised |= "hg" in rest
    return advised


def test_large_tables_and_their_adam_state_are_advised_onto_huge_pages():
    from pathlib import Path

    from peerlm import PEER
    from peerlm.kernels.cpu import advise_huge_pages
    from peerlm.optim import RowSparseAdamW

    if not Path("/proc/self/smaps").exists():
        pytest.skip("no /proc/self/smaps here")
    assert not advise_huge_pages(torch.empty(1000))  # small: left alone
    layer = PEER(576, 128**2, heads=2, topk=4, dim_key=16, sparse_grad=True)  # 36 MiB tables
    assert _advised(layer.w_down) and _advised(layer.w_up)
    opt = RowSparseAdamW([layer.w_up], lr=1e-3)
    layer(torch.randn(8, 576)).sum().backward()
    opt.step()
    assert _advised(opt.state[layer.w_up]["exp_avg"]) and _advised(opt.state[layer.w_up]["exp_avg_sq"])
    plain = torch.empty(128**2, 576)  # a fresh mapping of its own (over glibc's mmap threshold)
    assert not _advised(plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bag_update_is_bag_scatter_then_row_adamw_bit_for_bit(dtype):
    """The table update fused into the backward: the same gradient sums and the same AdamW arithmetic;
    targets past the rows (a spare row nobody keeps) are skipped; a plain SGD without state."""
    g = torch.Generator().manual_seed(4)
    T, K, D, N, U = 200, 6, 40, 1000, 300  # rows enough for both threads
    x, w = torch.randn(T, D, generator=g, dtype=dtype), torch.randn(T, K, generator=g, dtype=dtype)
    target = torch.randint(0, U + 1, (T, K), generator=g)  # U: the spare row
    target[target == 5] = 6  # a row without pairs: a zero gradient, as row_adamw_ takes it
    rows = torch.randperm(N, generator=g)[:U].sort().values
    p0 = torch.randn(N, D, generator=g, dtype=dtype)
    state0 = [torch.rand(N, D, generator=g, dtype=dtype) for _ in range(2)] + [torch.randint(0, 5, (N,), generator=g)]
    args = (1e-2, 0.9, 0.95, 1e-8, 0.1)
    grad = kernels.bag_scatter(x, target, w, U + 1)[:U].contiguous()
    ref, ref_state = p0.clone(), [s.clone() for s in state0]
    kernels.row_adamw_(ref, *ref_state, rows, grad, *args)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            got, got_state = p0.clone(), [s.clone() for s in state0]
            kernels.bag_update_(x, target, w, rows, got, *got_state, *args)
            assert torch.equal(got, ref) and all(torch.equal(a, b) for a, b in zip(got_state, ref_state)), n
    finally:
        torch.set_num_threads(threads)
    assert not torch.equal(got[rows], p0[rows])
    others = torch.ones(N, dtype=torch.bool)
    others[rows] = False
    assert torch.equal(got[others], p0[others]) and torch.equal(got_state[2][others], state0[2][others])
    sgd = p0.clone()
    kernels.bag_update_(x, target, w, rows, sgd, None, None, None, 0.5)
    expected = p0.clone()
    expected[rows] += -0.5 * grad
    torch.testing.assert_close(sgd, expected)


def test_bag_update_refuses_rows_out_of_order_or_range():
    x, w, p = torch.randn(2, 4), torch.ones(2, 2), torch.zeros(5, 4)
    target = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(RuntimeError, match="ascending and distinct"):
        kernels.bag_update_(x, target, w, torch.tensor([3, 1]), p, None, None, None, 0.1)
    with pytest.raises(RuntimeError, match="out of range"):
        kernels.bag_update_(x, target, w, torch.tensor([1, 5]), p, None, None, None, 0.1)
    with pytest.raises(RuntimeError, match="together"):
        kernels.bag_update_(x, target, w, torch.tensor([1, 2]), p, torch.zeros(5, 4), None, None, 0.1)


def test_row_adamw_bias_corrections_from_the_table_equal_computing_them():
    """The bias corrections are tabulated by step count after an update reaches it: a second update of
    the same state (counts now in the table) gives the bits of the first (computed on the spot), also
    for a count past the table's end, and both are AdamW's formula with the row's own count."""
    betas = (0.87, 0.931)  # a pair of this test's own: its table starts empty
    g = torch.Generator().manual_seed(9)
    N, D = 64, 24
    rows = torch.arange(0, N, 2)
    counts = torch.randint(0, 60, (N,), generator=g)
    counts[rows[-1]] = (1 << 20) + 7  # past the largest count tabulated
    p0, m0 = torch.randn(N, D, generator=g, dtype=torch.float64), torch.randn(N, D, generator=g, dtype=torch.float64)
    v0 = torch.rand(N, D, generator=g, dtype=torch.float64)
    grad = torch.randn(len(rows), D, generator=g, dtype=torch.float64)
    lr, eps, wd = 1e-2, 1e-8, 0.1
    results = []
    for _ in range(2):
        p, m, v, s = p0.clone(), m0.clone(), v0.clone(), counts.clone()
        kernels.row_adamw_(p, m, v, s, rows, grad, lr, *betas, eps, wd)
        results.append((p, m, v, s))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    p, _, _, s = results[0]
    assert torch.equal(s[rows], counts[rows] + 1)
    t = (counts[rows] + 1).to(torch.float64)[:, None]
    m_ref = m0[rows] + (1 - betas[0]) * (grad - m0[rows])
    v_ref = v0[rows] * betas[1] + (1 - betas[1]) * grad * grad
    denom = v_ref.sqrt() / (1 - betas[1] ** t).sqrt() + eps
    p_ref = p0[rows] * (1 - lr * wd) - lr / (1 - betas[0] ** t) * m_ref / denom
    torch.testing.assert_close(p[rows], p_ref, rtol=1e-12, atol=1e-12)
