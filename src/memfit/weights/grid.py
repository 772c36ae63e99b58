"""Uniform group-wise grids: round-to-nearest (RTN), a searched clipping, and HQQ's half-quadratic refinement.

A group is ``group_size`` consecutive input channels of one output row; each has a scale and a
(fractional) zero point in the code domain: ``w ~ (q - zero) * scale`` with ``q`` in ``0 .. 2**bits - 1``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

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


def _scale_floor(wg: torch.Tensor) -> torch.Tensor:
    # keeps |zero| = |min| / scale <= 2**12, so it fits float16: a constant group (range 0) would
    # otherwise get an infinite zero, and a narrow one far from 0 a zero past float16's range
    return (wg.abs().amax(-1) * 2.0**-12).clamp_min(1e-8)


def minmax_grid(wg: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale = torch.maximum((hi - lo) / ((1 << bits) - 1), _scale_floor(wg))
    return scale, -lo / scale


def _sse(wg: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    q = round_codes(wg, scale, zero, bits)
    return ((wg - (q - zero[..., None]) * scale[..., None]) ** 2).sum(-1)


def _least_squares(q: torch.Tensor, x: torch.Tensor, scale: torch.Tensor, floor: torch.Tensor):
    """The scale and zero that fit ``x ~ (q - zero) * scale`` best in squared error, codes fixed
    (the old scale where all codes are equal)."""
    qm, xm = q.mean(-1, keepdim=True), x.mean(-1, keepdim=True)
    var = ((q - qm) ** 2).sum(-1)
    cov = ((q - qm) * (x - xm)).sum(-1)
    a = torch.where(var > 0, cov / var.clamp_min(1e-12), scale)
    a = torch.maximum(a, floor)
    return a, qm[..., 0] - xm[..., 0] / a


def search_grid(wg: torch.Tensor, bits: int, steps: int = 20, rmin: float = -1.0, rdelta: float = 0.1,
                refits: int = 2, error: Callable | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Each group's grid with the smallest error among ``steps + 1`` clippings of its range
    (``2**bits - 1 + rmin + i * rdelta`` steps across min..max, min..max itself among them), each
    also refitted ``refits`` times by least squares on its codes: the search llama.cpp's k-quants
    make (``make_qkx2_quants``), calibration-free. ``error(scale, zero)`` gives each group's error
    (default: its squared error on this grid). Never worse than the min..max grid."""
    error = error or (lambda s, z: _sse(wg, s, z, bits))
    n = (1 << bits) - 1
    lo, hi = wg.amin(-1), wg.amax(-1)
    floor = _scale_floor(wg)
    best_s, best_z = minmax_grid(wg, bits)
    best = error(best_s, best_z)
    for i in range(steps + 1):
        s = torch.maximum((hi - lo) / (n + rmin + i * rdelta), floor)
        z = -lo / s
        for r in range(refits + 1):
            if r:
                s, z = _least_squares(round_codes(wg, s, z, bits), wg, s, floor)
            err = error(s, z)
            better = err < best
            best = torch.where(better, err, best)
            best_s, best_z = torch.where(better, s, best_s), torch.where(better, z, best_z)
    return best_s, best_z


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
    """HQQ (Badri & Shaji 2023), calibration-free: alternate a sparse (l_p, p < 1) estimate of the
    quantization error and the scale and zero that best explain the rest (least squares on the codes),
    with the penalty ``beta`` growing by ``kappa``. It starts from ``search_grid`` (HQQ's own start is
    min..max; on SmolLM2 the search is worth more than the refinement: 4-bit perplexity 35.0 -> 33.9)
    and keeps each group's grid of smallest squared error, so it is never worse than either."""
    wg = _grouped(w, group_size)
    floor = _scale_floor(wg)
    scale, zero = search_grid(wg, bits)
    best_s, best_z, best = scale, zero, torch.full_like(zero, float("inf"))
    for _ in range(iters):
        q = round_codes(wg, scale, zero, bits)
        e = wg - (q - zero[..., None]) * scale[..., None]
        err = (e**2).sum(-1)
        better = err < best
        if not better.any():
            break
        best = torch.where(better, err, best)
        best_s, best_z = torch.where(better, scale, best_s), torch.where(better, zero, best_z)
        scale, zero = _least_squares(q, wg - _shrink_lp(e, beta, p), scale, floor)
        beta *= kappa
    codes = round_codes(wg, best_s, best_z, bits)
    return UniformCodes(codes.reshape(w.shape).to(torch.uint8), best_s, best_z, bits, group_size)


