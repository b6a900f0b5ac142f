"""A transformers causal LM as a run's model: its run-config section and the adapter the loop trains.

``HFModelConfig`` is the ``model`` section of a run config whose ``model_kind`` is ``"hf"``
(``peerlm.runconfig``): the transformers config as a dict (``config``; the memory that
``peerlm.hf.add_memory`` added is part of it, under ``peerlm_memory``), the training context
(``context_length``, at most the model's positions) and where the starting weights came from
(``source``: the directory's resolved path, its model type, and the sha256 of its weight files, or none
for a config-only directory). The dict, not a path, is what rebuilds the model: a checkpoint then brings the
weights, so a run resumes, evaluates and generates wherever its source directory went.

``HFCausalLM`` wraps the transformers model (``self.hf``; state dict keys ``hf.`` + the model's) and
offers what peerlm's ``Transformer`` offers the loop, ``evaluate`` and ``generate``: ``model(idx,
targets)`` -> ``(logits, loss)`` (targets already shifted, -1 ignored, logits in fp32),
``last_losses``, ``memory_layers()``, ``num_params()``, ``cfg`` (``vocab_size``, ``context_length``)
and ``new_kv_cache(batch)`` over a transformers ``DynamicCache``.

``build_hf(spec, device, weights=None)``: the model of an ``HFModelConfig``, initialised by transformers
(config only) or loaded from a directory (``weights``; the memory the config records beyond the
directory's is added new, with its own init).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, PreTrainedConfig, PreTrainedModel
from transformers.utils import logging as hf_logging

from peerlm.ffn import memory_layers

from .memory import CONFIG_KEY, from_pretrained, memory_class

__all__ = ["HFModelConfig", "HFCausalLM", "build_hf", "causal_class", "hf_config", "positions", "WEIGHT_NAMES"]

# the weight files a transformers directory may hold (single file or sharded, safetensors or torch)
WEIGHT_NAMES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def hf_config(config: dict[str, Any]) -> PreTrainedConfig:
    """The transformers config of a config dict (``PreTrainedConfig.to_dict()``); ValueError naming the
    model type when transformers does not know it."""
    d = copy.deepcopy(config)
    model_type = d.pop("model_type", None)
    if not model_type:
        raise ValueError("the transformers config has no model_type; it is not a transformers model config")
    try:
        return AutoConfig.for_model(model_type, **d)
    except (ValueError, KeyError) as e:
        raise ValueError(f"transformers does not know model type {model_type!r} ({e}); upgrade transformers "
                         "or use another model") from None


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    text = config.get("text_config")
    return text if isinstance(text, dict) and "vocab_size" not in config else config


def positions(config: dict[str, Any]) -> int | None:
    """The most positions the model takes (its ``max_position_embeddings`` or its family's name for it)."""
    text = _text_config(config)
    for key in _POSITION_KEYS:
        if isinstance(text.get(key), int):
            return text[key]
    return None


@dataclasses.dataclass
class HFModelConfig:
    """The ``model`` section of a run that trains a transformers model (see the module docstring)."""

    config: dict[str, Any]
    context_length: int
    source: dict[str, Any] = dataclasses.field(default_factory=dict)

    KIND = "hf"

    def __post_init__(self) -> None:
        if not isinstance(self.config, dict) or not self.config.get("model_type"):
            raise ValueError("HFModelConfig.config must be a transformers config dict with a model_type")
        self.config = json.loads(json.dumps(self.config))  # as config.json holds it (id2label's keys: strings)
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(f"the {self.model_type} config has no vocab_size")
        if isinstance(self.context_length, bool) or not isinstance(self.context_length, int) \
                or self.context_length < 1:
            raise ValueError(f"model.context_length must be a whole number >= 1, got {self.context_length!r}")
        most = positions(self.config)
        if most is not None and self.context_length > most:
            raise ValueError(f"model.context_length {self.context_length} is more than the {most} positions of "
                             f"this {self.model_type} model; set model.context_length <= {most}")

    model_type = property(lambda self: self.config["model_type"])
    vocab_size = property(lambda self: _text_config(self.config).get("vocab_size"))
    memory = property(lambda self: list(self.config.get(CONFIG_KEY) or []))

    def to_dict(self) -> dict[str, Any]:
        return {"config": copy.deepcopy(self.config), "context_length": self.context_length,
                "source": copy.deepcopy(self.source)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFModelConfig:
        unknown = sorted(set(d) - {"config", "context_length", "source"})
        if unknown or "config" not in d or "context_length" not in d:
            raise ValueError(f"a transformers model section needs 'config' and 'context_length'"
                             f"{f', and has unknown keys {unknown}' if unknown else ''}")
        return cls(d["config"], d["context_length"], d.get("source", {}))


class _HFCache:
    """peerlm's cache interface (``pos``, ``max_len``, ``batch``, ``reset``) over a transformers
    ``DynamicCache``, which the adapter passes to the model."""

    def __init__(self, config: PreTrainedConfig, batch: int, max_len: int):
        self.config, self.batch, self.max_len = config, batch, max_len
        self.reset()

    def reset(self) -> None:
        self.cache, self.pos = DynamicCache(config=self.config), 0


class HFCausalLM(nn.Module):
    """A transformers causal LM (``self.hf``) with peerlm's model interface (module docstring)."""

    def __init__(self, hf: PreTrainedModel, spec: HFModelConfig):
        super().__init__()
        self.hf, self.cfg = hf, spec
        self.last_losses: dict[str, Tensor] = {}

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                kv_cache: _HFCache | None = None) -> tuple[Tensor, Tensor | None]:
        """idx (B, T) -> logits (B, T, V) in fp32, and the mean cross-entropy against ``targets`` (B, T)
        (-1 ignored) when given; ``kv_cache`` holds the keys and values of earlier positions."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        limit = kv_cache.max_len if kv_cache is not None else self.cfg.context_length
        if T == 0 or past + T > limit:
            raise ValueError(f"sequence of {T} tokens after {past} cached positions does not fit the context of "
                             f"{limit}; crop the input to at most {limit - past} tokens")
        if kv_cache is not None:
            out = self.hf(input_ids=idx, cache=kv_cache.cache, use_cache=True)
            kv_cache.pos += T
        else:
            out = self.hf(input_ids=idx, use_cache=False)
        logits_BTV = out.logits.float()
        if targets is None:
            self.last_losses = {}
            return logits_BTV, None
        loss = F.cross_entropy(logits_BTV.view(-1, logits_BTV.shape[-1]), targets.reshape(-1).long(),
                               ignore_index=-1)
        parts = torch.stack([loss, torch.zeros_like(loss), loss]).detach()
        self.last_losses = dict(zip(("ce", "aux", "loss"), parts.unbind()))
        return logits_BTV, loss

    def new_kv_cache(self, batch: int, max_len: int | None = None) -> _HFCache:
        """An empty cache for ``batch`` sequences of up to ``max_len`` (default: the context length)."""
        max_len = self.cfg.context_length if max_len is None else max_len
        if not 1 <= max_len <= self.cfg.context_length:
            raise ValueError(f"max_len must be in [1, context_length={self.cfg.context_length}], got {max_len}")
        return _HFCache(self.hf.config, batch, max_len)

    def memory_layers(self) -> list[tuple[str, nn.Module]]:
        """(name, module) of every PEER and PKM layer, for usage statistics."""
        return memory_layers(self)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def causal_class(config: PreTrainedConfig) -> type[PreTrainedModel]:
    """The causal-LM class of ``config``, with the memory it records."""
    try:
        base = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        raise ValueError(f"transformers has no causal LM for model type {config.model_type!r}; train a causal "
                         "LM (e.g. llama, qwen2, gpt2)") from None
    return memory_class(base) if getattr(config, CONFIG_KEY, None) else base


def build_hf(spec: HFModelConfig, device: torch.device | str = "cpu",
             weights: str | os.PathLike[str] | None = None) -> HFCausalLM:
    """The model of ``spec`` in fp32 on ``device``, in training mode: from the weights in directory
    ``weights`` plus the memory ``spec`` records beyond it (new, with its own init), or, without
    ``weights``, initialised by transformers (seeded by the caller's RNG state; a checkpoint loaded
    afterwards overwrites that init, which is then work done once too often, not a second copy)."""
    config = hf_config(spec.config)
    if weights is None:
        model = causal_class(config)(config)
    else:
        saved = AutoConfig.from_pretrained(weights)
        have = len(getattr(saved, CONFIG_KEY, None) or [])
        extra = spec.memory[have:]
        memory = [{"kind": m["kind"], "layers": m["layers"], "mode": m["mode"], "mlp_path": m["mlp_path"],
                   **{k: v for k, v in m["options"].items() if k != "kind"}} for m in extra]
        # new memory makes keys missing (its own) and, replacing an MLP, unexpected (the MLP's): transformers'
        # load report would list them all; its other warnings stay
        before = hf_logging.get_verbosity()
        if memory:
            hf_logging.set_verbosity(max(before, hf_logging.ERROR))
        try:
            model = from_pretrained(Path(weights), memory=memory, dtype=torch.float32)
        finally:
            hf_logging.set_verbosity(before)
    model = model.to(device=device, dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    return HFCausalLM(model, spec)
