"""Evaluation: built-in long-context tasks, multi-question reuse, perplexity, plots."""

from memfit.eval.perplexity import perplexity
from memfit.eval.runner import run_eval, summarize

__all__ = ["perplexity", "run_eval", "summarize"]
