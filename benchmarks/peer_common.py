"""What the peer workers (kvpress_worker.py, llamacpp_worker.py) share. Standard library only: they
run in their own venvs, where memfit and its torch are not installed, so memfit's standalone files
are loaded by path and both sides cut and score replies with the same code."""

from __future__ import annotations

import importlib.util
import json
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


# -- the drivers' side (peer_kvpress.py, peer_llamacpp.py: memfit's venv) ---------------------------
def add_sample_args(ap) -> None:
    """The options that pick the samples, as `memfit eval` takes them, so both sides see the same ones."""
    ap.add_argument("--tasks", default=None, help="comma-separated; default: memfit eval's default tasks")
    ap.add_argument("--length", type=int, action="append", default=None)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--out", type=Path, default=Path("results/eval"))


def write_samples(args, name: str) -> Path:
    """The samples ``args`` pick, as memfit's own token ids, written to ``args.out / name``."""
    import memfit  # only in memfit's venv
    from memfit.eval.runner import export_samples, make_samples
    from memfit.eval.tasks import DEFAULT_TASKS

    lm = memfit.load_model(args.model)
    tasks = args.tasks.split(",") if args.tasks else list(DEFAULT_TASKS)
    samples = make_samples(lm, tasks, args.length or [2048], args.samples, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / name
    path.write_text(json.dumps(export_samples(lm, samples)))
    return path
