"""KV-cache compression: the cache, quantization, eviction methods and policies."""

from __future__ import annotations

import importlib

# imported on first use, as in memfit/__init__.py: policies and the planner need no transformers
_EXPORTS = {"CompressedCache": "memfit.kv.cache", "CompressedLayer": "memfit.kv.layer", "Policy": "memfit.kv.policy",
            "PolicyError": "memfit.kv.policy", "parse_policy": "memfit.kv.policy", "KIVI": "memfit.kv.quant"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memfit.kv' has no attribute {name!r}")
