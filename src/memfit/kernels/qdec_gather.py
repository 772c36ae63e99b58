"""QDEC's correction on the GPU in one launch: ``R x`` over each row's chosen input channels, with
the residual ``R`` read straight from pinned host memory.

The residual is stored channel-major (``[in, out]``, 8-bit codes ``q`` with ``R[c] = (q - 127) *
scale[c]``), so a chosen channel is one contiguous row. Each program takes ``CH`` chosen channels of
one input row and a block of ``BLOCK`` outputs: it reads ``CH`` row segments of ``BLOCK`` bytes
(whole PCIe transactions when the codes sit in host memory), scales each by ``scale[c] * x[c]`` and
adds the sum into the float32 output with one atomic add. Many small programs keep enough reads in
flight to cover the bus latency; the unfused torch path (gather, unpack, scale, multiply, sum: a
kernel each, a [k, out] float32 temporary) is the reference (``memfit.weights.qdec.correction``).
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

BLOCK, CH = 1024, 4  # outputs and chosen channels a program


def supported(x: torch.Tensor, codes: torch.Tensor, bits: int) -> bool:
    return triton is not None and x.is_cuda and codes.is_cuda and bits == 8 and codes.dtype == torch.uint8


if triton is not None:

    @triton.jit
    def _gather_kernel(X, IDX, Q, S, OUT, k, n_in, n_out, sq, BLOCK: tl.constexpr, CH: tl.constexpr):
        j, t, r = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        offs = j * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n_out
        acc = tl.zeros((BLOCK,), tl.float32)
        for i in tl.static_range(CH):
            slot = r * CH + i
            ok = slot < k
            c = tl.load(IDX + t * k + slot, mask=ok, other=0)
            w = tl.load(X + t * n_in + c, mask=ok, other=0.0).to(tl.float32)
            w = w * tl.load(S + c, mask=ok, other=0.0).to(tl.float32)
            q = tl.load(Q + c.to(tl.int64) * sq + offs, mask=mask & ok, other=127).to(tl.float32)
            acc += (q - 127.0) * w
        tl.atomic_add(OUT + t * n_out + offs, acc, mask=mask)


def correction(x: torch.Tensor, idx: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [T, in] (16-bit or float32), ``idx`` [T, k] (each row's chosen channels), ``codes`` [in, out]
    uint8 (a CUDA view of pinned host memory, or device memory), ``scale`` [in] -> float32 [T, out]."""
    t, k = idx.shape
    n_out = codes.shape[1]
    out = torch.zeros(t, n_out, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n_out, BLOCK), t, triton.cdiv(k, CH))
    _gather_kernel[grid](x.contiguous(), idx.contiguous(), codes, scale, out, k, x.shape[1], n_out, codes.stride(0),
                         BLOCK=BLOCK, CH=CH, num_warps=4)
    return out
