"""Why 4-bit g64 HQQ loses ~28% perplexity on SmolLM2: its reference weights are already GGUF Q4_1
(4-bit, blocks of 32 input channels). This sweeps where the groups start: the same grid (same bits,
same group size, same bytes) is lossless when its groups line up with Q4_1's blocks and loses when
they are shifted by half a block, which is the reference's own quantization noise, not the
quantizer's. Weights are quantized and dequantized in place (the grid ``memfit.weights`` stores),
so no QuantLinear is built; perplexity as in ``memfit bench weights``.

    PYTHONPATH=src .venv/bin/python benchmarks/weights_alignment.py
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import memfit
from memfit.eval.perplexity import SHIPPED_TEXT, perplexity
from memfit.weights.grid import hqq, rtn

CONFIGS = [("hqq", 32, 0), ("hqq", 32, 16), ("rtn", 32, 0), ("rtn", 32, 16), ("hqq", 64, 0), ("hqq", 64, 16),
           ("hqq", 64, 32)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("results/weights_alignment.json"))
    args = ap.parse_args()
    lm = memfit.load_model(args.model)
    text = SHIPPED_TEXT.read_text(encoding="utf-8")
    layers = {n: m for n, m in lm.model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"}
    originals = {n: m.weight.data.clone() for n, m in layers.items()}
    ref = perplexity(lm, text)
    rows = []
    for method, group, shift in CONFIGS:
        err = norm = 0.0
        for n, m in layers.items():
            w = originals[n].float()
            # groups start `shift` input channels into the row (the row wraps around)
            wq = {"hqq": hqq, "rtn": rtn}[method](w.roll(-shift, 1), args.bits, group).dequantize().roll(shift, 1)
            err += float(((wq - w) ** 2).sum())
            norm += float((w**2).sum())
            m.weight.data = wq.to(m.weight.dtype)
        ppl = perplexity(lm, text)
        for n, m in layers.items():
            m.weight.data = originals[n].clone()
        rows.append({"method": method, "bits": args.bits, "group_size": group, "shift": shift, "perplexity": ppl,
                     "ppl_vs_ref": ppl / ref - 1, "relative_mse": err / norm})
        print(f"{method}:{args.bits}:g{group} groups shifted by {shift:2d}: ppl {ppl:7.2f} ({ppl / ref - 1:+6.1%})  "
              f"relative squared error {err / norm:.2e}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "reference_perplexity": ref, "rows": rows}, indent=1))
    print(f"reference {ref:.2f} -> {args.out}")


if __name__ == "__main__":
    main()
