"""Exact product-key retrieval (Lample et al. 2019; He 2024, "Mixture of A Million Experts", sec. 2).

N = n^2 keys are never stored one by one. Two sub-key tables C, C' (n rows of d_key/2 each) define
key (i, j) = [C_i ; C'_j] with flat index ``i * n + j``. For a query q = [q1 ; q2],

    score(i, j) = q1 . C_i + q2 . C'_j

and the exact top-k over all N keys is found in O((n + k^2) d_key): top-k of each half, the k x k grid
of summed candidates, top-k of the grid. It is exact because any key in the global top-k must have its
i among the top-k of q1 . C (else k keys (i', j) with better i' beat it), and likewise for j.

Shape legend used here and in the layers built on it:
    ...  leading dims (tokens, heads)      n   sub-keys per half (sqrt(N))
    K    top-k                             Dk  d_key (query width), Dk/2 per half
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from peerlm.fused import sampled_dot

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
    va_K, ia_K = scores_a.topk(k, dim=-1)  # (..., K)
    vb_K, ib_K = scores_b.topk(k, dim=-1)  # (..., K)
    grid_KK = va_K.unsqueeze(-1) + vb_K.unsqueeze(-2)  # (..., K, K): [a-candidate, b-candidate]
    values_K, flat_K = grid_KK.flatten(-2).topk(k, dim=-1)  # (..., K), sorted descending
    i_K = ia_K.gather(-1, flat_K // k)
    j_K = ib_K.gather(-1, flat_K % k)
    indices_K = i_K * n + j_K
    assert indices_K.shape == values_K.shape == scores_a.shape[:-1] + (k,)
    return values_K, indices_K


def split_index(indices: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """Inverse of ``i * n + j``: flat expert ids -> (i, j) sub-key ids."""
    return torch.div(indices, n, rounding_mode="floor"), indices % n


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
        with torch.no_grad():
            s_a, s_b = self.half_scores(q.detach())
            _, indices = product_key_topk(s_a, s_b, k)
        return self.rescore(q, indices), indices
