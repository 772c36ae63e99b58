from __future__ import annotations

import math
from dataclasses import dataclass
import torch


@dataclass(frozen=True)
class Eviction:
    """Base of the eviction methods. ``keep`` is the fraction of context tokens kept."""

    keep: float = 0.25

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"{type(self).__name__.lower()}: keep must be in (0, 1], got {self.keep}")

    def queries_needed(self) -> int:
        """How many of the context's last queries ``score`` needs (0: none)."""
        return 0

    def budget(self, n: int) -> int:
        """Tokens kept out of ``n``."""
        return min(n, max(1, math.ceil(self.keep * n)))

    def score(self, keys: torch.Tensor, values: torch.Tensor, queries: torch.Tensor | None) -> torch.Tensor:
        """keys/values [B, H, N, D] (RoPE applied), queries [B, Hq, W, D] or None -> scores [B, H, N]."""
        raise NotImplementedError


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, H, k] of the ``k`` best tokens per head, in their original order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values
