"""Perplexity with a compressed KV cache (teacher-forced)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F

from memfit.api import LM
from memfit.hfcompat import with_cache
from memfit.kv.policy import Policy, parse_policy

SHIPPED_TEXT = Path(__file__).parent / "data" / "lighthouses.txt"  # an original essay, written for memfit


def perplexity(lm: LM, text: str, policy: "str | Policy" = "none", *, context_fraction: float = 0.5,
               chunk: int = 64, max_tokens: int | None = None) -> float:
    """Perplexity of the second part of ``text`` given its first part compressed with ``policy``.

    The first ``context_fraction`` of the tokens is prefilled and compressed as ``lm.prefill``
    does (evictions included); the rest is fed in chunks of ``chunk`` tokens, so that a quantizer
    also compresses the continuation as it grows. Only the continuation (after its first token) is scored.
    """
    return perplexity_and_bits(lm, text, policy, context_fraction=context_fraction, chunk=chunk,
                               max_tokens=max_tokens)[0]


@torch.no_grad()
def perplexity_and_bits(lm: LM, text: str, policy: "str | Policy" = "none", *, context_fraction: float = 0.5,
                        chunk: int = 64, max_tokens: int | None = None) -> tuple[float, float]:
    """:func:`perplexity`, and the bits an element the cache holds at the end, everything counted: the
    bytes of the compressed context and of the continuation's own storage (codes, grids, windows,
    sinks, codebooks), times 8, over the keys' and values' elements of every token it has seen."""
    if not 0.0 < context_fraction < 1.0:
        raise ValueError("context_fraction must be in (0, 1)")
    ids = lm.tokenizer(text, add_special_tokens=True, return_tensors="pt")["input_ids"].to(lm.device)
    if max_tokens:
        ids = ids[:, :max_tokens]
    n = ids.shape[1]
    split = int(n * context_fraction)
    if split < 1 or n - split < 2:
        raise ValueError(f"text too short for perplexity: {n} tokens")
    policy = parse_policy(policy)
    if policy.spec == "none":
        chunk = max(chunk, 1024)  # nothing compresses as the continuation grows: fewer, larger passes, same result
    ctx = lm.prefill_ids(ids[:, :split], policy)
    cache = ctx.cache.fork(1)
    nll, count = 0.0, 0
    # feed tokens split .. n-2; each position predicts the next token (the first continuation token
    # itself is not scored: its logits come from the prefill, which keeps none)
    for start in range(split, n - 1, chunk):
        piece = ids[:, start : min(start + chunk, n - 1)]
        targets = ids[:, start + 1 : start + 1 + piece.shape[1]]
        logits = lm.model(piece, **with_cache(lm.model, cache), use_cache=True).logits
        logits = logits.float() if logits.element_size() < 4 else logits  # upcast 16-bit, keep float64
        nll += F.cross_entropy(logits[0], targets[0], reduction="sum").item()
        count += targets.shape[1]
    elements = 2 * lm.num_layers * lm.num_kv_heads * lm.head_dim * (n - 1)  # keys and values of tokens 0 .. n-2
    return math.exp(nll / count), 8 * (ctx.cache.nbytes + cache.nbytes) / elements
