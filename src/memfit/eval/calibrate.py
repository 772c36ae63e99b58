"""`memfit calibrate`: measure the planner's families (see :mod:`memfit.kv.plan`) on memfit's tasks,
and write the table the planner chooses by."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from memfit.api import LM
from memfit.eval.runner import run_eval, summarize
from memfit.kv.plan import Calibration, Family
from memfit.kv.policy import parse_policy

# what the planner chooses among; "{keep}" is the eviction's free keep. A 32-token 16-bit window:
# the default 128 spends a 1K-token context's budget on the window (12% of it in 16-bit). The rotated
# quantizer replaced 2-bit KIVI's families (with outliers and pre-RoPE keys it kept about a quarter
# of the accuracy, the rotated 2 bits more than half), and its 4-bit keys with 2-bit values kept as
# much as 4 bits for both (at 1K tokens) in 20% fewer bytes; 4-bit KIVI stays for comparison.
# Transform-coded keys (klt) keep the most at 6x alone and at 16x after KVzip (docs/evaluation.md).
FAMILIES = ("kivi(bits=8,residual=32)", "kivi(bits=4,residual=32)", "hadamard(bits=4,residual=32)",
            "hadamard(bits=4,value_bits=2,residual=32)", "hadamard(bits=2,residual=32)", "klt(bits=2,residual=32)",
            "klt(bits=1.5,residual=32)",
            "kvzip(keep={keep})", "kvzip(keep={keep})+kivi(bits=4,residual=32)",
            "kvzip(keep={keep})+hadamard(bits=4,value_bits=2,residual=32)",
            "kvzip(keep={keep})+hadamard(bits=2,residual=32)", "kvzip(keep={keep})+klt(bits=1.5,residual=32)")
KEEPS = (0.2, 0.4, 0.7)


def calibrate(lm: LM, tasks: list[str], length: int, samples: int, seed: int = 0,
              families: tuple[str, ...] = FAMILIES, keeps: tuple[float, ...] = KEEPS,
              out_dir: Path | None = None) -> Calibration:
    """Every family at every keep (once if it has none) next to "none", on ``samples`` samples of each
    task at ``length`` tokens: a family's points are (mean compression, accuracy / none's accuracy)."""
    if not families or not keeps or any(not 0 < k <= 1 for k in keeps):
        raise ValueError("calibrate needs families and keeps in (0, 1]")
    specs: dict[str, str] = {}  # canonical spec -> its family's template
    for t in families:
        for k in (keeps if "{keep}" in t else (None,)):
            specs[parse_policy(t.format(keep=k) if k is not None else t).spec] = t
    records = run_eval(lm, tasks, ["none", *specs], [length], samples, seed, out_dir=out_dir)
    rows = {r["policy"]: r for r in summarize(records)}
    if not rows["none"]["accuracy"]:
        raise ValueError(f"the uncompressed cache answered nothing right on {tasks} at {length} tokens: "
                         "no accuracy to calibrate against")
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for spec, template in specs.items():
        points[template].append((round(rows[spec]["compression"], 3), round(rows[spec]["relative"], 4)))
    return Calibration(tuple(Family(t, tuple(sorted(points[t]))) for t in families),
                       {"model": lm.name, "length": length, "samples_per_task": samples, "seed": seed,
                        "tasks": tasks, "none_accuracy": rows["none"]["accuracy"]})
