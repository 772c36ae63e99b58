from __future__ import annotations

from dataclasses import dataclass

from memfit.kv.evict.base import Eviction, Observation
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class H2O(Eviction):
    """H2O (Zhang et al., 2023): keep the "heavy hitters", the tokens that received the most attention
    summed over every query of the context (and the query heads of the GQA group), plus the
    ``recent`` last tokens."""

    recent: int = 32

    observes = "attention_sum"

    def score(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> torch.Tensor:
        s = obs.need("attention_sum", "h2o").float().clone()
        if self.recent:
            s[..., -self.recent :] = float("inf")
        return s
