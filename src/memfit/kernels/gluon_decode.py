"""Decode attention over KIVI-packed KV in Gluon (Triton's explicit-layout dialect), one warp a program.

The Triton kernel beside it (``decode_attention._split_kernel``) spends most of its instructions on
moving data between layouts: the query is re-read from shared memory and reshuffled for every tile,
the probabilities cross warps through shared memory, and each thread loads 72 scales one by one.
Here every operand is loaded straight into the registers the tensor-core instruction reads
(``DotOperandLayout``), one warp owns whole tiles (no cross-warp exchange), and the quantization
grid is folded into the small operands instead of applied to every code:

- keys: ``k = ks * code + kz`` per channel and key group, so ``q . k = (q * ks) . code + q . kz``:
  the query is scaled once per tile; the codes become float16 ``1024 + f * code`` exactly with two
  integer instructions per pair (``prmt`` spreads the bytes, ``lop3`` masks a code into the
  mantissa of 1024; ``f`` is the code's bit position, folded into the query as ``1 / f``); the
  constant parts (``q . kz`` and ``1024 * sum(q * ks / f)``) are two small MMAs per tile;
- values: ``v = vs * code + vz`` per token, so ``p . v = (p * vs) . code + p . vz``: the
  probabilities are scaled per token; codes become float16 the same way, and ``1024 / f`` times
  ``sum(p * vs)`` plus ``sum(p * vz)`` is taken off once at the end.

Shapes it takes (``supports``): head_dim 64 or 128, 2 or 4 bits, key groups of 32 or 64 tokens,
value groups of at least 8 code words. The 16-bit window is attended by the Triton kernel and the
splits are merged by its merge kernel.
"""

from __future__ import annotations

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
except ImportError:  # pragma: no cover - CPU-only installs, or a Triton without Gluon
    gluon = None

def _key_asm(bits: int) -> str:
    """Four code bytes ($N) -> for each code position m (8 // bits of them) four float16
    code * 2**(bits*m), exact, as two registers per position (1024 + that, less 1024: the offset
    left in would make the MMA's float32 sums 1024x larger than the logits, and as much less exact)."""
    per = 8 // bits
    src = f"${2 * per}"
    lines = ["mov.b32 k, 0x64006400;", f"prmt.b32 t0, {src}, 0, 0x4140;", f"prmt.b32 t1, {src}, 0, 0x4342;"]
    for m in range(per):
        mask = (((1 << bits) - 1) << (bits * m)) * 0x10001
        lines += [f"lop3.b32 t2, t0, {mask:#x}, k, 0xEA;", f"sub.f16x2 ${2 * m}, t2, k;",
                  f"lop3.b32 t2, t1, {mask:#x}, k, 0xEA;", f"sub.f16x2 ${2 * m + 1}, t2, k;"]
    return "{ .reg .b32 t0, t1, t2, k; " + " ".join(lines) + " }"


