"""memfit: long-context LLM inference that fits in the memory you have."""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# Names are imported on first use (PEP 562): `import memfit` stays cheap, and a command that needs
# only a config (`memfit info`, `memfit plan`) never imports transformers' modelling code.
_EXPORTS = {"LM": "memfit.api", "Context": "memfit.api", "load_context": "memfit.api", "load_model": "memfit.api",
            "KIVI": "memfit.kv.quant", "CompressedCache": "memfit.kv.cache", "Policy": "memfit.kv.policy",
            "PolicyError": "memfit.kv.policy", "parse_policy": "memfit.kv.policy",
            "ContextStore": "memfit.store", "open_store": "memfit.store"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memfit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
