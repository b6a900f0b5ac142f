"""Parameter counts and forward FLOPs per token, from a ModelConfig alone (nothing is allocated).

Conventions:
- A multiply-add is 2 FLOPs (as ``torch.utils.flop_counter.FlopCounterMode``). Matmuls are counted;
  elementwise work (activations, norms, softmax, rotary, residual adds) is not, except the k x k
  candidate grid of product-key retrieval (one add per candidate), which is the retrieval's own cost.
- Attention per token and layer: the q/k/v and output projections, 2 * 4 D^2, plus 2 * 2 * T * D
  for the scores q.k and the weighted sum of values over T positions. By default every token is
  charged the full T (what FlopCounterMode reports for a masked T x T attention and what kernels
  compute unless they skip masked blocks); ``causal=True`` charges the average (T + 1) / 2 positions
  a causal token actually attends to.
- Embedding lookup: 0 FLOPs; output head: 2 * D * V.
- Training FLOPs per token = 3 x forward (backward costs about twice the forward), except what
  runs forward only: product-key retrieval (PEER, PKM) scores all n sub-keys without autograd and
  re-scores only the k winners differentiably, so its sub-key scoring is charged once and the
  re-scoring (2 h k d_key, the sampled dot products of both halves) three times.
- PEER via ``peerlm.peer.peer_cost``; PKM the same way (query projection, sub-key scores over all n
  sub-keys of both halves, the candidate grid, and the gate-weighted sum of h*k value rows).
- MoE: the router (2 * D * E) plus the experts a token uses, each of ``expert_hidden`` units (default
  the dense MLP's): ``topk`` for token choice (an upper bound in training, where capacity may drop
  a few assignments); for expert choice the average ``capacity_factor`` experts per token (training
  routing, which eval's thresholds match on average).
- ``active_params``: what one token touches. Expert tables and memories count only the rows used
  (h*k for PEER/PKM, topk or capacity_factor experts for MoE); retrieval counts every sub-key (all are
  scored); the token embedding counts one row, the output head all V rows (a tied table: all of it).
"""

from __future__ import annotations

import math

from peerlm.config import DenseConfig, ModelConfig, MoEConfig, PEERConfig, PKMConfig
from peerlm.peer import peer_cost

__all__ = [
    "attention_cost", "dense_cost", "moe_cost", "pkm_cost", "ffn_cost", "model_cost",
    "tokens_for_budget", "format_cost", "retrieval_rescore_flops",
]


def _cost(params: int, active: int | float, flops: dict[str, int | float]) -> dict:
    flops = dict(flops)
    flops["total"] = sum(flops.values())
    return {"params": params, "active_params": active, "flops": flops}


def attention_cost(dim: int, seq_len: int, causal: bool = False) -> dict:
    """Causal self-attention with q/k/v/out projections and no biases; see the module docstring."""
    per_matmul = (seq_len + 1) * dim if causal else 2 * seq_len * dim  # 2 * keys * D, keys = (T+1)/2 or T
    flops = {"qkv": 2 * dim * 3 * dim, "scores": per_matmul, "weighted_sum": per_matmul, "out": 2 * dim * dim}
    return _cost(4 * dim * dim, 4 * dim * dim, flops)


def dense_cost(dim: int, hidden: int, activation: str = "gelu") -> dict:
    """Dense MLP: 2 matrices (GELU) or 3 (SwiGLU) of D x F."""
    mats = 3 if activation == "swiglu" else 2
    return _cost(mats * dim * hidden, mats * dim * hidden, {"mlp": 2 * mats * dim * hidden})


def moe_cost(dim: int, hidden: int, activation: str, cfg: MoEConfig) -> dict:
    """Router plus the experts a token uses; active experts per token as in the module docstring.

    ``hidden`` is the dense MLP's hidden size, each expert's unless ``cfg.expert_hidden`` is set."""
    expert = dense_cost(dim, cfg.hidden_size(hidden), activation)
    per_token = cfg.topk if cfg.routing == "token" else cfg.capacity()
    router = dim * cfg.num_experts
    active = router + per_token * expert["params"]
    flops = {"router": 2 * router, "experts": per_token * expert["flops"]["total"]}
    if isinstance(per_token, float) and per_token.is_integer():
        active, flops = int(active), {k: int(v) for k, v in flops.items()}
    return _cost(router + cfg.num_experts * expert["params"], active, flops)


def pkm_cost(dim: int, cfg: PKMConfig) -> dict:
    """Product-key memory: query projection, query norm affine, sub-keys, (N, D) values."""
    n = math.isqrt(cfg.num_keys)
    h, k, dk = cfg.heads, cfg.topk, cfg.dim_key
    query = dim * h * dk
    norm = 2 * h * dk if cfg.query_norm != "none" else 0
    keys = (1 if cfg.shared_keys else h) * n * dk
    flops = {
        "query": 2 * query,
        "subkey_scores": 2 * h * n * dk,
        "candidate_grid": h * k * k,
        "values": 2 * h * k * dim,
    }
    return _cost(query + norm + keys + cfg.num_keys * dim, query + norm + keys + h * k * dim, flops)


