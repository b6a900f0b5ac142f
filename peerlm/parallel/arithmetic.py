"""Sizing arithmetic for PEER expert tables sharded across P ranks: communication per token, memory per rank.

A PEER layer's two (N, D) tables are most of a PEER model (2 * 1024^2 * 2048 = 4.3e9 parameters at the
paper's N and d_model 2048). Plain FSDP all-gathers a whole parameter before each use, i.e. moves the
full table to read the h*k rows a token needs, so the tables are sharded for good instead, in one of two
layouts. Here every rank holds its own T tokens (data parallel: each rank reads its own batch), K = h*k
experts per token, and volumes count the bytes one rank sends (as many as it receives) per token of its
own batch, forward plus backward, in the bandwidth-optimal collectives (direct all-to-all, ring
reduce-scatter / all-gather).

Column sharding (``peerlm.parallel.experts``): rank r holds columns [r D/P, (r+1) D/P) of every u_i
and v_i. Each rank works on every token of the group, on its own columns:

    forward   x column slices, all-to-all             (P-1)/P * D * act_bytes
              expert ids, all-gather                  (P-1) * K * index_bytes
              partial u.x, reduce-scatter             (P-1) * K * score_bytes
              gate * act(u.x), all-gather             (P-1) * K * score_bytes
              y column slices back, all-to-all        (P-1)/P * D * act_bytes
    backward  dy column slices, all-to-all            (P-1)/P * D * act_bytes
              partial v.dy, reduce-scatter            (P-1) * K * score_bytes
              dz, all-gather                          (P-1) * K * score_bytes
              dx column slices back, all-to-all       (P-1)/P * D * act_bytes
    total     4 (P-1)/P D act_bytes + (P-1) K (index_bytes + 4 score_bytes)

The issue's "one all-reduce of the (tokens, h*k) scores" is here split into its two halves, a
reduce-scatter to the token's own rank and an all-gather, with the activation and gate applied between
them, so the gates never travel on their own. (When the tokens are already replicated over the group,
as in a tensor-parallel group, the x all-to-all and the id all-gather disappear and the rest is the
all-reduce of the scores plus a gather of y.)

Row sharding: rank r owns experts [r N/P, (r+1) N/P). A token's K (expert, gate) pairs go to the ranks
owning those experts; x is sent once to each distinct remote owner and a partial y comes back from
each. With uniform routing a token meets R = (P-1)(1 - (1 - 1/P)^K) distinct remote owners on average:

    forward   x to each remote owner                  R * D * act_bytes
              (row slot, expert id, gate) per remote pair   K (P-1)/P * (2 index_bytes + score_bytes)
              partial y back                          R * D * act_bytes
    backward  dy to each remote owner, partial dx back   2 R * D * act_bytes
              d gate per remote pair                  K (P-1)/P * score_bytes
    total     4 R D act_bytes + K (P-1)/P (2 index_bytes + 2 score_bytes)

plus an exchange of message sizes each call, and a load that follows the routing (a popular expert's
rank does more work and receives more).

The choice: column sharding. Its D-term is at most 4 D act_bytes per token whatever P; the row
layout's is 4 R D act_bytes with R close to P-1 whenever K >= P (R = 7.0 at P = 8 and 54.6 at P = 64
for K = 128). The column layout pays instead (P-1) K (index_bytes + 4 score_bytes) for ids and
scores, which grows with P as the row layout's D-term does, but with K * 20 bytes in place of 4 D
act_bytes. At K = 128, int32 ids and fp32 scores, column sharding moves less for every D from about
400 up in bf16 activations (200 in fp32) at any P from 2 to 64, and at D = 2048 for every P below
about 750. At the paper's shape (D 2048, K 128, bf16) it moves 10.8 KB per token at P = 2 against
17.4 KB for rows, 32 KB against 116 KB at P = 8 and 177 KB against 897 KB at P = 64. Besides: its
messages have fixed sizes and its work is balanced whatever the routing, each rank's shard is an
ordinary (N, D/P) table so peerlm's embedding-bag path runs on it unchanged, and a row-sparse gradient
touches the same rows on every rank (the batch's distinct experts), so the row-sparse optimizer
behaves as in one process.

A PKM value table sharded by columns is the second half alone: ids and gates all-gathered, y back,
dy out, partial v.dy reduce-scattered: 2 (P-1)/P D act_bytes + (P-1) K (index_bytes + 2 score_bytes).

Memory per rank (``memory_per_rank``), column sharding: tables, their gradients (dense, or the rows
retrieved by the group's batch for ``sparse_grad``) and AdamW's two moments all scale as 1/P; what
the layer keeps for backward is the rank's x columns for every token of the group (T D act_bytes, as
many bytes as its own x), and the ids and gated activations of every token of the group (P T K
entries: the price of the layout, which grows with P at a fixed batch per rank).
"""

