"""Eviction methods: one small dataclass per file, each with ``score(...)`` (and, where it differs
from the base, ``budget``/``layer_keep``).

``score`` returns one score per (row, KV head, token); the cache keeps the best tokens of every
head (or, with ``heads=adaptive``, of the whole layer) and frees the rest (nothing is masked).
"""

from memfit.kv.evict.base import Eviction, Observation, key_only, select_adaptive, select_global, select_topk
from memfit.kv.evict.h2o import H2O
from memfit.kv.evict.knorm import Knorm
from memfit.kv.evict.kvzip import KVzip
from memfit.kv.evict.pyramidkv import PyramidKV
from memfit.kv.evict.snapkv import SnapKV
from memfit.kv.evict.streaming import StreamingLLM
from memfit.kv.evict.tova import TOVA

__all__ = ["H2O", "TOVA", "Eviction", "KVzip", "Knorm", "Observation", "PyramidKV", "SnapKV", "StreamingLLM",
           "key_only", "select_adaptive", "select_global", "select_topk"]
