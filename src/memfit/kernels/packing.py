"""Bit-packing of low-bit codes into uint8, shared by the torch reference and the GPU kernels.

Codes are packed along the last dimension: four 2-bit or two 4-bit codes per byte, the first code
in the lowest bits, so that byte ``i`` holds channels ``per_byte * i + j`` for ``j < per_byte``.
"""

from __future__ import annotations

import torch

SUPPORTED_BITS = (2, 4, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes (< 2**bits) along the last dimension: [..., D] -> [..., D * bits // 8]."""
    check_bits(bits)
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    if bits == 8:
        return codes.contiguous()
    per_byte = 8 // bits
    d = codes.shape[-1]
    if d % per_byte:
        raise ValueError(f"last dimension {d} is not a multiple of {per_byte} (needed to pack {bits}-bit codes)")
    c = codes.reshape(*codes.shape[:-1], d // per_byte, per_byte)
    out = c[..., 0].clone()
    for i in range(1, per_byte):
        out |= c[..., i] << (bits * i)
    return out


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: [..., D * bits // 8] uint8 -> [..., D] uint8 codes."""
    check_bits(bits)
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed codes must be uint8, got {packed.dtype}")
    if bits == 8:
        return packed
    per_byte = 8 // bits
    mask = (1 << bits) - 1
    shifts = torch.arange(0, 8, bits, device=packed.device, dtype=torch.uint8)
    c = (packed.unsqueeze(-1) >> shifts) & mask
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
