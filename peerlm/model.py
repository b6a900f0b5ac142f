"""A decoder-only transformer whose feed-forward is chosen per block (dense MLP, PEER, MoE or PKM).

Pre-norm blocks (RMSNorm), causal multi-head attention with rotary positions (RoFormer, Su et al.
2021; the non-interleaved "rotate half" layout), a final RMSNorm and an output head, optionally tied
to the token embedding. ``forward(idx, targets, kv_cache)`` returns (logits, loss) with
loss = mean cross-entropy + the sum of the feed-forwards' auxiliary losses (MoE router losses, in
training mode only); ``last_losses`` keeps the parts. A ``KVCache`` allows prefill then one token at a
time; the cached path gives the logits of a full forward. Attention asks a cache only for ``pos``,
``max_len``, ``batch`` and ``update(layer, k, v)``, so another cache can stand in (``peerlm.hf`` puts
transformers' ``Cache`` behind these names).

Attention runs through ``F.scaled_dot_product_attention`` (``attn_impl="sdpa"``) or a plain
matmul-softmax-matmul reference (``"eager"``), which FLOP counters can see into.

``build_model`` builds on the meta device, materialises with ``to_empty`` and initialises every
parameter and buffer exactly once with ``init_weights`` (a 2^20 x d expert table is not filled twice).
Init: embedding N(0, 1/D) (logits of unit scale with a tied head); attention q/k/v N(0, 1/D); output
projections of attention, MLPs and MoE experts scaled by 1/sqrt(2 * n_layers) (GPT-2); PEER and PKM
use their own documented init.

Shape legend: B batch, T new tokens, P cached + new positions, D model dim, H heads, Dh head dim,
V vocabulary.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerlm.config import ModelConfig
from peerlm.ffn import build_ffn, expert_parameters, memory_layers, routing_parameters
from peerlm.norms import RMSNorm

__all__ = ["KVCache", "Attention", "Block", "Transformer", "build_model"]


class KVCache:
    """Keys and values of every layer for incremental decoding, preallocated to ``max_len``."""

    def __init__(self, n_layers: int, batch: int, n_heads: int, head_dim: int, max_len: int,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        shape = (n_layers, batch, n_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.batch, self.max_len, self.pos = batch, max_len, 0

    def update(self, layer: int, k_BHTDh: Tensor, v_BHTDh: Tensor) -> tuple[Tensor, Tensor]:
        """Store the new positions of one layer; return that layer's keys and values so far (B, H, P, Dh)."""
        T = k_BHTDh.shape[2]
        end = self.pos + T
        assert end <= self.max_len, (self.pos, T, self.max_len)
        self.k[layer, :, :, self.pos:end] = k_BHTDh
        self.v[layer, :, :, self.pos:end] = v_BHTDh
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def reset(self) -> None:
        self.pos = 0


def apply_rotary(x_BHTDh: Tensor, cos_TDh2: Tensor, sin_TDh2: Tensor) -> Tensor:
    """Rotate pairs (x_i, x_{i + Dh/2}) by position-dependent angles, in fp32."""
    x1, x2 = x_BHTDh.float().chunk(2, dim=-1)  # (B, H, T, Dh/2) each
    cos_TDh2, sin_TDh2 = cos_TDh2.float(), sin_TDh2.float()
    y = torch.cat([x1 * cos_TDh2 - x2 * sin_TDh2, x1 * sin_TDh2 + x2 * cos_TDh2], dim=-1)
    return y.to(x_BHTDh.dtype)


def eager_attention(q: Tensor, k: Tensor, v: Tensor, mask_TP: Tensor | None) -> Tensor:
    """Reference attention: softmax(q k^T / sqrt(Dh) + mask) v, softmax in fp32."""
    scores_BHTP = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if mask_TP is not None:
        scores_BHTP = scores_BHTP.masked_fill(~mask_TP, float("-inf"))
    return scores_BHTP.float().softmax(dim=-1).to(v.dtype) @ v


