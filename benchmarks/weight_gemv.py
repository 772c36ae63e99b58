"""One decode-sized matmul through memfit's weight kernels against bf16 cuBLAS, on Llama-3.1-8B's
Linear shapes: the tile-layout GEMV (``kernels/tile_gemv.py``, ``set_prefer("tiles")``) at each width, the
bit-plane GEMV (any-precision reads) and torch's tinygemm int4. Each time is per call, replayed from
a CUDA graph of 50 calls (median of 20 replays), with the bytes it reads at HBM peak beside it
(``roofline_ms``, ``of_peak``; ``f16_input_ms``: the kernel alone, on a float16 ``x``, which under
torch.compile is what it meets: the conversion fuses with the op before; ``a8_ms``: the tiles with ``x``
rounded to int8 and dp4a products, the rounding in separate torch kernels here). ``--sweep`` also times
the tile kernel's block, groups-a-step and warps choices, to tune its defaults. Writes JSON.

    PYTHONPATH=src python benchmarks/weight_gemv.py --out results/weight_gemv.json
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
from torch import nn

from memfit.kernels import plane_gemv, tile_gemv
from memfit.weights import QuantLinear
from memfit.weights.grid import hqq

# (out, in) of each Linear in a Llama-3.1-8B layer, as transformers runs them (q, k, v and gate, up apart)
SHAPES = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336)}


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


def _sweep(q: QuantLinear, x: torch.Tensor, n: int) -> list[dict]:
    """The five fastest (block of outputs, groups a step, warps) choices of the tile kernel."""
    codes, (scale, zero) = q.codes(), q.grid()
    out = []
    for bn in (16, 32):
        parts = tile_gemv.pack_tiles(codes, q.bits, q.group_size, block_n=bn)
        pad = (0, 0, 0, parts[0].shape[0] * bn - n)
        s = nn.functional.pad(scale, pad).T.contiguous().half()
        o = nn.functional.pad(-zero * scale, pad).T.contiguous().half()
        for groups, warps, per_sm in itertools.product((4, 8), (2, 4), (4, 8, 16)):
            choice = {"block_n": bn, "groups": groups, "warps": warps, "per_sm": per_sm}
            try:
                ms = _ms(lambda: tile_gemv.tile_gemv(x, parts, q.bits, n, s, o, groups=groups, warps=warps,  # noqa: B023
                                                     per_sm=per_sm))  # noqa: B023
            except Exception as e:  # noqa: BLE001 - a choice that does not compile is left out, and said so
                out.append({**choice, "error": type(e).__name__})
                continue
            out.append({**choice, "ms": ms})
    return sorted([r for r in out if "ms" in r], key=lambda r: r["ms"])[:5]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bits", type=int, nargs="+", default=[2, 3, 4, 5, 6, 8])
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--rows", type=int, default=1)
    ap.add_argument("--peak-tbs", type=float, default=4.8, help="HBM peak, TB/s (H200: 4.8)")
    ap.add_argument("--sweep", action="store_true", help="also time the tile kernel's block / split / warps choices")
    ap.add_argument("--out", type=Path, default=Path("results/weight_gemv.json"))
    args = ap.parse_args()
    peak = args.peak_tbs * 1e12
    rows = []
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
            bf16_bytes = n * k * 2
            row = {"shape": name, "out": n, "in": k, "bf16_ms": _ms(lin, x),
                   "bf16_roofline_ms": bf16_bytes / peak * 1e3}
            row["bf16_of_peak"] = row["bf16_roofline_ms"] / row["bf16_ms"]
            for bits in args.bits:
                uc = hqq(lin.weight.data.float(), bits, args.group_size)
                q = QuantLinear.from_codes(lin, uc.codes, bits, scale=uc.scale.half(), zero=uc.zero.half(),
                                           group_size=args.group_size)
                q.set_prefer("tiles")
                row[f"{bits}bit_kernel"] = q.kernel
                row[f"{bits}bit_ms"] = _ms(q, x)
                row[f"{bits}bit_f16_input_ms"] = _ms(q, x.half())  # the kernel alone: no conversion of x
                _, parts, s, o = q._fast  # the int8-input variant on the same tiles (x rounded in torch first)
                row[f"{bits}bit_a8_ms"] = _ms(
                    lambda: tile_gemv.tile_gemv(x, parts, bits, n, s, o, a8=True))  # noqa: B023
                nbytes = q.resident_nbytes  # the tiles and their float16 grid: what the kernel reads
                row[f"{bits}bit_bytes"] = nbytes
                row[f"{bits}bit_roofline_ms"] = nbytes / peak * 1e3
                row[f"{bits}bit_of_peak"] = row[f"{bits}bit_roofline_ms"] / row[f"{bits}bit_ms"]
                row[f"{bits}bit_vs_bf16"] = row["bf16_ms"] / row[f"{bits}bit_ms"]
                if args.sweep:
                    row[f"{bits}bit_sweep"] = _sweep(q, x, n)
                q._drop_fast()
                if bits in (2, 3, 4):  # the bit-plane GEMV, on the same codes
                    p = QuantLinear.from_codes(lin, uc.codes, bits, scale=uc.scale.half(), zero=uc.zero.half(),
                                               group_size=args.group_size)
                    row[f"{bits}bit_planes_ms"] = _ms(lambda p=p: plane_gemv.plane_gemv(
                        x, p.planes, p.group_size, bits, scale=p.scale, zero=p.zero))
                if bits == 4:
                    q.set_prefer("tinygemm")
                    row["4bit_tinygemm_ms"] = _ms(q, x)
                del q
            rows.append(row)
            print(json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": args.rows,
                                    "group_size": args.group_size, "peak_tbs": args.peak_tbs, "shapes": rows}, indent=1))


if __name__ == "__main__":
    main()
