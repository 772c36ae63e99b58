"""Eviction methods: one small dataclass per file, each with ``budget(n)`` and ``score(...)``.

``score`` returns one score per (row, KV head, token); the cache keeps the ``budget(n)`` tokens with
the highest scores in every head and frees the rest (nothing is masked).
"""

from memfit.kv.evict.base import Eviction, select_topk
from memfit.kv.evict.snapkv import SnapKV
from memfit.kv.evict.streaming import StreamingLLM

__all__ = ["Eviction", "SnapKV", "StreamingLLM", "select_topk"]
