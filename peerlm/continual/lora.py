"""LoRA adapters (Hu et al. 2021) on the trunk's linear layers, through Hugging Face ``peft``.

``attach_lora`` injects adapters into a ``Transformer`` in place (``peft.inject_adapter_in_model``):
each targeted ``nn.Linear`` becomes a ``peft`` LoRA layer holding the frozen base weight and the
trainable low-rank pair A (r x in), B (out x r, zero at init, so the model starts as it was). Every
other parameter is frozen. The model stays a ``Transformer``, so the training loop, checkpoints and
resume treat it like any model; its state dict names the base weights ``...base_layer.weight`` and
the adapters ``...lora_A.default.weight`` / ``...lora_B.default.weight``.

``merge_lora`` folds the adapters into plain weights (W + (alpha / r) B A) and puts the plain
``nn.Linear`` back, so a merged model has exactly the state dict of a model without adapters.
``peerlm.rundir.load_run`` does this for a LoRA run, so eval and generate read it like any run.

Default targets (``TRUNK_TARGETS``): attention's qkv and output projections and the dense MLP's
layers; not the PEER / PKM query projections (routing), not the embedding or the head.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["TRUNK_TARGETS", "lora_config", "attach_lora", "merge_lora", "has_lora"]

TRUNK_TARGETS = ("attn.qkv", "attn.proj", "ffn.fc", "ffn.gate", "ffn.proj")


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise ValueError("LoRA needs Hugging Face peft: pip install 'peerlm[hf]'") from None
    return peft


def lora_config(rank: int, alpha: float, dropout: float, targets: Sequence[str] = TRUNK_TARGETS) -> Any:
    """The ``peft.LoraConfig``; ``targets`` are module name suffixes (``attn.qkv`` matches every
    block's)."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    if not targets:
        raise ValueError("LoRA needs at least one target module")
    pattern = r".*\.(" + "|".join(t.replace(".", r"\.") for t in targets) + r")$"
    return _peft().LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=pattern, bias="none")


def attach_lora(model: nn.Module, rank: int, alpha: float, dropout: float,
                targets: Sequence[str] = TRUNK_TARGETS) -> nn.Module:
    """Inject LoRA adapters into ``model`` in place and freeze everything else; returns ``model``.
    ValueError when no ``nn.Linear`` matches ``targets``."""
    cfg = lora_config(rank, alpha, dropout, targets)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and any(n == t or n.endswith("." + t) for t in targets)]
    if not names:
        raise ValueError(f"no linear layer of the model matches the LoRA targets {list(targets)}")
    _peft().inject_adapter_in_model(cfg, model)
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_" in name
    return model


def has_lora(model: nn.Module) -> bool:
    layer = _peft().tuners.lora.LoraLayer
    return any(isinstance(m, layer) for m in model.modules())


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRA adapter of ``model`` into its base weight and put the plain layer back, in
    place; returns ``model``."""
    layer_type = _peft().tuners.lora.LoraLayer
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, layer_type)]
    for name, m in found:
        m.merge(safe_merge=True)
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, m.get_base_layer())
    return model
