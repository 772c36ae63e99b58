"""memfit: long-context LLM inference that fits in the memory you have."""

from memfit.lazy import lazy_exports

__version__ = "0.1.0"
_EXPORTS = {"LM": "memfit.api", "Context": "memfit.api", "load_context": "memfit.api", "load_model": "memfit.api",
            "KIVI": "memfit.kv.quant", "CompressedCache": "memfit.kv.cache", "Policy": "memfit.kv.policy",
            "PolicyError": "memfit.kv.policy", "parse_policy": "memfit.kv.policy",
            "ContextStore": "memfit.store", "open_store": "memfit.store"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
