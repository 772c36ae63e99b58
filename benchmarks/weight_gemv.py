"""One decode-sized matmul through memfit's weight kernels against bf16 cuBLAS, on Llama-3.1-8B's
Linear shapes: the tile-layout GEMV (``kernels/tile_gemv.py``, ``set_prefer("tiles")``) at each width, the
bit-plane GEMV (any-precision reads) and torch's tinygemm int4. Each time is per call, replayed from
a CUDA graph of 48 calls (median of 20 replays), with the bytes it reads at HBM peak beside it
(``roofline_ms``, ``of_peak``; ``f16_input_ms``: the kernel alone, on a float16 ``x``, which under
torch.compile is what it meets: the conversion fuses with the op before; ``a8_ms``: the tiles with ``x``
rounded to int8 and dp4a products, the rounding in separate torch kernels here). The calls cycle
through copies of the layer that together exceed the L2 cache four times, so that each reads its
weights from HBM as a decode step does (``--warm``: one copy, read from L2 where it fits, as earlier
versions of this benchmark timed). ``--sweep`` also times the tile kernel's block, groups-a-step,
warps and programs-an-SM choices, to tune its defaults. ``--twin-rank-bits``: also the tiles with twin's
low-rank factors added in the same launch (``{bits}bit_twin_ms``, ``{bits}bit_twin_vs_tiles``). Writes JSON.

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
from memfit.weights import QuantLinear, linear, twin
from memfit.weights.grid import hqq

# (out, in) of each Linear in a Llama-3.1-8B layer, as transformers runs them (q, k, v and gate, up apart),
# and the stacks memfit runs on CUDA (``weights.fuse``: q/k/v and gate/up, one launch each)
SHAPES = {"q_o": (4096, 4096), "k_v": (1024, 4096), "gate_up": (14336, 4096), "down": (4096, 14336),
          "qkv": (6144, 4096), "gate_up_stack": (28672, 4096)}


def _ms(fns, reps: int = 48) -> float:
    """Per call, replayed from a CUDA graph of ``reps`` calls cycling through ``fns`` (one zero-argument
    callable per copy of the weights): the kernels' time, not Python's launches."""
    fns = fns if isinstance(fns, (list, tuple)) else [fns]
    reps = max(reps, len(fns))  # every copy read once a replay at least
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for fn in fns:
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(reps):
            fns[i % len(fns)]()
    ts = []
    for _ in range(20):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b) / reps)
    return sorted(ts)[len(ts) // 2]


def copies(nbytes: int, warm: bool) -> int:
    """Copies of a layer of ``nbytes`` that together exceed the L2 cache four times (1 if ``warm``)."""
    if warm:
        return 1
    return max(2, -(-4 * torch.cuda.get_device_properties(0).L2_cache_size // nbytes))


def _sweep(qs: list[QuantLinear], x: torch.Tensor, n: int) -> list[dict]:
    """The five fastest (groups a step, warps, programs an SM) choices of the tile kernel, over the
    copies ``qs`` of one layer (their tile copies made)."""
    bits = qs[0].bits
    layers = [q._fast[1:] for q in qs]  # each copy's tiles and grid, as its own calls read them
    out = []
    for groups, warps, per_sm in itertools.product((4, 8, 16, 32), (4, 8), (8, 16, 32)):
        choice = {"block_n": tile_gemv.BLOCK_N, "groups": groups, "warps": warps, "per_sm": per_sm}
        try:
            ms = _ms([lambda p=p, s=s, o=o: tile_gemv.tile_gemv(x, p, bits, n, s, o, groups=groups,  # noqa: B023
                                                                 warps=warps, per_sm=per_sm)  # noqa: B023
                      for p, s, o in layers])
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
    ap.add_argument("--warm", action="store_true", help="time one copy of each layer (read from L2 where it fits)")
    ap.add_argument("--sweep", action="store_true", help="also time the tile kernel's launch choices")
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--twin-rank-bits", type=float, default=0.0, help="also time the tiles with twin's 8-bit factors "
                    "of the rank this many bits a weight buy, added in the same launch (random values)")
    ap.add_argument("--out", type=Path, default=Path("results/weight_gemv.json"))
    args = ap.parse_args()
    peak = args.peak_tbs * 1e12
    rows = []
    with torch.no_grad():
        for name in args.shapes:
            n, k = SHAPES[name]
            lin = nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
            x = torch.randn(args.rows, k, device="cuda", dtype=torch.bfloat16)
            bf16_bytes = n * k * 2
            lins = [lin] + [nn.Linear(k, n, bias=False, device="cuda", dtype=torch.bfloat16)
                            for _ in range(copies(bf16_bytes, args.warm) - 1)]
            row = {"shape": name, "out": n, "in": k, "bf16_copies": len(lins),
                   "bf16_ms": _ms([lambda m=m: m(x) for m in lins]), "bf16_roofline_ms": bf16_bytes / peak * 1e3}
            row["bf16_of_peak"] = row["bf16_roofline_ms"] / row["bf16_ms"]
            del lins
            for bits in args.bits:
                uc = hqq(lin.weight.data.float(), bits, args.group_size)

                def layer() -> QuantLinear:
                    """A copy of the layer through the tiles, their copy made by a first call."""
                    c = QuantLinear.from_codes(lin, uc.codes, bits, scale=uc.scale.half(),  # noqa: B023
                                               zero=uc.zero.half(), group_size=args.group_size)  # noqa: B023
                    c.set_prefer("tiles")
                    c(x)  # noqa: B023
                    return c
                q = layer()
                nbytes = q.resident_nbytes  # the tiles and their float16 grid: the bytes the kernel reads
                qs = [q] + [layer() for _ in range(copies(nbytes, args.warm) - 1)]
                row[f"{bits}bit_kernel"] = q.kernel
                row[f"{bits}bit_copies"] = len(qs)
                row[f"{bits}bit_ms"] = _ms([lambda c=c: c(x) for c in qs])
                row[f"{bits}bit_f16_input_ms"] = _ms([lambda c=c: c(x.half()) for c in qs])  # no conversion of x
                # the int8-input variant on the same tiles (x rounded in torch first)
                row[f"{bits}bit_a8_ms"] = _ms([
                    lambda f=c._fast: tile_gemv.tile_gemv(x, f[1], bits, n, f[2], f[3], a8=True)  # noqa: B023
                    for c in qs])
                row[f"{bits}bit_bytes"] = nbytes
                row[f"{bits}bit_roofline_ms"] = nbytes / peak * 1e3
                row[f"{bits}bit_of_peak"] = row[f"{bits}bit_roofline_ms"] / row[f"{bits}bit_ms"]
                row[f"{bits}bit_vs_bf16"] = row["bf16_ms"] / row[f"{bits}bit_ms"]
                if args.sweep:
                    row[f"{bits}bit_sweep"] = _sweep(qs, x, n)
                if args.twin_rank_bits:
                    rank = twin.rank_for(n, k, args.twin_rank_bits)
                    for c in qs:
                        c.attach_lowrank(torch.randint(-127, 128, (n, rank), device="cuda", dtype=torch.int8),
                                         torch.full((n,), 1e-3, device="cuda"),
                                         torch.randint(-127, 128, (rank, k), device="cuda", dtype=torch.int8),
                                         torch.full((rank,), 1e-3, device="cuda"))
                    row["twin_rank"] = rank
                    row[f"{bits}bit_twin_ms"] = _ms([lambda c=c: c(x) for c in qs])
                    row[f"{bits}bit_twin_f16_input_ms"] = _ms([lambda c=c: c(x.half()) for c in qs])
                    row[f"{bits}bit_twin_bytes"] = qs[0].resident_nbytes
                    row[f"{bits}bit_twin_roofline_ms"] = row[f"{bits}bit_twin_bytes"] / peak * 1e3
                    row[f"{bits}bit_twin_vs_tiles"] = row[f"{bits}bit_twin_ms"] / row[f"{bits}bit_ms"]
                    for c in qs:  # the plain layers again for the kernels timed below
                        for name in linear.LOWRANK_BUFFERS:
                            del c._buffers[name]
                        c.rank = 0
                for c in qs:
                    c._drop_fast()
                if bits in (2, 3, 4):  # the bit-plane GEMV, on the same codes
                    row[f"{bits}bit_planes_ms"] = _ms([lambda c=c: plane_gemv.plane_gemv(
                        x, c.planes, c.group_size, bits, scale=c.scale, zero=c.zero) for c in qs])
                if bits == 4:
                    for c in qs:
                        c.set_prefer("tinygemm")
                    row["4bit_tinygemm_ms"] = _ms([lambda c=c: c(x) for c in qs])
                del q, qs
                torch.cuda.empty_cache()
            rows.append(row)
            print(json.dumps({kk: (round(v, 4) if isinstance(v, float) else v) for kk, v in row.items()}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "rows": args.rows, "warm": args.warm,
                                    "group_size": args.group_size, "peak_tbs": args.peak_tbs, "shapes": rows},
                                   indent=1))


if __name__ == "__main__":
    main()
