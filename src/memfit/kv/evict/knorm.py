from __future__ import annotations

from dataclasses import dataclass

from memfit.kv.evict.base import Eviction, Observation
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class Knorm(Eviction):
    """Knorm (Devoto et al., 2024): keys with a small L2 norm tend to receive high attention; keep
    them. Needs nothing but the keys."""

    def score(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> torch.Tensor:
        return -keys.float().norm(dim=-1)
