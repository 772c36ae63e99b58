"""Filler prose, generated offline from a seed, and fitting text to a token budget."""

from __future__ import annotations

import random
from collections.abc import Callable

from memfit.eval.demo import filler_sentence

TokenCounter = Callable[[str], int]


def filler_sentences(rng: random.Random, n: int) -> list[str]:
    return [filler_sentence(rng) for _ in range(n)]


def fill_to_length(rng: random.Random, count_tokens: TokenCounter, budget: int, inserts: list[str],
                   ordered: bool = False) -> tuple[str, list[float]]:
    """Filler sentences with ``inserts`` placed at random depths (in the given order if ``ordered``),
    about ``budget`` tokens in all. Returns the text and the relative depth (0..1) of each insert."""
    fixed = sum(count_tokens(s) for s in inserts)
    per_sentence = max(1.0, count_tokens(" ".join(filler_sentences(random.Random(0), 20))) / 20)
    n = max(len(inserts) + 1, int((budget - fixed) / per_sentence))
    sentences = filler_sentences(rng, n)
    slots = sorted(rng.sample(range(n + 1), len(inserts)))
    order = list(range(len(inserts)))
    if not ordered:
        rng.shuffle(order)
    depth = [0.0] * len(inserts)
    for slot, i in sorted(zip(slots, order), reverse=True):
        sentences.insert(slot, inserts[i])
    text = " ".join(sentences)
    for i, s in enumerate(inserts):
        depth[i] = text.index(s) / max(1, len(text))
    return text, depth
