from __future__ import annotations

from dataclasses import dataclass

from memfit.hfcompat import with_cache
from memfit.kv.evict.base import Eviction, Observation
from memfit.lazy import lazy_module

torch = lazy_module("torch")

REPEAT_PROMPT = "Repeat the previous context exactly."


@dataclass(frozen=True)
class KVzip(Eviction):
    """KVzip (Kim et al., 2025), query-agnostic: after prefill, the model is asked to repeat the
    context, reading it again in ``chunk``-token pieces (each starting with the last tokens of the
    previous one) on top of the cache. A KV pair scores the most attention it received from any
    repeat position and any query head of its GQA group; the pairs the model needs to reconstruct
    the context are kept. Costs about one more prefill. Heads are global by default (the paper's
    pair-level threshold: one budget over every layer and head)."""

    heads: str = "global"
    chunk: int = 2048

    observes = "reconstruction"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.chunk < 16:
            raise ValueError(f"kvzip: chunk must be >= 16 tokens, got {self.chunk}")

    def score(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> torch.Tensor:
        return obs.need("reconstruction", "kvzip")


def repeat_inputs(prompt_ids: list[int], context_ids: list[int], chunk: int, overlap: int = 8) -> list[list[int]]:
    """Token ids of each reconstruction pass: the repeat prompt, the previous piece's last
    ``overlap`` tokens (so that the model continues rather than restarts), then the piece."""
    return [prompt_ids + context_ids[max(0, s - overlap) : s] + context_ids[s : s + chunk]
            for s in range(0, len(context_ids), chunk)]


def reconstruction_scores(model: torch.nn.Module, cache, inputs: list[list[int]]) -> dict[int, torch.Tensor]:
    """Run each input on top of ``cache`` (an uncompressed, deferred cache holding the context), then
    cut the cache back: layer -> [B, H, N] max attention received by each of the N context keys."""
    from memfit.kv.attention import observe  # here: the spec parser imports this module, not transformers

    n = cache.get_seq_length()
    device = next(model.parameters()).device
    cache.reserve(max(map(len, inputs)))  # each pass appends in place and is cut back without a copy
    try:
        with torch.no_grad(), observe(reduce="max", num_keys=n) as seen:
            for ids in inputs:
                model(torch.tensor([ids], device=device), **with_cache(model, cache), use_cache=True, logits_to_keep=1)
                cache.truncate_(n)
    finally:
        cache.release()
    return seen.attention
