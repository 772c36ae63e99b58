"""Imports deferred to first use: `import memfit` stays cheap, and a command that needs only a config
or the policy dataclasses (`memfit info`, the spec parser) imports neither torch (~3 s) nor
transformers' modelling code."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import lazy_loader


def lazy_exports(namespace: dict[str, Any], exports: dict[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` that imports each of ``exports`` (name -> module) on first
    use and keeps it in ``namespace`` (the package's ``globals()``)."""
    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = namespace[name] = getattr(importlib.import_module(exports[name]), name)
        return value
    return __getattr__


def lazy_module(name: str) -> Any:
    """``name`` as a module object that imports it on first attribute access (the module itself if
    already imported): for modules that use torch only inside functions."""
    return lazy_loader.load(name, suppress_warning=True)
