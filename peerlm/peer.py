"""PEER: Parameter Efficient Expert Retrieval (He 2024, "Mixture of A Million Experts", arXiv 2407.04153).

A PEER layer replaces a feed-forward block with N = n^2 one-neuron experts e_i(x) = act(u_i . x) v_i.
Each of h heads projects x to a query, retrieves its exact top-k experts from ONE shared pool through
product keys (``peerlm.retrieval``), gates them with a softmax over its k scores (``gate``: or over a
token's h*k scores, or a sigmoid per score), and the head outputs are summed:
f(x) = sum_h sum_{i in I_h} g_{h,i}(x) e_i(x). It is an MLP with h*k hidden neurons assembled per token.

Four ways to compute the experts, behind ``impl=``:
- ``"reference"``: the paper's Algorithm 1: gather u and v rows, einsum, act, gate, einsum. Keeps two
  (tokens, h, k, d) tensors for backward; the yardstick for the other paths.
- ``"fused"``: ``peerlm.fused.PEERExperts``, a custom autograd function built on embedding-bag
  kernels: it never forms a (tokens, h, k, d) tensor, keeps O(tokens * h * k) for backward and re-reads
  rows there; dense or row-sparse table gradients. Retrieval runs its
  O(sqrt(N)) scoring without autograd and re-scores the k winners differentiably (same gradient).
- ``"triton"``: ``peerlm.kernels.peer_triton``, Triton kernels for CUDA (extra ``triton``, imported on
  first use) with the fused path's gradients and retrieval; the table-gradient reduction is
  deterministic by default, atomic with ``peerlm.kernels.set_triton_reduction("atomic")``.
- ``"auto"``: the fastest correct path available: ``"triton"`` on CUDA when Triton imports, else
  ``"fused"`` (always on CPU).

Column-sharded tables are one more way to store and compute the experts under the same forward, init
and validation: ``peerlm.parallel.shard_peer`` (or ``shard_experts`` on a model) sets the layer's
``shard`` and keeps this rank's (N, D/P) columns of ``w_down`` and ``w_up``; ``reset_parameters`` then
draws the whole tables' stream and keeps those columns (``peerlm.tables``), and forward's expert step
runs ``peerlm.parallel.experts.column_sharded_experts``, the fused path on the local shard with the
ranks' collectives, whatever ``impl`` says.

Choices the paper leaves open (documented defaults):
- activation GELU; d_key 128; query BatchNorm (``query_norm="running"`` is the causal-safe variant,
  see ``peerlm.norms``); one set of product keys shared by all heads (``shared_keys=False`` for
  per-head keys).
- init: u_i ~ N(0, 1/d) so that u_i . x has unit variance for unit-variance x; v_i ~ N(0, 1/d), which
  with softmax gates (summing to 1 per head) gives output RMS about sqrt(h * E[act(z)^2] / (k * d))
  times the input RMS at init (0.02 for d=512, h=8, k=16, GELU; 1/h of that with
  ``gate="softmax-token"``): small next to the residual stream, as for the down-scaled output
  projections of GPT-2. Sub-keys ~ N(0, 2/d_key), so that unit-variance
  normalised queries give unit-variance scores. Query projection ~ N(0, 1/d), unit-variance queries
  for unit-variance x (as PKM's), so that the scores, and hence the gate temperature, start alike
  with and without the query norm.

Shape legend: T tokens (leading dims flattened), D model dim, H heads, K top-k, Dk d_key,
N experts, n = sqrt(N).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerlm.bags import ACTIVATIONS
from peerlm.config import PEERConfig
from peerlm.fused import peer_experts
from peerlm.norms import make_query_norm
from peerlm.retrieval import ProductKeys
from peerlm.tables import ColumnShard, normal_table_, shard_repr
from peerlm.usage import UsageTracking

__all__ = ["PEER", "peer_cost"]

_OPTIONS = (
    "heads", "topk", "dim_key", "activation", "gate", "query_norm", "impl", "sparse_grad",
    "shared_keys", "track_usage", "device", "dtype",
)


def peer_cost(dim: int, num_experts: int, heads: int = 8, topk: int = 16, dim_key: int = 128,
              shared_keys: bool = True, query_norm: str = "batchnorm") -> dict:
    """Parameters and forward FLOPs per token of a PEER layer, without allocating it.

    FLOPs count a multiply-add as 2. Retrieval is counted: query projection, sub-key scores of both
    halves over all n sub-keys, and the k x k candidate grid (one add each; the top-k compares are of
    the same order and not counted). The fused path's differentiable re-scoring of the k winners
    (2 h k d_key, under 2% of the sub-key scoring) is an implementation cost, not counted.
    ``active_params`` counts what one token touches: the query projection, every sub-key (all are
    scored), the norm's affine and h*k (u, v) pairs.
    """
    n = math.isqrt(num_experts)
    norm = 2 * heads * dim_key if query_norm != "none" else 0
    query = dim * heads * dim_key
    keys = (1 if shared_keys else heads) * n * dim_key
    experts = 2 * num_experts * dim
    flops = {
        "query": 2 * dim * heads * dim_key,
        "subkey_scores": 2 * heads * n * dim_key,
        "candidate_grid": heads * topk * topk,
        "experts": 4 * heads * topk * dim,
    }
    flops["total"] = sum(flops.values())
    return {
        "params": experts + query + keys + norm,
        "active_params": 2 * heads * topk * dim + query + keys + norm,
        "flops": flops,
    }


class PEER(UsageTracking, nn.Module):
    """A PEER layer, (..., dim) -> (..., dim). See the module docstring for the math and options.

    Args:
        dim: model width d.
        num_experts: N, a perfect square.
        heads: h query heads sharing the expert pool.
        topk: k experts per head, at most sqrt(N).
        dim_key: query / key width (even: two halves).
        activation: "gelu", "relu" or "silu".
        gate: "softmax" over each head's k scores (paper), "sigmoid" of each score, or
            "softmax-token" over all h*k scores of a token (gates sum to 1 per token, not per head,
            so the output's scale does not grow with h at fixed h*k).
        query_norm: "batchnorm" (paper), "running" (causal-safe) or "none".
        impl: "auto", "reference", "fused" or "triton" (see the module docstring).
        sparse_grad: expert tables get row-sparse COO gradients holding only retrieved rows.
        shared_keys: one set of product keys for all heads (paper); False gives each head its own.
        track_usage: accumulate each expert's gate mass (see ``usage``).

    ``shard`` is None, or the ``ColumnShard`` of this rank when ``peerlm.parallel.shard_peer`` has
    column-sharded the tables (see the module docstring).
    """

    TABLES = ("w_down", "w_up")  # the (N, D) tables, which a ColumnShard splits by columns

    def __init__(self, dim: int, num_experts: int, heads: int = 8, topk: int = 16, dim_key: int = 128,
                 activation: str = "gelu", gate: str = "softmax", query_norm: str = "batchnorm",
                 impl: str = "auto", sparse_grad: bool = False, shared_keys: bool = True,
                 track_usage: bool = False, device=None, dtype=None,
                 **unknown):
        super().__init__()
        if unknown:
            hints = {k: difflib.get_close_matches(k, _OPTIONS, n=1) for k in unknown}
            msg = ", ".join(f"{k!r}" + (f" (did you mean {h[0]!r}?)" if h else "") for k, h in hints.items())
            raise ValueError(f"unknown PEER option(s) {msg}; valid options: {', '.join(_OPTIONS)}")
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        # the options are a PEERConfig's: validated there, with its messages, before anything is allocated
        PEERConfig(num_experts=num_experts, heads=heads, topk=topk, dim_key=dim_key, activation=activation, gate=gate,
                   query_norm=query_norm, shared_keys=shared_keys, impl=impl, sparse_grad=sparse_grad)
        factory = {"device": device, "dtype": dtype}
        self.dim, self.num_experts, self.heads, self.topk, self.dim_key = dim, num_experts, heads, topk, dim_key
        self.n = math.isqrt(num_experts)
        self.activation, self.gate, self.query_norm, self.impl = activation, gate, query_norm, impl
        self.sparse_grad, self.shared_keys = sparse_grad, shared_keys

        self.query = nn.Linear(dim, heads * dim_key, bias=False, **factory)
        self.norm = make_query_norm(query_norm, heads * dim_key)
        self.keys = ProductKeys(num_experts, dim_key, heads, shared=shared_keys)
        self.w_down = nn.Parameter(torch.empty(num_experts, dim, **factory))  # rows u_i
        self.w_up = nn.Parameter(torch.empty(num_experts, dim, **factory))  # rows v_i
        given = {k: v for k, v in factory.items() if v is not None}
        if given:
            self.norm.to(**given)
            self.keys.to(**given)
        self.usage_slots = num_experts
        self._init_usage(track_usage)
        self.shard: ColumnShard | None = None  # this rank's columns of the tables (peerlm.parallel.shard_peer)
        self.grad_reduction = "mean"  # of a sharded table's gradient over the ranks (peerlm.parallel.experts)
        # with sparse_grad on the fused path: (distinct ids, counts) -> the rows that get a table gradient
        # (peerlm.bags.table_grads; set by sparse memory finetuning, peerlm.continual.memory.SparseRows)
        self.grad_rows: Callable[[Tensor, Tensor], Tensor] | None = None
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- set-up

    def reset_parameters(self) -> None:
        """Initialise every parameter (also after ``to_empty`` from the meta device)."""
        if self.w_down.is_meta:
            return
        std = self.dim**-0.5
        normal_table_(self.w_down, std, self.shard)
        normal_table_(self.w_up, std, self.shard)
        nn.init.normal_(self.query.weight, std=std)
        self.keys.reset_parameters()
        if hasattr(self.norm, "reset_parameters"):  # BatchNorm also resets its running stats
            self.norm.reset_parameters()
        self.reset_usage()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_experts={self.num_experts}, heads={self.heads}, topk={self.topk}, "
                f"dim_key={self.dim_key}, activation={self.activation}, gate={self.gate}, "
                f"query_norm={self.query_norm}, impl={self.impl}, sparse_grad={self.sparse_grad}"
                + shard_repr(self))

    # ---------------------------------------------------------------------------------- forward

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"PEER expects a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"PEER expects a floating-point input, got {x.dtype}; cast with x.float()")
        if x.dim() == 0 or x.shape[-1] != self.dim:
            raise ValueError(f"PEER expects input of shape (..., {self.dim}), got {tuple(x.shape)}")

    def _route(self, x_TD: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        T = x_TD.shape[0]
        w = self.query.weight
        route_dtype = torch.float64 if w.dtype == torch.float64 else torch.float32
        with torch.autocast(x_TD.device.type, enabled=False):  # routing in fp32 (fp64 for gradcheck)
            q = self.query(x_TD.to(w.dtype)).to(route_dtype)
            q_THDk = self.norm(q).view(T, self.heads, self.dim_key)
            return self.keys(q_THDk, self.topk, differentiable=differentiable)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Pre-gate scores and expert ids the forward pass uses, each (..., heads, topk).

        Runs the query norm as forward does (in training mode BatchNorm updates its running stats).
        """
        self._check_input(x)
        x_TD = x.reshape(-1, self.dim)
        scores, ids = self._route(x_TD, differentiable=True)
        lead = x.shape[:-1] + (self.heads, self.topk)
        return scores.view(lead), ids.view(lead)

    def _gates(self, scores_THK: Tensor) -> Tensor:
        if self.gate == "softmax":
            return F.softmax(scores_THK, dim=-1)  # scores are fp32 (or fp64) already
        if self.gate == "softmax-token":
            return F.softmax(scores_THK.flatten(-2), dim=-1).view(scores_THK.shape)
        return torch.sigmoid(scores_THK)

    def resolved_impl(self) -> str:
        """The path ``forward`` takes: ``impl``, with ``"auto"`` resolved for where the tables live;
        ``"fused"`` for sharded tables, whose path is the fused one on this rank's columns."""
        if self.shard is not None:
            return "fused"
        if self.impl != "auto":
            return self.impl
        from peerlm.kernels import triton_available  # Triton itself is only imported on CUDA

        return "triton" if self.w_down.is_cuda and triton_available() else "fused"

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x_TD = x.reshape(-1, self.dim)
        impl = self.resolved_impl()
        if x_TD.shape[0] == 0 and impl == "triton":
            impl = "fused"  # no kernel to launch; the empty output still belongs to the graph (zero gradients)
        scores_THK, ids_THK = self._route(x_TD, differentiable=impl == "reference")
        g_THK = self._gates(scores_THK)
        if self.track_usage:
            self._accumulate_usage(ids_THK, g_THK)
        return self._experts(x_TD, ids_THK, g_THK, impl).view(x.shape)

    def _experts(self, x_TD: Tensor, ids_THK: Tensor, g_THK: Tensor, impl: str) -> Tensor:
        """The expert mixture (T, D) on the path ``impl``, or on this rank's columns of sharded tables."""
        if self.shard is not None:
            from peerlm.parallel.experts import column_sharded_experts  # peerlm.parallel imports this module

            return column_sharded_experts(x_TD, ids_THK.flatten(1), g_THK.flatten(1), self.w_down, self.w_up,
                                          self.shard, self.activation, self.sparse_grad, self.grad_reduction)
        if impl == "reference":
            return self._experts_reference(x_TD, ids_THK, g_THK)
        if impl == "triton":
            from peerlm.kernels import peer_experts_triton  # imports Triton on first use

            return peer_experts_triton(x_TD, ids_THK.flatten(1), g_THK.flatten(1), self.w_down, self.w_up,
                                       self.activation, self.sparse_grad)
        return peer_experts(x_TD, ids_THK.flatten(1), g_THK.flatten(1), self.w_down, self.w_up,
                            self.activation, self.sparse_grad, self.grad_rows)

    def _experts_reference(self, x_TD: Tensor, ids_THK: Tensor, g_THK: Tensor) -> Tensor:
        """Algorithm 1 of the paper: materialises (T, H, K, D) twice."""
        u_THKD = F.embedding(ids_THK, self.w_down, sparse=self.sparse_grad).to(x_TD.dtype)
        v_THKD = F.embedding(ids_THK, self.w_up, sparse=self.sparse_grad).to(x_TD.dtype)
        z_THK = torch.einsum("thkd,td->thk", u_THKD, x_TD)
        h_THK = ACTIVATIONS[self.activation](z_THK) * g_THK.to(x_TD.dtype)
        return torch.einsum("thk,thkd->td", h_THK, v_THKD)

    # ------------------------------------------------------------------------------- accounting

    def cost(self) -> dict:
        return peer_cost(self.dim, self.num_experts, self.heads, self.topk, self.dim_key,
                         self.shared_keys, self.query_norm)

    def num_params(self) -> int:
        """Total parameters (expert tables, query projection, sub-keys, norm affine)."""
        return self.cost()["params"]

    def active_params_per_token(self) -> int:
        return self.cost()["active_params"]

    def flops_per_token(self) -> dict[str, int]:
        """Forward FLOPs per token, by part, with ``"total"``; see ``peer_cost``."""
        return self.cost()["flops"]
