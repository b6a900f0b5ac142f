"""Feed-forward blocks: the dense MLP, a mixture of experts (coarse or fine-grained), a product-key memory.

- ``DenseMLP``: GELU (GPT-2) or SwiGLU (Shazeer 2020) MLP, no biases.
- ``MoE``: experts are MLPs of the dense MLP's activation with ``hidden`` units each (the dense MLP's
  size for coarse experts; smaller for fine-grained ones, Krajewski et al. 2024), router in fp32.
  Token choice (Switch, Fedus et al. 2021; ST-MoE, Zoph et al. 2022): each token takes its top-k
  experts; gates are the router probability for k = 1 (Switch) and the top-k probabilities
  renormalised for k > 1 (ST-MoE); the load-balancing loss E * sum_e f_e P_e and the router z-loss
  mean(logsumexp(logits)^2) are left in ``aux_loss`` for the model to add to the LM loss. In training
  an expert takes at most C = ceil(capacity_factor * S * k / E) assignments; its slots go to first
  choices before second choices (rank within an expert in choice-major order, as in GShard/Switch
  implementations: choice 0 of every token, then choice 1, ...), then in token order; the rest are
  dropped (the token keeps its residual). Priority across choices makes a drop depend on later tokens
  of the batch, so training with drops is not causal; eval drops nothing and is. With the default
  capacity factor (2.0, see ``MoEConfig``) drops are rare, so train and eval routing agree.
  Expert choice (Zhou et al. 2022, the PEER paper's MoE baseline): in training each expert takes its
  top C = ceil(capacity_factor * S / E) tokens of the whole batch, gated by their router probability,
  so a token gets 0, 1, 2, ... experts, capacity_factor on average. This depends on every other token
  of the batch, future tokens of its own sequence included, so it is not causal in training. Eval
  keeps the same rule causally: expert e accepts token s iff probs[s, e] >= threshold[e], where
  threshold[e] estimates the probability of the last (C-th) token e accepted in a training batch (a
  persistent buffer, like BatchNorm's running statistics, updated at every training-mode forward).
  The estimate is an EMA with decay 0.99 and Adam's bias correction: the first batch sets it, later
  ones average over about the last 100 steps, long enough to smooth the batch-to-batch noise of an
  order statistic and short next to a run's length, so at the end of a decayed learning-rate schedule
  it follows a router that barely moves. Each token is decided alone (it decodes one token at a time
  with the KV cache) and is gated by its router probability as in training, so eval computes what
  training computes up to the tokens near a threshold. Until the first training step there is no
  estimate and eval routes each token to its top-k experts (the token-choice rule on the same router).
- ``PKM``: product-key memory (Lample et al. 2019): query projection, query norm, h heads retrieving
  top-k of N = n^2 product keys (``peerlm.retrieval.ProductKeys``), softmax over each head's k scores,
  gate-weighted sum of rows of an (N, D) ``values`` table, summed over heads. PEER is this with
  one-neuron experts in place of value rows.

Shape legend: S tokens (leading dims flattened), D model dim, F hidden size, E experts,
K top-k, C expert capacity, A (token, expert) assignments, H heads, Dk key width, N memory slots.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peerlm.config import MLP_ACTIVATIONS, DenseConfig, MoEConfig, PEERConfig, PKMConfig
from peerlm.fused import memory_bag
from peerlm.norms import make_query_norm
from peerlm.peer import PEER
from peerlm.retrieval import ProductKeys
from peerlm.tables import ColumnShard, normal_table_, shard_repr
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
        if activation not in MLP_ACTIVATIONS:
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
    """Mixture of MLP experts, (..., D) -> (..., D); see the module docstring.

    After each forward:
    - ``aux_loss``: aux_loss_coef * load-balancing loss (token choice; expert choice is balanced by
      construction) + z_loss_coef * router z-loss, a scalar tensor;
    - ``last_experts_per_token``: mean number of experts a token went to (a float);
    - ``last_drop_fraction``: fraction of token-choice assignments dropped for capacity (0.0 in eval
      and for expert choice).

    Expert weights are stacked like ``nn.Linear`` weights: ``w_fc`` (E, F, D), ``w_proj`` (E, D, F).
    Expert choice also keeps two persistent buffers (in ``state_dict``, hence in checkpoints):
    ``threshold`` (E,) and ``threshold_updates`` (), the number of training batches it has seen.
    """

    def __init__(self, dim: int, hidden: int, num_experts: int, topk: int = 1, routing: str = "token",
                 capacity_factor: float | str | None = "auto", activation: str = "gelu",
                 aux_loss_coef: float = 0.01, z_loss_coef: float = 1e-3, out_scale: float = 1.0,
                 threshold_decay: float = 0.99):
        super().__init__()
        # validates the routing options with the same messages as a config
        cfg = MoEConfig(num_experts=num_experts, topk=topk, routing=routing, capacity_factor=capacity_factor,
                        aux_loss_coef=aux_loss_coef, z_loss_coef=z_loss_coef, threshold_decay=threshold_decay)
        if activation not in MLP_ACTIVATIONS:
            raise ValueError(f"activation must be 'gelu' or 'swiglu', got {activation!r}")
        if hidden < 1:
            raise ValueError(f"MoE hidden (units per expert) must be >= 1, got {hidden}")
        self.dim, self.hidden, self.num_experts, self.topk = dim, hidden, num_experts, topk
        self.routing, self.capacity_factor, self.activation = routing, cfg.capacity(), activation
        self.aux_loss_coef, self.z_loss_coef, self.out_scale = aux_loss_coef, z_loss_coef, out_scale
        self.threshold_decay = threshold_decay
        self.router = nn.Linear(dim, num_experts, bias=False)
        self.w_fc = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w_gate = nn.Parameter(torch.empty(num_experts, hidden, dim)) if activation == "swiglu" else None
        self.w_proj = nn.Parameter(torch.empty(num_experts, dim, hidden))
        if routing == "expert":
            self.register_buffer("threshold", torch.empty(num_experts))
            self.register_buffer("threshold_updates", torch.empty((), dtype=torch.long))
        self.aux_loss: Tensor | None = None
        self.last_experts_per_token: float | None = None
        self.last_drop_fraction: float | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.router.weight, std=self.dim**-0.5)
        nn.init.normal_(self.w_fc, std=self.dim**-0.5)
        if self.w_gate is not None:
            nn.init.normal_(self.w_gate, std=self.dim**-0.5)
        nn.init.normal_(self.w_proj, std=self.out_scale * self.hidden**-0.5)
        if self.routing == "expert":
            with torch.no_grad():
                self.threshold.zero_()
                self.threshold_updates.zero_()  # 0: no estimate yet, eval falls back to top-k

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden={self.hidden}, num_experts={self.num_experts}, topk={self.topk}, "
                f"routing={self.routing}, capacity_factor={self.capacity_factor}")

    def _experts(self) -> list[tuple[Tensor, Tensor | None, Tensor]]:
        """(w_fc, w_gate, w_proj) of every expert, split by one ``unbind`` per table: its backward
        stacks the E gradients once, where indexing ``w[e]`` would zero-fill a full (E, ...) gradient
        for each expert."""
        gates = self.w_gate.unbind(0) if self.w_gate is not None else [None] * self.num_experts
        return list(zip(self.w_fc.unbind(0), gates, self.w_proj.unbind(0)))

    @staticmethod
    def _mlp(x_SD: Tensor, w_fc: Tensor, w_gate: Tensor | None, w_proj: Tensor) -> Tensor:
        h_SF = F.linear(x_SD, w_fc)
        h_SF = F.silu(F.linear(x_SD, w_gate)) * h_SF if w_gate is not None else F.gelu(h_SF)
        return F.linear(h_SF, w_proj)

    def forward(self, x: Tensor) -> Tensor:
        x_SD = x.reshape(-1, self.dim)
        S, E = x_SD.shape[0], self.num_experts
        with _fp32_off(x):
            logits_SE = F.linear(x_SD.float(), self.router.weight.float())
            probs_SE = logits_SE.softmax(dim=-1)
            z_loss = logits_SE.logsumexp(dim=-1).pow(2).mean()
        balance = probs_SE.new_zeros(())
        self.last_drop_fraction = 0.0
        if self.routing == "expert" and self.training:
            y_SD = self._expert_choice(x_SD, probs_SE)
        elif self.routing == "expert" and int(self.threshold_updates) > 0:
            y_SD = self._expert_threshold(x_SD, probs_SE)
        else:
            y_SD, balance = self._token_choice(x_SD, probs_SE)
        self.aux_loss = self.aux_loss_coef * balance + self.z_loss_coef * z_loss
        assert y_SD.shape == (S, self.dim) and E == probs_SE.shape[1]
        return y_SD.view(x.shape)

    def _grouped(self, x_SD: Tensor, tokens_A: Tensor, gates_A: Tensor, counts_E: list[int]) -> Tensor:
        """sum over assignments a of gates_A[a] * expert(x[tokens_A[a]]), written to row tokens_A[a].

        Assignments come grouped by expert, ``counts_E[e]`` of them for expert e: one gather, one
        contiguous slice per expert, one scatter-add (no per-expert scan over all tokens)."""
        assert tokens_A.shape == gates_A.shape and sum(counts_E) == tokens_A.numel()
        y_SD = torch.zeros_like(x_SD)
        if tokens_A.numel() == 0:
            return y_SD
        x_AD = x_SD.index_select(0, tokens_A)
        parts = [self._mlp(x_nD, *w) for x_nD, w, n in zip(x_AD.split(counts_E), self._experts(), counts_E) if n]
        y_AD = torch.cat(parts) * gates_A[:, None]
        return y_SD.index_add_(0, tokens_A, y_AD.to(y_SD.dtype))

    def _token_choice(self, x_SD: Tensor, probs_SE: Tensor) -> tuple[Tensor, Tensor]:
        S, E, K = x_SD.shape[0], self.num_experts, self.topk
        top_SK, ids_SK = probs_SE.topk(K, dim=-1)
        gates_SK = top_SK if K == 1 else top_SK / top_SK.sum(dim=-1, keepdim=True)
        # assignments in choice-major order, a = k * S + s: every first choice precedes every second
        experts_A = ids_SK.t().reshape(-1)
        counts_E = torch.bincount(experts_A, minlength=E)
        order_A = torch.argsort(experts_A, stable=True)  # grouped by expert, choice-major within
        counts = counts_E.tolist()
        if self.training and self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * S * K / E)
            starts_E = counts_E.cumsum(0) - counts_E
            rank_A = torch.arange(S * K, device=x_SD.device) - starts_E[experts_A[order_A]]  # within expert
            order_A = order_A[rank_A < capacity]
            counts = [min(c, capacity) for c in counts]
            self.last_drop_fraction = (S * K - sum(counts)) / (S * K)
        self.last_experts_per_token = sum(counts) / S
        tokens_A = order_A % S
        gates_A = gates_SK.t().reshape(-1)[order_A]
        # Switch load balance: fraction of assignments per expert (before dropping) times mean probability
        frac_E = counts_E.float() / (S * K)
        balance = E * (frac_E * probs_SE.mean(dim=0)).sum()
        return self._grouped(x_SD, tokens_A, gates_A, counts), balance

    def _expert_choice(self, x_SD: Tensor, probs_SE: Tensor) -> Tensor:
        S, E = x_SD.shape[0], self.num_experts
        C = min(S, math.ceil(self.capacity_factor * S / E))
        gates_EC, tokens_EC = probs_SE.t().topk(C, dim=-1)  # each expert picks its C best tokens
        self._update_threshold(gates_EC[:, -1].detach())  # the score of the last token accepted
        self.last_experts_per_token = E * C / S
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

    @torch.no_grad()
    def _update_threshold(self, accepted_E: Tensor) -> None:
        """Bias-corrected EMA of each expert's lowest accepted probability (Adam's correction: the
        n-th update has weight (1 - d) / (1 - d^n), so the first one sets the threshold outright)."""
        self.threshold_updates += 1
        d = self.threshold_decay
        weight = (1 - d) / (1 - d ** self.threshold_updates.double())
        self.threshold.lerp_(accepted_E.to(self.threshold.dtype), weight.to(self.threshold.dtype))

    def _expert_threshold(self, x_SD: Tensor, probs_SE: Tensor) -> Tensor:
        """Causal expert choice: token s goes to expert e iff probs[s, e] >= threshold[e], gated by
        probs[s, e]; each token is decided alone, so it decodes one token at a time."""
        S = x_SD.shape[0]
        take_ES = probs_SE.t() >= self.threshold[:, None].to(probs_SE.dtype)
        experts_A, tokens_A = take_ES.nonzero(as_tuple=True)  # grouped by expert
        counts = take_ES.sum(dim=1).tolist()
        self.last_experts_per_token = sum(counts) / S
        return self._grouped(x_SD, tokens_A, probs_SE[tokens_A, experts_A], counts)


class PKM(UsageTracking, nn.Module):
    """Product-key memory, (..., D) -> (..., D); see the module docstring.

    Init: query projection N(0, 1/D); sub-keys N(0, 2/Dk) (``ProductKeys``); values N(0, 1/D) as in
    Lample et al. Retrieval scores all n sub-keys without autograd and re-scores the k winners
    differentiably (same gradient, O(k Dk) backward per head).

    ``shard`` is None, or this rank's ``ColumnShard`` once ``peerlm.parallel.shard_pkm`` has
    column-sharded ``values``: the same forward and init, the lookup then on the local columns
    (``column_sharded_memory``) and the draw of ``values`` keeping them (``peerlm.tables``).
    """

    TABLES = ("values",)  # the (N, D) table, which a ColumnShard splits by columns

    def __init__(self, dim: int, num_keys: int, heads: int = 8, topk: int = 32, dim_key: int = 128,
                 query_norm: str = "batchnorm", shared_keys: bool = True, track_usage: bool = False,
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
        self.shard: ColumnShard | None = None  # this rank's columns of `values` (peerlm.parallel.shard_pkm)
        self.grad_reduction = "mean"  # of a sharded table's gradient over the ranks (peerlm.parallel.experts)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.values.is_meta:
            return
        nn.init.normal_(self.query.weight, std=self.dim**-0.5)
        if hasattr(self.norm, "reset_parameters"):  # BatchNorm resets its running stats too
            self.norm.reset_parameters()
        self.keys.reset_parameters()
        normal_table_(self.values, self.dim**-0.5, self.shard)
        self.reset_usage()

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_keys={self.num_keys}, heads={self.heads}, topk={self.topk}, "
                f"dim_key={self.dim_key}, query_norm={self.query_norm}, shared_keys={self.shared_keys}"
                + shard_repr(self))

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
        scores_SHK, ids_SHK = self._route(x_SD, differentiable=False)
        g_SHK = scores_SHK.softmax(dim=-1)  # fp32
        if self.track_usage:
            self._accumulate_usage(ids_SHK, g_SHK)
        ids_SM, g_SM = ids_SHK.flatten(1), g_SHK.flatten(1)  # M = H*K slots, summed over heads
        if self.shard is not None:
            from peerlm.parallel.experts import column_sharded_memory  # peerlm.parallel imports this module

            y_SD = column_sharded_memory(ids_SM, g_SM, self.values, self.shard, self.sparse_grad, self.grad_reduction,
                                         out_dtype=x.dtype)
            return y_SD.view(x.shape)
        y_SD = memory_bag(ids_SM, g_SM.to(self.values.dtype), self.values, self.sparse_grad)
        return y_SD.to(x.dtype).view(x.shape)


def memory_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every PEER and PKM layer in ``model`` (any module: a peerlm Transformer, a
    transformers model with memory added, a wrapper around either)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (PEER, PKM))]


def expert_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The large lookup tables of ``model``'s memory layers: PEER ``w_down``/``w_up`` and PKM ``values``."""
    for _, m in memory_layers(model):
        if isinstance(m, PEER):
            yield m.w_down
            yield m.w_up
        else:
            yield m.values


