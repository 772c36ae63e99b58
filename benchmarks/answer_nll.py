"""Paired answer log-loss (dNLL) of several policies on memfit's tasks (see memfit.eval.answer_nll):
one prefill a sample shared by every policy; each question's reference answer read teacher-forced,
its log-loss minus ``none``'s. Writes JSON. Session 60-61's comparisons at 16x / 32x used it:

    PYTHONPATH=src python benchmarks/answer_nll.py -n 4096 -s 4 --seed 3000 --dtype float32 --kv-dtype bfloat16 \\
        -p "kvzip(keep=0.46)+klt(bits=1.5,residual=32)" -p "kvzip(keep=0.21)+klt(bits=1.5,residual=32)" \\
        --out results/answer_nll.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import memfit
from memfit.eval.answer_nll import answer_nll
from memfit.eval.runner import make_samples
from memfit.eval.tasks import DEFAULT_TASKS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-p", "--policy", action="append", required=True)
    ap.add_argument("-t", "--task", action="append", default=None)
    ap.add_argument("-n", "--length", type=int, default=4096)
    ap.add_argument("-s", "--samples", type=int, default=4, help="samples a task")
    ap.add_argument("--seed", type=int, default=3000)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--kv-dtype", default=None)
    ap.add_argument("--out", type=Path, default=Path("results/answer_nll.json"))
    args = ap.parse_args()
    lm = memfit.load_model(args.model, dtype=args.dtype, kv_dtype=args.kv_dtype)
    samples = make_samples(lm, args.task or list(DEFAULT_TASKS), [args.length], args.samples, args.seed)
    res = answer_nll(lm, samples, args.policy)
    for p, r in res.items():
        tasks = " ".join(f"{t[:12]} {v:+.3f}" for t, v in r["per_task"].items())
        print(f"{p:70s} {r['compression']:6.2f}x  dNLL {r['dnll']:+.4f} +- {r['dnll_se']:.4f}  "
              f"KL {r['kl']:.4f}  {tasks}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": lm.name, "length": args.length, "seed": args.seed,
                                    "samples_per_task": args.samples, "policies": res}, indent=1))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
