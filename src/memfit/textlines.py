"""Reading answers line by line. Standalone (only ``re``): benchmarks/kvpress_worker.py loads this
file by path inside kvpress's own venv, so both sides cut replies the same way."""

import re

_TEXT_LINE = r"[^\w]*\w[^\n]*"  # optional punctuation / blank lines, then a line with a word character


_LINE_RE = re.compile(_TEXT_LINE)
_LINE_END_RE = re.compile(_TEXT_LINE + r"\n")


def first_lines(text: str, n: int) -> str:
    """The first ``n`` lines of ``text`` that hold a word (with what precedes them)."""
    end = 0
    for _ in range(n):
        m = _LINE_RE.match(text, end)
        if not m:
            break
        end = m.end()
    return text[:end] if end else text


def lines_done(text: str, n: int) -> bool:
    """Whether ``text`` already holds ``n`` complete lines with a word."""
    pos = 0
    for _ in range(n):
        m = _LINE_END_RE.match(text, pos)
        if not m:
            return False
        pos = m.end()
    return True