META_BITS = range(2, 9)  # the widths a MetaCodes scale or zero may take


def _half_towards(x: torch.Tensor, direction: int) -> torch.Tensor:
    """``x`` in float16, rounded down (``direction`` -1) or up (+1) instead of to nearest."""
    h = x.half()
    off = h.float() > x if direction < 0 else h.float() < x
    return torch.where(off, torch.nextafter(h, torch.full_like(h, direction * float("inf"))), h)


@dataclass
class MetaCodes:
    """A uniform grid's scale and zero stored in ``bits`` bits per group instead of float16 (HQQ's
    meta-data quantization, QLoRA's double quantization): ``log2(scale)`` and the grid's offset
    ``-zero * scale`` (the weight that code 0 stands for), each on ``2**bits`` levels spanning its
    output row's own range. ``ranges`` float16 [out, 4]: log2-scale low and step, offset low and step.
    Log scale, because a row's scales span orders of magnitude and each wants the same relative
    precision; offset in the weight domain, because a constant group's zero (|zero| up to 2**12 in
    code units) would stretch a code-domain range for the whole row."""

    scale_codes: torch.Tensor  # uint8 [out, groups]
    offset_codes: torch.Tensor  # uint8 [out, groups]
    ranges: torch.Tensor
    bits: int

    @classmethod
    def fit(cls, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> "MetaCodes":
        """Each row's ranges from its own grids, then those grids snapped onto them."""
        if bits not in META_BITS:
            raise ValueError(f"meta bits must be in 2..8, got {bits}")
        n = (1 << bits) - 1

        def span(x):  # float16 low rounded down and step rounded up, so the n steps still reach the top
            lo = _half_towards(x.amin(-1), -1)
            return lo, _half_towards((x.amax(-1) - lo.float()) / n, 1)

        ranges = torch.stack([*span(torch.log2(scale.float())), *span(-zero.float() * scale.float())], -1)
        return cls.snap(ranges, scale, zero, bits)

    @classmethod
    def snap(cls, ranges: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> "MetaCodes":
        """Codes of the grids ``scale``/``zero`` on given row ranges (out-of-range values are clamped)."""
        n = (1 << bits) - 1
        r = ranges.float()[:, None, :]  # [out, 1, 4] against [out, groups]

        def code(x, lo, step):
            return torch.round((x - lo) / step.clamp_min(1e-30)).clamp_(0, n).to(torch.uint8)

        sc = code(torch.log2(scale.float()), r[..., 0], r[..., 1])
        oc = code(-zero.float() * scale.float(), r[..., 2], r[..., 3])
        return cls(sc, oc, ranges, bits)

    def grid(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The scale and zero (float32) these codes stand for."""
        r = self.ranges.float()[:, None, :]
        scale = torch.exp2(r[..., 0] + self.scale_codes.float() * r[..., 1])
        offset = r[..., 2] + self.offset_codes.float() * r[..., 3]
        return scale, -offset / scale


def with_meta(w: torch.Tensor, uc: UniformCodes, meta_bits: int) -> tuple[UniformCodes, MetaCodes]:
    """``uc``'s grids with their scale and zero stored in ``meta_bits`` bits (``MetaCodes``), and the
    weights re-rounded on the grids as stored, so the codes fit the grid that is read back."""
    meta = MetaCodes.fit(uc.scale, uc.zero, meta_bits)
    scale, zero = meta.grid()
    codes = round_codes(_grouped(w, uc.group_size), scale, zero, uc.bits)
    return UniformCodes(codes.reshape(w.shape).to(torch.uint8), scale, zero, uc.bits, uc.group_size), meta
