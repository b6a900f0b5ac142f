"""Model configuration: typed dataclasses that validate themselves, JSON round trip, overrides, presets.

A ``ModelConfig`` describes a decoder-only transformer whose blocks all use the dense MLP ``mlp``
except the blocks named by ``placement``, whose feed-forward is ``ffn``: a ``PEERConfig``, ``MoEConfig``
or ``PKMConfig`` (``ffn=None`` is a dense model). Block ids are 0-based; ``"middle"`` is block
``(n_layers - 1) // 2``, i.e. block 5 of 0..11, the paper's "block 6 of 12".

Each per-kind config defaults to the paper's setting for that layer (PEER N = 1024^2, h 8, k 16;
PKM 1024^2 memories, h 8, k 32; MoE 128 expert-choice experts); CPU presets shrink them.

``to_dict``/``from_dict`` round-trip through JSON; a sparse ``ffn`` carries its ``"kind"`` (the
generic machinery, type checks and override parsing live in ``peerlm.configio``, re-exported here).
``apply_overrides(cfg, ["ffn.num_experts=16384", "placement=1,3"])`` works on any of these dataclasses
(and on any dataclass nesting them, e.g. a training config with a ``model`` field).

Presets are plain functions registered by name; see ``list_presets()``.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from peerlm.configio import (  # noqa: F401 (re-exported: the config API in one place)
    accepted_form,
    apply_overrides,
    check_types,
    from_dict,
    from_json,
    parse_float,
    parse_int,
    to_dict,
    to_json,
)

__all__ = [
    "DenseConfig", "PEERConfig", "MoEConfig", "PKMConfig", "ModelConfig", "SPARSE_KINDS",
    "to_dict", "from_dict", "to_json", "from_json", "apply_overrides", "parse_int", "parse_float",
    "preset", "get_preset", "list_presets", "MLP_ACTIVATIONS", "PEER_ACTIVATIONS", "GATES", "IMPLS", "QUERY_NORMS",
]

# The layers' options by name. They live with the configs, not in the layer modules: the layers validate
# their options through these configs, so the configs must not depend on the layers.
MLP_ACTIVATIONS = ("gelu", "swiglu")
PEER_ACTIVATIONS = ("gelu", "relu", "silu")  # of PEER's one-neuron experts (peerlm.bags.ACTIVATIONS)
GATES = ("softmax", "sigmoid", "softmax-token")
IMPLS = ("auto", "reference", "fused", "triton")
QUERY_NORMS = ("batchnorm", "running", "none")
ROUTINGS = ("token", "expert")
ATTN_IMPLS = ("sdpa", "eager")
PLACEMENTS = ("middle", "all")


def _fail(obj: Any, name: str, problem: str, fix: str = "") -> None:
    msg = f"{type(obj).__name__}.{name} {problem}"
    raise ValueError(msg + (f"; {fix}" if fix else ""))


def _check_choice(obj: Any, name: str, allowed: Iterable[str]) -> None:
    allowed = tuple(allowed)
    value = getattr(obj, name)
    if value not in allowed:
        _fail(obj, name, f"must be one of {allowed}, got {value!r}")


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            _fail(obj, name, f"must be >= 1, got {getattr(obj, name)}")


def _check_square(obj: Any, name: str) -> int:
    value = getattr(obj, name)
    n = math.isqrt(max(value, 0))
    if value < 1 or n * n != value:
        m = max(n, 1)
        lo, hi = m**2, (m + 1) ** 2
        _fail(obj, name, f"must be a perfect square n*n (product keys), got {value}",
              f"use e.g. {lo} or {hi}")
    return n


def _check_product_keys(obj: Any, count: str) -> None:
    """Retrieval fields shared by PEER and PKM: a square pool, heads >= 1, topk <= sqrt, even dim_key."""
    n = _check_square(obj, count)
    _check_positive(obj, "heads")
    if not 1 <= obj.topk <= n:
        _fail(obj, "topk", f"must be in [1, sqrt({count})={n}], got {obj.topk}", f"lower topk or raise {count}")
    if obj.dim_key < 2 or obj.dim_key % 2:
        _fail(obj, "dim_key", f"must be even and >= 2 (two query halves), got {obj.dim_key}")


# ------------------------------------------------------------------------------------- feed-forwards


@dataclass
class DenseConfig:
    """The dense MLP. ``hidden=None``: 4*dim for GELU; for SwiGLU 8/3*dim rounded up to a multiple of
    64, which keeps the parameter count (3*dim*hidden) about equal to the GELU MLP's (2*dim*4*dim)."""

    KIND: ClassVar[str] = "dense"
    hidden: int | None = None
    activation: str = "gelu"

    def __post_init__(self) -> None:
        check_types(self)
        if self.hidden is not None and self.hidden < 1:
            _fail(self, "hidden", f"must be >= 1 or None (default size), got {self.hidden}")
        _check_choice(self, "activation", MLP_ACTIVATIONS)

    def hidden_size(self, dim: int) -> int:
        if self.hidden is not None:
            return self.hidden
        if self.activation == "gelu":
            return 4 * dim
        return 64 * math.ceil(8 * dim / 3 / 64)