def _value_asm(bits: int, word: int) -> str:
    """Code words (``word`` bits) of two consecutive tokens -> for each code of the word (channel
    order) a float16 pair (token 2t, token 2t+1) holding 1024 + code * 2**(bits*m), m the code's
    position in its byte. 32-bit words come in two registers, 16-bit ones share one."""
    per = 8 // bits
    n_out = word // 8 * per
    lines = []
    for k in range(word // 8):  # byte k of both words -> the two halves of t
        if word == 32:
            sel = ((4 + k) << 12) | ((4 + k) << 8) | (k << 4) | k
            lines.append(f"prmt.b32 t, ${n_out}, ${n_out + 1}, {sel:#x};")
        else:
            sel = ((2 + k) << 12) | ((2 + k) << 8) | (k << 4) | k
            lines.append(f"prmt.b32 t, ${n_out}, 0, {sel:#x};")
        for m in range(per):
            mask = (((1 << bits) - 1) << (bits * m)) * 0x10001
            lines.append(f"lop3.b32 ${k * per + m}, t, {mask:#x}, 0x64006400, 0xEA;")
    return "{ .reg .b32 t; " + " ".join(lines) + " }"


if gluon is not None:
    _K4, _K2 = gl.constexpr(_key_asm(4)), gl.constexpr(_key_asm(2))
    _V4, _V2 = gl.constexpr(_value_asm(4, 32)), gl.constexpr(_value_asm(2, 32))
    _V4H, _V2H = gl.constexpr(_value_asm(4, 16)), gl.constexpr(_value_asm(2, 16))

    @gluon.jit
    def _keys(codes, BITS: gl.constexpr):
        if BITS == 4:
            return gl.inline_asm_elementwise(_K4, "=r,=r,=r,=r,r", [codes], dtype=(gl.float16, gl.float16),
                                             is_pure=True, pack=4)
        else:
            return gl.inline_asm_elementwise(_K2, "=r,=r,=r,=r,=r,=r,=r,=r,r", [codes],
                                             dtype=(gl.float16,) * 4, is_pure=True, pack=4)

    @gluon.jit
    def _values(words, BITS: gl.constexpr, VW: gl.constexpr):
        if VW == 32:
            if BITS == 4:
                out = gl.inline_asm_elementwise(_V4, "=r," * 8 + "r,r", [words], dtype=(gl.float16,) * 8,
                                                is_pure=True, pack=2)
            else:
                out = gl.inline_asm_elementwise(_V2, "=r," * 16 + "r,r", [words], dtype=(gl.float16,) * 16,
                                                is_pure=True, pack=2)
        else:
            if BITS == 4:
                out = gl.inline_asm_elementwise(_V4H, "=r," * 4 + "r", [words], dtype=(gl.float16,) * 4,
                                                is_pure=True, pack=2)
            else:
                out = gl.inline_asm_elementwise(_V2H, "=r," * 8 + "r", [words], dtype=(gl.float16,) * 8,
                                                is_pure=True, pack=2)
        return out

    @gluon.jit
    def _halves(words, PB: gl.constexpr):
        """Scale words (PB float16 each: the channels one code byte holds) -> PB float16 tensors."""
        if PB == 2:
            return ((words & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    (words >> 16).to(gl.int16).to(gl.float16, bitcast=True))
        else:
            return ((words & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    ((words >> 16) & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    ((words >> 32) & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    (words >> 48).to(gl.int16).to(gl.float16, bitcast=True))

    @gluon.jit
    def _split_kernel(Q, KC, KS, KZ, VC, VS, VZ, QLEN, ACC, M, L,
                      sqb, sqh, skcb, skch, sksb, sksh, svcb, svch, svsb, svsh,
                      H, NSPLIT, SPLIT_LEN, NQ, scale,
                      G: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr, NVG: gl.constexpr,
                      KGROUP: gl.constexpr, T: gl.constexpr, VW: gl.constexpr, PER_HEAD: gl.constexpr):
        """One program: one row, one KV head, one slice of the quantized tokens, one warp.
        Writes the slice's unnormalized output (float32 [G, D]), running max (natural log) and sum."""
        b = gl.program_id(0)
        h = gl.program_id(1)
        s = gl.program_id(2)
        PB: gl.constexpr = 8 // BITS  # codes a byte
        DP: gl.constexpr = D // PB  # code bytes a token
        WG: gl.constexpr = D * BITS // VW // NVG  # code words a token and value group
        NO: gl.constexpr = VW // BITS  # codes a word
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        la4: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=4)
        lb4: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=4)
        la2: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        lb2: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        rows: gl.constexpr = gl.SliceLayout(1, mma)
        cols: gl.constexpr = gl.SliceLayout(0, mma)

        if PER_HEAD:
            qlen = gl.minimum(gl.load(QLEN + b * H + h), NQ)
        else:
            qlen = gl.minimum(QLEN, NQ)
        start = s * SPLIT_LEN
        end = gl.minimum(start + SPLIT_LEN, qlen)

        # the query, scaled (log2 units: softmax in exp2), split by code position, each divided by
        # the factor its codes carry (2**(BITS*m)), as float16 A operands, clamped to its range
        r_a = gl.arange(0, 16, layout=gl.SliceLayout(1, la4))
        j_a = gl.arange(0, DP, layout=gl.SliceLayout(0, la4))
        qptr = Q + b * sqb + (h * G + r_a)[:, None] * sqh + j_a[None, :] * PB
        qm = (r_a < G)[:, None]
        qs = ()  # q / f: multiplies the codes (which carry f)
        qr = ()  # q: multiplies the zero points
        for m in gl.static_range(PB):
            x = gl.load(qptr + m, mask=qm, other=0.0).to(gl.float32) * (scale * 1.4426950408889634)
            x = gl.minimum(gl.maximum(x, -65504.0), 65504.0)
            qr = qr + (x.to(gl.float16),)
            if m == 0:
                qs = qs + (qr[0],)
            else:
                qs = qs + ((x * (1.0 / (1 << (BITS * m)))).to(gl.float16),)

        j_b = gl.arange(0, DP, layout=gl.SliceLayout(1, lb4))  # key code bytes (the B operand's K)
        n_b = gl.arange(0, T, layout=gl.SliceLayout(0, lb4))
        t_c = gl.arange(0, T, layout=cols)
        t_v = gl.arange(0, T, layout=gl.SliceLayout(1, lb2))
        w_v = gl.arange(0, WG, layout=gl.SliceLayout(0, lb2))
        like = gl.zeros([DP, 8], gl.float16, layout=lb4)  # the shape of the zero points' B operand
        if PB == 2:
            sw_t: gl.constexpr = gl.int32
        else:
            sw_t: gl.constexpr = gl.int64
        ksw_ptr = (KS + b * sksb + h * sksh).to(gl.pointer_type(sw_t), bitcast=True)
        kzw_ptr = (KZ + b * sksb + h * sksh).to(gl.pointer_type(sw_t), bitcast=True)
        gl.static_assert(KGROUP % T == 0)
        kc_ptr = KC + b * skcb + h * skch
        if VW == 32:
            vw_t: gl.constexpr = gl.int32
        else:
            vw_t: gl.constexpr = gl.int16
        vc_ptr = (VC + b * svcb + h * svch).to(gl.pointer_type(vw_t), bitcast=True)
        vs_ptr = VS + b * svsb + h * svsh
        vz_ptr = VZ + b * svsb + h * svsh

        m_i = gl.full([16], float("-inf"), gl.float32, layout=rows)
        l_i = gl.zeros([16], gl.float32, layout=rows)
        zero_acc = gl.zeros([16, WG], gl.float32, layout=mma)
        accs = ()
        pz = ()  # per value group: sum of p * vz (the zero points' part)
        for i in gl.static_range(NVG * NO):
            accs = accs + (zero_acc,)
        for g in gl.static_range(NVG):
            pz = pz + (gl.zeros([16], gl.float32, layout=rows),)

        # offsets inside a tile (rows of codes and scales are contiguous: their strides are constants)
        off_kc = n_b[None, :] * DP + j_b[:, None]
        off_vc = t_v[:, None] * (WG * NVG) + w_v[None, :]
        full = start + (end - start) // T * T  # whole tiles need no masks; one partial tile may follow
        for n0 in range(start, full, T):
            m_i, l_i, accs, pz = _tile(n0, end, qs, qr, m_i, l_i, accs, pz, ksw_ptr, kzw_ptr, kc_ptr, vc_ptr,
                                       vs_ptr, vz_ptr, off_kc, off_vc, j_a, j_b, n_b, t_c, t_v, like, BITS, NVG, KGROUP, T, VW,
                                       False)
        if full < end:
            m_i, l_i, accs, pz = _tile(full, end, qs, qr, m_i, l_i, accs, pz, ksw_ptr, kzw_ptr, kc_ptr, vc_ptr,
                                       vs_ptr, vz_ptr, off_kc, off_vc, j_a, j_b, n_b, t_c, t_v, like, BITS, NVG, KGROUP, T, VW,
                                       True)

        # out[c] = acc / f + sum(p * vz), channel c = word * NO + i
        r_o = gl.arange(0, 16, layout=rows)
        w_o = gl.arange(0, WG, layout=cols)
        row = (b * H + h) * NSPLIT + s
        base = ACC + row * G * D + r_o[:, None] * D
        om = (r_o < G)[:, None]
        for g in gl.static_range(NVG):
            for i in gl.static_range(NO):
                out = accs[g * NO + i] * (1.0 / (1 << (BITS * (i % PB)))) + pz[g][:, None]
                gl.store(base + ((g * WG + w_o) * NO + i)[None, :], out, mask=om)
        gm = r_o < G
        gl.store(M + row * G + r_o, m_i * 0.6931471805599453, mask=gm)  # log2 -> natural units
        gl.store(L + row * G + r_o, l_i, mask=gm)

    @gluon.jit
    def _tile(n0, end, qs, qr, m_i, l_i, accs, pz, ksw_ptr, kzw_ptr, kc_ptr, vc_ptr, vs_ptr, vz_ptr, off_kc, off_vc,
              j_a, j_b, n_b, t_c, t_v, like, BITS: gl.constexpr, NVG: gl.constexpr, KGROUP: gl.constexpr, T: gl.constexpr,
              VW: gl.constexpr, MASKED: gl.constexpr):
        """One tile of T tokens from n0 (``MASKED``: tokens from ``end`` on are not real): the
        running max / sum, the value accumulators and the zero points' sums, updated."""
        PB: gl.constexpr = 8 // BITS
        DP: gl.constexpr = j_a.shape[0]
        NO: gl.constexpr = VW // BITS
        WG: gl.constexpr = off_vc.shape[1]
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8])
        la2: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        grp = n0 // KGROUP
        # keys: q . k = (q * ks) . code + q . kz, per channel of this key group
        ks = _halves(gl.load(ksw_ptr + grp * DP + j_a), PB)
        kz = _halves(gl.load(kzw_ptr + grp * DP + j_b), PB)
        if MASKED:
            codes = gl.load(kc_ptr + n0 * DP + off_kc, mask=((n0 + n_b) < end)[None, :], other=0)
        else:
            codes = gl.load(kc_ptr + n0 * DP + off_kc)
        kv = _keys(codes, BITS)
        qk = gl.zeros([16, T], gl.float32, layout=mma)
        off = gl.zeros([16, 8], gl.float32, layout=mma)
        for m in gl.static_range(PB):
            qk = mma_v2(qs[m] * ks[m][None, :], kv[m], qk)  # (q / f * ks) . (code * f)
            off = mma_v2(qr[m], _bcast(kz[m], like), off)  # q . kz
        qk = qk + gl.max(off, axis=1)[:, None]
        if MASKED:
            valid = (n0 + t_c) < end
            qk = gl.where(valid[None, :], qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        # values: p . v = (p * vs) . code + p . vz, per token; codes of consecutive tokens pair up
        # in the B operand's registers
        new_accs = ()
        new_pz = ()
        for g in gl.static_range(NVG):
            if MASKED:
                vsg = gl.load(vs_ptr + (n0 + t_c) * NVG + g, mask=valid, other=0.0)
                vzg = gl.load(vz_ptr + (n0 + t_c) * NVG + g, mask=valid, other=0.0)
                words = gl.load(vc_ptr + n0 * (WG * NVG) + g * WG + off_vc,
                                mask=((n0 + t_v) < end)[:, None], other=0)
            else:
                vsg = gl.load(vs_ptr + (n0 + t_c) * NVG + g)
                vzg = gl.load(vz_ptr + (n0 + t_c) * NVG + g)
                words = gl.load(vc_ptr + n0 * (WG * NVG) + g * WG + off_vc)
            pv = (p * vsg.to(gl.float32)[None, :]).to(gl.float16)
            # the codes' 1024 offset times sum(p * vs), taken out of the accumulator before this
            # tile's MMAs (not at the end: its float32 sums stay the size of the output)
            off_v = (gl.sum(pv.to(gl.float32), axis=1) * -1024.0)[:, None]
            new_pz = new_pz + (pz[g] * alpha + gl.sum(p * vzg.to(gl.float32)[None, :], axis=1),)
            pa = gl.convert_layout(pv, la2)
            vals = _values(words, BITS, VW)
            for i in gl.static_range(NO):
                new_accs = new_accs + (mma_v2(pa, vals[i], accs[g * NO + i] * alpha[:, None] + off_v),)
        return m_new, l_i, new_accs, new_pz

    @gluon.jit
    def _bcast(vec, like):
        """A [K] vector as the [K, 8] B operand whose every column is it."""
        return gl.broadcast(vec[:, None], like)[0]


def _word_bits(d: int, bits: int, nvg: int) -> int:
    """Value codes are read in words of 32 bits, or 16 where that leaves a value group fewer than
    8 words (one MMA's N)."""
    return 32 if d * bits // 32 // max(nvg, 1) >= 8 else 16


def supports(d: int, bits: int, kgroup: int, nvg: int, group: int) -> bool:
    """Whether the Gluon kernel takes these shapes (else the Triton kernel does): head_dim 64/128,
    2/4 bits, key groups of 32/64 tokens, at most 16 query heads a KV head, value groups of at
    least 8 code words."""
    words = d * bits // _word_bits(d, bits, nvg) // max(nvg, 1)
    return (gluon is not None and d in (64, 128) and bits in (2, 4) and kgroup in (32, 64) and group <= 16
            and words >= 8)


def launch(q, kc, ks, kz, vc, vs, vz, qlen, acc, m, lsum, *, nsplit: int, split_len: int, scale: float,
           per_head: bool, tile: int | None = None, maxnreg: int | None = None) -> None:
    """Fill splits 0 .. nsplit-2 of ``acc`` / ``m`` / ``lsum`` (the window's split is the caller's)."""
    b, hq, d = q.shape
    h, n, dp = kc.shape[1], kc.shape[2], kc.shape[3]
    bits = dp * 8 // d
    kgroup = n // ks.shape[2]
    tile = tile or kgroup
    opts = {} if maxnreg is None else {"maxnreg": maxnreg}
    _split_kernel[(b, h, nsplit - 1)](
        q, kc, ks, kz, vc, vs, vz, qlen, acc, m, lsum,
        q.stride(0), q.stride(1), kc.stride(0), kc.stride(1), ks.stride(0), ks.stride(1),
        vc.stride(0), vc.stride(1), vs.stride(0), vs.stride(1), h, nsplit, split_len, n, scale,
        G=hq // h, D=d, BITS=bits, NVG=vs.shape[-1], KGROUP=kgroup, T=tile, VW=_word_bits(d, bits, vs.shape[-1]),
        PER_HEAD=per_head, num_warps=1, **opts)