class Attention(nn.Module):
    """Causal multi-head self-attention with rotary positions; no biases."""

    def __init__(self, dim: int, n_heads: int, impl: str = "sdpa", out_scale: float = 1.0):
        super().__init__()
        self.dim, self.n_heads, self.head_dim = dim, n_heads, dim // n_heads
        self.impl, self.out_scale = impl, out_scale
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def reset_parameters(self) -> None:
        nn.init.normal_(self.qkv.weight, std=self.dim**-0.5)
        nn.init.normal_(self.proj.weight, std=self.out_scale * self.dim**-0.5)

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None,
                layer: int = 0) -> Tensor:
        B, T, D = x_BTD.shape
        qkv = self.qkv(x_BTD).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, Dh) each
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:
            past = cache.pos
            k, v = cache.update(layer, k, v)  # (B, H, P, Dh), P = past + T
            k, v = k.to(q.dtype), v.to(q.dtype)  # the cache may be kept in another dtype
        # new token t (absolute position past + t) sees every position <= past + t
        mask_TP = None
        if T > 1 and (past > 0 or self.impl == "eager"):
            mask_TP = torch.ones(T, past + T, dtype=torch.bool, device=x_BTD.device).tril(diagonal=past)
        if self.impl == "eager":
            y_BHTDh = eager_attention(q, k, v, mask_TP)
        else:
            causal = past == 0 and T > 1
            y_BHTDh = F.scaled_dot_product_attention(q, k, v, attn_mask=mask_TP, is_causal=causal)
        return self.proj(y_BHTDh.transpose(1, 2).reshape(B, T, D))