from __future__ import annotations

import math

__all__ = ["COLUMN", "ROW", "comm_bytes_per_token", "memory_per_rank", "distinct_rows"]

COLUMN, ROW = "column", "row"


def _remote_owners(ranks: int, k: int) -> float:
    """Expected number of distinct other ranks owning at least one of a token's k uniform experts."""
    if ranks == 1:
        return 0.0
    return (ranks - 1) * (1.0 - (1.0 - 1.0 / ranks) ** k)


def comm_bytes_per_token(dim: int, heads: int, topk: int, ranks: int, sharding: str = COLUMN,
                         act_bytes: int = 2, score_bytes: int = 4, index_bytes: int = 4) -> dict[str, float]:
    """Bytes one rank sends per token of its own batch for one PEER layer (forward, backward, total).

    See the module docstring for the terms. ``act_bytes``: x, y and their gradients (2 for bf16);
    ``score_bytes``: u.x, gates and their gradients (4, fp32); ``index_bytes``: expert ids (4 while
    N < 2^31). Uniform routing for the row layout.
    """
    if sharding not in (COLUMN, ROW):
        raise ValueError(f"sharding must be {COLUMN!r} or {ROW!r}, got {sharding!r}")
    if min(dim, heads, topk, ranks) < 1:
        raise ValueError(f"dim, heads, topk and ranks must be >= 1, got {dim}, {heads}, {topk}, {ranks}")
    P, K, D = ranks, heads * topk, dim
    if sharding == COLUMN:
        slices = (P - 1) / P * D * act_bytes  # one all-to-all of column slices
        forward = 2 * slices + (P - 1) * K * (index_bytes + 2 * score_bytes)
        backward = 2 * slices + (P - 1) * K * 2 * score_bytes
    else:
        R = _remote_owners(P, K)
        pairs = K * (P - 1) / P
        forward = 2 * R * D * act_bytes + pairs * (2 * index_bytes + score_bytes)
        backward = 2 * R * D * act_bytes + pairs * score_bytes
    return {"forward": forward, "backward": backward, "total": forward + backward}


def distinct_rows(num_experts: int, draws: int) -> float:
    """Expected number of distinct experts among ``draws`` uniform retrievals."""
    return num_experts * -math.expm1(draws * math.log1p(-1.0 / num_experts))


def memory_per_rank(num_experts: int, dim: int, ranks: int, heads: int = 8, topk: int = 16,
                    tokens_per_rank: int = 8192, param_bytes: int = 4, act_bytes: int = 4,
                    sparse_grad: bool = False) -> dict[str, float]:
    """Bytes one rank holds for one column-sharded PEER layer's expert tables.

    ``params``: both (N, D/P) shards; ``grads``: their gradients, dense, or with ``sparse_grad`` the
    rows retrieved by the group's P * tokens_per_rank tokens (expected distinct count under uniform
    routing) with their int64 row ids; ``adamw``: exp_avg and exp_avg_sq, in the parameters' dtype
    (the row-sparse AdamW adds an int64 step count per row); ``activations``: what the layer keeps for
    backward, for ``tokens_per_rank`` tokens of each rank (its x columns for the group's tokens, the
    group's int64 ids and gated activations, its own tokens' u.x and gates). Transient communication
    buffers (about two more copies of the largest saved tensor) and the routing (query projection,
    norm, sub-keys: replicated and small) are not counted.
    """
    if dim % ranks:
        raise ValueError(f"dim {dim} is not divisible by {ranks} ranks; column sharding needs D % P == 0")
    P, K, C, T = ranks, heads * topk, dim // ranks, tokens_per_rank
    params = 2 * num_experts * C * param_bytes
    if sparse_grad:
        rows = distinct_rows(num_experts, P * T * K)
        grads = 2 * rows * (C * param_bytes + 8)
    else:
        grads = params
    adamw = 2 * params + (2 * num_experts * 8 if sparse_grad else 0)
    activations = T * dim * act_bytes + P * T * K * (8 + act_bytes) + 2 * T * K * act_bytes
    return {"params": params, "grads": grads, "adamw": adamw, "activations": activations,
            "total": params + grads + adamw + activations}
