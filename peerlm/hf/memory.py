"""PEER and PKM memory layers in any transformers causal LM: add, save, load, optimise.

``add_memory(model, kind, layers, mode, **layer_options)`` puts a PEER or PKM layer (peerlm's own,
validated by ``PEERConfig`` / ``PKMConfig``) at the MLP of each listed block:

- ``mode="replace"``: the MLP is swapped for the memory (a ``MemoryFFN`` at the MLP's path).
- ``mode="parallel"``: the memory runs beside the MLP, on the MLP's input, and its output, times a
  per-channel ``scale`` that starts at zero, is added to the MLP's; the model computes the same
  function as before at step 0, and the MLP keeps its parameter names, so a checkpoint of the base
  model still loads into it. The memory sits at ``<mlp path>.memory``; a forward hook on the MLP
  adds it (the MLP's own class and forward are left as they are).

Where the MLP of block i is: ``FAMILY_MLP_PATHS`` by ``config.model_type`` (Llama, Mistral, Qwen2,
Qwen3, OLMo2, GPT-2, GPT-NeoX, peerlm), else ``mlp_path="...{i}..."``.

Saving and loading: the memory settings are recorded in ``config.peerlm_memory`` (a list of specs,
one per ``add_memory`` call), so config.json carries them. The model's class becomes
``memory_class(type(model))``, a subclass of the base class (of the same name, so config.json's
``architectures`` and transformers' checkpoint key conversions stay the base's) whose ``__init__``
rebuilds the recorded memory, so ``type(model).from_pretrained(dir)``, and ``from_pretrained(dir)``
here for any directory, load the memory's weights exactly; ``save_pretrained`` writes ``auto_map``
and a module (``MEMORY_MODULE``) beside config.json, so ``AutoModelForCausalLM.from_pretrained(dir,
trust_remote_code=True)`` does too (without ``trust_remote_code`` it builds the plain base class and
leaves the memory's weights out). ``from_pretrained(base_dir, memory={...})`` adds new memory to a
plain checkpoint.

Init, against the traps of transformers 5: its ``post_init`` resets every ``nn.Linear`` (PEER's query
projection would drop from N(0, 1/dim) to N(0, 0.02)); ``from_pretrained`` builds on the meta device
and leaves tensors that the checkpoint lacks uninitialised (PEER's tables would hold garbage), calling
the ``_init_weights`` of the sub-model that owns them (``model.*``), never the outer class's for those.
So: memory built on a real device is initialised by its own ``reset_parameters`` at once and marked
initialised (later ``post_init`` / ``init_weights`` passes skip it); memory built on the meta device
is initialised just before transformers' own pass (in ``initialize_weights`` of the outer class, which
both ``post_init`` and ``from_pretrained`` call on the root): each ``MemoryFFN`` with a tensor the
checkpoint did not hold runs its own ``reset_parameters``, gets back the tensors that were loaded and is
flagged initialised, so that the pass leaves it alone (``init_missing``). A per-module ``_init_weights``
on the outer class would not do: it never sees modules under a sub-model, and transformers skips even
the root's call for custom classes whose root holds no tensor of its own.

``param_groups(model, lr, ...)``: the optimizer groups of ``peerlm train`` (``peerlm.optim``): tables
at their own LR, routing at its own.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel

from peerlm.config import PEERConfig, PKMConfig, from_dict, to_dict
from peerlm.ffn import build_ffn
from peerlm.fileio import atomic_write_text
from peerlm.optim import param_groups as _param_groups

from .modeling import init_missing

__all__ = ["FAMILY_MLP_PATHS", "KINDS", "MODES", "MemoryFFN", "add_memory", "memory_class", "from_pretrained",
           "param_groups"]

FAMILY_MLP_PATHS = {
    "llama": "model.layers.{i}.mlp",
    "mistral": "model.layers.{i}.mlp",
    "qwen2": "model.layers.{i}.mlp",
    "qwen3": "model.layers.{i}.mlp",
    "olmo2": "model.layers.{i}.mlp",
    "gpt2": "transformer.h.{i}.mlp",
    "gpt_neox": "gpt_neox.layers.{i}.mlp",
    "peerlm": "model.blocks.{i}.ffn",
}
KINDS = {"peer": PEERConfig, "pkm": PKMConfig}
MODES = ("replace", "parallel")
CONFIG_KEY = "peerlm_memory"
MEMORY_MODULE = "peerlm_memory_model"  # the module save_pretrained writes beside config.json


class MemoryFFN(nn.Module):
    """A PEER or PKM ``layer`` where a model has an MLP: ``layer(x)`` (replace), or ``scale * layer(x)``
    (parallel: added to the MLP's output; ``scale`` (dim,) starts at zero). The layer computes in its
    own dtype; the output has the input's."""

    def __init__(self, layer: nn.Module, mode: str):
        super().__init__()
        assert mode in MODES, mode
        self.mode = mode
        self.layer = layer
        self.scale = nn.Parameter(torch.empty(layer.dim, device=layer.query.weight.device)) if mode == "parallel" \
            else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.layer.reset_parameters()  # a no-op on the meta device
        if self.scale is not None and not self.scale.is_meta:
            nn.init.zeros_(self.scale)

    def extra_repr(self) -> str:
        return f"mode={self.mode}"

    def forward(self, x: Tensor) -> Tensor:
        y = self.layer(x.to(self.layer.query.weight.dtype)).to(x.dtype)
        return y if self.scale is None else y * self.scale.to(x.dtype)


def _add_parallel_memory(mlp: nn.Module, args: tuple, kwargs: dict, output: Any) -> Tensor:
    """Forward hook of an MLP with parallel memory: its output plus the memory's, on the MLP's input."""
    x = args[0] if args else next(iter(kwargs.values()))
    if not isinstance(output, Tensor):
        raise ValueError(f"{type(mlp).__name__} returns a {type(output).__name__}, not one tensor, so parallel "
                         "memory cannot be added to it; use mode='replace' or an mlp_path naming a module that "
                         "returns one tensor")
    return output + mlp.memory(x)


# ---------------------------------------------------------------------------------------- the spec


def _hidden_size(config: PreTrainedConfig) -> int | None:
    return getattr(config.get_text_config(), "hidden_size", None)


def _num_layers(config: PreTrainedConfig) -> int | None:
    return getattr(config.get_text_config(), "num_hidden_layers", None)


def _layer_config(kind: str, options: dict[str, Any]) -> PEERConfig | PKMConfig:
    """The validated config of one memory layer (ValueError naming a bad option and the valid ones)."""
    if kind not in KINDS:
        raise ValueError(f"add_memory: kind must be one of {tuple(KINDS)}, got {kind!r}")
    cls = KINDS[kind]
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in options if k not in names]
    if unknown:
        close = difflib.get_close_matches(unknown[0], names, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"add_memory: unknown {kind} option {unknown[0]!r}{hint}; valid options: {', '.join(names)}")
    return cls(**options)


