"""Uniform group-wise grids: round-to-nearest (RTN) and HQQ's half-quadratic refinement of the zero.

A group is ``group_size`` consecutive input channels of one output row; each has a scale and a
(fractional) zero point in the code domain: ``w ~ (q - zero) * scale`` with ``q`` in ``0 .. 2**bits - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class UniformCodes:
    """Codes on a uniform grid: ``codes`` uint8 [out, in], ``scale`` and ``zero`` float32 [out, in // group]."""

    codes: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor
    bits: int
    group_size: int

    def dequantize(self) -> torch.Tensor:
        return dequantize_uniform(self.codes, self.scale, self.zero, self.group_size)


def _grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = w.shape
    if inp % group_size:
        raise ValueError(f"input size {inp} is not a multiple of group_size {group_size}")
    return w.float().reshape(out, inp // group_size, group_size)


def round_codes(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    return torch.round(wg / scale[..., None] + zero[..., None]).clamp_(0, (1 << bits) - 1)


def dequantize_uniform(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    out, inp = codes.shape
    q = codes.float().reshape(out, inp // group_size, group_size)
    return ((q - zero[..., None]) * scale[..., None]).reshape(out, inp)


def minmax_grid(wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = ((hi - lo) / ((1 << bits) - 1)).clamp_min(1e-8)
    return scale, -lo / scale


def rtn(w: torch.Tensor, bits: int, group_size: int) -> UniformCodes:
    """Round to nearest on each group's min..max range."""
    wg = _grouped(w, group_size)
    scale, zero = minmax_grid(wg, bits)
    codes = round_codes(wg, scale, zero, bits)
    return UniformCodes(codes.reshape(w.shape).to(torch.uint8), scale, zero, bits, group_size)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    # proximal operator of |x|^p (p < 1): a generalised soft threshold that keeps large errors (outliers) sparse
    return torch.sign(x) * torch.relu(x.abs() - x.abs().clamp_min(1e-12).pow(p - 1) / beta)


def hqq(w: torch.Tensor, bits: int, group_size: int, *, iters: int = 20, p: float = 0.7, beta: float = 10.0,
        kappa: float = 1.01) -> UniformCodes:
    """HQQ (Badri & Shaji 2023): starting from the min..max grid, alternate a sparse (l_p, p < 1) estimate
    of the quantization error and the zero point that best explains the rest, with the penalty ``beta``
    growing by ``kappa``; keeps the zero point with the smallest mean absolute error. Calibration-free."""
    wg = _grouped(w, group_size)
    scale, zero = minmax_grid(wg, bits)
    best_zero, best_err = zero.clone(), torch.full_like(zero, float("inf"))
    for _ in range(iters):
        q = round_codes(wg, scale, zero, bits)
        wr = (q - zero[..., None]) * scale[..., None]
        err = (wg - wr).abs().mean(-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_zero = torch.where(better, zero, best_zero)
        if not better.any():
            break
        we = _shrink_lp(wg - wr, beta, p)
        zero = (q - (wg - we) / scale[..., None]).mean(-1)
        beta *= kappa
    codes = round_codes(wg, scale, best_zero, bits)
    return UniformCodes(codes.reshape(w.shape).to(torch.uint8), scale, best_zero, bits, group_size)
