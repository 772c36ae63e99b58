"""RULER-style aggregation: common-word extraction (a word list) and frequent-word extraction (coded text)."""

from __future__ import annotations

import random

from memfit.eval.filler import TokenCounter
from memfit.eval.tasks.base import Question, Sample

_WORDS = ("apple river stone cloud maple copper lantern velvet harbor meadow pepper silver thunder willow "
          "basket candle feather garden hammer island jungle kitten ladder mirror needle orange pencil rabbit "
          "saddle tomato umbrella violet walnut yellow zipper bridge castle dolphin engine forest giraffe helmet "
          "igloo jacket kettle lemon magnet napkin oyster parrot quilt rocket spider tiger valley wagon").split()


def _fit(count: TokenCounter, length: int, per_item: str) -> int:
    """How many list items make about ``length`` tokens."""
    per = max(1.0, count(per_item * 10) / 10)
    return max(20, int(length / per))


def common_words(seed: int, length: int, count: TokenCounter, top: int = 1) -> Sample:
    """A numbered word list in which ``top`` words are far more frequent than the rest."""
    rng = random.Random(f"cwe:{seed}:{length}")
    words = rng.sample(_WORDS, len(_WORDS))
    common, rare = words[:top], words[top:]
    n = _fit(count, length, "\n123. lantern")
    n_common = max(n // 5 // top, 8)
    items = [w for w in common for _ in range(n_common)]
    items += [rng.choice(rare) for _ in range(n - len(items))]
    # no rare word may come close to the common ones
    limit = max(2, n_common // 3)
    counts: dict[str, int] = {}
    capped = []
    for w in items:
        if w not in common and counts.get(w, 0) >= limit:
            w = min(rare, key=lambda r: counts.get(r, 0))
        counts[w] = counts.get(w, 0) + 1
        capped.append(w)
    rng.shuffle(capped)
    text = "Below is a numbered list of words.\n" + "\n".join(f"{i + 1}. {w}" for i, w in enumerate(capped))
    if top == 1:
        q = Question("Which word appears most often in the list above?", (common[0],),
                     "The word that appears most often is")
    else:
        q = Question(f"What are the {top} most common words in the list above?", tuple(common),
                     f"The {top} most common words are", lines=top)
    return Sample("common_words", length, seed, text, (q,), {"top": top, "repeats": n_common})


def frequent_words(seed: int, length: int, count: TokenCounter, top: int = 1) -> Sample:
    """Coded words drawn from a Zipf law; the most frequent coded word(s) must be named."""
    rng = random.Random(f"fwe:{seed}:{length}")
    vocab = ["".join(rng.choice("bcdfghjklmnpqrstvwxz") + rng.choice("aeiou") for _ in range(2)) for _ in range(200)]
    vocab = list(dict.fromkeys(vocab))
    weights = [1.0 / (r + 1) ** 1.2 for r in range(len(vocab))]
    weights[0] *= 2.5  # a clear winner, as in RULER's fwe
    n = _fit(count, length, " gabo")
    text_words = rng.choices(vocab, weights=weights, k=n)
    counts = {w: text_words.count(w) for w in set(text_words)}
    ranked = sorted(counts, key=lambda w: -counts[w])
    text = "Read the following coded text and track how often each coded word appears.\n" + " ".join(text_words)
    if top == 1:
        q = Question("Which coded word appears most often in the coded text above?", (ranked[0],),
                     "The coded word that appears most often is")
    else:
        q = Question(f"What are the {top} most frequent coded words in the text above?", tuple(ranked[:top]),
                     f"The {top} most frequent coded words are", lines=top)
    return Sample("frequent_words", length, seed, text, (q,), {"counts": [counts[w] for w in ranked[:3]]})
