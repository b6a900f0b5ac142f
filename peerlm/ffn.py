"""Feed-forward blocks: the dense MLP, a coarse mixture of experts, and a product-key memory.

- ``DenseMLP``: GELU (GPT-2) or SwiGLU (Shazeer 2020) MLP, no biases.
- ``MoE``: experts shaped like the dense MLP, router in fp32. Token choice (Switch, Fedus et al. 2021;
  ST-MoE, Zoph et al. 2022): each token takes its top-k experts; gates are the router probability
  for k = 1 (Switch) and the top-k probabilities renormalised for k > 1 (ST-MoE); optional capacity
  dropping in training; the load-balancing loss E * sum_e f_e P_e and the router z-loss
  mean(logsumexp(logits)^2) are left in ``aux_loss`` for the model to add to the LM loss.
  Expert choice (Zhou et al. 2022, the PEER paper's MoE baseline): each expert takes its top
  C = ceil(capacity_factor * S / E) tokens of the whole batch, gated by their router probability.
  Caveat: at train time a token's experts depend on every other token of the batch, future tokens of
  its own sequence included, so expert choice is not causal in training. In eval the layer routes each
  token to its own top-k experts (token choice on the same router, no dropping), which is causal and
  decodes one token at a time, at the price of a train/eval routing mismatch.
- ``PKM``: product-key memory (Lample et al. 2019): query projection, query norm, h heads retrieving
  top-k of N = n^2 product keys (``peerlm.retrieval.ProductKeys``), softmax over each head's k scores,
  gate-weighted sum of rows of an (N, D) ``values`` table, summed over heads. PEER is this with
  one-neuron experts in place of value rows.

Shape legend: S tokens (leading dims flattened), D model dim, F hidden size, E experts,
K top-k, C expert capacity, H heads, Dk key width, N memory slots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerlm.config import DenseConfig, MoEConfig, PEERConfig, PKMConfig
from peerlm.norms import make_query_norm
from peerlm.peer import PEER
from peerlm.retrieval import ProductKeys
from peerlm.usage import UsageTracking

__all__ = ["DenseMLP", "MoE", "PKM", "build_ffn"]


def _fp32_off(x: Tensor):
    """Autocast off, so that routing math stays in fp32 under a bf16 autocast region."""
    return torch.autocast(x.device.type, enabled=False)


class DenseMLP(nn.Module):
    """(..., D) -> (..., D). GELU: proj(gelu(fc x)); SwiGLU: proj(silu(gate x) * fc x).

    Init: fc/gate ~ N(0, 1/D); proj ~ N(0, out_scale^2 / F), where the model passes
    out_scale = 1/sqrt(2 * n_layers) so the residual stream does not grow with depth (GPT-2).
    """

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", out_scale: float = 1.0):
        super().__init__()
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.dim, self.hidden, self.activation, self.out_scale = dim, hidden, activation, out_scale
        self.fc = nn.Linear(dim, hidden, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False) if activation == "swiglu" else None
        self.proj = nn.Linear(hidden, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.fc.weight, std=self.dim**-0.5)
        if self.gate is not None:
            nn.init.normal_(self.gate.weight, std=self.dim**-0.5)
        nn.init.normal_(self.proj.weight, std=self.out_scale * self.hidden**-0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)  # (..., F)
        h = F.silu(self.gate(x)) * h if self.gate is not None else F.gelu(h)
        return self.proj(h)


class MoE(nn.Module):
    """Mixture of dense-MLP-sized experts, (..., D) -> (..., D); see the module docstring.

    After each forward, ``aux_loss`` holds aux_loss_coef * load-balancing loss (token choice in
    training; expert choice is balanced by construction) + z_loss_coef * router z-loss, a scalar
    tensor. Expert weights are stacked like ``nn.Linear`` weights: ``w_fc`` (E, F, D), ``w_proj`` (E, D, F).
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, topk: int = 1, routing: str = "token",
                 capacity_factor: float | None = None, activation: str = "gelu", aux_loss_coef: float = 0.01,
                 z_loss_coef: float = 1e-3, out_scale: float = 1.0):
        super().__init__()
        # validates the routing options with the same messages as a config
        MoEConfig(num_experts, topk, routing, capacity_factor, aux_loss_coef, z_loss_coef)
        if activation not in ("gelu", "swiglu"):
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        self.dim, self.hidden, self.num_experts, self.topk = dim, hidden, num_experts, topk
        self.routing, self.capacity_factor, self.activation = routing, capacity_factor, activation
        self.aux_loss_coef, self.z_loss_coef, self.out_scale = aux_loss_coef, z_loss_coef, out_scale
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_fc = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, dim)) if activation == "swiglu" else None
        self.w_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.aux_loss: Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.dim**-0.5)
        nn.init.normal_(self.w_fc, std=self.dim**-0.5)
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, std=self.dim**-0.5)
        nn.init.normal_(self.w_proj, std=self.out_scale * self.hidden**-0.5)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, topk={self.topk}, "
                f"routing={self.routing}, capacity_factor={self.capacity_factor}")

    def _expert(self, e: int, x_SD: Tensor) -> Tensor:
        h_SF = F.linear(x_SD, self.w_fc[e])
        if self.w_gate is not None:
            h_SF = F.silu(F.linear(x_SD, self.w_gate[e])) * h_SF
        else:
            h_SF = F.gelu(h_SF)
        return F.linear(h_SF, self.w_proj[e])

    def forward(self, x: Tensor) -> Tensor:
        x_SD = x.reshape(-1, self.dim)
        S, E = x_SD.shape[0], self.num_experts
        with _fp32_off(x):
            logits_SE = F.linear(x_SD.float(), self.router.weight.float())
            probs_SE = logits_SE.softmax(dim=-1)
            z_loss = logits_SE.logsumexp(dim=-1).pow(2).mean()
        if self.routing == "expert" and self.training:
            y_SD, balance = self._expert_choice(x_SD, probs_SE), probs_SE.new_zeros(())
        else:
            y_SD, balance = self._token_choice(x_SD, probs_SE)
        self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z_loss
        assert y_SD.shape == (S, self.dim) and E == probs_SE.shape[1]
        return y_SD.view(x.shape)

    def _token_choice(self, x_SD: Tensor, probs_SE: Tensor) -> tuple[Tensor, Tensor]:
        S, E, K = x_SD.shape[0], self.num_experts, self.topk
        top_SK, ids_SK = probs_SE.topk(K, dim=-1)
        gates_SK = top_SK if K == 1 else top_SK / top_SK.sum(dim=-1, keepdim=True)
        onehot_SKE = F.one_hot(ids_SK, E)
        keep_SK = torch.ones_like(ids_SK, dtype=torch.bool)
        if self.training and self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * S * K / E)
            # rank of each assignment within its expert, in token order (first come, first served)
            rank_SKE = onehot_SKE.view(S * K, E).cumsum(dim=0).view(S, K, E) - 1
            keep_SK = (rank_SKE * onehot_SKE).sum(-1) < capacity
        # Switch load balance: fraction of assignments per expert times mean router probability
        frac_E = onehot_SKE.sum(dim=(0, 1)).float() / (S * K)
        balance = E * (frac_E * probs_SE.mean(dim=0)).sum()
        y_SD = torch.zeros_like(x_SD)
        flat_ids, flat_gates = ids_SK.view(-1), (gates_SK * keep_SK).view(-1)
        flat_keep = keep_SK.view(-1)
        for e in range(E):
            slots = torch.nonzero((flat_ids == e) & flat_keep).squeeze(-1)  # into S*K
            if slots.numel() == 0:
                continue
            tokens = torch.div(slots, K, rounding_mode="floor")
            y = self._expert(e, x_SD.index_select(0, tokens)) * flat_gates[slots, None]
            y_SD.index_add_(0, tokens, y.to(y_SD.dtype))
        return y_SD, balance

    def _expert_choice(self, x_SD: Tensor, probs_SE: Tensor) -> Tensor:
        S, E = x_SD.shape[0], self.num_experts
        C = min(S, math.ceil(self.capacity_factor * S / E))
        gates_EC, tokens_EC = probs_SE.t().topk(C, dim=-1)  # each expert picks its C best tokens
        x_ECD = x_SD[tokens_EC]
        h_ECF = torch.bmm(x_ECD, self.w_fc.transpose(1, 2))
        if self.w_gate is not None:
            h_ECF = F.silu(torch.bmm(x_ECD, self.w_gate.transpose(1, 2))) * h_ECF
        else:
            h_ECF = F.gelu(h_ECF)
        y_ECD = torch.bmm(h_ECF, self.w_proj.transpose(1, 2)) * gates_EC[..., None]
        y_SD = torch.zeros_like(x_SD)
        y_SD.index_add_(0, tokens_EC.reshape(-1), y_ECD.reshape(E * C, self.dim).to(y_SD.dtype))
        return y_SD


