"""Parameters and FLOPs per token of transformers models of the known families, from their config.

Families: ``COSTED`` (Llama, Mistral, Qwen2, Qwen3, OLMo2, GPT-2, GPT-NeoX): decoder-only stacks whose
every matmul is a linear layer (``nn.Linear``, GPT-2's ``Conv1D``) applied once per token, plus
attention over the sequence. The model is built on the meta device (nothing allocated) and counted with
``peerlm.flops``' conventions: a multiply-add is 2 FLOPs; each linear layer costs 2 x its weights per
token; attention adds 2 * 2 * T * (heads x head_dim) per layer for the scores and the weighted sum,
every token charged the full T (sliding windows longer than T change nothing; shorter ones are
charged as full); the output head 2 * D * V; embeddings, norms, activations and rotary 0. PEER and PKM
layers added by ``peerlm.hf.add_memory`` are counted by ``peerlm.flops.ffn_cost`` (their retrieval
included) in place of their modules; a ``parallel`` one adds to its MLP, a ``replace`` one stands in
for it. Training = 3 x forward, but sub-key scoring (no autograd) once and the re-scoring of the k
winners three times, as for peerlm's own models.

Parameters are counted on the built model, tied tables once. Another family raises ``ValueError``
(its matmuls may not be its linear layers: MoE experts, fused kernels), so FLOP budgets need one of
these; it still trains by steps or tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from peerlm.config import from_dict
from peerlm.flops import ffn_cost, retrieval_rescore_flops

from .adapter import HFModelConfig, causal_class, hf_config
from .memory import KINDS, MemoryFFN

__all__ = ["COSTED", "hf_cost"]

COSTED = ("llama", "mistral", "qwen2", "qwen3", "olmo2", "gpt2", "gpt_neox")


def _attention_width(config: Any) -> tuple[int, int]:
    """(layers, heads x head_dim) of the attention of ``config``."""
    if config.model_type == "gpt2":
        return config.n_layer, config.n_embd
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return config.num_hidden_layers, heads * head_dim


def _linear_weights(module: nn.Module) -> int:
    """Weights of a matmul layer (``nn.Linear``, GPT-2's ``Conv1D``), 0 for anything else."""
    if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
        return module.weight.numel()
    return 0


def hf_cost(spec: HFModelConfig, seq_len: int | None = None) -> dict[str, Any]:
    """``params``, ``active_params`` (all but the rows of the memory tables a token does not touch),
    ``expert_params``, ``flops_forward`` and ``flops_train`` per token of ``spec``'s model at attention
    length ``seq_len`` (default: the run's context). ValueError for a family not in ``COSTED``."""
    if spec.model_type not in COSTED:
        raise ValueError(f"no FLOP model for transformers model type {spec.model_type!r} (known: "
                         f"{', '.join(COSTED)}); train it by --max-steps or --max-tokens")
    T = spec.context_length if seq_len is None else seq_len
    config = hf_config(spec.config)
    with torch.device("meta"):
        model = causal_class(config)(config)
    head = model.get_output_embeddings()
    inside = {id(sub) for m in model.modules() if isinstance(m, MemoryFFN) for sub in m.modules()}
    dim = model.get_input_embeddings().weight.shape[1]
    V = head.weight.shape[0]
    linear = sum(_linear_weights(m) for m in model.modules() if id(m) not in inside and m is not head)
    layers, width = _attention_width(config)
    forward = 2 * linear + layers * 2 * 2 * T * width + 2 * dim * V
    train = 3 * forward
    params = active = sum(p.numel() for p in model.parameters())
    expert = 0
    for spec_i in spec.memory:
        cfg = from_dict(KINDS[spec_i["kind"]], spec_i["options"])
        cost = ffn_cost(cfg, dim)
        n = len(spec_i["layers"])
        forward += n * cost["flops"]["total"]
        scoring = cost["flops"]["subkey_scores"]  # no autograd: once, and the k winners re-scored 3x
        train += n * (3 * cost["flops"]["total"] - 2 * scoring + 3 * retrieval_rescore_flops(cfg))
        expert += n * (2 * cfg.num_experts * dim if spec_i["kind"] == "peer" else cfg.num_keys * dim)
        active += n * (cost["active_params"] - cost["params"])
    return {"seq_len": T, "params": params, "active_params": active, "expert_params": expert,
            "flops_forward": forward, "flops_train": train}
