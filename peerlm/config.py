"""Model configuration: typed dataclasses that validate themselves, JSON round trip, overrides, presets.

A ``ModelConfig`` describes a decoder-only transformer whose blocks all use the dense MLP ``mlp``
except the blocks named by ``placement``, whose feed-forward is ``ffn``: a ``PEERConfig``, ``MoEConfig``
or ``PKMConfig`` (``ffn=None`` is a dense model). Block ids are 0-based; ``"middle"`` is block
``(n_layers - 1) // 2``, i.e. block 5 of 0..11, the paper's "block 6 of 12".

Each per-kind config defaults to the paper's setting for that layer (PEER N = 1024^2, h 8, k 16;
PKM 1024^2 memories, h 8, k 32; MoE 128 expert-choice experts); CPU presets shrink them.

``to_dict``/``from_dict`` round-trip through JSON; a sparse ``ffn`` carries its ``"kind"``.
``apply_overrides(cfg, ["ffn.num_experts=16384", "placement=1,3"])`` works on any of these dataclasses
(and on any dataclass nesting them, e.g. a training config with a ``model`` field).

Presets are plain functions registered by name; see ``list_presets()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import re
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

from peerlm.fused import ACTIVATIONS as PEER_ACTIVATIONS
from peerlm.norms import QUERY_NORMS
from peerlm.peer import GATES, IMPLS

__all__ = [
    "DenseConfig", "PEERConfig", "MoEConfig", "PKMConfig", "ModelConfig", "SPARSE_KINDS",
    "to_dict", "from_dict", "to_json", "from_json", "apply_overrides", "parse_int", "parse_float",
    "preset", "get_preset", "list_presets",
]

MLP_ACTIVATIONS = ("gelu", "swiglu")
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


def check_types(obj: Any) -> None:
    """Type-check every field against its annotation (ints are accepted, and stored, as floats)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        coerced = _decode(value, hints[f.name], f"{type(obj).__name__}.{f.name}", from_json=False)
        if coerced is not value and type(coerced) is float:
            object.__setattr__(obj, f.name, coerced)


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        if getattr(obj, name) < 1:
            _fail(obj, name, f"must be >= 1, got {getattr(obj, name)}")


def _check_square(obj: Any, name: str) -> int:
    value = getattr(obj, name)
    n = math.isqrt(max(value, 0))
    if value < 1 or n * n != value:
        lo, hi = max(n, 1) ** 2, (n + 1) ** 2
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


# ------------------------------------------------------------------------------- JSON (de)serialising


def _union_args(tp: Any) -> tuple | None:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return typing.get_args(tp)
    return None


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    args = _union_args(tp)
    if args:
        return " | ".join(_type_name(a) for a in args)
    if typing.get_origin(tp) in (list, tuple):
        return f"{typing.get_origin(tp).__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is Ellipsis:
        return "..."
    return getattr(tp, "__name__", str(tp))


def _decode(value: Any, tp: Any, where: str, from_json: bool = True) -> Any:
    """Check ``value`` against ``tp``; build nested dataclasses from dicts when ``from_json``."""
    args = _union_args(tp)
    if args:
        if value is None:
            if type(None) in args:
                return None
            raise ValueError(f"{where}: expected {_type_name(tp)}, got None")
        classes = [a for a in args if dataclasses.is_dataclass(a)]
        if classes and (isinstance(value, dict) or any(isinstance(value, c) for c in classes)):
            if isinstance(value, dict) and from_json:
                kinds = {c.KIND: c for c in classes}
                kind = value.get("kind")
                if kind not in kinds:
                    raise ValueError(f"{where}: needs a 'kind' among {sorted(kinds)}, got {kind!r}")
                return _from_dict(kinds[kind], value, where)
            if any(isinstance(value, c) for c in classes):
                return value
        for a in args:
            if a is type(None) or dataclasses.is_dataclass(a):
                continue
            try:
                return _decode(value, a, where, from_json)
            except ValueError:
                pass
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if from_json and isinstance(value, dict):
            return _from_dict(tp, value, where)
        raise ValueError(f"{where}: expected a {tp.__name__} (a JSON object), got {type(value).__name__}")
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            raise ValueError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_decode(v, item, f"{where}[{i}]", from_json) for i, v in enumerate(value)]
    if typing.get_origin(tp) is tuple:
        items = typing.get_args(tp)
        if isinstance(value, (list, tuple)):
            if len(items) == 2 and items[1] is Ellipsis:
                items = (items[0],) * len(value)
            if len(items) == len(value):
                pairs = enumerate(zip(value, items))
                return tuple(_decode(v, t, f"{where}[{i}]", from_json) for i, (v, t) in pairs)
        raise ValueError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # NaN and inf mean nothing in a config and end as NaN losses
                raise ValueError(f"{where}: expected a finite number, got {value!r}")
            return float(value) if isinstance(value, int) else value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp in (bool, str):
        if isinstance(value, tp):
            return value
    else:
        raise AssertionError(f"{where}: unsupported annotation {tp!r}")
    raise ValueError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _unknown_key(cls: type, key: str, where: str) -> ValueError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown key {key!r}{hint}; known keys: {', '.join(names)}")