def memory_spec(config: PreTrainedConfig, kind: str = "peer", layers: list[int] | tuple[int, ...] = (),
                mode: str = "parallel", mlp_path: str | None = None, **options: Any) -> dict[str, Any]:
    """The JSON-able record of one ``add_memory`` call, checked against the model's ``config``
    (ValueError with the fix for a bad kind, mode, option, layer, width or path)."""
    if mode not in MODES:
        raise ValueError(f"add_memory: mode must be one of {MODES}, got {mode!r}")
    model_type = getattr(config, "model_type", None)
    if mlp_path is None:
        mlp_path = FAMILY_MLP_PATHS.get(model_type)
        if mlp_path is None:
            raise ValueError(f"add_memory: no known MLP path for model type {model_type!r} (known: "
                             f"{', '.join(FAMILY_MLP_PATHS)}); pass mlp_path naming the MLP of block i, e.g. "
                             "mlp_path='model.layers.{i}.mlp'")
    if "{i}" not in mlp_path:
        raise ValueError(f"add_memory: mlp_path must contain '{{i}}' where the block index goes, got {mlp_path!r}")
    hidden = _hidden_size(config)
    dim = options.pop("dim", None)
    if dim is not None and hidden is not None and dim != hidden:
        raise ValueError(f"add_memory: memory width dim={dim} does not match the model's hidden size {hidden}; "
                         "leave dim out (it is the model's)")
    dim = hidden if dim is None else dim
    if not isinstance(dim, int) or dim < 1:
        raise ValueError("add_memory: the model's config has no hidden_size; pass dim=<the MLP's input width>")
    cfg = _layer_config(kind, options)
    layers = list(layers) if isinstance(layers, (list, tuple, range)) else [layers]
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"add_memory: layers must be a non-empty list of block indices, got {layers!r}")
    n = _num_layers(config)
    bad = [i for i in layers if i < 0 or (n is not None and i >= n)]
    if bad:
        span = f"[0, {n})" if n is not None else ">= 0"
        raise ValueError(f"add_memory: layer {bad[0]} is out of range: the model has {n} blocks; use indices in "
                         f"{span}")
    if len(set(layers)) != len(layers):
        raise ValueError(f"add_memory: layers must be distinct, got {layers}")
    taken = {i for spec in getattr(config, CONFIG_KEY, None) or [] for i in spec["layers"]}
    if taken & set(layers):
        raise ValueError(f"add_memory: block(s) {sorted(taken & set(layers))} already have memory; pick other "
                         "layers")
    return {"kind": kind, "mode": mode, "layers": sorted(layers), "mlp_path": mlp_path, "dim": dim,
            "options": to_dict(cfg)}


