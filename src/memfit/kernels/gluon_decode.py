"""Decode attention over KIVI-packed KV in Gluon (Triton's explicit-layout dialect), one warp a program.

The Triton kernel beside it (``decode_attention._split_kernel``) spends most of its instructions on
moving data between layouts: the query is re-read from shared memory and reshuffled for every tile,
the probabilities cross warps through shared memory, and each thread loads 72 scales one by one.
Here every operand is read straight into the registers the tensor-core instruction takes
(``DotOperandLayout``), one warp owns whole tiles (no cross-warp exchange), tiles stream through a
ring of shared memory filled by ``cp.async`` (no registers wait on memory), and the quantization
grid is folded into the small operands instead of applied to every code:

- keys: ``k = ks * code + kz`` per channel and key group, so ``q . k = (q * ks) . code + q . kz``:
  the query is scaled once per tile, and ``q . kz`` is one small MMA;
- values: ``v = vs * code + vz`` per token, so ``p . v = (p * vs) . code + p . vz``: the
  probabilities are scaled per token, and ``sum(p * vz)`` is added at the end;
- codes become float16 exactly with one ``and`` per pair (after a ``prmt`` that spreads four
  bytes): the masked bits under a zero exponent are the subnormal ``code * f * 2**-24`` (``f`` the
  code's bit position in its byte, folded into the query as ``1 / f``; ``2**24`` is multiplied back
  once per tile). Unlike the ``0x6400`` (``1024 + code``) trick there is no offset, whose removal
  costs an instruction a pair or, left in, makes the MMA's float32 sums 1024x larger than the
  result and as much less exact.

``_split_kernel`` with ``TM`` (the default where its shapes fit) swaps the MMAs' roles: tokens as
M, the query heads of a GQA group as N, so that a group of 4-8 heads pads an MMA to 8 columns, not 16 rows.

The 16-bit window is attended by extra programs of the same launch (WINDOW_TILE tokens each), and
``decode_attention._merge_kernel`` merges the slices. Shapes it takes (``supports``): head_dim 64 or
128, 2 or 4 bits, key groups of 32 or 64 tokens, up to 16 query heads a KV head, value groups of at
least 8 code words.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
except ImportError:  # pragma: no cover - CPU-only installs, or a Triton without Gluon
    gluon = None

TESTED_TRITON = ("3.6.",)  # Gluon is experimental: its API has changed between Triton releases


def enabled() -> bool:
    """Whether the Gluon kernel may run: Gluon imports and Triton is a release it was tested with
    (``MEMFIT_GLUON=1`` allows any release, ``MEMFIT_GLUON=0`` turns the kernel off). Elsewhere the
    Triton kernel runs: slower, but its API is stable."""
    flag = os.environ.get("MEMFIT_GLUON", "")
    if gluon is None or flag == "0":
        return False
    return flag == "1" or triton.__version__.startswith(TESTED_TRITON)


def _key_asm(bits: int) -> str:
    """Four code bytes ($N) -> for each code position m (8 // bits of them) four float16 holding
    code * 2**(bits*m) * 2**-24 exactly, as two registers per position: the masked bits read as a
    float16 with a zero exponent are a subnormal number (no offset to take off, unlike the
    0x6400 = 1024 trick)."""
    per = 8 // bits
    src = f"${2 * per}"
    lines = [f"prmt.b32 t0, {src}, 0, 0x4140;", f"prmt.b32 t1, {src}, 0, 0x4342;"]
    for m in range(per):
        mask = (((1 << bits) - 1) << (bits * m)) * 0x10001
        lines += [f"and.b32 ${2 * m}, t0, {mask:#x};", f"and.b32 ${2 * m + 1}, t1, {mask:#x};"]
    return "{ .reg .b32 t0, t1; " + " ".join(lines) + " }"


def _value_asm(bits: int, word: int) -> str:
    """Code words (``word`` bits) of two consecutive tokens -> for each code of the word (channel
    order) a float16 pair (token 2t, token 2t+1) holding code * 2**(bits*m) * 2**-24 (subnormal,
    exact), m the code's position in its byte. 32-bit words come in two registers, 16-bit ones
    share one."""
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
            lines.append(f"and.b32 ${k * per + m}, t, {mask:#x};")
    return "{ .reg .b32 t; " + " ".join(lines) + " }"


if gluon is not None:

    # the layouts of one warp's m16n8k16 MMAs: the accumulator, and the A / B operands with 4 or 2
    # consecutive K elements a thread (4: code bytes spread in place; 2: float16 pairs)
    MMA = gl.constexpr(gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[1, 1], instr_shape=[16, 8]))
    LA4 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=4))
    LB4 = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA.value, k_width=4))
    LA2 = gl.constexpr(gl.DotOperandLayout(operand_index=0, parent=MMA.value, k_width=2))
    LB2 = gl.constexpr(gl.DotOperandLayout(operand_index=1, parent=MMA.value, k_width=2))

    _key_ptx = gluon.constexpr_function(_key_asm)  # the PTX strings, built when a kernel compiles
    _value_ptx = gluon.constexpr_function(_value_asm)

    @gluon.constexpr_function
    def _f16s(n):
        return (gl.float16,) * n

    @gluon.constexpr_function
    def _outs(n, inputs):
        return "=r," * n + inputs

    @gluon.jit
    def _keys(codes, BITS: gl.constexpr):
        """uint8 code bytes -> one float16 tensor per code position (see ``_key_asm``)."""
        PB: gl.constexpr = 8 // BITS
        return gl.inline_asm_elementwise(_key_ptx(BITS), _outs(2 * PB, "r"), [codes], dtype=_f16s(PB),
                                         is_pure=True, pack=4)

    @gluon.jit
    def _values(words, BITS: gl.constexpr, VW: gl.constexpr):
        """Code words, two tokens a register pair -> one float16 tensor per code of a word (see
        ``_value_asm``)."""
        NO: gl.constexpr = VW // BITS
        if VW == 32:
            inputs: gl.constexpr = "r,r"
        else:
            inputs: gl.constexpr = "r"
        return gl.inline_asm_elementwise(_value_ptx(BITS, VW), _outs(NO, inputs), [words], dtype=_f16s(NO),
                                         is_pure=True, pack=2)

    @gluon.jit
    def _halves(words, PB: gl.constexpr):
        """Words of PB float16 (the channels one code byte holds, a token's value groups) -> PB
        float16 tensors."""
        if PB == 1:
            return (words,)
        elif PB == 2:
            return ((words & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    (words >> 16).to(gl.int16).to(gl.float16, bitcast=True))
        else:
            return ((words & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    ((words >> 16) & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    ((words >> 32) & 0xFFFF).to(gl.int16).to(gl.float16, bitcast=True),
                    (words >> 48).to(gl.int16).to(gl.float16, bitcast=True))

    # lengths change every decode step: specializing on them (divisible by 16 or not) would compile
    # new variants while a model decodes
    @gluon.jit(do_not_specialize=["QLEN", "WLEN", "NSPLIT", "S0", "NQS", "NQ", "NW", "NQC"])
    def _split_kernel(Q, KC, KS, KZ, VC, VS, VZ, KW, VWIN, QLEN, WLEN, QOFF, WOFF, ACC, M, L,
                      sqb, sqh, skcb, skch, sksb, sksh, svcb, svch, svsb, svsh, swb, swh,
                      H, NSPLIT, S0, NQS, SPLIT_LEN, NQ, NW, scale, WL, KCOR, VLOG, NQC,
                      G: gl.constexpr, D: gl.constexpr, BITS: gl.constexpr, NVG: gl.constexpr,
                      T: gl.constexpr, VW: gl.constexpr, PER_HEAD: gl.constexpr, STAGES: gl.constexpr,
                      WTILE: gl.constexpr, OFFSETS: gl.constexpr, VBITS: gl.constexpr, KG: gl.constexpr,
                      TM: gl.constexpr = False, GN: gl.constexpr = 8, WORK: gl.constexpr = False,
                      KOUT: gl.constexpr = False, VOUT: gl.constexpr = False):
        """One program: one row, one KV head, one slice of the quantized tokens, one warp; tiles of
        T tokens within key groups of KG (one row of key scales a tile; T <= KG, KG % T == 0).
        Writes the slice's unnormalized output (float32 [G, D]), running max (natural log) and sum,
        as slice S0 + s of NSPLIT. ``OFFSETS``: each row and head's tokens start at QOFF / WOFF
        [B, H] in flat storage (ragged heads and batches; row and head strides are then 0).
        Tiles stream through a ring of ``STAGES`` shared-memory buffers filled by asynchronous
        copies (cp.async), issued ``STAGES - 1`` tiles ahead: no registers wait on memory.
        ``TM``: the tokens are the MMAs' M and the query heads their N (``GN`` columns: 8 or 16),
        see ``_tile_t``; else the query heads are M (16 rows), see ``_tile``. ``VBITS``: the value
        codes' width (``BITS`` is the keys'). ``WORK``: a 1-D launch over the work list ``WL``
        (int32, ``(b * H + h) * 65536 + s`` an entry: only the slices that hold tokens). Sparse
        outliers (``TM`` only), as the Triton kernel takes them: ``KOUT`` adds the keys' corrections
        summed per token and query head in KCOR [B, H * G, NQC] (float32, natural units) to the
        logits; ``VOUT`` saves the logits (natural units) to VLOG, same shape, for the values'."""
        if WORK:
            e = gl.load(WL + gl.program_id(0))
            bh = e // 65536
            b = bh // H
            h = bh % H
            s = e % 65536
        else:
            b = gl.program_id(0)
            h = gl.program_id(1)
            s = gl.program_id(2)
        if OFFSETS:  # 32-bit: a layer's flat storage holds fewer than 2**31 / 64 tokens
            # runs start at whole key groups: // KG * KG says so to the compiler, whose 16-byte
            # asynchronous copies need that alignment proven (the value scales are 2-byte words)
            qo = gl.load(QOFF + b * H + h).to(gl.int32) // KG * KG
        else:
            qo = 0
        if s >= NQS:  # the 16-bit window's programs, WTILE tokens each
            if OFFSETS:
                wo = gl.load(WOFF + b * H + h).to(gl.int32)
            else:
                wo = 0
            _window(Q, KW, VWIN, WLEN, ACC, M, L, b, h, S0 + s, sqb, sqh, swb, swh, wo, H, NSPLIT,
                    (s - NQS) * WTILE, NW, scale, G, D, WTILE, PER_HEAD)
            return
        PB: gl.constexpr = 8 // BITS  # key codes a byte
        DP: gl.constexpr = D // PB  # key code bytes a token
        VB: gl.constexpr = VBITS
        WG: gl.constexpr = D * VB // VW // NVG  # value code words a token and value group
        WT: gl.constexpr = WG * NVG  # value code words a token
        NO: gl.constexpr = VW // VB  # value codes a word
        rows: gl.constexpr = gl.SliceLayout(1, MMA)
        cols: gl.constexpr = gl.SliceLayout(0, MMA)
        NC: gl.constexpr = DP // 16  # 16-channel chunks of a code position

        if PER_HEAD:
            qlen = gl.minimum(gl.load(QLEN + b * H + h), NQ)
        else:
            qlen = gl.minimum(QLEN, NQ)
        start = s * SPLIT_LEN
        end = gl.minimum(start + SPLIT_LEN, qlen)

        if TM:
            # the query as B operands in registers, a [16, GN] chunk per code position m and 16
            # channels: q / f (f = 2**(BITS*m), which the codes carry) for the codes, q for the zeros
            k_b = gl.arange(0, 16, layout=gl.SliceLayout(1, LB4))
            n_b = gl.arange(0, GN, layout=gl.SliceLayout(0, LB4))
            qptr = Q + b * sqb + (h * G + n_b)[None, :] * sqh
            qm = (n_b < G)[None, :]
            qf = ()
            qz = ()
            for m in gl.static_range(PB):
                for c in gl.static_range(NC):
                    x = gl.load(qptr + ((c * 16 + k_b) * PB + m)[:, None], mask=qm, other=0.0).to(gl.float32)
                    x = x * (scale * 1.4426950408889634)
                    x = gl.minimum(gl.maximum(x, -65504.0), 65504.0)
                    qf = qf + ((x * (1.0 / (1 << (BITS * m)))).to(gl.float16),)
                    qz = qz + (x.to(gl.float16),)
            q_state = (qf, qz)
        else:
            # the query, scaled (log2 units: softmax in exp2), split by code position m: q / f (f =
            # 2**(BITS*m), which the codes carry) multiplies the codes, q the zero points; kept in
            # shared memory, read per tile
            r_a = gl.arange(0, 16, layout=gl.SliceLayout(1, LA4))
            j_a = gl.arange(0, DP, layout=gl.SliceLayout(0, LA4))
            qptr = Q + b * sqb + (h * G + r_a)[:, None] * sqh + j_a[None, :] * PB
            qm = (r_a < G)[:, None]
            # swizzled (rows XOR 8-byte chunks): the A operand reads 8 rows at the same columns at once
            q_smem = gl.allocate_shared_memory(gl.float16, [2 * PB - 1, 16, DP],
                                               gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0]))
            for m in gl.static_range(PB):
                x = gl.load(qptr + m, mask=qm, other=0.0).to(gl.float32) * (scale * 1.4426950408889634)
                x = gl.minimum(gl.maximum(x, -65504.0), 65504.0)
                if m == 0:
                    q_smem.index(0).store(x.to(gl.float16))
                else:
                    q_smem.index(m).store((x * (1.0 / (1 << (BITS * m)))).to(gl.float16))
                    q_smem.index(PB + m - 1).store(x.to(gl.float16))
            q_state = q_smem

        kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf, kc_base, vc_base, ks_ptr, kz_ptr, vs_ptr, vz_ptr = _ring(
            KC, KS, KZ, VC, VS, VZ, b, h, qo, start, end, skcb, skch, sksb, sksh, svcb, svch, svsb, svsh,
            DP, WT, T, PB, NVG, VW, STAGES, KG)

        # a query head's running max, sum and zero points' sums lie along the MMA's N (TM) or M
        if KOUT or VOUT:  # a query head's row of KCOR / VLOG (sparse outliers), along the MMA's N
            crow = ((b * H + h) * G + gl.arange(0, GN, layout=cols)).to(gl.int64) * NQC
        else:
            crow = 0
        if TM:
            vl: gl.constexpr = cols
            wl: gl.constexpr = rows
            QN: gl.constexpr = GN
            zero_acc = gl.zeros([WG, GN], gl.float32, layout=MMA)
            # the probabilities times the value scales, token-major: stored from the accumulator's
            # layout, read back as the B operand
            pbuf = gl.allocate_shared_memory(gl.float16, [T, GN],
                                             gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0, 1]))
        else:
            vl: gl.constexpr = rows
            wl: gl.constexpr = cols
            QN: gl.constexpr = 16
            zero_acc = gl.zeros([16, WG], gl.float32, layout=MMA)
            pbuf = None
        m_i = gl.full([QN], float("-inf"), gl.float32, layout=vl)
        l_i = gl.zeros([QN], gl.float32, layout=vl)
        accs = ()
        pz = ()  # per value group: sum of p * vz (the zero points' part)
        for i in gl.static_range(NVG * NO):
            accs = accs + (zero_acc,)
        for g in gl.static_range(NVG):
            pz = pz + (gl.zeros([QN], gl.float32, layout=vl),)

        for n0 in range(start, end, T):
            it = (n0 - start) // T
            async_copy.wait_group(STAGES - 2)  # this tile's copies have landed ...
            gl.thread_barrier()  # ... every lane's, and the stage refilled next was read by all
            _issue(n0 + (STAGES - 1) * T, end, (it + STAGES - 1) % STAGES, kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf,
                   kc_base, vc_base, ks_ptr, kz_ptr, vs_ptr, vz_ptr, DP, WT, T, KG, VW)
            st = it % STAGES
            outl = (KCOR, VLOG, crow)
            if n0 + T <= end:
                m_i, l_i, accs, pz = _tile_any(n0, end, q_state, m_i, l_i, accs, pz, kbuf.index(st), vbuf.index(st),
                                               ksbuf.index(st), kzbuf.index(st), vsbuf.index(st), vzbuf.index(st),
                                               pbuf, outl, BITS, VB, NVG, T, VW, TM, GN, False, G, KOUT, VOUT)
            else:  # the slice's last tile, partial
                m_i, l_i, accs, pz = _tile_any(n0, end, q_state, m_i, l_i, accs, pz, kbuf.index(st), vbuf.index(st),
                                               ksbuf.index(st), kzbuf.index(st), vsbuf.index(st), vzbuf.index(st),
                                               pbuf, outl, BITS, VB, NVG, T, VW, TM, GN, True, G, KOUT, VOUT)
        async_copy.wait_group(0)

        # out[c] = acc * 2**24 / f + sum(p * vz), channel c = word * NO + i
        qh = gl.arange(0, QN, layout=vl)
        wc = gl.arange(0, WG, layout=wl)
        row = (b * H + h) * NSPLIT + S0 + s
        base = ACC + row * G * D + _along(qh, TM) * D
        om = _along(qh < G, TM)
        for g in gl.static_range(NVG):
            for i in gl.static_range(NO):
                out = accs[g * NO + i] * (16777216.0 / (1 << (VB * (i % (8 // VB))))) + _along(pz[g], TM)
                gl.store(base + _across((g * WG + wc) * NO + i, TM), out, mask=om)
        gm = qh < G
        gl.store(M + row * G + qh, m_i * 0.6931471805599453, mask=gm)  # log2 -> natural units
        gl.store(L + row * G + qh, l_i, mask=gm)

    @gluon.jit
    def _along(v, TM: gl.constexpr):
        """A per-query-head vector as a row (TM: the query heads are the MMA's N) or a column."""
        if TM:
            return v[None, :]
        else:
            return v[:, None]

    @gluon.jit
    def _across(v, TM: gl.constexpr):
        """A per-channel vector the other way: a column (TM) or a row."""
        if TM:
            return v[:, None]
        else:
            return v[None, :]

    @gluon.jit
    def _ring(KC, KS, KZ, VC, VS, VZ, b, h, qo, start, end, skcb, skch, sksb, sksh, svcb, svch, svsb, svsh,
              DP: gl.constexpr, WT: gl.constexpr, T: gl.constexpr, PB: gl.constexpr, NVG: gl.constexpr,
              VW: gl.constexpr, STAGES: gl.constexpr, KG: gl.constexpr):
        """The ring of shared memory both kernels stream tiles through, the pointers its copies read
        from, and the first ``STAGES - 1`` tiles' copies issued."""
        flat1: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        # the ring: key codes, value code words, the key group's scale / zero rows (PB float16 a
        # word: the channels of one code byte), the tokens' value scales / zero points
        if PB == 2:
            sw_t: gl.constexpr = gl.int32
        else:
            sw_t: gl.constexpr = gl.int64
        if VW == 32:
            vw_t: gl.constexpr = gl.int32
        else:
            vw_t: gl.constexpr = gl.int16
        # swizzled in 16-byte chunks (a copy's width), so that the 8 token rows one MMA operand
        # read touches fall in different banks
        kbuf = gl.allocate_shared_memory(gl.uint8, [STAGES, T, DP], gl.SwizzledSharedLayout(
            vec=16, per_phase=max(1, 128 // DP), max_phase=max(1, DP // 16), order=[1, 0]))
        VCH: gl.constexpr = WT * (VW // 8) // 16  # 16-byte chunks a row of value codes
        vbuf = gl.allocate_shared_memory(vw_t, [STAGES, T, WT], gl.SwizzledSharedLayout(
            vec=16 // (VW // 8), per_phase=max(2, 128 // (16 * VCH)), max_phase=max(1, VCH), order=[1, 0]))
        ksbuf = gl.allocate_shared_memory(sw_t, [STAGES, DP], flat1)
        kzbuf = gl.allocate_shared_memory(sw_t, [STAGES, DP], flat1)
        if NVG == 1:  # a token's value scales: one float16, or a word of two
            vz_t: gl.constexpr = gl.float16
        else:
            vz_t: gl.constexpr = gl.int32
        vsbuf = gl.allocate_shared_memory(vz_t, [STAGES, T], flat1)
        vzbuf = gl.allocate_shared_memory(vz_t, [STAGES, T], flat1)
        # a row and head's code bytes are contiguous from these bases; ``_issue`` adds a tile's offsets
        kc_base = KC + b * skcb + h * skch + qo * DP
        vc_base = (VC + b * svcb + h * svch).to(gl.pointer_type(vw_t), bitcast=True) + qo * WT
        SPT: gl.constexpr = 16 // (2 * PB)
        cs: gl.constexpr = gl.BlockedLayout([SPT], [32], [1], [0])
        cz: gl.constexpr = gl.BlockedLayout([8 // NVG], [32], [1], [0])
        i_s = gl.arange(0, DP, layout=cs)
        i_z = gl.arange(0, T, layout=cz)
        ks_ptr = (KS + b * sksb + h * sksh).to(gl.pointer_type(sw_t), bitcast=True) + (qo // KG) * DP + i_s
        kz_ptr = (KZ + b * sksb + h * sksh).to(gl.pointer_type(sw_t), bitcast=True) + (qo // KG) * DP + i_s
        vs_ptr = (VS + b * svsb + h * svsh).to(gl.pointer_type(vz_t), bitcast=True) + qo + i_z
        vz_ptr = (VZ + b * svsb + h * svsh).to(gl.pointer_type(vz_t), bitcast=True) + qo + i_z
        for i in gl.static_range(STAGES - 1):
            _issue(start + i * T, end, i, kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf, kc_base, vc_base, ks_ptr, kz_ptr,
                   vs_ptr, vz_ptr, DP, WT, T, KG, VW)
        return kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf, kc_base, vc_base, ks_ptr, kz_ptr, vs_ptr, vz_ptr

    @gluon.jit
    def _window(Q, KW, VWIN, WLEN, ACC, M, L, b, h, s, sqb, sqh, swb, swh, wo, H, NSPLIT, w0, NW, scale,
                G: gl.constexpr, D: gl.constexpr, WT: gl.constexpr, PER_HEAD: gl.constexpr):
        """Attention over WT tokens of the 16-bit window from w0 (bf16 MMAs; the row and head's
        window starts at token ``wo``), as slice ``s``."""
        rows: gl.constexpr = gl.SliceLayout(1, MMA)
        cols: gl.constexpr = gl.SliceLayout(0, MMA)
        ld: gl.constexpr = gl.BlockedLayout([1, 8], [32 // (D // 8), D // 8], [1, 1], [1, 0])
        if PER_HEAD:
            wlen = gl.minimum(gl.load(WLEN + b * H + h), NW)
        else:
            wlen = gl.minimum(WLEN, NW)
        r = gl.arange(0, 16, layout=gl.SliceLayout(1, LA2))
        c = gl.arange(0, D, layout=gl.SliceLayout(0, LA2))
        q = gl.load(Q + b * sqb + (h * G + r)[:, None] * sqh + c[None, :], mask=(r < G)[:, None], other=0.0)
        q = (q.to(gl.float32) * (scale * 1.4426950408889634)).to(gl.bfloat16)
        t = gl.arange(0, WT, layout=gl.SliceLayout(1, ld))
        cd = gl.arange(0, D, layout=gl.SliceLayout(0, ld))
        tm = ((w0 + t) < wlen)[:, None]
        off = b * swb + h * swh + (wo + w0 + t)[:, None] * D + cd[None, :]
        k = gl.load(KW + off, mask=tm, other=0.0).to(gl.bfloat16)
        v = gl.load(VWIN + off, mask=tm, other=0.0).to(gl.bfloat16)
        qk = mma_v2(q, gl.convert_layout(gl.permute(k, [1, 0]), LB2), gl.zeros([16, WT], gl.float32, layout=MMA))
        valid = (w0 + gl.arange(0, WT, layout=cols)) < wlen
        qk = gl.where(valid[None, :], qk, float("-inf"))
        m = gl.max(qk, axis=1)
        p = gl.where(valid[None, :], gl.exp2(qk - m[:, None]), 0.0)
        l = gl.sum(p, axis=1)
        acc = mma_v2(gl.convert_layout(p.to(gl.bfloat16), LA2), gl.convert_layout(v, LB2),
                     gl.zeros([16, D], gl.float32, layout=MMA))
        r_o = gl.arange(0, 16, layout=rows)
        row = (b * H + h) * NSPLIT + s
        gm = r_o < G
        gl.store(ACC + row * G * D + r_o[:, None] * D + gl.arange(0, D, layout=cols)[None, :], acc, mask=gm[:, None])
        gl.store(M + row * G + r_o, m * 0.6931471805599453, mask=gm)  # -inf where the slice is empty
        gl.store(L + row * G + r_o, l, mask=gm)

    @gluon.jit
    def _issue(n, end, st, kbuf, vbuf, ksbuf, kzbuf, vsbuf, vzbuf, kc_base, vc_base, ks_ptr, kz_ptr, vs_ptr, vz_ptr,
               DP: gl.constexpr, WT: gl.constexpr, T: gl.constexpr, KG: gl.constexpr, VW: gl.constexpr):
        """Start copying the tile at token ``n`` (T tokens of a key group of KG) into ring stage ``st``
        (tokens from ``end`` on are not copied: their bytes read as zeros), as one commit group."""
        # copy layouts: 16 bytes a thread
        ck: gl.constexpr = gl.BlockedLayout([1, 16], [32 // (DP // 16), DP // 16], [1, 1], [1, 0])
        VPT: gl.constexpr = 16 // (VW // 8)
        cv: gl.constexpr = gl.BlockedLayout([1, VPT], [32 // (WT // VPT), WT // VPT], [1, 1], [1, 0])
        rk = gl.arange(0, T, layout=gl.SliceLayout(1, ck))
        rv = gl.arange(0, T, layout=gl.SliceLayout(1, cv))
        koff = rk[:, None] * DP + gl.arange(0, DP, layout=gl.SliceLayout(0, ck))[None, :]
        voff = rv[:, None] * WT + gl.arange(0, WT, layout=gl.SliceLayout(0, cv))[None, :]
        if n + T <= end:  # a whole tile: no mask a row
            async_copy.async_copy_global_to_shared(kbuf.index(st), kc_base + n * DP + koff)
            async_copy.async_copy_global_to_shared(vbuf.index(st), vc_base + n * WT + voff)
        else:
            async_copy.async_copy_global_to_shared(kbuf.index(st), kc_base + n * DP + koff,
                                                   mask=((n + rk) < end)[:, None])
            async_copy.async_copy_global_to_shared(vbuf.index(st), vc_base + n * WT + voff,
                                                   mask=((n + rv) < end)[:, None])
        live = n < end
        async_copy.async_copy_global_to_shared(ksbuf.index(st), ks_ptr + (n // KG) * DP, mask=live)
        async_copy.async_copy_global_to_shared(kzbuf.index(st), kz_ptr + (n // KG) * DP, mask=live)
        # whole tiles of value scales (a mask per token would copy 2 bytes at a time): the buffers
        # hold whole tiles, and what lies past ``end`` is zeroed where it is read
        async_copy.async_copy_global_to_shared(vsbuf.index(st), vs_ptr + n, mask=live)
        async_copy.async_copy_global_to_shared(vzbuf.index(st), vz_ptr + n, mask=live)
        async_copy.commit_group()

    @gluon.jit
    def _tile(n0, end, q_smem, m_i, l_i, accs, pz, kb, vb, ksb, kzb, vsb, vzb, BITS: gl.constexpr,
              VB: gl.constexpr, NVG: gl.constexpr, T: gl.constexpr, VW: gl.constexpr, MASKED: gl.constexpr):
        """One tile of T tokens from n0 (``MASKED``: tokens from ``end`` on are not real), read from
        one ring stage: the running max / sum, the value accumulators and the zero points' sums,
        updated."""
        PB: gl.constexpr = 8 // BITS
        NO: gl.constexpr = VW // VB
        cols: gl.constexpr = gl.SliceLayout(0, MMA)
        DP: gl.constexpr = kb.shape[1]
        WG: gl.constexpr = vb.shape[1] // NVG
        # keys: q . k = (q * ks) . code + q . kz, per channel of this key group
        ks = _halves(ksb.load(gl.SliceLayout(0, LA4)), PB)
        kz = _halves(kzb.load(gl.SliceLayout(1, LB4)), PB)
        kv = _keys(kb.permute([1, 0]).load(LB4), BITS)
        like = gl.zeros([DP, 8], gl.float16, layout=LB4)
        qk = gl.zeros([16, T], gl.float32, layout=MMA)
        off = gl.zeros([16, 8], gl.float32, layout=MMA)
        for m in gl.static_range(PB):
            qs = q_smem.index(m).load(LA4)  # q / f
            qk = mma_v2(qs * ks[m][None, :], kv[m], qk)  # (q / f * ks) . (code * f * 2**-24)
            if m > 0:
                qs = q_smem.index(PB + m - 1).load(LA4)  # q
            off = mma_v2(qs, _bcast(kz[m], like), off)  # q . kz
        qk = qk * 16777216.0 + gl.max(off, axis=1)[:, None]  # the codes' 2**-24 back
        if MASKED:
            valid = (n0 + gl.arange(0, T, layout=cols)) < end
            qk = gl.where(valid[None, :], qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        if gl.max(m_new - m_i, axis=0) > 0.0:  # a running max moved: rescale what came before
            scaled = ()
            for i in gl.static_range(len(accs)):
                scaled = scaled + (accs[i] * alpha[:, None],)
            accs = scaled
        # values: p . v = (p * vs) . code + p . vz, per token; codes of consecutive tokens pair up
        # in the B operand's registers
        vss = _halves(vsb.load(cols), NVG)  # per value group
        vzs = _halves(vzb.load(cols), NVG)
        new_accs = ()
        new_pz = ()
        for g in gl.static_range(NVG):
            vsg = vss[g].to(gl.float32)
            vzg = vzs[g].to(gl.float32)
            if MASKED:  # what lies past the end in the copied scale rows
                vsg = gl.where(valid, vsg, 0.0)
                vzg = gl.where(valid, vzg, 0.0)
            pv = (p * vsg[None, :]).to(gl.float16)
            new_pz = new_pz + (pz[g] * alpha + gl.sum(p * vzg[None, :], axis=1),)
            pa = gl.convert_layout(pv, LA2)
            vals = _values(vb.slice(g * WG, WG, dim=1).load(LB2), VB, VW)
            for i in gl.static_range(NO):
                new_accs = new_accs + (mma_v2(pa, vals[i], accs[g * NO + i]),)
        return m_new, l_i, new_accs, new_pz

    @gluon.jit
    def _tile_any(n0, end, q_state, m_i, l_i, accs, pz, kb, vb, ksb, kzb, vsb, vzb, pbuf, outl, BITS: gl.constexpr,
                  VB: gl.constexpr, NVG: gl.constexpr, T: gl.constexpr, VW: gl.constexpr, TM: gl.constexpr,
                  GN: gl.constexpr, MASKED: gl.constexpr, G: gl.constexpr = 0, KOUT: gl.constexpr = False,
                  VOUT: gl.constexpr = False):
        """One tile, by ``_tile_t`` (``TM``; ``q_state`` = the query's B-operand chunks; ``outl``: the
        sparse outliers' buffers, read where ``KOUT`` / ``VOUT``) or ``_tile``."""
        if TM:
            return _tile_t(n0, end, q_state[0], q_state[1], m_i, l_i, accs, pz, kb, vb, ksb, kzb, vsb, vzb, pbuf,
                           outl[0], outl[1], outl[2], BITS, VB, NVG, T, VW, GN, MASKED, G, KOUT, VOUT)
        else:
            return _tile(n0, end, q_state, m_i, l_i, accs, pz, kb, vb, ksb, kzb, vsb, vzb, BITS, VB, NVG, T, VW,
                         MASKED)

    @gluon.jit
    def _tile_t(n0, end, qf, qz, m_i, l_i, accs, pz, kb, vb, ksb, kzb, vsb, vzb, pbuf, KCOR, VLOG, crow,
                BITS: gl.constexpr, VB: gl.constexpr, NVG: gl.constexpr, T: gl.constexpr, VW: gl.constexpr,
                GN: gl.constexpr, MASKED: gl.constexpr, G: gl.constexpr = 0, KOUT: gl.constexpr = False,
                VOUT: gl.constexpr = False):
        """``_tile`` with ``TM``: one tile of T tokens, scores and outputs transposed: scores^T [T, GN]
        = codes [T, D] . (q * ks)^T, out^T [D, GN] = value codes^T [D, T] . (p * vs)^T. A GQA group
        has 4-8 query heads: as M (16 rows) three quarters of every MMA and of the softmax were
        padding, here half or none, and the accumulators take a quarter of the registers (out^T
        [D, 8] against [16, D]). Operands are built 16 channels / tokens at a time; the
        probabilities reach the B operand's layout through ``pbuf`` (the price of the swap)."""
        PB: gl.constexpr = 8 // BITS
        NO: gl.constexpr = VW // VB
        rows: gl.constexpr = gl.SliceLayout(1, MMA)
        DP: gl.constexpr = kb.shape[1]
        NC: gl.constexpr = DP // 16
        WG: gl.constexpr = vb.shape[1] // NVG
        # keys: scores^T = code . (q * ks)^T + q . kz, 16 channels of each code position at a time
        like = gl.zeros([16, 16], gl.float16, layout=LA4)
        qk = gl.zeros([T, GN], gl.float32, layout=MMA)
        off = gl.zeros([16, GN], gl.float32, layout=MMA)
        for c in gl.static_range(NC):
            kv = _keys(kb.slice(c * 16, 16, dim=1).load(LA4), BITS)
            ks = _halves(ksb.slice(c * 16, 16).load(gl.SliceLayout(1, LB4)), PB)
            kz = _halves(kzb.slice(c * 16, 16).load(gl.SliceLayout(0, LA4)), PB)
            for m in gl.static_range(PB):
                qk = mma_v2(kv[m], qf[m * NC + c] * ks[m][:, None], qk)
                off = mma_v2(gl.broadcast(kz[m][None, :], like)[0], qz[m * NC + c], off)
        qk = qk * 16777216.0 + gl.max(off, axis=0)[None, :]
        if KOUT or VOUT:  # sparse outliers: [T, GN] of KCOR / VLOG, token-major (natural units there)
            tok = n0 + gl.arange(0, T, layout=rows)
            optr = crow[None, :] + tok[:, None]
            om = (tok < end)[:, None] & (gl.arange(0, GN, layout=gl.SliceLayout(0, MMA)) < G)[None, :]
            if KOUT:
                qk += gl.load(KCOR + optr, mask=om, other=0.0) * 1.4426950408889634
            if VOUT:
                gl.store(VLOG + optr, qk * 0.6931471805599453, mask=om)
        if MASKED:
            valid = (n0 + gl.arange(0, T, layout=rows)) < end
            qk = gl.where(valid[:, None], qk, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(qk, axis=0))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(qk - m_new[None, :])
        l_i = l_i * alpha + gl.sum(p, axis=0)
        if gl.max(m_new - m_i, axis=0) > 0.0:
            scaled = ()
            for i in gl.static_range(len(accs)):
                scaled = scaled + (accs[i] * alpha[None, :],)
            accs = scaled
        # values: out^T = code^T . (p * vs)^T + sum(p * vz), 16 tokens at a time
        vss = _halves(vsb.load(rows), NVG)
        vzs = _halves(vzb.load(rows), NVG)
        new_pz = ()
        for g in gl.static_range(NVG):
            vsg = vss[g].to(gl.float32)
            vzg = vzs[g].to(gl.float32)
            if MASKED:
                vsg = gl.where(valid, vsg, 0.0)
                vzg = gl.where(valid, vzg, 0.0)
            new_pz = new_pz + (pz[g] * alpha + gl.sum(p * vzg[:, None], axis=0),)
            if g > 0:  # the previous group's reads of the buffer are done
                gl.thread_barrier()
            pbuf.store((p * vsg[:, None]).to(gl.float16))
            gl.thread_barrier()
            for c in gl.static_range(T // 16):
                pb = pbuf.slice(c * 16, 16, dim=0).load(LB2)
                vals = _values(vb.slice(c * 16, 16, dim=0).slice(g * WG, WG, dim=1).permute([1, 0]).load(LA2),
                               VB, VW)
                upd = ()
                for j in gl.static_range(len(accs)):
                    if j // NO == g:
                        upd = upd + (mma_v2(vals[j % NO], pb, accs[j]),)
                    else:
                        upd = upd + (accs[j],)
                accs = upd
        return m_new, l_i, accs, new_pz

    @gluon.jit
    def _bcast(vec, like):
        """A [K] vector as the [K, 8] B operand whose every column is it."""
        return gl.broadcast(vec[:, None], like)[0]


WINDOW_TILE = 32  # tokens of the 16-bit window a program attends
TILE_TOKENS = None  # tokens a tile for every shape (None: as ``tile_tokens`` chooses)


def tile_tokens(kgroup: int, bits: int, vbits: int) -> int:
    """Tokens a tile: 32 for 4-bit keys and values in key groups of 64 (half the shared memory a
    program, so that 12 programs an SM run at once instead of 8: H200, 1 x 128K, 0.0538 -> 0.0505 ms),
    else a whole key group (2-bit programs hold more registers, 9 an SM either way, and 32-token
    tiles were slower there: 0.0466 -> 0.058 ms; 16-token tiles were slower at both widths)."""
    if TILE_TOKENS is not None:
        return min(kgroup, TILE_TOKENS)
    return 32 if kgroup == 64 and bits == 4 and vbits == 4 else kgroup


def _word_bits(d: int, bits: int, nvg: int) -> int:
    """Value codes are read in words of 32 bits, or 16 where that leaves a value group fewer than
    8 words (one MMA's N)."""
    return 32 if d * bits // 32 // max(nvg, 1) >= 8 else 16


TOKENS_AS_M = True  # _split_kernel with TM (tokens as M) where it takes the shapes (False: the query-major kernel, for comparison)


def _token_major(d: int, bits: int, nvg: int, group: int) -> bool:
    """Whether ``_split_kernel`` takes these shapes with ``TM``: a value group's code words fill an MMA's
    16 rows, at most 16 query heads a KV head."""
    return TOKENS_AS_M and group <= 16 and d * bits // _word_bits_t(d, bits, nvg) // max(nvg, 1) >= 16


def _word_bits_t(d: int, bits: int, nvg: int) -> int:
    """The token-major kernel reads value codes in 32-bit words where a value group then still
    has 16 (its MMA's M), else in 16-bit ones."""
    return 32 if d * bits // 32 // max(nvg, 1) >= 16 else 16


def supports(d: int, bits: int, kgroup: int, nvg: int, group: int, vbits: int | None = None) -> bool:
    """Whether the Gluon kernel takes these shapes (else the Triton kernel does): head_dim 64/128,
    2/4-bit keys and values (``vbits``: the values' width where it differs), key groups of 32/64
    tokens, at most 16 query heads a KV head, value groups of at least 8 code words."""
    vb = vbits or bits
    words = d * vb // _word_bits(d, vb, nvg) // max(nvg, 1)
    return (enabled() and d in (64, 128) and bits in (2, 4) and vb in (2, 4) and kgroup in (32, 64)
            and group <= 16 and words >= 8)


def _prepared(q, kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, qoff, woff, acc, m, lsum, *, h: int, bits: int,
              kgroup: int, nq: int, nw: int, s0: int, nsplit: int, nqs: int, split_len: int, scale: float,
              per_head: bool, stages: int, window_tile: int, vbits: int, work: torch.Tensor | None = None,
              kcor: torch.Tensor | None = None, vlog: torch.Tensor | None = None):
    """The kernel that takes these inputs, its arguments and its compile-time ones."""
    b, hq, d = q.shape
    offsets = qoff is not None
    # flat storage: every row and head reads from its offsets
    st = (lambda t: (0, 0)) if offsets else (lambda t: (t.stride(0), t.stride(1)))  # noqa: E731
    g, nvg = hq // h, vs.shape[-1]
    args = (q, kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, qoff if offsets else m, woff if offsets else m,
            acc, m, lsum, q.stride(0), q.stride(1), *st(kc), *st(ks), *st(vc), *st(vs), *st(kw),
            h, nsplit, s0, nqs, split_len, nq, nw, scale, m if work is None else work,
            m if kcor is None else kcor, m if vlog is None else vlog, _row_length(kcor, vlog))
    common = dict(G=g, D=d, BITS=bits, NVG=nvg, T=tile_tokens(kgroup, bits, vbits), KG=kgroup, PER_HEAD=per_head,
                  STAGES=stages, WTILE=window_tile, OFFSETS=offsets, VBITS=vbits, WORK=work is not None, num_warps=1)
    if _token_major(d, vbits, nvg, g):  # the value words decide it
        return _split_kernel, args, dict(VW=_word_bits_t(d, vbits, nvg), TM=True, GN=8 if g <= 8 else 16,
                                         KOUT=kcor is not None, VOUT=vlog is not None, **common)
    if kcor is not None or vlog is not None:
        raise ValueError("the query-major Gluon kernel reads no sparse outliers (see takes_outliers)")
    return _split_kernel, args, dict(VW=_word_bits(d, vbits, nvg), **common)


def _row_length(kcor: torch.Tensor | None, vlog: torch.Tensor | None) -> int:
    """The tokens a row of the outlier buffers holds (their last dimension; 0 without outliers)."""
    t = kcor if kcor is not None else vlog
    return t.shape[-1] if t is not None else 0


def takes_outliers(d: int, bits: int, nvg: int, group: int) -> bool:
    """Whether the kernel reads sparse outliers for these shapes: its token-major variant does."""
    return _token_major(d, bits, nvg, group)


_CAPACITY: dict = {}


def programs_per_sm(q, kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, qoff, woff, *, h: int, bits: int, kgroup: int,
                    per_head: bool, vbits: int, stages: int = 2, window_tile: int = WINDOW_TILE,
                    outliers: tuple[bool, bool] = (False, False)) -> int:
    """How many of the kernel's programs (one warp each) an SM holds at once, from the registers
    and shared memory of the variant these inputs compile to (compiled here if it was not yet):
    the launch sizes its slices to one wave of them, since a few programs past a full wave run
    alone afterwards and take as long again."""
    # keyed by what picks the compiled variant, so that a decode step (which asks every layer) does
    # not build the kernel's arguments twice: _prepared runs once a variant, on the first ask
    key = (q.device, q.shape[1] // h, q.shape[2], bits, vbits, vs.shape[-1], kgroup, TILE_TOKENS, per_head, stages,
           window_tile, qoff is not None, tuple(t.dtype for t in (q, kc, ks, kz, vc, vs, vz, kw, vw)), outliers)
    if key not in _CAPACITY:
        work = torch.empty(64, device=q.device, dtype=torch.float32)  # the partials' dtype and alignment
        kernel, args, kw_ = _prepared(q, kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, qoff, woff, q, q, q, h=h,
                                      bits=bits, kgroup=kgroup, nq=kgroup, nw=0, s0=0, nsplit=1, nqs=1,
                                      split_len=kgroup, scale=1.0, per_head=per_head, stages=stages,
                                      window_tile=window_tile, vbits=vbits, kcor=work if outliers[0] else None,
                                      vlog=work if outliers[1] else None)
        args = args[:13] + (work, work, work) + args[16:-4] + (work, work, work, args[-1])
        compiled = kernel.warmup(*args, grid=(1,), **kw_)
        compiled._init_handles()  # loads it: its register count is known from then on
        props = torch.cuda.get_device_properties(q.device)
        regs = -(-max(compiled.n_regs, 1) * 32 // 256) * 256  # a warp's registers, allocated 256 at a time
        by_regs = getattr(props, "regs_per_multiprocessor", 65536) // regs
        by_smem = props.shared_memory_per_multiprocessor // (compiled.metadata.shared + 1024)  # 1 KiB reserved a block
        _CAPACITY[key] = max(1, min(32, by_regs, by_smem))
    return _CAPACITY[key]


def launch(q, kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, qoff, woff, acc, m, lsum, *, h: int, bits: int,
           kgroup: int, nq: int, nw: int, s0: int, nslices: int, nsplit: int, nqs: int, split_len: int, scale: float,
           per_head: bool, vbits: int, stages: int = 2, window_tile: int = WINDOW_TILE,
           work: torch.Tensor | None = None, kcor: torch.Tensor | None = None, vlog: torch.Tensor | None = None) -> None:
    """Fill slices ``s0 .. s0 + nslices`` of the ``nsplit`` in ``acc`` / ``m`` / ``lsum``: ``nqs``
    of the quantized tokens (at most ``nq`` a row and head), then the 16-bit window's (at most
    ``nw``), ``window_tile`` tokens each. ``qoff`` / ``woff``: [B, H] starts in flat storage, or None.
    ``work``: int32 entries ``(b * h + head) * 65536 + slice``, the slices to run (one program each)
    instead of every row, head and slice. ``kcor`` / ``vlog``: sparse outliers' buffers (see ``_split_kernel``)."""
    kernel, args, kw_ = _prepared(q, kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, qoff, woff, acc, m, lsum, h=h,
                                  bits=bits, kgroup=kgroup, nq=nq, nw=nw, s0=s0, nsplit=nsplit, nqs=nqs,
                                  split_len=split_len, scale=scale, per_head=per_head, stages=stages,
                                  window_tile=window_tile, vbits=vbits, work=work, kcor=kcor, vlog=vlog)
    kernel[(q.shape[0], h, nslices) if work is None else (work.numel(),)](*args, **kw_)
