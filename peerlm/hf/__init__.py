"""peerlm and Hugging Face transformers (extra ``hf``).

    configuration.py   PeerLMConfig: a peerlm ModelConfig as a transformers config
    modeling.py        PeerLMForCausalLM: peerlm's Transformer behind the transformers causal-LM interface
    memory.py          add_memory: PEER / PKM layers in any transformers causal LM; from_pretrained; param_groups
    export.py          a run as a transformers directory (``peerlm export RUN --hf OUT``) and back
    adapter.py         HFModelConfig (a run's transformers model) and HFCausalLM (peerlm's model interface)
    flops.py           parameters and FLOPs per token of the known transformers families
    training.py        ``peerlm train --hf-model DIR [--add-memory SPEC]``: a transformers model in peerlm's loop
    retrofit.py        ``peerlm retrofit``: PEER added to a pretrained dense Llama and healed, against dense

Importing this package registers ``PeerLMConfig`` and ``PeerLMForCausalLM`` with ``AutoConfig`` and
``AutoModelForCausalLM`` (model type ``"peerlm"``); an exported directory also carries the code
(``auto_map``), so ``trust_remote_code=True`` loads it wherever peerlm is installed.
"""

from __future__ import annotations

try:
    import transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - depends on the environment
    raise ImportError(f"peerlm.hf needs transformers ({e}); install the extra: pip install 'peerlm[hf]'") from None

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration import PeerLMConfig
from .memory import FAMILY_MLP_PATHS, MemoryFFN, add_memory, from_pretrained, memory_class, param_groups
from .modeling import PeerLMForCausalLM

__all__ = ["PeerLMConfig", "PeerLMForCausalLM", "FAMILY_MLP_PATHS", "MemoryFFN", "add_memory", "from_pretrained",
           "memory_class", "param_groups"]

AutoConfig.register(PeerLMConfig.model_type, PeerLMConfig, exist_ok=True)
AutoModelForCausalLM.register(PeerLMConfig, PeerLMForCausalLM, exist_ok=True)
PeerLMConfig.register_for_auto_class()
PeerLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")