# -------------------------------------------------------------------------------------- attaching


def _get(model: nn.Module, path: str, i: int) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"add_memory: {type(model).__name__} has no module {path!r} (the MLP of block {i}); pass "
                         "mlp_path naming the MLP of block i, e.g. 'model.layers.{i}.mlp'") from None


def _attach(model: nn.Module, spec: dict[str, Any]) -> list[MemoryFFN]:
    """Build the memory of ``spec`` into ``model`` on the device of each MLP (the meta device inside
    ``from_pretrained``): initialised and marked so on a real device, left for the loader on meta."""
    cfg = from_dict(KINDS[spec["kind"]], spec["options"])
    built = []
    mlps = {i: _get(model, spec["mlp_path"].format(i=i), i) for i in spec["layers"]}  # all found, or none built
    for i, mlp in mlps.items():
        path = spec["mlp_path"].format(i=i)
        if spec["mode"] == "parallel" and hasattr(mlp, "memory"):
            raise ValueError(f"add_memory: {path} already has an attribute 'memory'; it has memory already "
                             "or needs mode='replace'")
    for i, mlp in mlps.items():
        path = spec["mlp_path"].format(i=i)
        ref = next(mlp.parameters(), None)
        device = ref.device if ref is not None else torch.empty(()).device
        dtype = ref.dtype if ref is not None and ref.is_floating_point() else torch.get_default_dtype()
        with torch.device("meta"):  # tables allocated once, where they live, and initialised once
            layer = build_ffn(cfg, spec["dim"])
        if device.type != "meta":
            layer.to_empty(device=device)
        memory = MemoryFFN(layer, spec["mode"]).to(dtype=dtype).train(mlp.training)  # in the model's mode
        if spec["mode"] == "replace":
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, name, memory)
        else:
            mlp.memory = memory
            mlp.register_forward_hook(_add_parallel_memory, with_kwargs=True)
        if device.type != "meta":  # initialised: transformers' init passes must leave it (nn.Linear -> 0.02)
            for t in [*memory.parameters(), *memory.buffers()]:
                t._is_hf_initialized = True
            for m in memory.modules():
                m._is_hf_initialized = True
        built.append(memory)
    return built


