"""Built-in long-context tasks, generated offline and deterministically: ``TASKS[name](seed, length, count_tokens)``."""

from __future__ import annotations

from collections.abc import Callable

from memfit.eval.filler import TokenCounter
from memfit.eval.tasks.base import Question, Sample
from memfit.eval.tasks.qa import documents_qa
from memfit.eval.tasks.retrieval import niah_multikey, niah_multiquery, niah_multivalue, niah_single
from memfit.eval.tasks.variables import variable_tracking
from memfit.eval.tasks.words import common_words, frequent_words

TaskFn = Callable[[int, int, TokenCounter], Sample]
TASKS: dict[str, TaskFn] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "variable_tracking": variable_tracking,
    "common_words": common_words,
    "frequent_words": frequent_words,
    "documents_qa": documents_qa,
}

# What SmolLM2-135M answers at >= 60% uncompressed at 1K and 2K tokens (README: the measured
# figures). variable_tracking, common_words and frequent_words stay available for larger models.
DEFAULT_TASKS = ["niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "documents_qa"]


def get_task(name: str) -> TaskFn:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["DEFAULT_TASKS", "TASKS", "Question", "Sample", "get_task"]