def routing_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """What picks the experts of ``model``'s PEER and PKM layers: query projections, query norms, sub-keys."""
    for _, m in memory_layers(model):
        yield from m.query.parameters()
        yield from m.norm.parameters()
        yield from m.keys.parameters()


def build_ffn(cfg: DenseConfig | PEERConfig | MoEConfig | PKMConfig, dim: int, mlp: DenseConfig | None = None,
              out_scale: float = 1.0) -> nn.Module:
    """Build any feed-forward from its config. ``mlp`` gives MoE experts their activation and, unless
    ``MoEConfig.expert_hidden`` is set, their hidden size (default: ``DenseConfig()``);
    ``out_scale`` scales the init of output projections (dense MLP and MoE experts)."""
    if isinstance(cfg, DenseConfig):
        return DenseMLP(dim, cfg.hidden_size(dim), cfg.activation, out_scale)
    if isinstance(cfg, PEERConfig):
        return PEER(dim, cfg.num_experts, heads=cfg.heads, topk=cfg.topk, dim_key=cfg.dim_key,
                    activation=cfg.activation, gate=cfg.gate, query_norm=cfg.query_norm, impl=cfg.impl,
                    sparse_grad=cfg.sparse_grad, shared_keys=cfg.shared_keys)
    if isinstance(cfg, MoEConfig):
        mlp = mlp or DenseConfig()
        return MoE(dim, cfg.hidden_size(mlp.hidden_size(dim)), cfg.num_experts, cfg.topk, cfg.routing,
                   cfg.capacity_factor, mlp.activation, cfg.aux_loss_coef, cfg.z_loss_coef, out_scale,
                   cfg.threshold_decay)
    if isinstance(cfg, PKMConfig):
        return PKM(dim, cfg.num_keys, cfg.heads, cfg.topk, cfg.dim_key, cfg.query_norm, cfg.shared_keys,
                   sparse_grad=cfg.sparse_grad)
    raise ValueError(f"no feed-forward for config of type {type(cfg).__name__}")