def _from_dict(cls: type, data: dict, where: str) -> Any:
    data = dict(data)
    kind = data.pop("kind", None)
    own = getattr(cls, "KIND", None)
    if kind is not None and kind != own:
        raise ValueError(f"{where}: 'kind' is {kind!r} but a {cls.__name__} has kind {own!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            raise _unknown_key(cls, key, where)
    kwargs = {k: _decode(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """A JSON-ready dict of a config dataclass; nested feed-forward configs carry their ``"kind"``."""
    out: dict[str, Any] = {}
    if hasattr(cfg, "KIND"):
        out["kind"] = cfg.KIND
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            value = to_dict(value)
        elif isinstance(value, (list, tuple)):
            value = list(value)
        out[f.name] = value
    return out


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of ``to_dict``; ValueError on unknown keys, wrong types or invalid values."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a dict, got {type(data).__name__}")
    return _from_dict(cls, data, cls.__name__)


def to_json(cfg: Any) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def from_json(cls: type, text: str) -> Any:
    return from_dict(cls, json.loads(text))


# ------------------------------------------------------------------------------------------ overrides

_INT_EXPR = re.compile(r"^\s*([+-]?\d[\d_]*)\s*(?:(\*\*|\^|\*)\s*(\d[\d_]*)\s*)?$")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def parse_int(text: str) -> int:
    """A whole number as a user writes one: ``256``, ``-1``, ``1_000``, ``1024**2``, ``64*64``, or
    an integral float such as ``1e6``; ValueError otherwise. Ranges are the caller's to check, so that
    ``-1`` gets a range error rather than a parse error."""
    m = _INT_EXPR.match(text)
    if m:
        a, op, b = m.groups()
        if op is None:
            return int(a)
        return int(a) * int(b) if op == "*" else int(a) ** int(b)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a whole number: {text!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"not a whole number: {text!r}")
    return int(value)


def parse_float(text: str) -> float:
    """A finite number (``3e-4``, ``-1``, ``1_000.5``); ValueError for anything else, NaN and inf
    included: no field means anything by them, and they turn into NaN losses far from here."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"not a number: {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def accepted_form(tp: Any) -> str:
    """How a value of annotation ``tp`` is written in an override, for error messages."""
    args = _union_args(tp)
    if args:
        forms = [accepted_form(a) for a in args if a is not type(None) and not dataclasses.is_dataclass(a)]
        kinds = sorted(a.KIND for a in args if dataclasses.is_dataclass(a))
        if kinds:
            forms.append(f"a kind ({', '.join(kinds)})")
        if type(None) in args:
            forms.append("none")
        return " or ".join(forms)
    if tp is int:
        return "a whole number such as 256, 1e6 or 1024**2"
    if tp is float:
        return "a number such as 3e-4"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a word"
    if typing.get_origin(tp) is list:
        return "comma-separated values such as 1,3 (or [1,3])"
    if typing.get_origin(tp) is tuple:
        items = typing.get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            return "comma-separated values such as 1,2"
        examples = {int: ("1", "2"), float: ("0.9", "0.95"), bool: ("true", "false")}
        example = ",".join(examples.get(t, ("x", "y"))[i % 2] for i, t in enumerate(items))
        return f"{len(items)} comma-separated values such as {example}"
    if dataclasses.is_dataclass(tp):
        return "its fields, e.g. <section>.<field>=..."
    return _type_name(tp)


def _parse(text: str, tp: Any, where: str) -> Any:
    """Parse an override string as ``tp`` (``parse_int`` / ``parse_float`` for numbers)."""
    args = _union_args(tp)
    if args:
        if text.strip().lower() in ("none", "null") and type(None) in args:
            return None
        classes = {a.KIND: a for a in args if dataclasses.is_dataclass(a)}
        if text.strip() in classes:
            return classes[text.strip()]()
        # most specific member first, so that "5" is a list of block ids rather than a string
        order = sorted((a for a in args if a is not type(None) and not dataclasses.is_dataclass(a)),
                       key=lambda a: a is str)
        for a in order:
            try:
                return _parse(text, a, where)
            except ValueError:
                pass
        extra = f" or one of {sorted(classes)}" if classes else ""
        raise ValueError(f"{where}: cannot parse {text!r} as {_type_name(tp)}{extra}; give {accepted_form(tp)}")
    if tp is int:
        with contextlib.suppress(ValueError):
            return parse_int(text)
    elif tp is float:
        with contextlib.suppress(ValueError):
            return parse_float(text)
    elif tp is bool:
        if text.strip().lower() in _TRUE + _FALSE:
            return text.strip().lower() in _TRUE
    elif tp is str:
        return text
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        body = text.strip().removeprefix("[").removesuffix("]").strip()
        if not body:
            return []
        try:
            return [_parse(p.strip(), item, where) for p in body.split(",")]
        except ValueError:
            pass
    elif typing.get_origin(tp) is tuple:
        body = text.strip().removeprefix("(").removesuffix(")").removeprefix("[").removesuffix("]").strip()
        texts = [p.strip() for p in body.split(",")] if body else []
        items = typing.get_args(tp)
        if len(items) == 2 and items[1] is Ellipsis:
            items = (items[0],) * len(texts)
        if len(items) == len(texts):
            with contextlib.suppress(ValueError):
                return tuple(_parse(t, i, where) for t, i in zip(texts, items))
    elif dataclasses.is_dataclass(tp):
        raise ValueError(f"{where} is a {tp.__name__}; set its fields, e.g. {where}.<field>=...")
    raise ValueError(f"{where}: cannot parse {text!r} as {_type_name(tp)}; give {accepted_form(tp)}")


def _section_class(tp: Any, data: dict) -> type:
    """The dataclass a nested dict stands for: the field's type, or the union member named by its kind."""
    args = _union_args(tp)
    if not args:
        return tp
    kinds = {a.KIND: a for a in args if dataclasses.is_dataclass(a)}
    return kinds[data["kind"]]


def _set(data: dict, cls: type, parts: list[str], text: str, where: str) -> None:
    """Set one override in the ``to_dict`` form ``data`` of a ``cls``, parsing by the field type."""
    name = parts[0]
    if name == "kind" and hasattr(cls, "KIND"):
        raise ValueError(f"to change the kind of {where}, set {where}=<kind> (resets its fields)")
    if name not in {f.name for f in dataclasses.fields(cls)}:
        raise _unknown_key(cls, name, where or cls.__name__)
    tp = typing.get_type_hints(cls)[name]
    path = f"{where}.{name}" if where else name
    if len(parts) == 1:
        value = _parse(text, tp, path)
        data[name] = to_dict(value) if dataclasses.is_dataclass(value) else value
        return
    child = data[name]
    if child is None:
        raise ValueError(f"{path} is None; set {path}=<kind> first")
    if not isinstance(child, dict):
        raise ValueError(f"{path} is not a config section; cannot set {'.'.join(parts[1:])} in it")
    _set(child, _section_class(tp, child), parts[1:], text, path)


def apply_overrides(cfg: Any, overrides: Iterable[str]) -> Any:
    """Return a copy of ``cfg`` with ``"path.to.field=value"`` overrides applied in order.

    Values are parsed by the field's type (ints, also as ``a*b`` or ``a**b``; floats; bools as
    true/false; lists and tuples as ``1,2`` or ``[1,2]``; ``none`` for optional fields); a sparse ``ffn``
    is switched with ``ffn=peer|moe|pkm`` (that kind's defaults) or removed with ``ffn=none``. The
    result is validated once, after all overrides, so their order does not matter for validity.
    Works on any dataclass whose fields have these types or nest such dataclasses.
    """
    overrides = list(overrides)
    data = to_dict(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like path.to.field=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        if not all(parts):
            raise ValueError(f"override {item!r}: empty field name in {path!r}")
        try:
            _set(data, type(cfg), parts, text.strip(), "")
        except ValueError as e:
            raise ValueError(f"override {item!r}: {e}") from None
    try:
        return from_dict(type(cfg), data)
    except ValueError as e:
        raise ValueError(f"overrides {overrides}: {e}") from None


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
