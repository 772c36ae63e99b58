"""What every task produces: a context, questions about it, and checkable answers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Question:
    text: str
    answers: tuple[str, ...]  # every one must occur in the reply (case-insensitive)
    answer_prefix: str = ""
    lines: int = 1  # the reply is read up to this many lines with text

    @property
    def reference(self) -> str:
        """The expected reply in words (the answer prefix, then every answer): what an earlier turn
        of a conversation says when the history holds reference answers."""
        return (f"{self.answer_prefix} " if self.answer_prefix else "") + ", ".join(self.answers) + "."

    def score(self, reply: str) -> float:
        """Fraction of the expected answers found in the reply (1.0 = correct)."""
        norm = _normalize(reply)
        return sum(_normalize(a) in norm for a in self.answers) / len(self.answers)


@dataclass(frozen=True)
class Sample:
    task: str
    length: int  # target context length in tokens
    seed: int
    context: str
    questions: tuple[Question, ...]
    meta: dict = field(default_factory=dict)


def _normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.lower()).strip()
