from __future__ import annotations

import math
from dataclasses import dataclass

from memfit.kv.evict.base import Eviction, Observation
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class TOVA(Eviction):
    """TOVA (Oren et al., 2024): keep the tokens the context's last query attends to most, its
    attention averaged over the query heads of each KV head's GQA group."""

    observes = "queries"

    def queries_needed(self) -> int:
        return 1

    def score(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> torch.Tensor:
        q = obs.need("queries", "tova")[:, :, -1:].float()  # [B, Hq, 1, D]
        b, h, n, d = keys.shape
        k = keys.float().repeat_interleave(q.shape[1] // h, dim=1)
        attn = ((q @ k.transpose(-1, -2)) / math.sqrt(d)).softmax(dim=-1)[:, :, 0]  # [B, Hq, N]
        return attn.reshape(b, h, -1, n).mean(dim=2)
