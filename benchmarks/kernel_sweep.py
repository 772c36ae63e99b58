"""Sweep the decode kernels' launch parameters on a GPU (the Llama-3.1-8B heads of `memfit bench
attention`): the Gluon kernel's programs per SM and ring stages, the Triton kernel's programs per
SM, warps and pipeline stages. Prints the five fastest settings of each, with their max abs error
against the torch reference; every time is a CUDA-graph replay, as in `memfit bench attention`.

    PYTHONPATH=src python benchmarks/kernel_sweep.py [--gluon-only]
"""

import functools
import itertools
import sys

import torch
import torch.nn.functional as F

from memfit.bench import _cuda_ms
from memfit.kernels import gluon_decode
from memfit.kernels.decode_attention import decode_attention, decode_attention_reference
from memfit.kv.quant import quantize_keys, quantize_values

GLUON = [{"impl": "gluon", "programs_per_sm": pps, "stages": st} for pps, st in itertools.product((6, 8, 10, 12), (2, 3))]
TRITON = [{"impl": "triton", "programs_per_sm": pps, "num_warps": nw, "num_stages": ns}
          for pps, nw, ns in itertools.product((4, 8, 16), (2, 4, 8), (2, 3))]


TOP = 12 if "--gluon-only" in sys.argv else 5  # settings printed per shape, fastest first


def run(args, bits: int, setting: dict) -> torch.Tensor:
    kw = dict(setting)
    stages = kw.pop("stages", None)
    launch = gluon_decode.launch
    if stages is not None:  # the ring depth is the Gluon launcher's
        gluon_decode.launch = functools.partial(launch, stages=stages)
    try:
        return decode_attention(*args, bits=bits, **kw)
    finally:
        gluon_decode.launch = launch


def main() -> None:
    dev = "cuda"
    for b, n in [(1, 131072), (8, 32768)]:
        k = torch.randn(b, 8, n, 128, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        q = torch.randn(b, 32, 1, 128, device=dev, dtype=torch.bfloat16)
        sdpa = _cuda_ms(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), graph=True)  # noqa: B023
        for bits in (4, 2):
            nq = n - 128
            qk, qv = quantize_keys(k[:, :, :nq], bits, 64), quantize_values(v[:, :, :nq], bits, 64)
            lens = (torch.full((b, 8), nq, dtype=torch.int32, device=dev),
                    torch.full((b, 8), 128, dtype=torch.int32, device=dev))
            args = (q[:, :, 0], qk.codes, qk.scale, qk.zero, qv.codes, qv.scale, qv.zero, k[:, :, nq:].contiguous(),
                    v[:, :, nq:].contiguous(), *lens)
            ref = decode_attention_reference(*args, bits=bits)
            for name, settings in (("gluon", GLUON), ("triton", [] if "--gluon-only" in sys.argv else TRITON)):
                res = []
                for s in settings:
                    try:
                        err = (run(args, bits, s) - ref).abs().max().item()
                        res.append((_cuda_ms(lambda: run(args, bits, s), graph=True), s, err))  # noqa: B023
                    except Exception as e:  # a setting the GPU cannot launch (registers, shared memory)
                        print("failed", s, str(e)[:100])
                res.sort(key=lambda r: r[0])
                print(f"b={b} n={n} bits={bits} {name} (sdpa {sdpa:.4f} ms):",
                      [f"{ms:.4f} ms {s} err {err:.0e}" for ms, s, err in res[:TOP]], flush=True)


if __name__ == "__main__":
    main()
