"""Exact product-key retrieval (Lample et al. 2019; He 2024, "Mixture of A Million Experts", sec. 2).

N = n^2 keys are never stored one by one. Two sub-key tables C, C' (n rows of d_key/2 each) define
key (i, j) = [C_i ; C'_j] with flat index ``i * n + j``. For a query q = [q1 ; q2],

    score(i, j) = q1 . C_i + q2 . C'_j

and the exact top-k over all N keys is found in O(n d_key + k log k): top-k of each half, the grid of
summed candidates (of the k x k pairs of ranks only those with (a + 1)(b + 1) <= k can reach the top
k), top-k of the grid. It is exact because any key in the global top-k must have its
i among the top-k of q1 . C (else k keys (i', j) with better i' beat it), and likewise for j.

Shape legend used here and in the layers built on it:
    ...  leading dims (tokens, heads)      n   sub-keys per half (sqrt(N))
    K    top-k                             Dk  d_key (query width), Dk/2 per half
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from peerlm.fused import sampled_dot
from peerlm.kernels.cpu import usable

__all__ = ["product_key_topk", "ProductKeys", "split_index"]


def product_key_topk(scores_a: Tensor, scores_b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact top-k of the n*n sums ``scores_a[..., i] + scores_b[..., j]``.

    Args:
        scores_a, scores_b: (..., n) sub-key scores of the two query halves (same shape).
        k: how many to return, 1 <= k <= n.

    Returns:
        values (..., k), sorted descending, and indices (..., k) into the flat n*n grid, ``i * n + j``.
        Values are differentiable with respect to both score tensors.
    """
    if scores_a.shape != scores_b.shape:
        raise ValueError(f"scores_a {tuple(scores_a.shape)} and scores_b {tuple(scores_b.shape)} must match")
    n = scores_a.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    kernels = usable(scores_a, scores_b)
    if kernels is not None:  # the same values; one pass per row (peerlm/kernels/cpu.cpp)
        a_P, b_P = _grid_candidates(k, scores_a.device)
        lead = scores_a.shape[:-1]
        with torch.profiler.record_function("peerlm::pk_topk"):
            values_RK, indices_RK = kernels.pk_topk(scores_a.reshape(-1, n).contiguous(),
                                                    scores_b.reshape(-1, n).contiguous(), k, a_P, b_P)
        return values_RK.view(*lead, k), indices_RK.view(*lead, k)
    va_K, ia_K = scores_a.topk(k, dim=-1)  # (..., K), sorted descending
    vb_K, ib_K = scores_b.topk(k, dim=-1)  # (..., K)
    # the grid's rows a = 0..k-1, each the b < k // (a + 1) that can reach the top k (_grid_candidates)
    grid_P = torch.cat([va_K[..., a:a + 1] + vb_K[..., : k // (a + 1)] for a in range(k)], dim=-1)  # (..., P)
    a_P, b_P = _grid_candidates(k, scores_a.device)
    values_K, pos_K = grid_P.topk(k, dim=-1)  # (..., K), sorted descending
    i_K = ia_K.gather(-1, a_P[pos_K])
    j_K = ib_K.gather(-1, b_P[pos_K])
    indices_K = i_K * n + j_K
    assert indices_K.shape == values_K.shape == scores_a.shape[:-1] + (k,)
    return values_K, indices_K


def _grid_candidates(k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The (a, b) rank pairs of the k x k candidate grid with (a + 1)(b + 1) <= k (a, b from 0).

    With both halves sorted descending, pair (a, b) is beaten or tied by every (a', b') with a' <= a
    and b' <= b: (a + 1)(b + 1) - 1 others. Where that is k or more it cannot be needed for the top k,
    so only P = sum_a floor(k / (a + 1)) pairs are scored (50 of 256 at k = 16, 140 of 1024 at k = 32)."""
    pairs = [(a, b) for a in range(k) for b in range(k // (a + 1))]  # the order product_key_topk lays out
    a_P, b_P = torch.tensor(pairs, dtype=torch.long, device=device).t()
    return a_P.contiguous(), b_P.contiguous()


def split_index(indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Inverse of ``i * n + j``: flat expert ids -> (i, j) sub-key ids."""
    return torch.div(indices, n, rounding_mode="floor"), indices % n


class _GatherRescore(torch.autograd.Function):
    """Re-scoring from the full sub-key scores: forward gathers ``s_a[i] + s_b[j]`` (already computed
    without autograd for the top-k), backward scatters the score gradient into (R, n) and runs two
    matmuls per half. That is O(n Dk) per row instead of the embedding-bag path's O(K Dk), but on BLAS
    instead of per-row gathers, which is faster in time while n is a small multiple of K
    (``DENSE_RESCORE_RATIO``). Same gradient; FLOP accounting (``peerlm.flops``) counts the O(K Dk)
    re-scoring either way."""

    @staticmethod
    def forward(ctx, q1_RD, q2_RD, c_a, c_b, s_a_Rn, s_b_Rn, i_RK, j_RK):
        ctx.save_for_backward(q1_RD, q2_RD, c_a, c_b, i_RK, j_RK)
        ctx.n = s_a_Rn.shape[-1]
        return s_a_Rn.gather(-1, i_RK) + s_b_Rn.gather(-1, j_RK)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout_RK):
        q1_RD, q2_RD, c_a, c_b, i_RK, j_RK = ctx.saved_tensors
        R, n = dout_RK.shape[0], ctx.n
        grads = []
        for q_RD, c_nD, ids_RK in ((q1_RD, c_a, i_RK), (q2_RD, c_b, j_RK)):
            ds_Rn = dout_RK.new_zeros(R, n).scatter_add_(-1, ids_RK, dout_RK)
            grads.append((ds_Rn @ c_nD, ds_Rn.t() @ q_RD))
        (dq1, dc_a), (dq2, dc_b) = grads
        return dq1, dq2, dc_a, dc_b, None, None, None, None


# the dense re-scoring backward pays n / K times the FLOPs of the sparse one; up to this ratio its BLAS
# matmuls still take less time than PyTorch's embedding-bag kernels (n 256, K 16: about 3x faster). With
# peerlm's CPU kernels (peerlm.kernels.cpu) the sparse path is the faster one, and is taken instead.
DENSE_RESCORE_RATIO = 16
# sub-key scores the non-differentiable search holds at once, in elements (8 MiB of float32): a block of
# tokens at a time, never the whole batch's (``ProductKeys.forward``)
SCORE_BLOCK = 2**21


class ProductKeys(nn.Module):
    """Sub-key tables for ``heads`` query heads over one pool of n*n keys.

    With ``shared=True`` (the paper) every head scores against the same C, C'. With ``shared=False``
    each head has its own pair of tables (as some public code does; not the paper).

    ``forward(q)`` takes queries (..., heads, Dk) and returns the top-k (scores, ids), each
    (..., heads, K). ``differentiable=False`` runs the O(n) scoring without autograd and re-scores
    only the K winners with gathers, so backward costs O(K Dk) instead of O(n Dk) per head; the
    gradient is the same because the top-k selection itself is piecewise constant.
    """

    def __init__(self, num_keys: int, dim_key: int, heads: int, shared: bool = True):
        super().__init__()
        n = math.isqrt(num_keys)
        assert n * n == num_keys and dim_key % 2 == 0 and heads >= 1
        self.n, self.dim_key, self.heads, self.shared = n, dim_key, heads, shared
        tables = 1 if shared else heads
        # keys[t, half, i, :]: t = table (one, or one per head), half 0 -> C, half 1 -> C'
        self.keys = nn.Parameter(torch.empty(tables, 2, n, dim_key // 2))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # unit-variance query halves against N(0, 2/Dk) sub-keys give unit-variance scores
        nn.init.normal_(self.keys, std=(2.0 / self.dim_key) ** 0.5)

    def half_scores(self, q: Tensor) -> tuple[Tensor, Tensor]:
        """Queries (..., H, Dk) -> full sub-key scores (..., H, n) for each half."""
        q = q.to(torch.promote_types(q.dtype, torch.float32))
        q1, q2 = q.chunk(2, dim=-1)  # (..., H, Dk/2) each
        keys = self.keys.to(q.dtype)
        if self.shared:
            s_a = q1 @ keys[0, 0].t()  # (..., H, n)
            s_b = q2 @ keys[0, 1].t()
        else:
            s_a = torch.einsum("...hd,hnd->...hn", q1, keys[:, 0])
            s_b = torch.einsum("...hd,hnd->...hn", q2, keys[:, 1])
        return s_a, s_b

    def rescore(self, q: Tensor, indices: Tensor) -> Tensor:
        """Differentiable scores of given expert ids: (..., H, Dk), (..., H, K) -> (..., H, K)."""
        q = q.to(torch.promote_types(q.dtype, torch.float32))
        lead, (H, K), half = indices.shape[:-2], indices.shape[-2:], self.dim_key // 2
        q1, q2 = (t.reshape(-1, half) for t in q.chunk(2, dim=-1))  # (R, Dk/2), R = tokens * H
        i, j = split_index(indices.reshape(-1, K), self.n)  # (R, K)
        keys = self.keys.to(q.dtype)
        if self.shared:
            c_a, c_b = keys[0, 0], keys[0, 1]  # (n, Dk/2)
        else:
            # one table per head, stacked: head h's sub-key i is row h * n + i
            offset = (torch.arange(H, device=q.device) * self.n).repeat(q1.shape[0] // H).unsqueeze(-1)
            c_a, c_b = keys[:, 0].reshape(-1, half), keys[:, 1].reshape(-1, half)
            i, j = i + offset, j + offset
        scores = sampled_dot(q1, c_a, i) + sampled_dot(q2, c_b, j)  # (R, K)
        return scores.view(*lead, H, K)

    def forward(self, q: Tensor, k: int, differentiable: bool = True) -> tuple[Tensor, Tensor]:
        assert q.shape[-2:] == (self.heads, self.dim_key), (tuple(q.shape), self.heads, self.dim_key)
        if differentiable:
            s_a, s_b = self.half_scores(q)
            return product_key_topk(s_a, s_b, k)
        # scored SCORE_BLOCK sub-key scores at a time: the whole batch's (..., H, 2n) scores at once were
        # the layer's largest transient above its tables (128 MiB at 2048 tokens, 8 heads, n 1024); each
        # row's scores are the same numbers either way, so the ids are the same
        q_TH = q.detach().reshape(-1, self.heads, self.dim_key)
        step = max(1, SCORE_BLOCK // (2 * self.n * self.heads))
        with torch.no_grad():
            first = self.half_scores(q_TH[:step])
        if self.shared and self.n <= DENSE_RESCORE_RATIO * k and usable(first[0]) is None:  # all at once
            with torch.no_grad():
                s_a, s_b = first if q_TH.shape[0] <= step else self.half_scores(q_TH)
                s_a, s_b = s_a.view(*q.shape[:-1], self.n), s_b.view(*q.shape[:-1], self.n)
                _, indices = product_key_topk(s_a, s_b, k)
            return self._dense_rescore(q, s_a, s_b, indices), indices
        with torch.no_grad():
            ids = [product_key_topk(*first, k)[1]]
            ids += [product_key_topk(*self.half_scores(q_TH[t:t + step]), k)[1]
                    for t in range(step, q_TH.shape[0], step)]
            indices = (ids[0] if len(ids) == 1 else torch.cat(ids)).view(*q.shape[:-1], k)
        return self.rescore(q, indices), indices

    def _dense_rescore(self, q: Tensor, s_a: Tensor, s_b: Tensor, indices: Tensor) -> Tensor:
        """``rescore`` through ``_GatherRescore`` (shared keys): the same scores and gradients."""
        q = q.to(s_a.dtype)
        lead, K, half = indices.shape[:-1], indices.shape[-1], self.dim_key // 2
        q1, q2 = (t.reshape(-1, half) for t in q.chunk(2, dim=-1))  # (R, Dk/2)
        i, j = split_index(indices.reshape(-1, K), self.n)  # (R, K)
        keys = self.keys.to(q.dtype)
        scores = _GatherRescore.apply(q1, q2, keys[0, 0], keys[0, 1], s_a.reshape(-1, self.n),
                                      s_b.reshape(-1, self.n), i, j)
        return scores.view(*lead, K)
