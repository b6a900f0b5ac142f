"""``PeerLMForCausalLM``: peerlm's own ``Transformer`` as a transformers causal LM.

The wrapper holds ``peerlm.model.Transformer`` as ``self.model`` (no second implementation: the
weights, the forward and the init are peerlm's; the state dict keys are the Transformer's prefixed
with ``model.``), in the way transformers' ``TimmWrapper`` holds a timm model. It adds what
transformers expects of a causal LM: the ``CausalLMOutputWithPast`` output, labels shifted inside the
model (``labels == input_ids``; -100 is ignored), the KV cache as a transformers ``Cache``, and the
init hooks that ``post_init`` and ``from_pretrained`` call.

KV cache: peerlm's attention asks a cache for ``pos``, ``max_len``, ``batch`` and
``update(layer, k, v)``; ``_CacheView`` answers those from a transformers ``Cache`` (a
``DynamicCache`` unless one is passed in), so ``generate`` decodes with the cache it manages, and
``use_cache=True`` gives the tokens of ``use_cache=False``.

Init: transformers 5 builds a model on the meta device for ``from_pretrained`` and then initialises
whatever the checkpoint did not hold (``initialize_weights``, also run by ``post_init``), calling
``_init_weights`` on every module; its default resets every ``nn.Linear`` to N(0, 0.02). Here
``initialize_weights`` runs peerlm's own ``init_weights`` when any tensor of the Transformer was not
loaded (every one, for a new model), keeping those that were (``init_missing``), and
``_init_weights`` does nothing; the rotary tables (non-persistent) are recomputed on every load.

Not supported: padded batches (an ``attention_mask`` with zeros; peerlm's attention is causal over
whole sequences), ``inputs_embeds``, and sequences longer than the context (``max_position_embeddings``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import DynamicCache, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from peerlm.model import Block, Transformer

from .configuration import PeerLMConfig

__all__ = ["PeerLMForCausalLM", "init_missing"]


@torch.no_grad()
def init_missing(module: nn.Module, reset: Callable[[], None]) -> bool:
    """Run ``reset`` (the module's own init) when any parameter or persistent buffer of ``module`` is not
    flagged ``_is_hf_initialized`` (transformers flags the tensors it loads from a checkpoint; this flags
    the ones it initialises), and put the flagged ones back afterwards; return whether it ran. Every
    tensor is flagged after, so that a later init pass (``post_init`` again) leaves the module as it is."""
    tensors = module.state_dict(keep_vars=True)
    loaded = {k: t for k, t in tensors.items() if getattr(t, "_is_hf_initialized", False)}
    if len(loaded) == len(tensors):
        return False
    kept = {k: t.detach().clone() for k, t in loaded.items()}
    reset()
    for k, t in module.state_dict(keep_vars=True).items():
        if k in kept:
            t.data.copy_(kept[k])
        t._is_hf_initialized = True
    return True


class _CacheView:
    """peerlm's cache interface (``pos``, ``max_len``, ``batch``, ``update``) over a transformers Cache.

    ``pos`` is the number of positions cached before this forward; the Transformer advances it once
    the forward is done, while the Cache itself grows layer by layer."""

    def __init__(self, cache: Cache, batch: int, max_len: int):
        self.cache, self.batch, self.max_len = cache, batch, max_len
        self.pos = cache.get_seq_length()

    def update(self, layer: int, k_BHTDh: Tensor, v_BHTDh: Tensor) -> tuple[Tensor, Tensor]:
        return self.cache.update(k_BHTDh, v_BHTDh, layer)


class PeerLMForCausalLM(PreTrainedModel, GenerationMixin):
    """A peerlm ``Transformer`` (``self.model``) behind the transformers causal-LM interface."""

    config_class = PeerLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = [Block.__name__]

    def __init__(self, config: PeerLMConfig):
        super().__init__(config)
        target = torch.empty(()).device  # the default device here (meta inside from_pretrained)
        with torch.device("meta"):  # large tables are allocated once, where they live, and initialised once
            self.model = Transformer(config.model_config())
        if target.type != "meta":
            self.model.to_empty(device=target)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing per module: the Transformer's init is peerlm's, run whole by ``initialize_weights``."""

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """peerlm's init where a tensor was not loaded (all of them for a new model); the rotary tables
        (non-persistent, never in a checkpoint) always."""
        init_missing(self.model, self.model.init_weights)
        self.model._init_rope()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.tok_emb

    def get_output_embeddings(self) -> nn.Module | None:
        return self.model.head

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: Cache | None = None,
                inputs_embeds: Tensor | None = None, labels: Tensor | None = None, use_cache: bool | None = None,
                **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits (B, T, V) in fp32 for ``input_ids`` (B, T); the mean next-token loss when ``labels``
        (B, T) are given (labels[:, t + 1] is the target of position t; -100 ignored), plus the MoE
        router losses in training mode; ``cache`` holds the keys and values of earlier positions."""
        if cache is None:
            cache = kwargs.pop("past_key_values", None)  # transformers' older name of ``cache``
        if inputs_embeds is not None or input_ids is None:
            raise ValueError("PeerLMForCausalLM takes input_ids (token ids), not inputs_embeds")
        B, T = input_ids.shape
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("PeerLMForCausalLM does not take padded batches (attention_mask has zeros); pass "
                             "sequences of one length, one at a time, or attention_mask=torch.ones_like(input_ids) "
                             "where the zeros stood for <|endoftext|> tokens, not padding")
        if use_cache is None:  # a training step keeps no keys and values around
            use_cache = self.config.use_cache and not self.training
        view = None
        if use_cache:
            if cache is None:
                cache = DynamicCache(config=self.config)
            view = _CacheView(cache, B, self.config.max_position_embeddings)
        past = view.pos if view is not None else 0
        context = self.config.max_position_embeddings
        if past + T > context:
            raise ValueError(f"{past + T} positions do not fit the model's context of {context} "
                             f"(max_position_embeddings); keep prompt plus new tokens within {context}")
        if position_ids is not None:
            expected = torch.arange(past, past + T, device=position_ids.device).expand(B, T)
            if not torch.equal(position_ids.reshape(-1, T).expand(B, T), expected):
                raise ValueError("PeerLMForCausalLM takes positions 0, 1, ... after the cached ones only; leave "
                                 "position_ids out")
        targets = None
        if labels is not None:
            targets = F.pad(labels[:, 1:], (0, 1), value=-1)
            targets = targets.masked_fill(targets < 0, -1)  # -100 (transformers) is peerlm's -1
        logits, loss = self.model(input_ids, targets, kv_cache=view)
        return CausalLMOutputWithPast(loss=loss, logits=logits, cache=cache if use_cache else None)