@dataclass
class PEERConfig:
    """A PEER layer (``peerlm.peer.PEER``); defaults are the paper's (N = 1024^2, h 8, k 16, query BN)."""

    KIND: ClassVar[str] = "peer"
    num_experts: int = 1024**2
    heads: int = 8
    topk: int = 16
    dim_key: int = 128
    activation: str = "gelu"
    gate: str = "softmax"
    query_norm: str = "batchnorm"
    shared_keys: bool = True
    impl: str = "auto"
    sparse_grad: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        _check_product_keys(self, "num_experts")
        _check_choice(self, "activation", PEER_ACTIVATIONS)
        _check_choice(self, "gate", GATES)
        _check_choice(self, "query_norm", QUERY_NORMS)
        _check_choice(self, "impl", IMPLS)


@dataclass
class MoEConfig:
    """A mixture of experts, each a dense MLP of the model's activation with ``expert_hidden`` units.

    routing "token": each token picks its top-``topk`` experts (Switch/ST-MoE, with load-balancing and
    router z-losses). In training each expert takes at most C = ceil(capacity_factor * tokens * topk /
    num_experts) assignments, all first choices before any second choice; the rest are dropped.
    ``capacity_factor=None`` drops nothing. Eval never drops (a token's experts are its own top-k).
    routing "expert" (Zhou et al. 2022, the paper's baseline): in training each expert picks its
    ceil(capacity_factor * tokens / num_experts) top tokens of the batch, so capacity_factor is the
    average number of experts per token; eval routes a token to every expert whose router probability
    reaches that expert's threshold, a running estimate of its training-time acceptance score with
    decay ``threshold_decay`` (see ``peerlm.ffn.MoE``); before any training step, to its top-``topk``.
    ``capacity_factor="auto"``: 1.0 for expert choice (the layer costs what one expert costs; the paper
    leaves it unstated) and 2.0 for token choice, so that drops are rare and training routes as eval
    does. Slack costs no FLOPs here (only kept assignments are computed, nothing is padded); it bounds
    an expert's worst-case load. In a tiny LM after 60 steps ST-MoE's 1.25 dropped up to 6% of top-1
    assignments, putting its train-mode loss up to 0.06 nats above eval's; 2.0 dropped none (10 runs).
    ``expert_hidden``: hidden units per expert; None is the dense MLP's size (coarse experts). A
    granularity G (Krajewski et al. 2024, "Scaling laws for fine-grained mixture of experts") is
    expert_hidden = hidden / G with G times the experts and G times topk (or capacity_factor), which
    keeps parameters and FLOPs per token fixed.
    """

    KIND: ClassVar[str] = "moe"
    num_experts: int = 128
    topk: int = 1
    routing: str = "expert"
    capacity_factor: float | str | None = "auto"
    aux_loss_coef: float = 0.01
    z_loss_coef: float = 1e-3
    expert_hidden: int | None = None
    threshold_decay: float = 0.99

    AUTO_CAPACITY: ClassVar[dict[str, float]] = {"expert": 1.0, "token": 2.0}

    def __post_init__(self) -> None:
        check_types(self)
        _check_positive(self, "num_experts")
        if not 1 <= self.topk <= self.num_experts:
            _fail(self, "topk", f"must be in [1, num_experts={self.num_experts}], got {self.topk}")
        _check_choice(self, "routing", ROUTINGS)
        cf = self.capacity_factor
        if cf is None and self.routing == "expert":
            _fail(self, "capacity_factor", "must be set for routing='expert'",
                  "give the average number of experts per token, e.g. 1.0 or 2.0, or 'auto'")
        if isinstance(cf, str) and cf != "auto":
            _fail(self, "capacity_factor", f"must be a number > 0, 'auto' or None, got {cf!r}")
        if isinstance(cf, float) and not cf > 0:
            _fail(self, "capacity_factor", f"must be > 0 or None (no dropping), got {cf}")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                _fail(self, name, f"must be >= 0, got {getattr(self, name)}")
        if self.expert_hidden is not None and self.expert_hidden < 1:
            _fail(self, "expert_hidden", f"must be >= 1 or None (the dense MLP's size), got {self.expert_hidden}")
        if not 0 <= self.threshold_decay < 1:
            _fail(self, "threshold_decay", f"must be in [0, 1), got {self.threshold_decay}",
                  "0.99 averages the acceptance scores of about the last 100 training steps")

    def capacity(self) -> float | None:
        """The capacity factor with ``"auto"`` resolved for this routing."""
        if self.capacity_factor == "auto":
            return self.AUTO_CAPACITY[self.routing]
        return self.capacity_factor

    def hidden_size(self, mlp_hidden: int) -> int:
        """Hidden units per expert, given the dense MLP's hidden size."""
        return mlp_hidden if self.expert_hidden is None else self.expert_hidden