class PKM(UsageTracking, nn.Module):
    """Product-key memory, (..., D) -> (..., D); see the module docstring.

    Init: query projection N(0, 1/D); sub-keys N(0, 2/Dk) (``ProductKeys``); values N(0, 1/D) as in
    Lample et al. Retrieval scores all n sub-keys without autograd and re-scores the k winners
    differentiably (same gradient, O(k Dk) backward per head).
    """

    def __init__(self, dim: int, num_keys: int, heads: int = 8, topk: int = 32, dim_key: int = 512,
                 query_norm: str = "batchnorm", shared_keys: bool = False, track_usage: bool = False,
                 sparse_grad: bool = False):
        super().__init__()
        PKMConfig(num_keys, heads, topk, dim_key, query_norm, shared_keys, sparse_grad)  # validates
        self.sparse_grad = sparse_grad  # row-sparse COO gradient for `values` (read at every forward)
        self.dim, self.num_keys, self.heads, self.topk, self.dim_key = dim, num_keys, heads, topk, dim_key
        self.query_norm, self.shared_keys = query_norm, shared_keys
        self.query = nn.Linear(dim, heads * dim_key, bias=False)
        self.norm = make_query_norm(query_norm, heads * dim_key)
        self.keys = ProductKeys(num_keys, dim_key, heads, shared=shared_keys)
        self.values = nn.Parameter(torch.empty(num_keys, dim))
        self.usage_slots = num_keys
        self._init_usage(track_usage)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.values.is_meta:
            return
        nn.init.normal_(self.query.weight, std=self.dim**-0.5)
        if hasattr(self.norm, "reset_parameters"):  # BatchNorm resets its running stats too
            self.norm.reset_parameters()
        self.keys.reset_parameters()
        nn.init.normal_(self.values, std=self.dim**-0.5)
        self.reset_usage()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_keys={self.num_keys}, heads={self.heads}, topk={self.topk}, "
                f"dim_key={self.dim_key}, query_norm={self.query_norm}, shared_keys={self.shared_keys}")

    def _route(self, x_SD: Tensor, differentiable: bool) -> tuple[Tensor, Tensor]:
        S = x_SD.shape[0]
        with _fp32_off(x_SD):
            q = self.query(x_SD.to(self.query.weight.dtype)).float()
            q_SHDk = self.norm(q).view(S, self.heads, self.dim_key)
            return self.keys(q_SHDk, self.topk, differentiable=differentiable)

    def retrieve(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scores and memory ids, each (..., heads, topk); runs the query norm as forward does."""
        scores_SHK, ids_SHK = self._route(x.reshape(-1, self.dim), differentiable=True)
        lead = x.shape[:-1] + (self.heads, self.topk)
        return scores_SHK.view(lead), ids_SHK.view(lead)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"PKM expects input of shape (..., {self.dim}), got {tuple(x.shape)}")
        x_SD = x.reshape(-1, self.dim)
        S = x_SD.shape[0]
        scores_SHK, ids_SHK = self._route(x_SD, differentiable=False)
        g_SHK = scores_SHK.softmax(dim=-1)  # fp32
        if self.track_usage:
            self._accumulate_usage(ids_SHK, g_SHK)
        ids_SM, g_SM = ids_SHK.view(S, -1), g_SHK.view(S, -1)  # M = H*K slots, summed over heads
        y_SD = F.embedding_bag(ids_SM, self.values, per_sample_weights=g_SM.to(self.values.dtype), mode="sum",
                               sparse=self.sparse_grad)
        return y_SD.to(x.dtype).view(x.shape)


def build_ffn(cfg: DenseConfig | PEERConfig | MoEConfig | PKMConfig, dim: int, mlp: DenseConfig | None = None,
              out_scale: float = 1.0) -> nn.Module:
    """Build any feed-forward from its config. ``mlp`` shapes MoE experts (default: ``DenseConfig()``);
    ``out_scale`` scales the init of output projections (dense MLP and MoE experts)."""
    if isinstance(cfg, DenseConfig):
        return DenseMLP(dim, cfg.hidden_size(dim), cfg.activation, out_scale)
    if isinstance(cfg, PEERConfig):
        return PEER(dim, cfg.num_experts, heads=cfg.heads, topk=cfg.topk, dim_key=cfg.dim_key,
                    activation=cfg.activation, gate=cfg.gate, query_norm=cfg.query_norm, impl=cfg.impl,
                    sparse_grad=cfg.sparse_grad, shared_keys=cfg.shared_keys)
    if isinstance(cfg, MoEConfig):
        mlp = mlp or DenseConfig()
        return MoE(dim, mlp.hidden_size(dim), cfg.num_experts, cfg.topk, cfg.routing, cfg.capacity_factor,
                   mlp.activation, cfg.aux_loss_coef, cfg.z_loss_coef, out_scale)
    if isinstance(cfg, PKMConfig):
        return PKM(dim, cfg.num_keys, cfg.heads, cfg.topk, cfg.dim_key, cfg.query_norm, cfg.shared_keys,
                   sparse_grad=cfg.sparse_grad)
    raise ValueError(f"no feed-forward for config of type {type(cfg).__name__}")
