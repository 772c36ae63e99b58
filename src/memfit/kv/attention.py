"""memfit's attention function, registered with transformers' attention interface as ``"memfit"``.

It runs SDPA and, while :func:`capture_queries` is active, records the last query states of each
layer (after RoPE and any q-norm), which query-aware eviction methods such as SnapKV score with.
Having our own entry point here is also where packed-KV kernels plug in.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTN_IMPLEMENTATION = "memfit"


class QueryCapture:
    """The last ``window`` query states of every layer, [B, Hq, window, D], gathered over chunks."""

    def __init__(self, window: int):
        self.window = window
        self.queries: dict[int, torch.Tensor] = {}

    def add(self, layer_idx: int, query: torch.Tensor) -> None:
        q = query[:, :, -self.window :].detach()
        prev = self.queries.get(layer_idx)
        if prev is not None and q.shape[2] < self.window:
            q = torch.cat([prev, q], dim=2)[:, :, -self.window :]
        self.queries[layer_idx] = q.clone()


_capture: QueryCapture | None = None


@contextlib.contextmanager
def capture_queries(window: int) -> Iterator[QueryCapture | None]:
    """Record the last ``window`` queries of each layer during the forward passes inside the block."""
    global _capture
    if window <= 0:
        yield None
        return
    prev, _capture = _capture, QueryCapture(window)
    try:
        yield _capture
    finally:
        _capture = prev


def memfit_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: torch.Tensor | None, **kwargs):
    if _capture is not None:
        _capture.add(module.layer_idx, query)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(ATTN_IMPLEMENTATION, memfit_attention_forward)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)
