"""What rounding a decode GEMV's input to int8 costs in perplexity: each quantized Linear's input is
rounded in blocks of 32 channels (``tile_gemv.quantize_input``, what ``tile_gemv(..., a8=True)``
reads), for each weight config, on the model's shipped perplexity text. Writes JSON.

    PYTHONPATH=src python benchmarks/weights_a8.py -c hqq:4:g32:m8 -c hqq:3:g32:m8 --out results/weights_a8.json
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import memfit
from memfit.bench import parse_weight_config
from memfit.eval.perplexity import SHIPPED_TEXT, perplexity
from memfit.kernels.tile_gemv import dequantize_input, quantize_input
from memfit.weights import QuantLinear, quantize_


def _round_input(module, args):
    (x,) = args
    return dequantize_input(*quantize_input(x.reshape(-1, x.shape[-1]))).reshape(x.shape).to(x.dtype)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("-c", "--config", action="append", default=None)
    ap.add_argument("--out", type=Path, default=Path("results/weights_a8.json"))
    args = ap.parse_args()
    lm = memfit.load_model(args.model)
    text = SHIPPED_TEXT.read_text(encoding="utf-8")
    reference = copy.deepcopy(lm.model)
    out = {"model": args.model, "reference": perplexity(lm, text), "configs": {}}
    for spec in args.config or ["hqq:4:g32:m8", "hqq:4", "hqq:3:g32:m8", "hqq:2:g32:m8"]:
        lm.model = copy.deepcopy(reference)
        quantize_(lm.model, parse_weight_config(spec), progress=False)
        weight_only = perplexity(lm, text)
        hooks = [m.register_forward_pre_hook(_round_input) for m in lm.model.modules() if isinstance(m, QuantLinear)]
        rounded = perplexity(lm, text)
        for h in hooks:
            h.remove()
        out["configs"][spec] = {"weight_only": weight_only, "int8_input": rounded, "change": rounded / weight_only - 1}
        print(f"{spec:>14}  {weight_only:.3f} -> {rounded:.3f} ({rounded / weight_only - 1:+.2%})", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