class Block(nn.Module):
    """x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        out_scale = (2 * cfg.n_layers) ** -0.5
        self.layer = layer
        self.attn_norm = RMSNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.n_heads, cfg.attn_impl, out_scale)
        self.ffn_norm = RMSNorm(cfg.dim)
        self.ffn = build_ffn(cfg.block_ffn(layer), cfg.dim, cfg.mlp, out_scale)

    def reset_parameters(self) -> None:
        self.attn_norm.reset_parameters()
        self.attn.reset_parameters()
        self.ffn_norm.reset_parameters()
        self.ffn.reset_parameters()

    def forward(self, x_BTD: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None = None) -> Tensor:
        x_BTD = x_BTD + self.attn(self.attn_norm(x_BTD), cos, sin, cache, self.layer)
        return x_BTD + self.ffn(self.ffn_norm(x_BTD))


class Transformer(nn.Module):
    """The language model; see the module docstring. Build it with ``build_model``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.dim)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        half = cfg.head_dim // 2
        self.register_buffer("rope_cos", torch.empty(cfg.context_length, half), persistent=False)
        self.register_buffer("rope_sin", torch.empty(cfg.context_length, half), persistent=False)
        self.last_losses: dict[str, Tensor] = {}
        if not self.rope_cos.is_meta:
            self._init_rope()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Initialise every parameter and buffer (call once, after ``to_empty``)."""
        D = self.cfg.dim
        nn.init.normal_(self.tok_emb.weight, std=D**-0.5)
        for block in self.blocks:
            block.reset_parameters()
        self.norm.reset_parameters()
        if self.head is not None:
            nn.init.normal_(self.head.weight, std=D**-0.5)
        self._init_rope()

    @torch.no_grad()
    def _init_rope(self) -> None:
        """Rotary tables (non-persistent buffers: recomputed, never loaded from a checkpoint)."""
        Dh = self.cfg.head_dim
        inv_freq = self.cfg.rope_theta ** (-torch.arange(0, Dh, 2, dtype=torch.float64) / Dh)  # (Dh/2,)
        pos = torch.arange(self.cfg.context_length, dtype=torch.float64)
        angles = torch.outer(pos, inv_freq)  # (T, Dh/2)
        self.rope_cos.copy_(angles.cos())
        self.rope_sin.copy_(angles.sin())

    def new_kv_cache(self, batch: int, max_len: int | None = None,
                     dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` (default: the context length)."""
        cfg = self.cfg
        max_len = cfg.context_length if max_len is None else max_len
        if not 1 <= max_len <= cfg.context_length:
            raise ValueError(f"max_len must be in [1, context_length={cfg.context_length}], got {max_len}")
        return KVCache(cfg.n_layers, batch, cfg.n_heads, cfg.head_dim, max_len, self.tok_emb.weight.device,
                       dtype or self.tok_emb.weight.dtype)

    def _check_input(self, idx: Tensor, targets: Tensor | None, cache: KVCache | None) -> None:
        if not isinstance(idx, Tensor) or idx.dim() != 2 or idx.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(idx.shape)} {idx.dtype}" if isinstance(idx, Tensor) else type(idx).__name__
            raise ValueError(f"idx must be an integer tensor (batch, time), got {got}")
        B, T = idx.shape
        past = cache.pos if cache is not None else 0
        limit = cache.max_len if cache is not None else self.cfg.context_length
        if T == 0 or past + T > limit:
            where = f" after {past} cached positions" if cache is not None else ""
            raise ValueError(f"sequence of {T} tokens{where} does not fit the context of {limit}; "
                             f"crop the input to at most {limit - past} tokens")
        if cache is not None and cache.batch != B:
            raise ValueError(f"kv_cache was made for batch {cache.batch}, got batch {B}")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, vocab_size={self.cfg.vocab_size}), got range "
                             f"[{lo}, {hi}]; check the tokenizer matches the model's vocab_size")
        if targets is not None and targets.shape != idx.shape:
            raise ValueError(f"targets {tuple(targets.shape)} must have the shape of idx {tuple(idx.shape)}")

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                kv_cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) token ids -> logits (B, T, V) in fp32, and the loss if ``targets`` (B, T) are given
        (positions with target -1 are ignored)."""
        self._check_input(idx, targets, kv_cache)
        T = idx.shape[1]
        past = kv_cache.pos if kv_cache is not None else 0
        cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]  # (T, Dh/2)
        x_BTD = self.tok_emb(idx)
        for block in self.blocks:
            x_BTD = block(x_BTD, cos, sin, kv_cache)
        if kv_cache is not None:
            kv_cache.pos += T
        x_BTD = self.norm(x_BTD)
        weight = self.tok_emb.weight if self.head is None else self.head.weight
        logits_BTV = F.linear(x_BTD, weight).float()
        if targets is None:
            self.last_losses = {}
            return logits_BTV, None
        ce = F.cross_entropy(logits_BTV.view(-1, logits_BTV.shape[-1]), targets.reshape(-1).long(),
                             ignore_index=-1)
        aux = torch.zeros((), device=ce.device)
        if self.training:
            for block in self.blocks:
                part = getattr(block.ffn, "aux_loss", None)
                if part is not None:
                    aux = aux + part
        loss = ce + aux
        # one stacked copy, not detached aliases: torch.compile (inductor) folds ce + 0 into ce and would hand
        # back the detached alias as the loss, without its graph
        parts = torch.stack([ce, aux.to(ce.dtype), loss]).detach()
        self.last_losses = dict(zip(("ce", "aux", "loss"), parts.unbind()))
        return logits_BTV, loss

    # -------------------------------------------------------------------------------- bookkeeping

    def memory_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every PEER and PKM layer, for usage statistics."""
        return memory_layers(self)

    def expert_parameters(self) -> Iterator[nn.Parameter]:
        """The large lookup tables: PEER ``w_down``/``w_up`` and PKM ``values`` (their own param group)."""
        return expert_parameters(self)

    def routing_parameters(self) -> Iterator[nn.Parameter]:
        """What picks the experts of PEER and PKM layers: query projections, query norms, sub-keys."""
        return routing_parameters(self)

    def other_parameters(self) -> Iterator[nn.Parameter]:
        """Every parameter not in ``expert_parameters``."""
        experts = {id(p) for p in self.expert_parameters()}
        return (p for p in self.parameters() if id(p) not in experts)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def build_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> Transformer:
    """Construct on the meta device, materialise on ``device`` and initialise once."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device=device)
    model.init_weights()
    return model
