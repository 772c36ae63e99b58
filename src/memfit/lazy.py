"""Package names imported on first use (PEP 562): `import memfit` stays cheap, and a command that
needs only a config (`memfit info`) never imports transformers' modelling code."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that imports each of ``exports`` (name -> module) on first
    use and keeps it in ``namespace`` (the package's ``globals()``)."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(exports[name]), name)
        return value
    return __getattr__
