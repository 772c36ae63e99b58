"""KV-cache compression: the cache, quantization, eviction methods and policies."""

from memfit.kv.cache import CompressedCache
from memfit.kv.layer import CompressedLayer
from memfit.kv.policy import Policy, PolicyError, parse_policy
from memfit.kv.quant import KIVI

__all__ = ["KIVI", "CompressedCache", "CompressedLayer", "Policy", "PolicyError", "parse_policy"]
