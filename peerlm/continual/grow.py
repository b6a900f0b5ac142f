"""Growing a PEER layer's expert pool: n -> n + m sub-keys per half, (n + m)^2 - n^2 new experts.

PEER's product keys index expert (i, j) as ``i * n + j`` (``peerlm.retrieval``). Growing n re-indexes
every old expert: (i, j) moves from row ``i * n + j`` to row ``i * (n + m) + j``; the new experts are
the rows with i >= n or j >= n. ``grow_model`` builds the grown model (a plain ``Transformer`` of the
grown config, so a grown run evaluates, generates and resumes like any other) and copies every
weight across with that remap.

Initialisation of what is new, chosen so that the model's output at step 0 is the base model's:
- v rows (``w_up``) of new experts are zero, so a retrieved new expert adds nothing;
- new sub-keys are zero (``key_init="zero"``), so a new sub-key scores 0 for every query. A new
  expert can then only be retrieved by a head whose query has fewer than k old sub-keys scoring above
  0 in a half (the product top-k is a subset of each half's top-k). Where every head has k positive
  old scores in both halves, which holds for almost every token of a trained model, retrieval and
  gates are the base model's, and so is the output: bit for bit while both sizes re-score the winners
  on the same path (tested token by token), within float rounding where growing moves n past
  ``peerlm.retrieval.DENSE_RESCORE_RATIO * k``;
- u rows (``w_down``) of new experts are drawn like the layer's init (N(0, 1/d)), so that a new
  expert's gradient on v is not zero once it is retrieved.
``key_init="random"`` draws new sub-keys like the layer's init instead: the new experts then compete
for retrieval from the first step (they are learned faster), and old experts they displace change
the output from step 0.

Training a grown layer (``GrowRows``): only new experts' rows and new sub-keys get gradients; old
rows, the query projection, the query norm and the trunk stay frozen.

Shape legend: N' = (n + m)^2 rows after growing, N = n^2 before.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn

from peerlm.config import ModelConfig, PEERConfig
from peerlm.continual.memory import RoutingFrozen, keep_mask
from peerlm.model import Transformer, build_model
from peerlm.peer import PEER

__all__ = ["KEY_INITS", "grown_config", "old_rows", "new_rows_mask", "grow_model", "GrowRows"]

KEY_INITS = ("zero", "random")


def grown_config(cfg: ModelConfig, m: int) -> ModelConfig:
    """``cfg`` with its PEER layers' n grown by ``m`` (ValueError for a model without PEER layers)."""
    if not isinstance(cfg.ffn, PEERConfig):
        kind = "no memory layer" if cfg.ffn is None else f"{cfg.ffn.KIND} layers"
        raise ValueError(f"grow adds experts to PEER layers, and this model has {kind}")
    if m < 1:
        raise ValueError(f"the number of sub-keys to add per half must be >= 1, got {m}")
    n = math.isqrt(cfg.ffn.num_experts)
    return dataclasses.replace(cfg, ffn=dataclasses.replace(cfg.ffn, num_experts=(n + m) ** 2))


def old_rows(n: int, m: int, device: torch.device | str = "cpu") -> Tensor:
    """Row in the grown table of each old expert, in old id order: old id i*n+j -> i*(n+m)+j."""
    i = torch.arange(n, device=device).repeat_interleave(n)
    j = torch.arange(n, device=device).repeat(n)
    return i * (n + m) + j


def new_rows_mask(n: int, m: int, device: torch.device | str = "cpu") -> Tensor:
    """(N',) bool: True for the rows of new experts (i >= n or j >= n)."""
    mask = torch.ones((n + m) ** 2, dtype=torch.bool, device=device)
    mask[old_rows(n, m, device)] = False
    return mask


@torch.no_grad()
def grow_model(base: Transformer, m: int, key_init: str = "zero") -> Transformer:
    """A new model with every PEER layer of ``base`` grown by ``m`` sub-keys per half (see the module
    docstring), in ``base``'s training or eval mode; ``base`` is not changed. New parameters draw from
    torch's global generator."""
    if key_init not in KEY_INITS:
        raise ValueError(f"key_init must be one of {KEY_INITS}, got {key_init!r}")
    cfg = grown_config(base.cfg, m)
    device = base.tok_emb.weight.device
    grown = build_model(cfg, device)
    layers = dict(base.memory_layers())
    own = grown.state_dict()
    for name, t in base.state_dict().items():
        if not any(name.startswith(f"{layer}.") for layer in layers):
            own[name].copy_(t)
    for name, old in layers.items():
        new = grown.get_submodule(name)
        assert isinstance(old, PEER) and isinstance(new, PEER)
        n = old.n
        new.query.load_state_dict(old.query.state_dict())
        new.norm.load_state_dict(old.norm.state_dict())
        rows = old_rows(n, m, device)
        new.w_down[rows] = old.w_down
        new.w_up.zero_()
        new.w_up[rows] = old.w_up
        if key_init == "zero":
            new.keys.keys.zero_()
        new.keys.keys[:, :, :n] = old.keys.keys
    return grown.train(base.training)


class GrowRows(RoutingFrozen):
    """Step hooks of a grown model: keep only gradient rows of new experts and new sub-keys (``base_n``:
    the sub-keys per half before growing, by layer name)."""

    def __init__(self, model: Transformer, base_n: dict[str, int]):
        self.layers = dict(model.memory_layers())
        self.base_n = base_n
        self.masks = {name: new_rows_mask(base_n[name], layer.n - base_n[name], layer.w_up.device)
                      for name, layer in self.layers.items()}

    def before_update(self, model: nn.Module, step: int) -> None:
        for name, layer in self.layers.items():
            for p in (layer.w_down, layer.w_up):
                if p.grad is not None:
                    p.grad = keep_mask(p.grad, self.masks[name])
            if layer.keys.keys.grad is not None:
                layer.keys.keys.grad[:, :, : self.base_n[name]] = 0