class _WithMemory:
    """Mixed into a transformers model class: rebuilds ``config.peerlm_memory`` at construction and
    initialises memory that a checkpoint did not hold (see the module docstring)."""

    def __init__(self, config: PreTrainedConfig, *args: Any, **kwargs: Any):
        super().__init__(config, *args, **kwargs)
        for spec in getattr(config, CONFIG_KEY, None) or []:
            _attach(self, spec)

    def save_pretrained(self, save_directory: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        """``save_pretrained``, plus what ``AutoModelForCausalLM.from_pretrained(DIR,
        trust_remote_code=True)`` needs to build this class (memory included) where peerlm is installed:
        ``auto_map`` in config.json and a three-line ``MEMORY_MODULE`` beside it. A base class from
        outside transformers gets neither (load it with ``peerlm.hf.from_pretrained``)."""
        base = next(c for c in type(self).__mro__[1:] if not issubclass(c, _WithMemory))
        local = base.__module__.startswith("transformers.")
        if local:
            self.config.auto_map = {"AutoModelForCausalLM": f"{MEMORY_MODULE}.{base.__name__}"}
            # transformers marks a class it loaded through auto_map (``_auto_class``) so that saving copies
            # the file defining it, here this module under the wrong name; the memory classes write their
            # own (below), so the mark is cleared
            type(self)._auto_class = None
        out = super().save_pretrained(save_directory, *args, **kwargs)
        if local:
            source = (f'"""{base.__name__} with the peerlm memory its config.json records (peerlm.hf.memory); '
                      'needs peerlm installed."""\n'
                      f"from transformers import {base.__name__} as _Base\n\n"
                      "from peerlm.hf.memory import memory_class\n\n"
                      f"{base.__name__} = memory_class(_Base)\n")
            atomic_write_text(Path(save_directory) / f"{MEMORY_MODULE}.py", source)
        return out

    def initialize_weights(self) -> None:
        # before transformers' own pass, whose per-module hooks belong to the sub-models (``model.*``) and
        # do not know these layers: each memory layer with a tensor that is not initialised (not loaded)
        # runs its own init, keeping what was loaded, and is flagged, so that the pass leaves it alone
        for m in self.modules():
            if isinstance(m, MemoryFFN):
                init_missing(m, m.reset_parameters)
        super().initialize_weights()


@functools.cache
def memory_class(base: type[PreTrainedModel]) -> type[PreTrainedModel]:
    """``base`` with memory: a subclass that builds the memory recorded in its config. It keeps the base
    class's name and counts as the library's own code where ``base`` does, so transformers applies the
    base's checkpoint key conversions (GPT-NeoX's ``embed_out``, ...) and config.json names the base
    architecture; ``type(model).__module__`` is this module."""
    if issubclass(base, _WithMemory):
        return base
    return type(base.__name__, (_WithMemory, base), {
        "__module__": __name__, "__qualname__": base.__qualname__,
        "__doc__": f"{base.__name__} with peerlm memory layers (peerlm.hf.memory).",
        "is_custom_code": classmethod(lambda cls: base.is_custom_code()),
    })


def add_memory(model: PreTrainedModel, kind: str = "peer", layers: list[int] | tuple[int, ...] = (),
               mode: str = "parallel", mlp_path: str | None = None, **layer_options: Any) -> PreTrainedModel:
    """Add a PEER (``kind="peer"``) or PKM (``"pkm"``) layer at the MLP of each block in ``layers``, in
    place; return the model. ``layer_options``: the fields of ``PEERConfig`` / ``PKMConfig``
    (``num_experts``, ``heads``, ``topk``, ``dim_key``, ...). See the module docstring for ``mode``
    and ``mlp_path``. The settings are recorded in ``model.config.peerlm_memory``."""
    if not isinstance(model, PreTrainedModel):
        raise ValueError(f"add_memory takes a transformers PreTrainedModel, got {type(model).__name__}")
    spec = memory_spec(model.config, kind, layers, mode, mlp_path, **layer_options)
    _attach(model, spec)
    setattr(model.config, CONFIG_KEY, [*(getattr(model.config, CONFIG_KEY, None) or []), spec])
    model.__class__ = memory_class(type(model))
    return model


def from_pretrained(path: str | os.PathLike[str], memory: dict[str, Any] | list[dict[str, Any]] | None = None,
                    **kwargs: Any) -> PreTrainedModel:
    """A causal LM from a transformers directory (or hub name) with the memory its config.json records,
    plus ``memory`` (the arguments of ``add_memory`` as a dict, or a list of them) added new and
    initialised by the layers' own init. ``kwargs`` go to ``from_pretrained`` (``dtype``,
    ``device_map``, ...)."""
    config = kwargs.pop("config", None)
    if config is None:
        config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    for extra in [memory] if isinstance(memory, dict) else list(memory or []):
        spec = memory_spec(config, **extra)
        setattr(config, CONFIG_KEY, [*(getattr(config, CONFIG_KEY, None) or []), spec])
    try:
        base = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"{path}: transformers has no causal LM for model type {config.model_type!r}; load it "
                         "with its own class and call add_memory") from None
    cls = memory_class(base) if getattr(config, CONFIG_KEY, None) else base
    return cls.from_pretrained(path, config=config, **kwargs)


def param_groups(model: nn.Module, lr: float, weight_decay: float = 0.0, expert_lr: float | None = None,
                 routing_lr: float | None = None, expert_weight_decay: float = 0.0) -> list[dict[str, Any]]:
    """Optimizer parameter groups as ``peerlm train`` makes them (``peerlm.optim.param_groups``):
    ``decay`` / ``no_decay`` for the rest of the model, ``experts`` (PEER tables, PKM values) at
    ``expert_lr`` and ``routing`` / ``routing_no_decay`` (query projections, norms, sub-keys) at
    ``routing_lr``; None is ``lr``. Pass them to ``torch.optim.AdamW``."""
    return _param_groups(model, lr, weight_decay, expert_lr, expert_weight_decay, routing_lr)
