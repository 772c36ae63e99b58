"""Any-precision weights: one 8-bit model whose top ``n`` bit planes are an ``n``-bit model, 3 <= n <= 8.

The grid is nested by construction: the ``seed_bits`` (3-bit) grid comes from HQQ, and the 8-bit grid
divides each of its steps into ``2**(8 - seed_bits)`` equal parts, placed so that the centre of every
``n``-bit bin (the codes sharing their top ``n`` bits) falls on the finer grid of that width. Reading
the top ``seed_bits`` planes therefore gives exactly the HQQ ``seed_bits`` model, and every extra plane
halves the step. The file holds the 8-bit model only; the width is picked at load time.
"""

from __future__ import annotations

import torch

from memfit.weights.grid import UniformCodes, _grouped, hqq, round_codes


def anyprec(w: torch.Tensor, group_size: int, bits: int = 8, seed_bits: int = 3) -> UniformCodes:
    if not 1 <= seed_bits <= bits <= 8:
        raise ValueError(f"need 1 <= seed_bits ({seed_bits}) <= bits ({bits}) <= 8")
    seed = hqq(w, seed_bits, group_size)
    m = 1 << (bits - seed_bits)
    # bin k of the seed grid = codes m*k .. m*k + m - 1, centred on the seed's grid point k:
    # ((k + 0.5) m - 0.5 - zero) * scale == (k - seed.zero) * seed.scale
    scale = seed.scale / m
    zero = seed.zero * m + (m - 1) / 2
    codes = round_codes(_grouped(w, group_size), scale, zero, bits)
    return UniformCodes(codes.reshape(w.shape).to(torch.uint8), scale, zero, bits, group_size)
