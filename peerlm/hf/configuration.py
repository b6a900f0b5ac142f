"""``PeerLMConfig``: a peerlm ``ModelConfig`` as a transformers config (model type ``"peerlm"``).

The peerlm config is the one source of truth: it is stored whole under ``peerlm`` (the dict of
``peerlm.config.to_dict``), validated by ``ModelConfig`` as everywhere else, and the fields that
transformers reads by their standard names (``vocab_size``, ``hidden_size``, ``num_hidden_layers``,
``num_attention_heads``, ``max_position_embeddings``, ``tie_word_embeddings``) are derived from it, so
that transformers' caches and generation see the shape they expect. Edit the model through
``peerlm``, not through the derived fields, which are recomputed on every load.

Token ids: peerlm's tokenizer has one special token, ``<|endoftext|>`` (id 0), which starts and
separates documents; it is the beginning, end and padding token here.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from peerlm.config import ModelConfig, from_dict, to_dict

__all__ = ["PeerLMConfig"]


class PeerLMConfig(PreTrainedConfig):
    """A peerlm ``ModelConfig`` (``peerlm``: its dict; None: the default ``ModelConfig()``)."""

    model_type = "peerlm"

    peerlm: dict[str, Any] | None = None
    vocab_size: int | None = None
    hidden_size: int | None = None
    num_hidden_layers: int | None = None
    num_attention_heads: int | None = None
    max_position_embeddings: int | None = None
    tie_word_embeddings: bool = True
    use_cache: bool = True
    bos_token_id: int | None = 0
    eos_token_id: int | None = 0
    pad_token_id: int | None = 0

    def __post_init__(self, **kwargs: Any) -> None:
        cfg = self.model_config()
        self.peerlm = to_dict(cfg)
        self.vocab_size, self.hidden_size = cfg.vocab_size, cfg.dim
        self.num_hidden_layers, self.num_attention_heads = cfg.n_layers, cfg.n_heads
        self.max_position_embeddings = cfg.context_length
        self.tie_word_embeddings = cfg.tie_embeddings
        super().__post_init__(**kwargs)

    @classmethod
    def from_model_config(cls, cfg: ModelConfig, **kwargs: Any) -> PeerLMConfig:
        """The transformers config of a peerlm ``ModelConfig``."""
        return cls(peerlm=to_dict(cfg), **kwargs)

    def model_config(self) -> ModelConfig:
        """The peerlm ``ModelConfig`` (validated; ValueError naming the field when it is not valid)."""
        if self.peerlm is None:
            return ModelConfig()
        try:
            return from_dict(ModelConfig, self.peerlm)
        except (TypeError, KeyError) as e:
            raise ValueError(f"PeerLMConfig.peerlm is not a valid peerlm model config ({e}); write it with "
                             "peerlm.config.to_dict(ModelConfig(...))") from None
