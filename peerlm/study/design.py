"""What the isoFLOP study trains: the trunk ladder, the five methods, the recipe and the budgets.

The paper (He 2024, sec. 3) varies model size and tokens jointly at fixed
training FLOPs, for a dense transformer and for the same transformer with the middle block's
feed-forward swapped for MoE, PKM or PEER, and compares the compute-optimal model of each. Here:

- Trunks: depth and width grow together (``SIZES``); vocabulary 1024 and context 128, so that at
  1e12-1e13 FLOPs the compute-optimal dense models (a few hundred thousand parameters, about 20
  tokens per parameter) are not dominated by the output head (2 D V FLOPs per token) and the
  training text (12.6M tokens at this vocabulary) is seen less than once by them (the smallest rungs
  of a ladder may see it more: each record says how many epochs).
- Methods: ``dense``; ``moe`` (the paper's baseline: 8 experts the size of the dense MLP, expert
  choice, capacity factor 1, so it costs what the MLP costs); ``moe-fine`` (token choice, 32 experts
  a quarter of the MLP each, top-4: the fine-grained MoE of Krajewski et al. 2024, same FLOPs and
  parameters per token as ``moe``); ``pkm`` (h 8, k 32) and ``peer`` (h 8, k 16), both with 256^2
  slots, query BatchNorm, shared keys and d_key = max(32, D / 2), the paper's settings scaled to
  the trunk. MoE, PKM and PEER replace only the middle block's feed-forward.
- Recipe (``recipe``): AdamW (0.9, 0.95), weight decay 0.1, warmup 5% of the run, cosine to 10%,
  batch 16 x 128 tokens, clipping at 1. Peak LR by a rule in the width, lr = 4e-3 sqrt(64 / D), times
  a multiplier chosen by a sweep of the dense model at the smaller budget (0.5, 1, 2, extended by
  factors of 2 while the best is at an end) and then used for every method. The expert-table LR ratio
  of PEER and PKM is chosen by a sweep over {1, 3, 10} at the same point (extended likewise). The
  routing (query projection, query norm, sub-keys) of PEER and PKM trains at 0.1 x the trunk LR: on
  peer-small at LR 2e-3 that kept 72% of the experts in use after 150 steps against 44% at 1 x, at the
  same loss (see the README's study section).
- Every PEER and PKM table is updated by torch's dense AdamW, the trunk's optimizer, at every N (the
  row-sparse AdamW is a different, lazy optimizer; one pair of runs measures what it changes).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from peerlm.config import ModelConfig, MoEConfig, PEERConfig, PKMConfig, apply_overrides
from peerlm.runconfig import TrainConfig

__all__ = ["Size", "SIZES", "METHODS", "BUDGETS", "SEEDS", "VOCAB", "CONTEXT", "model_config", "recipe", "base_lr",
           "budget_name", "initial_window", "RunSpec"]

VOCAB = 1024
CONTEXT = 128
BATCH = 16
BUDGETS = (2e12, 8e12, 3.2e13)
SEEDS = 4  # seeds of every compute-optimal model (0 is its ladder run)
METHODS = ("dense", "moe", "moe-fine", "pkm", "peer")
SLOTS = 256**2
LR_MULTIPLIERS = (0.5, 1.0, 2.0)  # the first sweep; it grows along LR_GRID while its best is at an end
LR_GRID = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
EXPERT_LR_RATIOS = (1.0, 3.0, 10.0)  # likewise along RATIO_GRID
RATIO_GRID = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
ROUTING_LR_RATIO = 0.1


@dataclass(frozen=True)
class Size:
    """One rung of the trunk ladder."""

    name: str
    n_layers: int
    dim: int

    @property
    def n_heads(self) -> int:
        return max(1, self.dim // 16)


SIZES = tuple(Size(f"L{n}d{d}", n, d) for n, d in
              ((1, 24), (1, 32), (1, 48), (2, 64), (3, 80), (4, 96), (5, 112), (6, 128), (7, 160), (8, 192),
               (9, 224)))


def size(name: str) -> Size:
    for s in SIZES:
        if s.name == name:
            return s
    raise ValueError(f"unknown study size {name!r}; known: {', '.join(s.name for s in SIZES)}")


def _dim_key(dim: int) -> int:
    return max(32, 2 * (dim // 4))


def model_config(method: str, sz: Size) -> ModelConfig:
    """The model of ``method`` on trunk ``sz``; all methods share the trunk and differ in one block."""
    if method not in METHODS:
        raise ValueError(f"unknown study method {method!r}; known: {', '.join(METHODS)}")
    ffn = {
        "dense": None,
        "moe": MoEConfig(num_experts=8, topk=1, routing="expert", capacity_factor=1.0),
        "moe-fine": MoEConfig(num_experts=32, topk=4, routing="token", expert_hidden=sz.dim, capacity_factor=2.0),
        "pkm": PKMConfig(num_keys=SLOTS, heads=8, topk=32, dim_key=_dim_key(sz.dim)),
        "peer": PEERConfig(num_experts=SLOTS, heads=8, topk=16, dim_key=_dim_key(sz.dim)),
    }[method]
    return ModelConfig(vocab_size=VOCAB, context_length=CONTEXT, dim=sz.dim, n_layers=sz.n_layers,
                       n_heads=sz.n_heads, ffn=ffn)


def budget_name(flops: float) -> str:
    """A FLOP budget as run ids and reports write it: ``2e12``, ``2.5e13`` (three significant digits, so
    that budgets that differ do not share a name)."""
    return f"{flops:.3g}".replace("+", "")


def base_lr(dim: int) -> float:
    """The width rule of the peak LR (before the swept multiplier)."""
    return 4e-3 * math.sqrt(64 / dim)


def recipe(method: str, sz: Size, budget: float, lr_mult: float, expert_ratio: float, seed: int,
           sparse_optimizer: bool = False, routing_ratio: float = ROUTING_LR_RATIO) -> TrainConfig:
    """The training config of one run (see the module docstring)."""
    memory = method in ("pkm", "peer")
    return TrainConfig(
        lr=base_lr(sz.dim) * lr_mult, expert_lr_ratio=expert_ratio if memory else 1.0,
        routing_lr_ratio=routing_ratio if memory else 1.0, weight_decay=0.1, betas=(0.9, 0.95),
        warmup_frac=0.05, min_lr_ratio=0.1, grad_clip=1.0, batch_size=BATCH, flops=budget, eval_every=250,
        eval_batches=8, ckpt_every=250, keep=1, seed=seed, device="cpu", log_every=1,
        sparse_optimizer=sparse_optimizer)


def initial_window(budget: float, width: int = 4) -> list[str]:
    """``width`` consecutive sizes around the dense size a 20-tokens-per-parameter rule suggests
    (C = 6 N D = 120 N^2); the plan extends the ladder while the best size is at an end."""
    from peerlm.flops import model_cost

    target = math.sqrt(budget / 120)
    params = [model_cost(model_config("dense", s))["params"] for s in SIZES]
    best = min(range(len(SIZES)), key=lambda i: abs(math.log(params[i] / target)))
    lo = max(0, min(best - 1, len(SIZES) - width))
    return [s.name for s in SIZES[lo:lo + width]]


@dataclass(frozen=True)
class RunSpec:
    """One training run of a study; ``run_id`` names its record and its checkpoint directory.

    ``overrides`` change the method's model (``peerlm.config.apply_overrides`` paths, e.g.
    ``ffn.num_experts=16384``) and ``tokens`` replaces the FLOP budget by a token count (the ablations
    compare at equal tokens, so that the FLOP charge of retrieval does not change the data seen);
    ``budget`` then only names the budget whose compute-optimal shape the run starts from.
    ``routing_ratio`` (PEER and PKM) replaces the recipe's routing LR ratio ``ROUTING_LR_RATIO``.
    """

    phase: str
    budget: float
    method: str
    size: str
    lr_mult: float = 1.0
    expert_ratio: float = 1.0
    seed: int = 0
    sparse_optimizer: bool = False
    overrides: tuple[str, ...] = ()
    tokens: int | None = None
    routing_ratio: float | None = None

    @property
    def run_id(self) -> str:
        memory = self.method in ("pkm", "peer")
        parts = [budget_name(self.budget), self.method, self.size, f"lr{self.lr_mult:g}"]
        if memory:
            parts.append(f"x{self.expert_ratio:g}")
        if memory and self.routing_ratio is not None:
            parts.append(f"r{self.routing_ratio:g}")
        parts += [o.removeprefix("ffn.").replace("=", "").replace("_", "").replace("[", "").replace("]", "")
                  .replace(",", "-") for o in self.overrides]
        if self.tokens is not None:
            parts.append(f"tok{self.tokens}")
        if self.sparse_optimizer:
            parts.append("sparse")
        parts.append(f"s{self.seed}")
        return "_".join(parts)

    def model(self) -> ModelConfig:
        cfg = model_config(self.method, size(self.size))
        return apply_overrides(cfg, self.overrides) if self.overrides else cfg

    def train(self) -> TrainConfig:
        routing = {} if self.routing_ratio is None else {"routing_ratio": self.routing_ratio}
        t = recipe(self.method, size(self.size), self.budget, self.lr_mult, self.expert_ratio, self.seed,
                   self.sparse_optimizer, **routing)
        return t if self.tokens is None else dataclasses.replace(t, flops=None, max_tokens=self.tokens)

    def with_(self, **changes) -> RunSpec:
        return dataclasses.replace(self, **changes)
