"""RULER-style variable tracking: chains of assignments hidden in filler."""

from __future__ import annotations

import random
import string

from memfit.eval.filler import TokenCounter, fill_to_length
from memfit.eval.tasks.base import Question, Sample


def _name(rng: random.Random, used: set[str]) -> str:
    while True:
        n = "".join(rng.choice(string.ascii_uppercase) for _ in range(5))
        if n not in used:
            used.add(n)
            return n


def variable_tracking(seed: int, length: int, count: TokenCounter, hops: int = 3, chains: int = 2) -> Sample:
    """``chains`` chains of ``hops`` assignments (VAR B = VAR A ...), in order but far apart; the
    question asks for every variable of the first chain, which ends up holding its number."""
    rng = random.Random(f"vt:{seed}:{length}")
    used: set[str] = set()
    statements, first = [], None
    for c in range(chains):
        value = str(rng.randint(10000, 99999))
        names = [_name(rng, used) for _ in range(hops)]
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {names[i]} = VAR {names[i - 1]}." for i in range(1, hops)]
        statements.append(chain)
        if c == 0:
            first = (value, names)
    # chains interleaved, each in its own order: every assignment comes after the one it reads
    inserts = [s for group in zip(*statements) for s in group]
    text, _ = fill_to_length(rng, count, length, inserts, ordered=True)
    value, names = first
    q = Question(f"Which variables are assigned the value {value}, directly or through other variables?",
                 tuple(names), f"The variables assigned the value {value} are", lines=hops)
    return Sample("variable_tracking", length, seed, text, (q,), {"hops": hops, "chains": chains})