@dataclass
class PKMConfig:
    """A product-key memory (Lample et al. 2019); defaults are the paper's baseline (1024^2 memories,
    h 8, k 32, query BN). Its retrieval matches ``PEERConfig``'s (d_key 128, one key set shared by the
    heads), so that PKM and PEER differ only in what a retrieved slot holds (Lample used d_key 512 and
    per-head keys: ``dim_key=512, shared_keys=False``)."""

    KIND: ClassVar[str] = "pkm"
    num_keys: int = 1024**2
    heads: int = 8
    topk: int = 32
    dim_key: int = 128
    query_norm: str = "batchnorm"
    shared_keys: bool = True
    sparse_grad: bool = False

    def __post_init__(self) -> None:
        check_types(self)
        _check_product_keys(self, "num_keys")
        _check_choice(self, "query_norm", QUERY_NORMS)


SparseConfig = Union[PEERConfig, MoEConfig, PKMConfig]  # noqa: UP007 (needed at runtime for from_dict)
SPARSE_KINDS: dict[str, type] = {c.KIND: c for c in (PEERConfig, MoEConfig, PKMConfig)}


# ------------------------------------------------------------------------------------------- model


@dataclass
class ModelConfig:
    """A decoder-only transformer; defaults are the CPU-sized dense baseline (preset ``dense-small``)."""

    vocab_size: int = 8192
    context_length: int = 256
    dim: int = 256
    n_layers: int = 4
    n_heads: int = 4
    mlp: DenseConfig = field(default_factory=DenseConfig)
    tie_embeddings: bool = True
    rope_theta: float = 10000.0
    ffn: PEERConfig | MoEConfig | PKMConfig | None = None
    placement: str | list[int] = "middle"
    attn_impl: str = "sdpa"

    def __post_init__(self) -> None:
        check_types(self)
        _check_positive(self, "vocab_size", "context_length", "dim", "n_layers", "n_heads")
        if self.dim % self.n_heads:
            _fail(self, "dim", f"({self.dim}) must be divisible by n_heads ({self.n_heads})",
                  "change dim or n_heads")
        if (self.dim // self.n_heads) % 2:
            _fail(self, "n_heads", f"gives an odd head size {self.dim // self.n_heads}",
                  "rotary embeddings need dim / n_heads even")
        if not self.rope_theta > 0:
            _fail(self, "rope_theta", f"must be > 0, got {self.rope_theta}")
        _check_choice(self, "attn_impl", ATTN_IMPLS)
        if isinstance(self.placement, str):
            if self.placement not in PLACEMENTS:
                _fail(self, "placement", f"must be one of {PLACEMENTS} or a list of block ids, "
                      f"got {self.placement!r}", "e.g. placement=[5] or placement='middle'")
        else:
            bad = [i for i in self.placement if not 0 <= i < self.n_layers]
            if bad or not self.placement or len(set(self.placement)) != len(self.placement):
                _fail(self, "placement", f"must be distinct block ids in [0, {self.n_layers}), "
                      f"got {self.placement}", "block ids are 0-based")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def sparse_blocks(self) -> list[int]:
        """0-based ids of the blocks whose feed-forward is ``ffn`` (empty for a dense model)."""
        if self.ffn is None:
            return []
        if self.placement == "middle":
            return [(self.n_layers - 1) // 2]
        if self.placement == "all":
            return list(range(self.n_layers))
        return sorted(self.placement)

    def block_ffn(self, block: int) -> DenseConfig | SparseConfig:
        """The feed-forward config of one block."""
        assert 0 <= block < self.n_layers
        return self.ffn if block in self.sparse_blocks() else self.mlp


# -------------------------------------------------------------------------------------------- presets

_PRESETS: dict[str, Callable[[], ModelConfig]] = {}


def preset(name: str) -> Callable[[Callable[[], ModelConfig]], Callable[[], ModelConfig]]:
    """Register a function returning a ModelConfig under ``name``."""

    def register(fn: Callable[[], ModelConfig]) -> Callable[[], ModelConfig]:
        assert name not in _PRESETS, name
        _PRESETS[name] = fn
        return fn

    return register


def list_presets() -> list[str]:
    return list(_PRESETS)


def get_preset(name: str) -> ModelConfig:
    """A fresh ModelConfig of the named preset."""
    if name not in _PRESETS:
        close = difflib.get_close_matches(name, _PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown preset {name!r}{hint}; known presets: {', '.join(_PRESETS)}")
    return _PRESETS[name]()


# Every family shares one trunk; its dense/peer/moe/pkm members differ only in `ffn`, which goes into
# the middle block as in the paper. Sizes: "tiny" for tests (well under a second); "small" and
# "medium" for a few minutes on 2 CPU cores (PEER and PKM at N = 128^2, the smallest N of the paper's
# ablation, with the paper's h and k; MoE with 8 dense-sized experts, expert choice); "paper", the
# paper's 12 blocks with each per-kind config at its paper defaults. Width 768, a 32k vocabulary (C4
# with T5's SentencePiece) and context 2048 are documented guesses where the paper is silent; too
# large to train here.
_TRUNKS: dict[str, dict[str, int]] = {
    "tiny": {"vocab_size": 256, "context_length": 32, "dim": 32, "n_layers": 2, "n_heads": 2},
    "small": {"vocab_size": 8192, "context_length": 256, "dim": 256, "n_layers": 4, "n_heads": 4},
    "medium": {"vocab_size": 8192, "context_length": 256, "dim": 384, "n_layers": 6, "n_heads": 6},
    "paper": {"vocab_size": 32000, "context_length": 2048, "dim": 768, "n_layers": 12, "n_heads": 12},
}


def _family_ffn(family: str, kind: str) -> SparseConfig | None:
    if kind == "dense":
        return None
    if family == "paper":
        return SPARSE_KINDS[kind]()
    if family == "tiny":
        return {
            "peer": PEERConfig(num_experts=16**2, heads=2, topk=4, dim_key=16),
            "moe": MoEConfig(num_experts=4, topk=1, routing="expert", capacity_factor="auto"),
            "pkm": PKMConfig(num_keys=16**2, heads=2, topk=4, dim_key=16),
        }[kind]
    return {
        "peer": PEERConfig(num_experts=128**2, heads=8, topk=16, dim_key=128),
        "moe": MoEConfig(num_experts=8, topk=1, routing="expert", capacity_factor="auto"),
        "pkm": PKMConfig(num_keys=128**2, heads=8, topk=32, dim_key=128),
    }[kind]


def _family_member(family: str, kind: str) -> Callable[[], ModelConfig]:
    def make() -> ModelConfig:
        return ModelConfig(**_TRUNKS[family], ffn=_family_ffn(family, kind))

    make.__name__ = make.__qualname__ = f"{family}_{kind}"
    make.__doc__ = f"The {kind} member of the {family!r} preset family."
    return make


def _preset_name(family: str, kind: str) -> str:
    if family == "tiny":
        return "tiny" if kind == "dense" else f"tiny-{kind}"
    return f"paper-{kind}" if family == "paper" else f"{kind}-{family}"


for _family in _TRUNKS:
    for _kind in ("dense", "peer", "moe", "pkm"):
        preset(_preset_name(_family, _kind))(_family_member(_family, _kind))
