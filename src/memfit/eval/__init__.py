"""Evaluation: built-in long-context tasks, multi-question reuse, perplexity, plots."""

from __future__ import annotations

import importlib

# imported on first use, as in memfit/__init__.py: the CLI reads eval.demo's defaults without the model code
_EXPORTS = {"perplexity": "memfit.eval.perplexity", "run_eval": "memfit.eval.runner", "summarize": "memfit.eval.runner"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'memfit.eval' has no attribute {name!r}")
