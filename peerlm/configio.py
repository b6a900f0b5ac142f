"""Config machinery for typed dataclasses: type checks, the JSON round trip and ``--set`` overrides.

Generic over any dataclass whose fields are ints, floats, bools, strings, lists and tuples of these,
optionals, nested dataclasses, and unions of dataclasses told apart by a ``KIND`` class attribute
(written to JSON as ``"kind"``). ``peerlm.config`` (model configs) and ``peerlm.train`` (the training
config) build on it; both re-export what they use.
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
from collections.abc import Iterable
from typing import Any, Union

__all__ = ["check_types", "to_dict", "from_dict", "to_json", "from_json", "apply_overrides", "parse_int",
           "parse_float", "accepted_form"]


def check_types(obj: Any) -> None:
    """Type-check every field against its annotation (ints are accepted, and stored, as floats)."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        coerced = _decode(value, hints[f.name], f"{type(obj).__name__}.{f.name}", from_json=False)
        if coerced is not value and type(coerced) is float:
            object.__setattr__(obj, f.name, coerced)



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
        if isinstance(value, float) and value.is_integer():  # 256.0 for 256: say how to write it
            raise ValueError(f"{where}: expected a whole number, got {value!r}; write {int(value)}")
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
