"""Bit-packing of low-bit codes into uint8, shared by the torch reference and the GPU kernels.

Codes are packed along the last dimension: four 2-bit or two 4-bit codes per byte, the first code
in the lowest bits, so that byte ``i`` holds channels ``per_byte * i + j`` for ``j < per_byte``.
"""

from __future__ import annotations

import lazy_loader

torch = lazy_loader.load("torch")  # check_bits, which config validation calls, needs no torch

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


def pack_planes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes of any width 1..8 as bit planes, most significant first: [..., D] uint8 ->
    [bits, ..., ceil(D / 8)] uint8, plane ``p`` holding bit ``bits - 1 - p`` of eight codes per byte
    (the first code in the lowest bit). Exactly ``bits`` bits per code (3-bit codes take 3/8 of a byte),
    and the top ``n`` planes alone are the codes' top ``n`` bits, which is what any-precision reads."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits!r}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes must be uint8, got {codes.dtype}")
    d = codes.shape[-1]
    pad = (-d) % 8
    c = torch.nn.functional.pad(codes, (0, pad)) if pad else codes
    c = c.reshape(*c.shape[:-1], (d + pad) // 8, 8)
    weights = (1 << torch.arange(8, device=codes.device, dtype=torch.int32)).to(torch.uint8)
    planes = [(((c >> (bits - 1 - p)) & 1) * weights).sum(-1, dtype=torch.int32).to(torch.uint8) for p in range(bits)]
    return torch.stack(planes)


def unpack_planes(planes: torch.Tensor, dim: int, read_bits: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack_planes` for the first ``dim`` codes of the last dimension. With
    ``read_bits`` < the planes stored, returns the codes' top ``read_bits`` bits only."""
    if planes.dtype != torch.uint8:
        raise TypeError(f"bit planes must be uint8, got {planes.dtype}")
    bits = planes.shape[0]
    n = bits if read_bits is None else read_bits
    if not 1 <= n <= bits:
        raise ValueError(f"can read 1..{bits} bit planes, asked for {n}")
    if dim > planes.shape[-1] * 8:
        raise ValueError(f"{planes.shape[-1]} bytes per plane hold at most {planes.shape[-1] * 8} codes, asked for {dim}")
    shifts = torch.arange(8, device=planes.device, dtype=torch.uint8)
    out = None
    for p in range(n):
        b = (planes[p].unsqueeze(-1) >> shifts) & 1
        out = b if out is None else (out << 1) | b
    return out.reshape(*out.shape[:-2], -1)[..., :dim]
