"""Any-precision weights: one 8-bit model whose top ``n`` bit planes are an ``n``-bit model, 3 <= n <= 8.

The grid is nested by construction: the 8-bit grid divides each step of the ``seed_bits`` (3-bit)
grid into ``2**(8 - seed_bits)`` equal parts, placed so that the centre of every ``n``-bit bin (the
codes sharing their top ``n`` bits) falls on the finer grid of that width. Reading the top
``seed_bits`` planes therefore gives the ``seed_bits`` model, and every extra plane halves the step.

The seed grid serves every width at once. Clipping a group's range (what a 3-bit grid wants, see
``grid.search_grid``) clips every finer width too, so the seed is searched among the same clippings
for the smallest sum, over the widths, of each width's squared error in units of its own step
(``4**n``): no width is favoured. The file holds the 8-bit model only; the width is picked at load.
"""

from __future__ import annotations

import torch

from memfit.weights.grid import UniformCodes, _grouped, round_codes, search_grid


def nested_grid(scale: torch.Tensor, zero: torch.Tensor, bits: int, seed_bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``bits`` grid nested in the ``seed_bits`` grid (``scale``, ``zero``): bin k of the seed
    grid = codes m*k .. m*k + m - 1, centred on the seed's point k:
    ``((k + 0.5) m - 0.5 - zero') * scale' == (k - zero) * scale``."""
    m = 1 << (bits - seed_bits)
    return scale / m, zero * m + (m - 1) / 2


def bin_centres(top: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Codes on the ``bits`` grid of the bins that ``n``-bit codes (the top ``n`` planes) index: each
    bin of ``2**(bits - n)`` codes is read at its centre."""
    m = 1 << (bits - n)
    return (top.float() + 0.5) * m - 0.5 if m > 1 else top.float()


def anyprec(w: torch.Tensor, group_size: int, bits: int = 8, seed_bits: int = 3) -> UniformCodes:
    if not 1 <= seed_bits <= bits <= 8:
        raise ValueError(f"need 1 <= seed_bits ({seed_bits}) <= bits ({bits}) <= 8")
    wg = _grouped(w, group_size)

    def every_width(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        scale, zero = nested_grid(s, z, bits, seed_bits)
        codes = round_codes(wg, scale, zero, bits)
        err = 0
        for n in range(seed_bits, bits + 1):
            c = bin_centres(codes.to(torch.uint8) >> (bits - n), bits, n)
            err = err + 4.0 ** (n - seed_bits) * ((wg - (c - zero[..., None]) * scale[..., None]) ** 2).sum(-1)
        return err

    scale, zero = nested_grid(*search_grid(wg, seed_bits, error=every_width), bits, seed_bits)
    codes = round_codes(wg, scale, zero, bits)
    return UniformCodes(codes.reshape(w.shape).to(torch.uint8), scale, zero, bits, group_size)
