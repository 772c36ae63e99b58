"""Evaluation: built-in long-context tasks, multi-question reuse, perplexity, plots."""

from memfit.lazy import lazy_exports

# the CLI reads eval.demo's defaults without importing the model code behind these
_EXPORTS = {"perplexity": "memfit.eval.perplexity", "run_eval": "memfit.eval.runner", "summarize": "memfit.eval.runner"}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_exports(globals(), _EXPORTS)
