"""GEMV over weights in a layout made for bandwidth (Triton): ``y = x @ W.T`` for decode-sized ``x``.

The bit-plane layout (``plane_gemv``) lets a layer be read at any precision, but decoding one bit
plane at a time costs a bit test and a multiply-add per weight and plane: at 3 bits it ran at ~8%
of HBM bandwidth. This layout stores each code whole, in the fewest parts of width 8, 4, 2 or 1
(3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2, 7 = 4 + 2 + 1), and orders the bytes so that what one program
reads in one step is one contiguous block:

- a tile row covers a *unit* of ``U`` input channels: the grid's group, or less where the widest part's
  row would pass 16 bytes (4-bit codes in groups of 64: units of 32), so that one thread loads a row's
  codes in one 128-bit read and sums them alone (no shuffles, no barriers in the loop);
- a part of width ``w`` packs ``8 / w`` codes a byte; for unit ``g``, the ``R = U w / 8`` bytes of a row
  hold, at bits ``i w .. i w + w - 1`` (slot ``i``), the codes of channels ``g U + i R .. g U + i R + R - 1``:
  the piece of ``x`` a slot meets is one contiguous load. Within each 4-byte word the bytes hold
  channels ``r, r + 2, r + 1, r + 3`` (so ``U w`` is a multiple of 32), for the unpacking below;
- a part is stored ``[N / BN, K / U, BN, R]``: the ``BN`` output rows of a program, one unit at a
  time, are ``BN R`` contiguous bytes, and the units a program reads in a step are consecutive.

With ``w = code * scale + offset`` per group, a row's output is ``sum_g scale_g sum_k (code_k - c) x_k +
(offset_g + c scale_g) sum_k x_k`` for any constant ``c``: the kernel sums ``(code - c) * x`` per unit,
with ``c`` the middle of the code range, and applies the grid once per unit and row, in float32; each part's
codes count ``2**shift`` times. Centred codes keep the codes' mean out of the float16 sums, whose
rounding would otherwise count against the small difference left once the offsets are added (on the
H200 this halved the error of a 4-bit 4096 x 4096 layer with an outlier row, to 0.5% of the largest
output). The sums of ``(code - c) * x`` are float16 arithmetic on four codes a word: the word shifted by
``s`` and by ``s + 8``, masked into the mantissa of 1024.0 (two codes a register, in channel order
thanks to the byte order above), and one FMA a pair takes off ``1024 + c`` and scales by ``2**-w``,
exactly: about 1.5 instructions a code, then a float16 FMA with ``x`` (even and odd channels summed as
two chains, which compile to one f16x2 FMA a pair; a single chain compiled to three instructions a
pair). The PTX takes a thread's four consecutive bytes as one word, which Triton lays out so only when
a tile holds at least four bytes a thread; smaller tiles use plain Triton shifts (measured on the H200:
the PTX on tiles of one or two bytes a thread gave wrong sums). Conversions to float32 run at 1/8 of
the FMA rate on an H100, so only each row's per-slot sum is converted. ``x`` is read in float16,
saturated at +-65504, and a row's float16 sum over one slot (``R`` channels) must stay under 65504
(activations that large are not met in practice). Each unit's sum of ``x`` (float32) is computed next
to the conversion (both fuse with the op before under torch.compile).

Twin's low-rank part (``lowrank=``): ``y += (x R^T) L^T`` in the same launch, the dual-component product
(see :func:`_lowrank_u`, :func:`_lowrank_term` and ``docs/weights.md``).

``tile_gemv_reference`` computes the same thing in torch (dequantize the tiles, ``F.linear``): the
tests compare the kernel with it, and with the layer's own dequantized matmul.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None

MAX_ROWS = 16  # more rows than this (prefill) go through a dequantized matmul instead
BLOCK_N = 32  # output rows a program covers; fixed when a layer's tiles are packed
# widths of each code's parts, high bits first, and the bit each part starts at
PARTS = {1: ((1, 0),), 2: ((2, 0),), 3: ((2, 1), (1, 0)), 4: ((4, 0),), 5: ((4, 1), (1, 0)), 6: ((4, 2), (2, 0)),
         7: ((4, 3), (2, 1), (1, 0)), 8: ((8, 0),)}


def unit(bits: int, group_size: int) -> int:
    """Input channels a tile row covers: the group, or less so that the widest part's row is at most
    16 bytes (one 128-bit load: then one thread holds a row's codes and sums them alone)."""
    return min(group_size, 128 // PARTS[bits][0][0])


def fits(bits: int, group_size: int) -> bool:
    """Whether a layer's rows fill whole 4-byte words in every part (``unit * w / 8`` a multiple of 4)."""
    return bits in PARTS and group_size % 8 == 0 and all(unit(bits, group_size) * w % 32 == 0 for w, _ in PARTS[bits])


def supports(x: torch.Tensor, group_size: int, k: int) -> bool:
    """Whether the kernel takes ``x`` for a layer of ``k`` input channels in groups of ``group_size``:
    16-bit activations only (its float16 arithmetic is within their precision; a float32 model keeps
    float32 sums through the bit-plane GEMV)."""
    return (triton is not None and x.is_cuda and group_size % 8 == 0 and k % group_size == 0
            and x.numel() // k <= MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16))


def _word_order(r: int) -> list[int]:
    """Within each 4-byte word, bytes hold channels r, r + 2, r + 1, r + 3 (what the kernel's unpacking
    wants; the permutation is its own inverse)."""
    return [j - j % 4 + (0, 2, 1, 3)[j % 4] for j in range(r)]


def pack_tiles(codes: torch.Tensor, bits: int, group_size: int, block_n: int = BLOCK_N) -> list[torch.Tensor]:
    """uint8 codes [N, K] at ``bits`` -> one uint8 tensor [ceil(N / BN), K / U, BN, U w / 8] per part, ``U`` =
    :func:`unit` (rows past N are zero)."""
    if bits not in PARTS:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    n, k = codes.shape
    if not fits(bits, group_size) or k % group_size:
        raise ValueError(f"group_size must divide the {k} input channels and give each {bits}-bit part whole "
                         f"4-byte words (a multiple of {32 // min(w for w, _ in PARTS[bits])}), got {group_size}")
    nb, u = -(-n // block_n), unit(bits, group_size)
    c = torch.zeros(nb * block_n, k, dtype=torch.uint8, device=codes.device)
    c[:n] = codes
    out = []
    for w, shift in PARTS[bits]:
        per, r = 8 // w, u * w // 8
        part = ((c >> shift) & ((1 << w) - 1)).reshape(nb, block_n, k // u, per, r)
        byte = torch.zeros(nb, block_n, k // u, r, dtype=torch.uint8, device=codes.device)
        for i in range(per):
            byte |= part[:, :, :, i] << (i * w)
        out.append(byte[..., _word_order(r)].permute(0, 2, 1, 3).contiguous())
    return out


def unpack_tiles(tiles: list[torch.Tensor], bits: int, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_tiles`: uint8 codes [n, K]."""
    codes = None
    for (w, shift), t in zip(PARTS[bits], tiles):
        nb, ng, bn, r = t.shape
        per = 8 // w
        t = t[..., _word_order(r)]  # the order is its own inverse
        slots = torch.stack([(t >> (i * w)) & ((1 << w) - 1) for i in range(per)], 3)  # [nb, ng, bn, per, r]
        c = slots.permute(0, 2, 1, 3, 4).reshape(nb * bn, ng * per * r)
        codes = c << shift if codes is None else codes | (c << shift)
    return codes[:n]


def tile_gemv_reference(x: torch.Tensor, tiles: list[torch.Tensor], bits: int, n: int, scale: torch.Tensor,
                        offset: torch.Tensor, lowrank: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
    """``x @ W.T`` with ``W = code * scale + offset`` per group (float16 ``scale`` / ``offset`` [K / G, N]), in float32;
    ``lowrank`` (as :func:`tile_gemv` takes it): plus ``(x R^T) L^T``."""
    codes = unpack_tiles(tiles, bits, n).float()
    g = codes.shape[1] // scale.shape[0]
    w = codes * scale.float().T.repeat_interleave(g, 1)[:n] + offset.float().T.repeat_interleave(g, 1)[:n]
    y = x.float() @ w.T
    if lowrank is not None:
        lc, ls, rc, rs, table = _check_lowrank(lowrank, n, x.shape[-1], tiles[0].shape[0])
        u = x.float() @ (rc.float() * rs.float()[:, None]).T
        if table is None:
            return y + u @ (lc.float() * ls.float()[:, None]).T
        bn = tiles[0].shape[2]
        for b, (uo, r, at) in enumerate(table.tolist()):  # stacked layers: each block its own rows of L and u
            rows = min(bn, n - b * bn)
            lb = lc[at : at + rows * r].reshape(rows, r).float() * ls[b * bn : b * bn + rows].float()[:, None]
            y[..., b * bn : b * bn + rows] += u[..., uo : uo + r] @ lb.T
    return y


if triton is not None:

    # four codes -> (code >> shift & mask) / 2**w as four float16, from a word whose bytes hold the
    # codes of channels r, r + 2, r + 1, r + 3 (``pack_tiles`` stores them so): masking the word shifted by
    # s and by s + 8 into the mantissa of 1024.0 gives the pairs (r, r + 1) and (r + 2, r + 3) in order,
    # and one FMA per pair takes off the 1024 and scales by 2**-w, exactly (about 1.5 instructions a code).
    # $2: the word, $3 / $7: shifts s and s + 8, $11: the mask, $15: 2**-w, $19: -1024 * 2**-w (pairs)
    # one line: torch.compile copies the kernel's globals into generated source, where a string with
    # line breaks does not survive
    _DQ_ASM = tl.constexpr("{ .reg .b32 t0, t1; shr.b32 t0, $2, $3; shr.b32 t1, $2, $7; "
                           "lop3.b32 t0, t0, $11, 0x64006400, 0xEA; lop3.b32 t1, t1, $11, 0x64006400, 0xEA; "
                           "fma.rn.f16x2 $0, t0, $15, $19; fma.rn.f16x2 $1, t1, $15, $19; }")

    _DQ_REGS = tl.constexpr("=r,=r," + ",".join(["r"] * 21))

    @triton.jit
    def _codes(b, SHIFT: tl.constexpr, W: tl.constexpr, ASM: tl.constexpr):
        """Slot ``SHIFT / W`` of the bytes ``b`` as float16 ``(code - 2**(W-1)) / 2**W``, centred in
        [-1/2, 1/2): a product with any float16 ``x`` stays finite, and a group's sum does not carry
        the codes' mean (its rounding would count against the small difference left once the
        offsets are added)."""
        if ASM:
            # 2**-W and -(1024 + 2**(W-1)) * 2**-W as float16 pairs (the second as a negative int32)
            return tl.inline_asm_elementwise(
                asm=_DQ_ASM, constraints=_DQ_REGS,
                args=[b, tl.full(b.shape, SHIFT, tl.int32), tl.full(b.shape, SHIFT + 8, tl.int32),
                      tl.full(b.shape, ((1 << W) - 1) * 0x10001, tl.int32),
                      tl.full(b.shape, ((15 - W) << 10) * 0x10001, tl.int32),
                      tl.full(b.shape, (0x8000 | ((25 - W) << 10) | (1 << (W - 1))) * 0x10001 - (1 << 32), tl.int32)],
                dtype=tl.float16, is_pure=True, pack=4)
        return ((b >> SHIFT) & ((1 << W) - 1)).to(tl.float16) * (1.0 / (1 << W)) - 0.5

    @triton.jit
    def _part_dot(X, P, row, g0, pid_n, NG: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                  BN: tl.constexpr, NGT: tl.constexpr, ASM: tl.constexpr, WARPS: tl.constexpr):
        """One part's ``sum_k ((code_k - 2**(W-1)) / 2**W) x_k`` over units ``g0 .. g0 + NGT - 1`` for the
        program's BN rows: float32 [NGT BN], tile row ``j BN + n`` = output row ``n`` over unit ``g0 + j``.
        The units' blocks are consecutive in memory, so the tile [NGT BN, R] is one contiguous read, and
        a row's R <= 16 bytes are one thread's load; a 2-D tile keeps ``x`` and the codes in one
        register layout."""
        R: tl.constexpr = GROUP * W // 8
        # the PTX takes a thread's 4 consecutive bytes as one word: only a tile of at least 4 bytes a
        # thread is laid out so (smaller ones get 1 or 2 bytes a thread along a row, measured)
        FAST: tl.constexpr = ASM and NGT * BN * R >= 128 * WARPS
        r = tl.arange(0, R)
        t = tl.arange(0, NGT * BN)
        if FAST:
            rb = r
        else:  # plain Triton reads each code's own byte: undo the order within each word
            q = r % 4
            rb = r - q + tl.where(q == 1, 2, tl.where(q == 2, 1, q))
        b = tl.load(P + ((pid_n * NG + g0) * BN + t)[:, None] * R + rb[None, :], eviction_policy="evict_first")
        xrow = X + row * (NG * GROUP) + (g0 + t // BN) * GROUP  # each tile row's unit of x
        acc = tl.zeros((NGT * BN,), tl.float32)
        for i in tl.static_range(8 // W):  # slot i: channels g G + i R .. g G + i R + R - 1
            xs = tl.load(xrow[:, None] + i * R + r[None, :])  # float16, the same for the BN rows of a unit
            # summed as two interleaved chains (even and odd channels), which pair up into f16x2 FMAs
            prod = tl.reshape(_codes(b, i * W, W, FAST) * xs, (NGT * BN, R // 2, 2))
            acc += tl.sum(tl.sum(prod, 1), 1).to(tl.float32)
        return acc

    @triton.jit
    def _lowrank_term(U, LC, LS, FLG, BLK, N, RK, row, blk, BN: tl.constexpr, RB: tl.constexpr, SEG: tl.constexpr):
        """Twin's low-rank term of output block ``blk``: ``l_scale_n sum_j L_nj u_j`` (float32 [BN]; ``L`` int8
        [N, RK] in ``LC``, float16 row scales in ``LS``), ``u`` = ``R x`` (float32 ``U`` [rows, RK]) once
        :func:`_lowrank_u`'s programs say it is complete (``FLG[row, 0]``). They come first in the grid, so
        they are running or done by now: the wait is short, and cannot hold them out. The last block to
        get here (counted in ``FLG[row, 1]``) puts both flags back to zero. ``L`` is read ``RB`` columns a
        step: small tiles keep the kernel's registers (so its occupancy) near those of the plain GEMV.
        ``SEG`` (stacked layers): the block's own ``u`` offset, rank and start of its rows in the flat ``L``
        come from ``BLK`` [blocks, 3] (``L`` is block-diagonal)."""
        ready = tl.atomic_add(FLG + row * 2, 0, sem="acquire")
        while ready == 0:
            ready = tl.atomic_add(FLG + row * 2, 0, sem="acquire")
        if SEG:
            uo, rk, lo = tl.load(BLK + blk * 3), tl.load(BLK + blk * 3 + 1), tl.load(BLK + blk * 3 + 2)
        else:
            uo, rk, lo = 0, RK, blk * BN * RK
        t = tl.arange(0, BN)
        keep = blk * BN + t < N
        lr = tl.zeros((BN,), tl.float32)
        for r0 in range(0, rk, RB):
            j = r0 + tl.arange(0, RB)
            u = tl.load(U + row * RK + uo + j, mask=j < rk, other=0.0, cache_modifier=".cg")  # L2, not a stale L1
            lc = tl.load(LC + lo + t[:, None] * rk + j[None, :], mask=keep[:, None] & (j < rk)[None, :], other=0)
            lr += tl.sum(lc.to(tl.float32) * u[None, :], 1)
        if tl.atomic_add(FLG + row * 2 + 1, 1, sem="acq_rel") == tl.num_programs(0) - 1:
            tl.store(FLG + row * 2, 0)
            tl.store(FLG + row * 2 + 1, 0)
        return lr * tl.load(LS + blk * BN + t, mask=keep, other=0.0).to(tl.float32)

    @triton.jit
    def _finish(y, Y, WS, CNT, U, LC, LS, FLG, BLK, N, RK, pid_n, row, BN: tl.constexpr, SPLIT: tl.constexpr,
                LR: tl.constexpr, RB: tl.constexpr, SEG: tl.constexpr):
        """Write a program's sums ``y`` [BN] for output block ``pid_n``: directly, or with ``SPLIT`` > 1
        added into ``WS`` (float32, zero between calls) and counted in ``CNT``; the last program of the
        block writes the output (plus, with ``LR``, twin's low-rank term) and puts both back to zero, so
        one launch does the whole product."""
        out = pid_n * BN + tl.arange(0, BN)
        keep = out < N
        if SPLIT == 1:
            if LR:
                y += _lowrank_term(U, LC, LS, FLG, BLK, N, RK, row, pid_n, BN, RB, SEG)
            tl.store(Y + row * N + out, y.to(Y.dtype.element_ty), mask=keep)
        else:
            tl.atomic_add(WS + row * N + out, y, mask=keep, sem="release")
            tl.debug_barrier()  # every thread's share is in before the count says so
            done = tl.atomic_add(CNT + row * tl.num_programs(0) + pid_n, 1, sem="acq_rel")
            if done == SPLIT - 1:  # the last of the block: the sums are complete
                zero = tl.zeros((BN,), tl.float32)
                total = tl.atomic_add(WS + row * N + out, zero, mask=keep)  # read where the sums were made (L2)
                if LR:
                    total += _lowrank_term(U, LC, LS, FLG, BLK, N, RK, row, pid_n, BN, RB, SEG)
                tl.store(Y + row * N + out, total.to(Y.dtype.element_ty), mask=keep)
                tl.store(WS + row * N + out, zero, mask=keep)
                tl.store(CNT + row * tl.num_programs(0) + pid_n, 0)

    @triton.jit
    def _lowrank_u(X, RC, RS, US, U, UCNT, FLG, K, RK, row, p, KSP: tl.constexpr, URB: tl.constexpr,
                   UKC: tl.constexpr, SB: tl.constexpr, FLAG: tl.constexpr):
        """Twin's ``u = R x`` inside the GEMV's launch: program ``p`` of ``cdiv(RK, URB) * KS`` (``KS`` =
        ``cdiv(K, UKC)``) sums ``URB`` rows of ``R`` over ``UKC`` channels into ``US`` [rows, KS, RK] (one
        load each, so that ``u`` is ready well before the GEMV's blocks are); the last to finish (counted
        in ``UCNT``) adds the shares into ``U`` and raises ``FLG[row, 0]`` (:func:`_lowrank_term` waits
        for it)."""
        ks_n = tl.cdiv(K, UKC)
        ks, j = p % ks_n, p // ks_n * URB + tl.arange(0, URB)
        kk = ks * UKC + tl.arange(0, UKC)
        x = tl.load(X + row * K + kk, mask=kk < K, other=0.0).to(tl.float32)
        rc = tl.load(RC + j[:, None] * K + kk[None, :], mask=(j < RK)[:, None] & (kk < K)[None, :], other=0)
        rs = tl.load(RS + j, mask=j < RK, other=0.0).to(tl.float32)
        tl.store(US + (row * ks_n + ks) * RK + j, tl.sum(rc.to(tl.float32) * x[None, :], 1) * rs, mask=j < RK)
        tl.debug_barrier()  # every thread's share is in before the count says so
        done = tl.atomic_add(UCNT + row, 1, sem="acq_rel")
        if done == tl.cdiv(RK, URB) * ks_n - 1:
            tl.store(UCNT + row, 0)
            s = tl.arange(0, KSP)
            for r0 in range(0, RK, SB):
                jj = r0 + tl.arange(0, SB)
                share = tl.load(US + (row * ks_n + s[:, None]) * RK + jj[None, :],
                                mask=(s < ks_n)[:, None] & (jj < RK)[None, :], other=0.0, cache_modifier=".cg")
                tl.store(U + row * RK + jj, tl.sum(share, 0), mask=jj < RK)
            if FLAG:  # the blocks' epilogue waits for it (without, u is read after the launch)
                tl.debug_barrier()  # u is complete before the flag says so
                tl.atomic_xchg(FLG + row * 2, 1, sem="release")

    @triton.jit(do_not_specialize=["BNR"])
    def _tile_gemv_kernel(X, XS, XW0, XW1, XW2, XSC, P0, P1, P2, S, O, Y, WS, CNT, LC, LS, RC, RS, US, U, UCNT, FLG,
                          BLK, N, NPAD, BNR, RK, NG: tl.constexpr, PER: tl.constexpr, SPLIT: tl.constexpr,
                          W0: tl.constexpr, OFF0: tl.constexpr, W1: tl.constexpr, OFF1: tl.constexpr,
                          W2: tl.constexpr, OFF2: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr,
                          NGT: tl.constexpr, ASM: tl.constexpr,
                          WARPS: tl.constexpr, CENTRE: tl.constexpr, UPG: tl.constexpr, A8: tl.constexpr,
                          LR: tl.constexpr, LRC: tl.constexpr, KSP: tl.constexpr,
                          RB: tl.constexpr, URB: tl.constexpr, UKC: tl.constexpr, SB: tl.constexpr,
                          SEG: tl.constexpr):
        """Program (output block, split of K, row): units ``split PER .. split PER + PER - 1`` (``GROUP``
        channels each, ``UPG`` a group of the grid), ``NGT`` a step, its sums written by :func:`_finish`.
        ``A8``: ``x`` in int8 words (``XW*``, a scale a block of 32 channels in ``XSC``) and integer dot
        products: a row's output is ``sum_u scale_u sum_k code_k x_k + offset_u xsum_u``, the first sum
        exact in int32 over the rounded ``x``, the second over ``x`` itself. ``BNR`` is BN, passed as an
        unspecialised int: the grid's offsets then look scattered to the compiler, which loads them
        straight into the codes' register layout instead of loading them vectorised and moving them
        there through shared memory each step. Twin layers (``R``, ``L`` int8 with float16 row scales, rank
        ``RK``): the first ``LRC`` columns of programs compute ``u = R x`` (:func:`_lowrank_u`); with ``LR``,
        ``y += (x R^T) L^T`` in the same launch (each block's last program adds ``L u`` to its sums), without
        it ``u`` is left for the caller."""
        pid_n, col, row = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        split = col - LRC
        if split < 0:
            if LRC > 0:  # (compiled only for twin layers: the plain call passes placeholders of another type)
                p = col * tl.num_programs(0) + pid_n
                if p < tl.cdiv(RK, URB) * tl.cdiv(NG * GROUP, UKC):
                    _lowrank_u(X, RC, RS, US, U, UCNT, FLG, NG * GROUP, RK, row, p, KSP, URB, UKC, SB, LR)
        else:
            _tile_gemv_body(X, XS, XW0, XW1, XW2, XSC, P0, P1, P2, S, O, Y, WS, CNT, LC, LS, U, FLG, BLK, N, NPAD, BNR,
                            RK, pid_n, split, row, NG, PER, SPLIT, W0, OFF0, W1, OFF1, W2, OFF2, GROUP, BN, NGT, ASM,
                            WARPS, CENTRE, UPG, A8, LR, RB, SEG)

    @triton.jit
    def _tile_gemv_body(X, XS, XW0, XW1, XW2, XSC, P0, P1, P2, S, O, Y, WS, CNT, LC, LS, U, FLG, BLK, N, NPAD, BNR, RK,
                        pid_n, split, row, NG: tl.constexpr, PER: tl.constexpr, SPLIT: tl.constexpr,
                        W0: tl.constexpr, OFF0: tl.constexpr, W1: tl.constexpr, OFF1: tl.constexpr, W2: tl.constexpr,
                        OFF2: tl.constexpr, GROUP: tl.constexpr, BN: tl.constexpr, NGT: tl.constexpr,
                        ASM: tl.constexpr, WARPS: tl.constexpr, CENTRE: tl.constexpr, UPG: tl.constexpr,
                        A8: tl.constexpr, LR: tl.constexpr, RB: tl.constexpr, SEG: tl.constexpr):
        t = tl.arange(0, NGT * BN)
        n = pid_n * BN + t % BNR
        acc = tl.zeros((NGT * BN,), tl.float32)
        for j in range(0, PER, NGT):
            g0 = split * PER + j
            gi = g0 + t // BNR
            if A8:  # code = sum of parts << OFF, each part's products summed exactly (CENTRE is 0)
                cx = _part_dot_a8(P0, XW0, XSC, row, g0, pid_n, NG, W0, GROUP, BN, NGT, ASM) * (1 << OFF0)
                if W1 > 0:
                    cx += _part_dot_a8(P1, XW1, XSC, row, g0, pid_n, NG, W1, GROUP, BN, NGT, ASM) * (1 << OFF1)
                if W2 > 0:
                    cx += _part_dot_a8(P2, XW2, XSC, row, g0, pid_n, NG, W2, GROUP, BN, NGT, ASM) * (1 << OFF2)
            else:
                # code = sum of parts << OFF; each part's sum is of (part - 2**(W-1)) / 2**W, so cx is the sum
                # of (code - CENTRE) x: w = (code - CENTRE) * scale + (offset + CENTRE * scale)
                cx = _part_dot(X, P0, row, g0, pid_n, NG, W0, GROUP, BN, NGT, ASM, WARPS) * (1 << (OFF0 + W0))
                if W1 > 0:
                    cx += _part_dot(X, P1, row, g0, pid_n, NG, W1, GROUP, BN, NGT, ASM, WARPS) * (1 << (OFF1 + W1))
                if W2 > 0:
                    cx += _part_dot(X, P2, row, g0, pid_n, NG, W2, GROUP, BN, NGT, ASM, WARPS) * (1 << (OFF2 + W2))
            scale = tl.load(S + (gi // UPG) * NPAD + n).to(tl.float32)  # [NGT BN]
            offset = tl.load(O + (gi // UPG) * NPAD + n).to(tl.float32)
            if CENTRE > 0:
                offset += CENTRE * scale
            acc += scale * cx + offset * tl.load(XS + row * NG + gi)  # XS: each unit's sum of x
        _finish(tl.sum(tl.reshape(acc, (NGT, BN)), 0), Y, WS, CNT, U, LC, LS, FLG, BLK, N, RK, pid_n, row, BN, SPLIT,
                LR, RB, SEG)

    @triton.jit
    def _dp4a(a, b, ASM: tl.constexpr):
        """Per int32 lane: the dot product of ``a``'s four unsigned bytes with ``b``'s four signed ones."""
        if ASM:
            return tl.inline_asm_elementwise(asm="dp4a.u32.s32 $0, $1, $2, 0;", constraints="=r,r,r",
                                             args=[a, b], dtype=tl.int32, is_pure=True, pack=1)
        out = tl.zeros(a.shape, tl.int32)
        for j in tl.static_range(4):  # the same sum in plain Triton (what the interpreter runs)
            out += ((a >> (8 * j)) & 0xFF) * ((b << (24 - 8 * j)) >> 24)
        return out

    @triton.jit
    def _part_dot_a8(P, XW, XSC, row, g0, pid_n, NG: tl.constexpr, W: tl.constexpr, GROUP: tl.constexpr,
                     BN: tl.constexpr, NGT: tl.constexpr, ASM: tl.constexpr):
        """One part's ``sum_k part_k xq_k xscale_k`` (float32 [NGT BN]) over units ``g0 .. g0 + NGT - 1``:
        the part's words [NGT BN, R / 4] (int32: four bytes, one of each of four channels), each slot's
        lanes masked out and multiplied with the int8 ``x`` words in the same channel order (``XW``
        [rows, NG, 8 / W, R / 4]) by one dp4a a word; each 32-channel block's int sum scaled by its
        ``x`` scale (``XSC`` [rows, K / 32])."""
        R: tl.constexpr = GROUP * W // 8
        RW: tl.constexpr = R // 4
        PER: tl.constexpr = 8 // W
        t = tl.arange(0, NGT * BN)
        wj = tl.arange(0, RW)
        u = g0 + t // BN  # each tile row's unit
        c = tl.load(P.to(tl.pointer_type(tl.int32)) + ((pid_n * NG + g0) * BN + t)[:, None] * RW + wj[None, :],
                    eviction_policy="evict_first")
        xw = XW + ((row * NG + u) * PER)[:, None] * RW + wj[None, :]
        acc = tl.zeros((NGT * BN,), tl.float32)
        for i in tl.static_range(PER):  # slot i: channels u U + i R .. u U + i R + R - 1, one x block
            if W == 8:
                lanes = c
            else:
                lanes = (c >> (i * W)) & (((1 << W) - 1) * 0x01010101)
            d = tl.sum(_dp4a(lanes, tl.load(xw + i * RW), ASM), 1)  # exact int32
            acc += d.to(tl.float32) * tl.load(XSC + row * (NG * GROUP // 32) + (u * GROUP + i * R) // 32)
        return acc

_WORKSPACE: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def _workspace(device: torch.device, n: int, blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K sums and counters for outputs of size ``n`` (zero between calls: the kernel leaves them
    so), one pair per device and size, shared by the layers of that size (one stream at a time)."""
    key = (device, n, blocks)
    if key not in _WORKSPACE:
        _WORKSPACE[key] = (torch.zeros(MAX_ROWS, n, device=device, dtype=torch.float32),
                           torch.zeros(MAX_ROWS, blocks, device=device, dtype=torch.int32))
    return _WORKSPACE[key]


def splits(steps: int, blocks: int, rows: int, device: torch.device, per_sm: int = 8) -> int:
    """Programs a block of outputs is split over along K: a divisor of ``steps`` (the K steps),
    enough for about ``per_sm`` programs an SM."""
    want = -(-per_sm * torch.cuda.get_device_properties(device).multi_processor_count // (blocks * rows))
    return max(d for d in range(1, steps + 1) if steps % d == 0 and d <= max(1, want))


def groups_a_step(groups: int, most: int = 8) -> int:
    """The largest power of two <= ``most`` that divides ``groups``: units a program reads a step."""
    t = most
    while groups % t:
        t //= 2
    return t


A8_BLOCK = 32  # input channels sharing one int8 scale in ``tile_gemv(..., a8=True)`` (llama.cpp's q8_1 blocks)


def quantize_input(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` [m, K] -> int8 codes [m, K] and float32 scales [m, K / 32]: each block of 32 channels
    rounded on 255 levels spanning its largest magnitude (symmetric)."""
    m, k = x.shape
    xb = x.float().reshape(m, k // A8_BLOCK, A8_BLOCK)
    s = xb.abs().amax(-1).clamp_min(1e-30) / 127
    return (xb / s[..., None]).round().clamp(-127, 127).to(torch.int8).reshape(m, k), s


def dequantize_input(xq: torch.Tensor, xsc: torch.Tensor) -> torch.Tensor:
    """The float32 values :func:`quantize_input`'s codes and scales stand for: [m, K]."""
    return (xq.float().reshape(*xsc.shape, A8_BLOCK) * xsc[..., None]).reshape(xq.shape)


def _input_words(xq: torch.Tensor, tiles: list[torch.Tensor], bits: int) -> list[torch.Tensor]:
    """The int8 input in each part's byte order: int32 [m, K / U, 8 / w, R / 4], word ``j`` of slot
    ``i`` of unit ``u`` holding the four channels whose codes word ``j`` of a row holds."""
    m, k = xq.shape
    out = []
    for (w, _), t in zip(PARTS[bits], tiles):
        ng, r = t.shape[1], t.shape[3]
        # _word_order(r) as a view: [.., 2, 2] transposed is the order (0, 2, 1, 3) of each four bytes; no index
        # tensor, so the call can be captured in a CUDA graph
        words = xq.reshape(m, ng, 8 // w, r // 4, 2, 2).transpose(-1, -2)
        out.append(words.reshape(m, ng, 8 // w, r).contiguous().view(torch.int32))
    return out


def tile_gemv_a8_reference(x: torch.Tensor, tiles: list[torch.Tensor], bits: int, n: int, scale: torch.Tensor,
                           offset: torch.Tensor) -> torch.Tensor:
    """What ``tile_gemv(..., a8=True)`` computes, in torch (float32): the codes' products with ``x``
    rounded to int8 blocks, the offsets' with ``x`` itself."""
    x2 = x.reshape(-1, x.shape[-1]).float()
    xr = dequantize_input(*quantize_input(x2))
    codes = unpack_tiles(tiles, bits, n).float()
    g = codes.shape[1] // scale.shape[0]
    y = (xr @ (codes * scale.float().T.repeat_interleave(g, 1)[:n]).T
         + x2 @ offset.float().T.repeat_interleave(g, 1)[:n].T)
    return y.reshape(*x.shape[:-1], n)


# (warps, units a step) by code width, from a compiled Llama-3.1-8B decode step on the H200 (batch 1, CUDA
# graph; ``benchmarks/weight_gemv.py`` times single calls): 4-bit 3.97 -> 3.43 ms with (8, 8); 2-bit 3.32 ms
# with (4, 4), 3.48 with (8, 8). Other widths: (4, 4), not timed in a step.
LAUNCH = {4: (8, 8)}


def tile_gemv(x: torch.Tensor, tiles: list[torch.Tensor], bits: int, n: int, scale: torch.Tensor,
              offset: torch.Tensor, asm: bool = True, warps: int | None = None, groups: int | None = None,
              per_sm: int = 8, split: int | None = None, a8: bool = False,
              lowrank: tuple[torch.Tensor, ...] | None = None, lowrank_u: bool = False
              ) -> "torch.Tensor | tuple[torch.Tensor, torch.Tensor]":
    """``x`` [..., K] (at most ``MAX_ROWS`` rows) times ``W`` (``tiles`` from :func:`pack_tiles`, ``n``
    output rows; ``W = code * scale + offset``, float16 [K / G, ceil(N / BN) BN]). ``asm``: the PTX
    dequantization (False: plain Triton, which the interpreter runs). ``warps``, ``groups``, ``per_sm``:
    a program's warps, the most units it reads a step (None: :data:`LAUNCH`'s for the width), programs an
    SM (K is split to reach it); or ``split``, a divisor of the steps (for tuning).
    ``a8``: ``x`` rounded to int8 in blocks of 32 channels and the codes' products summed exactly by
    dp4a: the loop compiles to about 1.8 instructions a 4-bit code against 3.4 (SmolLM2's perplexity
    moves +0.11% at 4 bits g32, +0.40% at 3 bits). ``lowrank``: twin's factors (``L`` int8 [n, r], its
    float16 row scales [n], ``R`` int8 [r, K], its scales [r]): ``(x R^T) L^T`` is added in the same
    launch (:func:`_lowrank_u`; with ``a8``, ``R x`` reads ``x`` unrounded); stacked twin layers pass ``L`` flat
    and a fifth tensor, the block table of :func:`lowrank_blocks`. Returns [..., n] in ``x``'s dtype.
    ``lowrank_u``: the launch computes ``u = x R^T`` but does not add ``u L^T``; returns (y, u float32
    [rows, r]), for the caller to add (under torch.compile that product fuses with the ops around it,
    where the in-launch epilogue waits on ``u`` at the end of every block)."""
    k = x.shape[-1]
    launch = LAUNCH.get(bits, (4, 4))
    warps, groups = warps or launch[0], groups or launch[1]
    nb, ng, bn, _ = tiles[0].shape  # ng: units of `group` channels, a tile row each
    group, grid = k // ng, k // scale.shape[0]
    if not supports(x, grid, k) or len(tiles) != len(PARTS[bits]) or grid % group or (a8 and k % A8_BLOCK):
        raise ValueError(f"tile_gemv takes CUDA inputs with at most {MAX_ROWS} rows and the tiles of a {bits}-bit layer")
    if scale.shape != (k // grid, nb * bn) or offset.shape != scale.shape:
        raise ValueError(f"scale and offset must be [{k // grid}, {nb * bn}], got {tuple(scale.shape)} / "
                         f"{tuple(offset.shape)}")
    xs = x.reshape(-1, k)
    xsum = xs.float().reshape(-1, ng, group).sum(-1)  # each unit's sum of x, for the offsets
    m = xs.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    parts = list(PARTS[bits]) + [(0, 0)] * (3 - len(PARTS[bits]))
    ptrs = list(tiles) + [tiles[0]] * (3 - len(tiles))
    ngt = groups_a_step(ng, groups)
    split = split or splits(ng // ngt, nb, m, x.device, per_sm)
    if (ng // ngt) % split:
        raise ValueError(f"split must divide the {ng // ngt} steps of {ngt} units, got {split}")
    lr = 0 if lowrank is None or lowrank_u else 1
    ws, cnt = _workspace(x.device, n, nb) if split > 1 else (y, y)
    table = None
    if lowrank is not None:
        lc, ls, rc, rs, table = _check_lowrank(lowrank, n, k, nb)
        rank, ksn = rc.shape[0], -(-k // LOWRANK_UKC)
        lrc = -(-(-(-rank // LOWRANK_URB) * ksn) // nb)  # columns of nb programs that compute u
        us, u, ucnt, flg = _lowrank_workspace(x.device, rank, ksn)
        if lowrank_u:  # u handed back: a tensor of its own (the launch's rows), not the shared workspace
            u = torch.empty(m, rank, device=x.device)
    else:
        lc = ls = rc = rs = us = u = ucnt = flg = y  # not read
        rank, ksn, lrc = 0, 1, 0
    if a8:  # under torch.compile the rounding and the word order fuse with the op before
        xq, xsc = quantize_input(xs)
        words = _input_words(xq, tiles, bits)
        words += [words[0]] * (3 - len(words))
    else:
        xsc, words = xsum, [xsum] * 3  # not read
        if x.dtype == torch.bfloat16:  # float16, saturated (65280: the largest bfloat16 that float16 holds)
            xs = xs.clamp(-65280.0, 65280.0).to(torch.float16)
    _tile_gemv_kernel[(nb, split + lrc, m)](
        xs.contiguous(), xsum, *words, xsc, *ptrs, scale, offset, y, ws, cnt, lc, ls, rc, rs, us, u, ucnt, flg,
        table if table is not None else y, n,
        nb * bn, bn, rank, NG=ng, PER=ng // split, SPLIT=split, W0=parts[0][0], OFF0=parts[0][1], W1=parts[1][0],
        OFF1=parts[1][1], W2=parts[2][0], OFF2=parts[2][1], GROUP=group, BN=bn, NGT=ngt, ASM=asm, WARPS=warps,
        CENTRE=0 if a8 else sum(1 << (w - 1 + off) for w, off in PARTS[bits]), UPG=grid // group, A8=a8,
        LR=lr, LRC=lrc, KSP=triton.next_power_of_2(ksn), RB=LOWRANK_RB,
        URB=LOWRANK_URB, UKC=LOWRANK_UKC, SB=max(1, 2048 // triton.next_power_of_2(ksn)), SEG=table is not None,
        num_warps=warps)
    if lowrank is not None and lowrank_u:
        return y.reshape(*x.shape[:-1], n), u
    return y.reshape(*x.shape[:-1], n)


# twin's u = R x in a tile GEMV's launch: rows of R and input channels a program, and L's columns a step in
# the epilogue; tiles this small (R: 16 codes a thread at 8 warps) keep the registers of the plain GEMV; 256
# channels, not 128: half as many u programs ahead of the GEMV's and half the shares to sum (docs/weights.md)
LOWRANK_URB, LOWRANK_UKC, LOWRANK_RB = 16, 256, 32
_LOWRANK_WORKSPACE: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _check_lowrank(lowrank: tuple[torch.Tensor, ...], n: int, k: int, blocks: int) -> tuple[torch.Tensor, ...]:
    """(L, L scales, R, R scales) or, for stacked layers, (flat L, L scales, R, R scales, block table: int32
    [blocks, 3], each block of outputs' u offset, rank and start in the flat L; see :func:`lowrank_blocks`),
    checked, contiguous; the table None where not stacked."""
    lc, ls, rc, rs, blk = (*lowrank, None) if len(lowrank) == 4 else lowrank
    r = rc.shape[0] if rc.dim() == 2 else -1
    flat = blk is not None and lc.dim() == 1 and blk.shape == (blocks, 3) and blk.dtype == torch.int32
    if ((lc.shape != (n, r) and not flat) or rc.shape != (r, k) or ls.shape != (n,) or rs.shape != (r,) or r < 1
            or lc.dtype != torch.int8 or rc.dtype != torch.int8):
        raise ValueError(f"lowrank must be int8 L [{n}, r] (or flat, with an int32 [{blocks}, 3] block table), its "
                         f"scales [{n}], int8 R [r, {k}] and its scales [r]; got {[tuple(t.shape) for t in lowrank]}")
    return lc.contiguous(), ls.contiguous(), rc.contiguous(), rs.contiguous(), blk


def lowrank_blocks(segments: list[tuple[int, int, int, int, int]], n: int, device, block_n: int = BLOCK_N):
    """The block table of stacked twin layers (:func:`tile_gemv`'s ``lowrank``): for each block of
    ``block_n`` outputs, its layer's u offset, rank and the start of the block's rows in the flat ``L``;
    ``segments``: (first row, end row, u offset, rank, start of its L) a layer. None where a block would
    cross two layers (a layer's rows not a multiple of ``block_n``)."""
    if any(r0 % block_n for r0, *_ in segments):
        return None
    rows = []
    for b in range(-(-n // block_n)):
        r0, _, uo, r, at = next(g for g in segments if g[0] <= b * block_n < g[1])
        rows.append((uo, r, at + (b * block_n - r0) * r))
    return torch.tensor(rows, dtype=torch.int32, device=device)


def _lowrank_workspace(device: torch.device, rank: int, slots: int) -> tuple[torch.Tensor, ...]:
    """u's shares [rows, slots, rank] and sum [rows, rank] (float32), the count of shares in, and u's ready
    flag and count of blocks done (int32 [rows, 2]; all zero between calls), one set per device and shape,
    like :func:`_workspace`."""
    key = (device, rank, slots)
    if key not in _LOWRANK_WORKSPACE:
        _LOWRANK_WORKSPACE[key] = (torch.empty(MAX_ROWS, slots, rank, device=device),
                                   torch.empty(MAX_ROWS, rank, device=device),
                                   torch.zeros(MAX_ROWS, device=device, dtype=torch.int32),
                                   torch.zeros(MAX_ROWS, 2, device=device, dtype=torch.int32))
    return _LOWRANK_WORKSPACE[key]
