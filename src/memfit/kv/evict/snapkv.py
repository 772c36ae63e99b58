from __future__ import annotations

import math
from dataclasses import dataclass

from memfit.kv.evict.base import Eviction, Observation
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass(frozen=True)
class SnapKV(Eviction):
    """SnapKV (Li et al., 2024): score each token by the attention it gets from the last ``window``
    queries of the context, smoothed by average pooling over ``kernel`` tokens and averaged over
    the query heads of each KV head's GQA group. The observation window itself is always kept.
    Query-agnostic in memfit: the window is the end of the context, never the question."""

    window: int = 32
    kernel: int = 7

    observes = "queries"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.window < 1 or self.kernel < 1 or self.kernel % 2 == 0:
            raise ValueError(f"snapkv: window must be >= 1 and kernel odd >= 1, got {self.window}, {self.kernel}")

    def queries_needed(self) -> int:
        return self.window

    def score(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> torch.Tensor:
        queries = obs.need("queries", "snapkv")
        b, h, n, d = keys.shape
        hq, w = queries.shape[1], min(self.window, queries.shape[2], n)
        group = hq // h
        q = queries[:, :, -w:].float()
        k = keys.float().repeat_interleave(group, dim=1)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d)  # [B, Hq, w, N]
        # the window queries see the past and, causally, the window up to themselves
        causal = torch.ones(w, w, dtype=torch.bool, device=keys.device).triu(1)
        logits[..., n - w :] = logits[..., n - w :].masked_fill(causal, float("-inf"))
        attn = logits.softmax(dim=-1)[..., : n - w].mean(dim=2)  # [B, Hq, N - w]
        if self.kernel > 1 and n - w > 0:
            attn = torch.nn.functional.avg_pool1d(attn.reshape(b * hq, 1, -1), self.kernel, stride=1,
                                                  padding=self.kernel // 2, count_include_pad=False).reshape(b, hq, -1)
        scores = attn.reshape(b, h, group, n - w).mean(dim=2)
        top = scores.amax(dim=-1, keepdim=True) if n > w else torch.zeros(b, h, 1, device=keys.device)
        return torch.cat([scores, (top + 1).expand(b, h, w)], dim=-1)
