"""Quantize-and-pack on the GPU: 16-bit keys/values -> KIVI codes, scales and zero points in one pass.

Same contract and the same arithmetic as the pure-torch path in ``memfit.kv.quant``
(``quantize_keys`` / ``quantize_values``, which call this on CUDA and are its reference): per group
the minimum and maximum, ``zero = fp16(min)``, ``scale = fp16(max((max - zero) * (1 / qmax), 1e-6))``,
``code = clamp(rint((x - zero) / scale))`` with IEEE division and round-half-even, packed along the
channels (``kernels.packing``). Keys are grouped per channel over ``group`` tokens, values per token
over ``vgroup`` channels. One program reads a tile once and writes its codes and parameters.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

if triton is not None:
    FP16_MAX = tl.constexpr(65504.0)  # ranges are clamped to what float16 parameters can hold

    @triton.jit
    def _codes(x, zero, scale, QMAX: tl.constexpr):
        c = libdevice.rint(tl.math.div_rn(x - zero, scale))
        return tl.minimum(tl.maximum(c, 0.0), QMAX).to(tl.uint8)

    @triton.jit
    def _keys_kernel(X, C, S, Z, sxb, sxh, sxn, scb, sch, scn, ssb, ssh, ssg,
                     GROUP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr):
        b, h, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        PB: tl.constexpr = 8 // BITS
        DP: tl.constexpr = D // PB
        QMAX: tl.constexpr = (1 << BITS) - 1
        on = g * GROUP + tl.arange(0, GROUP)
        oi = tl.arange(0, DP)
        packed = tl.zeros((GROUP, DP), tl.uint8)
        for j in tl.static_range(PB):
            x = tl.load(X + b * sxb + h * sxh + on[:, None] * sxn + (oi * PB + j)[None, :]).to(tl.float32)
            lo = tl.minimum(tl.maximum(tl.min(x, 0), -FP16_MAX), FP16_MAX)
            hi = tl.minimum(tl.maximum(tl.max(x, 0), -FP16_MAX), FP16_MAX)
            zero = lo.to(tl.float16)
            scale = tl.maximum((hi - zero.to(tl.float32)) * (1.0 / QMAX), 1e-6).to(tl.float16)
            c = _codes(x, zero.to(tl.float32)[None, :], scale.to(tl.float32)[None, :], QMAX)
            packed = packed | (c << (BITS * j))
            tl.store(S + b * ssb + h * ssh + g * ssg + oi * PB + j, scale)
            tl.store(Z + b * ssb + h * ssh + g * ssg + oi * PB + j, zero)
        tl.store(C + b * scb + h * sch + on[:, None] * scn + oi[None, :], packed)

    @triton.jit
    def _values_kernel(X, C, S, Z, N, sxb, sxh, sxn, scb, sch, scn, ssb, ssh, ssn,
                       BLOCK: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, VGROUP: tl.constexpr,
                       NVG: tl.constexpr):
        b, h, t = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        PB: tl.constexpr = 8 // BITS
        DP: tl.constexpr = D // PB
        QMAX: tl.constexpr = (1 << BITS) - 1
        on = t * BLOCK + tl.arange(0, BLOCK)
        nm = on < N
        oi = tl.arange(0, DP)
        base = X + b * sxb + h * sxh + on[:, None] * sxn
        sbase = b * ssb + h * ssh + on * ssn
        packed = tl.zeros((BLOCK, DP), tl.uint8)
        for vg in tl.static_range(NVG):  # each value group's columns: packed column i holds channels i*PB+j
            cols = (oi * PB) // VGROUP == vg
            lo = tl.full((BLOCK,), float("inf"), tl.float32)
            hi = tl.full((BLOCK,), float("-inf"), tl.float32)
            for j in tl.static_range(PB):
                x = tl.load(base + (oi * PB + j)[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
                lo = tl.minimum(lo, tl.min(tl.where(cols[None, :], x, float("inf")), 1))
                hi = tl.maximum(hi, tl.max(tl.where(cols[None, :], x, float("-inf")), 1))
            lo = tl.minimum(tl.maximum(lo, -FP16_MAX), FP16_MAX)
            hi = tl.minimum(tl.maximum(hi, -FP16_MAX), FP16_MAX)
            zero = lo.to(tl.float16)
            scale = tl.maximum((hi - zero.to(tl.float32)) * (1.0 / QMAX), 1e-6).to(tl.float16)
            tl.store(S + sbase + vg, scale, mask=nm)
            tl.store(Z + sbase + vg, zero, mask=nm)
            for j in tl.static_range(PB):
                x = tl.load(base + (oi * PB + j)[None, :], mask=nm[:, None], other=0.0).to(tl.float32)
                c = _codes(x, zero.to(tl.float32)[:, None], scale.to(tl.float32)[:, None], QMAX)
                packed = tl.where(cols[None, :], packed | (c << (BITS * j)), packed)
        tl.store(C + b * scb + h * sch + on[:, None] * scn + oi[None, :], packed, mask=nm[:, None])


def supports(x: torch.Tensor, bits: int, group: int, values: bool = False) -> bool:
    """Whether the kernels take this input: CUDA, 2/4-bit, head_dim 64/128, a power-of-two group
    of 16..128 (tokens for keys, channels for values; values in one or two channel groups)."""
    return (triton is not None and x.is_cuda and x.ndim == 4 and bits in (2, 4) and x.shape[-1] in (64, 128)
            and group in (16, 32, 64, 128) and x.stride(-1) == 1 and (not values or x.shape[-1] // group in (1, 2)))


def quantize_keys_pack(k: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [B, H, N, D] (N % group == 0) -> codes [B, H, N, D*bits/8], scale/zero [B, H, N/group, D]."""
    b, h, n, d = k.shape
    codes = torch.empty(b, h, n, d * bits // 8, dtype=torch.uint8, device=k.device)
    scale = torch.empty(b, h, n // group, d, dtype=torch.float16, device=k.device)
    zero = torch.empty_like(scale)
    if n:
        _keys_kernel[(b, h, n // group)](k, codes, scale, zero, k.stride(0), k.stride(1), k.stride(2),
                                         codes.stride(0), codes.stride(1), codes.stride(2),
                                         scale.stride(0), scale.stride(1), scale.stride(2),
                                         GROUP=group, D=d, BITS=bits)
    return codes, scale, zero


def quantize_values_pack(v: torch.Tensor, bits: int, vgroup: int, block: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [B, H, N, D] -> codes [B, H, N, D*bits/8], scale/zero [B, H, N, D/vgroup]."""
    b, h, n, d = v.shape
    codes = torch.empty(b, h, n, d * bits // 8, dtype=torch.uint8, device=v.device)
    scale = torch.empty(b, h, n, d // vgroup, dtype=torch.float16, device=v.device)
    zero = torch.empty_like(scale)
    if n:
        _values_kernel[(b, h, triton.cdiv(n, block))](v, codes, scale, zero, n, v.stride(0), v.stride(1), v.stride(2),
                                                      codes.stride(0), codes.stride(1), codes.stride(2),
                                                      scale.stride(0), scale.stride(1), scale.stride(2),
                                                      BLOCK=block, D=d, BITS=bits, VGROUP=vgroup, NVG=d // vgroup)
    return codes, scale, zero
