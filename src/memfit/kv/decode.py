"""Compression during decoding: keep the tokens a layer adds after its context under a budget.

Long outputs grow the cache again after prefill compressed it. With ``decode(max_tokens=N)`` in a
policy, every layer accumulates the attention its own (post-context) entries receive from each new
query (H2O's score, computed by memfit's attention function for that one query), and when it holds
more than ``max_tokens`` of them it keeps the ``max_tokens - every`` best (the ``recent`` newest
always), so eviction runs about once per ``every`` steps. The shared context of a fork is never
touched.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class DecodeBudget:
    max_tokens: int = 1024
    every: int = 64
    recent: int = 32

    def __post_init__(self) -> None:
        if self.every < 1 or self.recent < 0:
            raise ValueError(f"decode: every must be >= 1 and recent >= 0, got {self.every}, {self.recent}")
        if self.max_tokens <= self.every + self.recent:
            raise ValueError(f"decode: max_tokens ({self.max_tokens}) must exceed every + recent "
                             f"({self.every + self.recent})")

    @property
    def keep(self) -> int:
        """Own tokens kept after an eviction."""
        return self.max_tokens - self.every