def ffn_cost(cfg: DenseConfig | PEERConfig | MoEConfig | PKMConfig, dim: int,
             mlp: DenseConfig | None = None) -> dict:
    """Cost of any feed-forward; ``mlp`` shapes MoE experts (as ``peerlm.ffn.build_ffn``)."""
    if isinstance(cfg, DenseConfig):
        return dense_cost(dim, cfg.hidden_size(dim), cfg.activation)
    if isinstance(cfg, PEERConfig):
        return peer_cost(dim, cfg.num_experts, cfg.heads, cfg.topk, cfg.dim_key, cfg.shared_keys,
                         cfg.query_norm)
    if isinstance(cfg, MoEConfig):
        mlp = mlp or DenseConfig()
        return moe_cost(dim, mlp.hidden_size(dim), mlp.activation, cfg)
    if isinstance(cfg, PKMConfig):
        return pkm_cost(dim, cfg)
    raise ValueError(f"no cost model for config of type {type(cfg).__name__}")


def model_cost(cfg: ModelConfig, seq_len: int | None = None, causal: bool = False) -> dict:
    """Per-block breakdown and totals of parameters and forward FLOPs per token.

    Returns a dict with ``blocks`` (one entry per block: ``kind``, ``attention``, ``ffn``, ``norms``
    params), ``embedding``, ``head``, ``final_norm``, and the totals ``params``, ``active_params``,
    ``expert_params`` (PEER tables and PKM values, the ``expert_parameters()`` of the model),
    ``flops_forward`` and ``flops_train`` per token. ``seq_len`` defaults to the context length.
    """
    T = cfg.context_length if seq_len is None else seq_len
    D, V = cfg.dim, cfg.vocab_size
    blocks = []
    for i in range(cfg.n_layers):
        ffn_cfg = cfg.block_ffn(i)
        blocks.append({
            "block": i,
            "kind": ffn_cfg.KIND,
            "attention": attention_cost(D, T, causal),
            "ffn": ffn_cost(ffn_cfg, D, cfg.mlp),
            "norm_params": 2 * D,
        })
    embedding = {"params": V * D, "active_params": D, "flops": {"total": 0}}
    head_params = 0 if cfg.tie_embeddings else V * D
    head = {"params": head_params, "active_params": V * D, "flops": {"total": 2 * D * V}}
    if cfg.tie_embeddings:  # the head reads the whole shared table; count it once
        embedding["active_params"] = 0
    parts = [embedding, head] + [b["attention"] for b in blocks] + [b["ffn"] for b in blocks]
    norms = sum(b["norm_params"] for b in blocks) + D
    expert = 0
    for i in range(cfg.n_layers):
        ffn_cfg = cfg.block_ffn(i)
        if isinstance(ffn_cfg, PEERConfig):
            expert += 2 * ffn_cfg.num_experts * D
        elif isinstance(ffn_cfg, PKMConfig):
            expert += ffn_cfg.num_keys * D
    forward = sum(p["flops"]["total"] for p in parts)
    train = 3 * forward
    for i in range(cfg.n_layers):
        ffn_cfg = cfg.block_ffn(i)
        if isinstance(ffn_cfg, (PEERConfig, PKMConfig)):
            scoring = blocks[i]["ffn"]["flops"]["subkey_scores"]
            train += -2 * scoring + 3 * retrieval_rescore_flops(ffn_cfg)
    return {
        "seq_len": T,
        "blocks": blocks,
        "embedding": embedding,
        "head": head,
        "final_norm": {"params": D},
        "params": sum(p["params"] for p in parts) + norms,
        "active_params": sum(p["active_params"] for p in parts) + norms,
        "expert_params": expert,
        "flops_forward": forward,
        "flops_train": train,
    }


def retrieval_rescore_flops(cfg: PEERConfig | PKMConfig) -> int:
    """Forward FLOPs per token of the differentiable re-scoring of the k retrieved keys of every head
    (two half dot products of d_key / 2 each); not part of the forward count, which scores all keys."""
    return 2 * cfg.heads * cfg.topk * cfg.dim_key


def tokens_for_budget(cfg: ModelConfig, flops: float, seq_len: int | None = None) -> int:
    """Training tokens a budget of ``flops`` buys at ``flops_train`` per token."""
    if not flops > 0:
        raise ValueError(f"flops must be > 0, got {flops}")
    return int(flops // model_cost(cfg, seq_len)["flops_train"])


def _si(x: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.2f}{unit}"
    return f"{x:.0f}"


def format_cost(cfg: ModelConfig, seq_len: int | None = None) -> str:
    """A small table: per block params / active params / forward FLOPs per token, then totals."""
    c = model_cost(cfg, seq_len)
    rows = [f"{'part':<16}{'params':>10}{'active':>10}{'fwd FLOPs/tok':>15}"]

    def row(name: str, part: dict) -> None:
        rows.append(f"{name:<16}{_si(part['params']):>10}{_si(part['active_params']):>10}"
                    f"{_si(part['flops']['total']):>15}")

    row("embedding", c["embedding"])
    for b in c["blocks"]:
        row(f"block {b['block']} attn", b["attention"])
        row(f"block {b['block']} {b['kind']}", b["ffn"])
    row("head", c["head"])
    row("total", {"params": c["params"], "active_params": c["active_params"],
                  "flops": {"total": c["flops_forward"]}})
    rows.append(f"train FLOPs/token {_si(c['flops_train'])} (3 x forward, sub-key scoring 1 x; "
                f"T = {c['seq_len']})")
    return "\n".join(rows)
