"""GEMV over bit-plane weights (Triton): ``y = x @ W.T`` for a few rows of ``x``, reading ``W``'s
packed bit planes (``packing.pack_planes``) and its per-group grid directly, never a 16-bit ``W``.

For the layouts torch's tinygemm int4 kernel does not take: 2/3/5..8-bit codes, and any-precision
reads of the top ``read_bits`` planes (each ``read_bits`` code stands for the centre of its bin of
``2**(bits - read_bits)`` stored codes). The grid is ``w = (centre - zero) * scale`` per group of
input channels, with float16 ``scale`` and ``zero``, or ``meta``: uint8 codes of ``log2(scale)`` and
of the offset ``-zero * scale`` on per-row ranges (float16 [N, 4]: low and step of each), decoded
in the kernel. Per group of 8 input channels the kernel sums ``code * x`` and ``x`` and applies the
grid to the two sums, so its inner loop is a bit test and one multiply-add per weight and plane.

The torch reference is the layer's own path: unpack, dequantize, ``F.linear``
(``memfit.weights.linear.QuantLinear``); the tests compare the two.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

MAX_ROWS = 16  # more rows than this (prefill) go through a dequantized matmul instead
TILE = (256, 8, 4)  # a program's tile: 256 outputs x 8 bytes of each plane (64 input channels), 4 warps: best of 9 on an H100


def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def supports(x: torch.Tensor, planes: torch.Tensor, group_size: int) -> bool:
    k = x.shape[-1]
    return (triton is not None and x.is_cuda and planes.is_cuda and group_size % 8 == 0 and k % group_size == 0
            and x.numel() // k <= MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16, torch.float32))


if triton is not None:

    @triton.jit
    def _gemv_kernel(X, P, S, Z, SC, OC, R, Y, N, K, K8, G, PER,
                     BITS: tl.constexpr, READ: tl.constexpr, GROUP: tl.constexpr, META: tl.constexpr,
                     BLOCK_N: tl.constexpr, BK8: tl.constexpr):
        """Program (output block, K split, row): ``PER`` steps of ``8 * BK8`` input channels, added
        atomically into ``Y``. Everything is a [BLOCK_N, BK8] tile, one byte column each: code * x is
        summed plane by plane and bit by bit (sum_k code_k x_k = sum_p 2**(READ-1-p) sum_k bit_pk x_k),
        so no code is assembled and no tile changes shape."""
        pid_n, split, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        M: tl.constexpr = 1 << (BITS - READ)
        n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = n < N
        acc = tl.zeros((BLOCK_N, BK8), tl.float32)
        if META:
            r0 = tl.load(R + n * 4 + 0, mask=nmask, other=0.0).to(tl.float32)[:, None]
            r1 = tl.load(R + n * 4 + 1, mask=nmask, other=0.0).to(tl.float32)[:, None]
            r2 = tl.load(R + n * 4 + 2, mask=nmask, other=0.0).to(tl.float32)[:, None]
            r3 = tl.load(R + n * 4 + 3, mask=nmask, other=0.0).to(tl.float32)[:, None]
        for it in range(split * PER, tl.minimum(split * PER + PER, tl.cdiv(K8, BK8))):
            j = it * BK8 + tl.arange(0, BK8)  # byte columns: input channels 8 j .. 8 j + 7
            jmask = j < K8
            mask = nmask[:, None] & jmask[None, :]
            cx = tl.zeros((BLOCK_N, BK8), tl.float32)
            sx = tl.zeros((BK8,), tl.float32)
            for t in tl.static_range(8):
                sx += tl.load(X + row * K + j * 8 + t, mask=jmask, other=0.0).to(tl.float32)
            for p in tl.static_range(READ):  # plane p holds bit BITS - 1 - p: the top READ planes
                byte = tl.load(P + p * N * K8 + n[:, None] * K8 + j[None, :], mask=mask, other=0).to(tl.int32)
                for u in tl.static_range(8):
                    xu = tl.load(X + row * K + j * 8 + u, mask=jmask, other=0.0).to(tl.float32) * (1 << (READ - 1 - p))
                    cx += tl.where((byte & (1 << u)) != 0, xu[None, :], 0.0)  # a select: no int-to-float conversion
            gi = n[:, None] * G + (j // (GROUP // 8))[None, :]  # each byte column's group
            if META:
                scale = tl.exp2(r0 + tl.load(SC + gi, mask=mask, other=0).to(tl.float32) * r1)
                offset = r2 + tl.load(OC + gi, mask=mask, other=0).to(tl.float32) * r3
            else:
                scale = tl.load(S + gi, mask=mask, other=0.0).to(tl.float32)
                offset = -tl.load(Z + gi, mask=mask, other=0.0).to(tl.float32) * scale
            # w = ((code + 0.5) M - 0.5) * scale + offset (the bin's centre; code itself when M == 1)
            acc += scale * (M * cx + (0.5 * M - 0.5) * sx[None, :]) + offset * sx[None, :]
        tl.atomic_add(Y + row * N + n, tl.sum(acc, 1), mask=nmask)


def plane_gemv(x: torch.Tensor, planes: torch.Tensor, group_size: int, read_bits: int, *,
               scale: torch.Tensor | None = None, zero: torch.Tensor | None = None,
               meta: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
               tile: tuple[int, int, int] | None = None) -> torch.Tensor:
    """``x`` [..., K] (at most ``MAX_ROWS`` rows) times the weight in ``planes`` (uint8 [bits, N, K/8]),
    read at ``read_bits``, on a grid given by ``scale`` and ``zero`` (float16 [N, K/group]) or by
    ``meta`` = (scale codes, offset codes, ranges). ``tile``: (outputs, bytes, warps) of a program,
    for tuning (default ``TILE``). Returns [..., N] in ``x``'s dtype."""
    if not supports(x, planes, group_size):
        raise ValueError(f"plane_gemv takes CUDA inputs with at most {MAX_ROWS} rows and a group_size that is a multiple of 8")
    bits, n, k8 = planes.shape
    k = x.shape[-1]
    if k8 != k // 8 or not 1 <= read_bits <= bits:
        raise ValueError(f"planes {tuple(planes.shape)} do not fit x [..., {k}] read at {read_bits} bits")
    xs = x.reshape(-1, k).contiguous()
    dummy = planes  # pointer for the grid form not in use
    if meta is not None:
        sc, oc, r = (t.contiguous() for t in meta)
        args = (dummy, dummy, sc, oc, r)
    else:
        args = (scale.contiguous(), zero.contiguous(), dummy, dummy, dummy)
    block_n, bk8, warps = tile or TILE
    steps, blocks = triton.cdiv(k8, bk8), triton.cdiv(n, block_n)
    per = triton.cdiv(steps, min(steps, triton.cdiv(4 * _sms(x.device), blocks)))  # split K to fill the GPU
    y = torch.zeros(xs.shape[0], n, device=x.device, dtype=torch.float32)
    _gemv_kernel[(blocks, triton.cdiv(steps, per), xs.shape[0])](
        xs, planes.contiguous(), *args, y, n, k, k8, k // group_size, per,
        BITS=bits, READ=read_bits, GROUP=group_size, META=meta is not None, BLOCK_N=block_n, BK8=bk8,
        num_warps=warps)
    return y.to(x.dtype).reshape(*x.shape[:-1], n)
