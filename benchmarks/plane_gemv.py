"""One decode-sized matmul (batch 1) through the Triton bit-plane GEMV, against bf16 cuBLAS, the
layer's dequantize-then-matmul path and tinygemm int4, on Llama-3.1-8B's Linear shapes; CUDA graphs
of 50 calls, median of 20 replays. Writes JSON.

    PYTHONPATH=src python benchmarks/plane_gemv.py --out results/plane_gemv.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

from memfit.weights import QuantLinear
from memfit.weights.grid import hqq

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _ms(fn, *args, reps: int = 50) -> float:
    """Per call, replayed from a CUDA graph of ``reps`` calls: the kernels' time, not Python's launches."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn(*args)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn(*args)
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    return sorted(ts)[len(ts) // 2]


def _dequantized_matmul(q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    return nn.functional.linear(x, q.dequantize(x.dtype))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path("results/plane_gemv.json"))
    args = ap.parse_args()
    rows = []
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
            row = {"shape": name, "out": n, "in": k, "bf16_ms": _ms(lin, x)}
            for bits in args.bits:
                uc = hqq(lin.weight.data.float(), bits, args.group_size)
                q = QuantLinear.from_codes(lin, uc.codes, bits, scale=uc.scale.half(), zero=uc.zero.half(),
                                           group_size=args.group_size)
                if bits == 4:  # the same codes through the GEMV (float32 input), before tinygemm takes them
                    row["4bit_gemv_ms"] = _ms(q, x.float())
                row[f"{bits}bit_kernel"] = q.kernel
                row[f"{bits}bit_ms"] = _ms(q, x)
                row[f"{bits}bit_dequantize_ms"] = _ms(_dequantized_matmul, q, x)
                del q
            rows.append(row)
            print(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": args.rows,
                                    "group_size": args.group_size, "shapes": rows}, indent=1))


if __name__ == "__main__":
    main()
