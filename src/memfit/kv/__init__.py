"""KV-cache compression: the cache, quantization, eviction methods and policies."""

from memfit.lazy import lazy_exports

# policies and the planner need no transformers: the cache classes are imported on first use
_EXPORTS = {"CompressedCache": "memfit.kv.cache", "CompressedLayer": "memfit.kv.layer", "Policy": "memfit.kv.policy",
            "PolicyError": "memfit.kv.policy", "parse_policy": "memfit.kv.policy", "KIVI": "memfit.kv.quant"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
