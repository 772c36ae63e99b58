"""What the peer workers (kvpress_worker.py, llamacpp_worker.py) share. Standard library only: they
run in their own venvs, where memfit and its torch are not installed, so memfit's standalone files
are loaded by path and both sides cut and score replies with the same code."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "memfit"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


textlines = _load("memfit_textlines", SRC / "textlines.py")  # reply cutting: first_lines, lines_done
_taskbase = _load("memfit_taskbase", SRC / "eval" / "tasks" / "base.py")


def score(answers: list[str], prefix: str, reply: str) -> float:
    """What memfit's eval scores for a question with these answers: the answer prefix and the reply."""
    return _taskbase.Question("", tuple(answers), prefix).score(prefix + reply)
