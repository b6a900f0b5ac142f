"""Sampling from a trained model with its KV cache: temperature, top-k, top-p; greedy at temperature 0.

The prompt is preceded by ``<|endoftext|>`` (a document start, as in training), prefilled in one
forward pass, then one token per step reads and extends the cache. When the cache is full (prompt plus
new tokens beyond the context), it is rebuilt from the last half context of tokens and decoding goes
on; ``use_cache=False`` recomputes the whole (last context of the) sequence at every step, the
reference the cached path is tested against.

Filtering order: temperature, then top-k, then top-p (the smallest set of tokens whose probability
reaches p, always at least one). Sampling draws from a ``torch.Generator`` seeded by ``seed``, so a
seed fixes the output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from peerlm.evaluate import progress_bar
from peerlm.model import KVCache, Transformer

__all__ = ["filter_logits", "sample_next", "generate"]


def filter_logits(logits_V: Tensor, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """Logits with everything outside the top-k / top-p set at -inf."""
    logits_V = logits_V.clone()
    V = logits_V.shape[-1]
    if top_k is not None and 0 < top_k < V:
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V[logits_V < kth] = float("-inf")
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = torch.sort(logits_V, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens ranked above it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop_sorted[0] = False
        logits_V[order[drop_sorted]] = float("-inf")
    return logits_V


def sample_next(logits_V: Tensor, temperature: float = 1.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """One token id from next-token logits (V,)."""
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = filter_logits(logits_V.float() / temperature, top_k, top_p)
    probs = logits_V.softmax(-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


def _check(temperature: float, top_k: int | None, top_p: float | None, max_new_tokens: int) -> None:
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             bos_id: int | None = 0, stop_id: int | None = 0, use_cache: bool = True,
             progress: bool = False) -> list[int]:
    """New token ids continuing ``prompt`` (ids without the start token): at most ``max_new_tokens``,
    ending early at ``stop_id`` (not included; None never stops). ``progress``: a bar over the tokens."""
    _check(temperature, top_k, top_p, max_new_tokens)
    T, V = model.cfg.context_length, model.cfg.vocab_size
    seq = ([bos_id] if bos_id is not None else []) + list(prompt)
    if not seq:
        raise ValueError("the prompt is empty and there is no start token to condition on")
    if len(seq) > T:
        raise ValueError(f"the prompt is {len(seq)} tokens (with the start token) but the model's context is "
                         f"{T}; shorten it")
    bad = [i for i in seq if not 0 <= i < V]
    if bad:
        raise ValueError(f"token ids must be in [0, vocab_size={V}), got {bad[0]}; the tokenizer does not "
                         "match this model")
    model.eval()
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    out: list[int] = []
    cache: KVCache | None = None

    def forward(ids: list[int]) -> Tensor:
        logits, _ = model(torch.tensor([ids], device=device), kv_cache=cache)
        return logits[0, -1]

    if use_cache:
        cache = model.new_kv_cache(batch=1)
        logits_V = forward(seq)
    bar = progress_bar(max_new_tokens, "generate", progress, unit="tok")
    for _ in range(max_new_tokens):
        bar.update(1)
        if not use_cache:
            logits_V = forward(seq[-T:])
        nxt = sample_next(logits_V, temperature, top_k, top_p, gen)
        if stop_id is not None and nxt == stop_id:
            break
        out.append(nxt)
        seq.append(nxt)
        if use_cache and len(out) < max_new_tokens:
            if cache.pos >= cache.max_len:  # full: rebuild from the last half context
                cache.reset()
                logits_V = forward(seq[-(T // 2 or 1):])
            else:
                logits_V = forward([nxt])
    bar.close()
    return out
