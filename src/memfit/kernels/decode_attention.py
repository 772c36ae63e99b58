"""Decode attention over KIVI-packed KV: one query token per row, read from the packed bytes.

Layout (memfit's KIVI, see ``memfit.kv.quant``), per row ``b`` and KV head ``h``:

- keys:   codes ``kc`` [B, H, N, D*bits/8] uint8, per-channel ``ks``/``kz`` [B, H, N/kgroup, D] fp16;
- values: codes ``vc`` [B, H, N, D*bits/8] uint8, per-token ``vs``/``vz`` [B, H, N, D/vgroup] fp16;
- a 16-bit window ``kw``/``vw`` [B, H, W, D] of the most recent tokens;
- ``qlen``/``wlen`` [B, H] int32: how many quantized / window tokens are real in each row and
  head (rows of a batch and heads of a ragged cache may hold fewer than N / W);
- optionally a rotation ``R`` (``PackedRun.rotation``): the run holds K R and V R (the Hadamard
  quantizer's codes); it is attended with q R and its slices' sum is multiplied by R^T in the merge.

``decode_attention_reference`` is the pure-torch definition (any device). ``decode_attention``
runs a kernel on CUDA: by default the Gluon one (``memfit.kernels.gluon_decode``, one warp a
program, the quantization grid folded into q and p, 2-3x faster than SDPA over bf16), else the
Triton one here (shapes Gluon does not take, or ``impl="triton"``). Both read each KV head's
packed tiles once for all the query heads of its GQA group, over one slice of the sequence a
program (split-K, flash-decoding), and a second kernel merges the slices. In the Triton kernel,
keys are dequantized in registers by a few integer and packed-float16 instructions per pair of
codes (no int-to-float conversion, whose throughput bounds a straightforward dequantization on an
H100), and multiplied in float16.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch

from memfit.kernels import gluon_decode
from memfit.kernels.packing import unpack

try:  # Triton exists only where CUDA does; the reference needs nothing
    import triton
    import triton.language as tl
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - CPU-only installs
    triton = None


def _capturing(t: torch.Tensor) -> bool:
    """Whether a CUDA graph is being captured on ``t``'s device (then nothing may read it on the host)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


@dataclass
class Outliers:
    """Corrections to a run's dequantized codes (KVQuant's dense-and-sparse outliers, read by the Triton
    kernel): entry ``e`` adds ``val[e]`` to channel ``ch[e]`` of token ``tok[e]``, the token's index in its
    row and head's run (keys: after RoPE, where the run's keys are stored before it). Entries are
    grouped by row and head, and sorted by token within each; ``ptr`` [B, H, NT + 1] (int32; NT: the
    run's key groups, a batch or head stride may be 0) holds where each row and head's entries of key
    group ``t`` start (``ptr[..., t]``), and where its last group's end (``ptr[..., NT]``)."""

    ptr: torch.Tensor
    tok: torch.Tensor  # int32 [E]
    ch: torch.Tensor  # int32 [E]
    val: torch.Tensor  # float32 [E]

    def per_row_head(self, b: int, h: int, all_pairs: bool = False
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every entry as (row-and-head index ``b * h``-flat, token, channel, value), for the reference;
        ``all_pairs`` (also while a CUDA graph captures): every entry for every row and head, those not
        its own with value 0."""
        start, end = self.ptr[..., 0].expand(b, h).reshape(-1).long(), self.ptr[..., -1].expand(b, h).reshape(-1).long()
        if all_pairs or _capturing(self.ptr):
            # shapes that read nothing on the host: every (row and head, entry) pair, those outside the
            # row and head's segment worth 0 (b * h times the entries: only where a graph captures it)
            e = torch.arange(len(self.tok), device=start.device)
            rh = torch.arange(b * h, device=start.device).repeat_interleave(len(e))
            e = e.repeat(b * h)
            inside = (e >= start[rh]) & (e < end[rh])
            return rh, self.tok.long()[e], self.ch.long()[e], torch.where(inside, self.val.float()[e], 0.0)
        counts = end - start
        rh = torch.repeat_interleave(torch.arange(b * h, device=start.device), counts)
        first = torch.cumsum(counts, 0) - counts
        e = start[rh] + torch.arange(len(rh), device=start.device) - first[rh]
        return rh, self.tok.long()[e], self.ch.long()[e], self.val.float()[e]


@dataclass
class PackedRun:
    """One run of stored KV that a decode step reads, per row and KV head: KIVI-packed tokens (the
    layout above; ``kc`` may hold no tokens), then 16-bit ones.

    Tensors are [B, H, N, ...], each row and head from token 0 (a batch dimension of stride 0 reads
    one shared context from every row), or flat [1, 1, T, ...] with ``qoff`` / ``woff`` (int64
    [B, H]) saying where each row and head's tokens start: ragged heads, a batch of contexts of
    different lengths, a parent read by many rows. Quantized runs start at multiples of ``kgroup``.
    ``nq`` / ``nw``: the longest quantized / window run of a row and head (default: N / W), which
    sizes the launch; lengths past them are clamped to them. ``total_q``: the quantized tokens of
    all rows and heads, which sizes the slices (so that uneven runs still fill the GPU).
    ``rotation``: an orthonormal [D, D] matrix ``R`` (float32) the run's keys and values were
    multiplied by before they were stored (QuaRot's Hadamard): the run is attended with the query
    times ``R`` (``q R . k R = q . k``) and its share of the output multiplied back by ``R^T``.
    ``vbits``: the value codes' width (None: the keys' ``bits``); ``vc`` is [.., D*vbits/8]. Runs of
    two widths are read by the Gluon kernel, not the Triton one. ``rope``: the quantized keys were
    stored before RoPE (KVQuant's pre-RoPE keys); ``rope`` is the model's ``inv_freq`` (float32
    [D/2]) and each key is rotated (Llama's ``rotate_half``, times ``rope_scaling``) at its index in
    its row and head's run: the layer's own first tokens, positions 0, 1, ... The 16-bit tokens are
    post-RoPE. Read by the Triton kernel (the Gluon one folds the key scales into the query, which a
    rotation per token does not allow). ``kout`` / ``vout``: sparse corrections of the quantized keys
    / values (:class:`Outliers`), added in the Triton kernel (on an unrotated run)."""

    kc: torch.Tensor
    ks: torch.Tensor
    kz: torch.Tensor
    vc: torch.Tensor
    vs: torch.Tensor
    vz: torch.Tensor
    kw: torch.Tensor
    vw: torch.Tensor
    qlen: torch.Tensor | int
    wlen: torch.Tensor | int
    bits: int
    kgroup: int
    qoff: torch.Tensor | None = None
    woff: torch.Tensor | None = None
    nq: int | None = None
    nw: int | None = None
    total_q: int | None = None  # quantized tokens over every row and head (default: rows x heads x nq)
    rotation: torch.Tensor | None = None
    vbits: int | None = None
    rope: torch.Tensor | None = None
    rope_scaling: float = 1.0
    kout: Outliers | None = None
    vout: Outliers | None = None

    @property
    def value_bits(self) -> int:
        return self.vbits or self.bits

    @classmethod
    def window_only(cls, kw: torch.Tensor, vw: torch.Tensor, wlen: torch.Tensor | int, bits: int = 4,
                    kgroup: int = 64, **kw_args) -> "PackedRun":
        """A run of 16-bit tokens only (no quantized ones yet)."""
        d, dev = kw.shape[-1], kw.device
        codes = torch.empty(1, 1, 0, d * bits // 8, dtype=torch.uint8, device=dev)
        ks = torch.empty(1, 1, 0, d, dtype=torch.float16, device=dev)
        vs = torch.empty(1, 1, 0, 1, dtype=torch.float16, device=dev)
        if kw_args.get("woff") is None:  # per-row-and-head layout: the empty part takes the window's rows
            codes, ks, vs = (t.expand(*kw.shape[:2], *t.shape[2:]) for t in (codes, ks, vs))
        return cls(codes, ks, ks, codes, vs, vs, kw, vw, 0, wlen, bits, kgroup, qoff=kw_args.get("qoff"),
                   nq=0, **{k: v for k, v in kw_args.items() if k != "qoff"})

    @property
    def offsets(self) -> bool:
        return self.qoff is not None

    @property
    def max_q(self) -> int:
        return self.kc.shape[2] if self.nq is None else self.nq

    @property
    def max_w(self) -> int:
        return self.kw.shape[2] if self.nw is None else self.nw

    def heads(self) -> int:
        return self.qoff.shape[1] if self.offsets else self.kc.shape[1]


def _check_run(q: torch.Tensor, r: PackedRun) -> int:
    """Validate one run against the query; returns its KV heads."""
    b, hq, d = q.shape
    h = r.heads()
    if hq % h:
        raise ValueError(f"query heads ({hq}) must be a multiple of KV heads ({h})")
    if r.kc.dtype != torch.uint8 or r.vc.dtype != torch.uint8:
        raise TypeError("key and value codes must be uint8")
    if r.kc.shape[-1] * 8 // r.bits != d or r.vc.shape[-1] * 8 // r.value_bits != d:
        raise ValueError(f"codes of width {r.kc.shape[-1]} / {r.vc.shape[-1]} do not hold head_dim {d} at "
                         f"{r.bits} / {r.value_bits} bits (keys / values)")
    rows = (1, 1) if r.offsets else (b, h)
    if r.kw.shape[:2] != rows or r.kw.shape[-1] != d or r.vw.shape != r.kw.shape:
        raise ValueError(f"window must be [B={rows[0]}, H={rows[1]}, W, D={d}], got {tuple(r.kw.shape)} and "
                         f"{tuple(r.vw.shape)}")
    if r.offsets:
        if r.kc.shape[:2] != (1, 1) or r.woff is None:
            raise ValueError("a run read from offsets needs flat [1, 1, T, ...] storage and both qoff and woff")
        for name, t in (("qoff", r.qoff), ("woff", r.woff)):
            if t.shape != (b, h) or t.dtype != torch.int64:
                raise ValueError(f"{name} must be an int64 [B, H] = [{b}, {h}] tensor, got {t.dtype} {tuple(t.shape)}")
    if r.rotation is not None and r.rotation.shape != (d, d):
        raise ValueError(f"rotation must be [D, D] = [{d}, {d}], got {tuple(r.rotation.shape)}")
    if r.rope is not None and (r.rope.shape != (d // 2,) or r.rope.dtype != torch.float32 or r.rotation is not None):
        raise ValueError(f"rope must be a float32 [D/2] = [{d // 2}] inv_freq tensor on an unrotated run, got "
                         f"{r.rope.dtype} {tuple(r.rope.shape)}")
    for name, o in (("kout", r.kout), ("vout", r.vout)):
        if o is None:
            continue
        nt = -(-r.max_q // r.kgroup)
        if r.rotation is not None:
            raise ValueError(f"{name}: outliers on a rotated run are not read")
        if o.ptr.dim() != 3 or o.ptr.shape[-1] < nt + 1 or o.ptr.dtype != torch.int32 or o.ptr.stride(-1) != 1:
            raise ValueError(f"{name}.ptr must be int32 [B, H, NT + 1] with NT >= {nt} key groups, contiguous "
                             f"in its last dimension; got {o.ptr.dtype} {tuple(o.ptr.shape)}")
        if o.ptr.shape[:2] not in ((b, h), (1, h), (1, 1), (b, 1)):
            raise ValueError(f"{name}.ptr's rows and heads {tuple(o.ptr.shape[:2])} do not broadcast to [{b}, {h}]")
        if not (o.tok.dtype == o.ch.dtype == torch.int32 and o.val.dtype == torch.float32
                and o.tok.shape == o.ch.shape == o.val.shape and o.tok.dim() == 1):
            raise ValueError(f"{name}: tok and ch must be int32 and val float32, all [E]")
    for name, t in (("qlen", r.qlen), ("wlen", r.wlen)):
        if isinstance(t, torch.Tensor) and t.shape != (b, h):
            raise ValueError(f"{name} must be an int or a [B, H] = [{b}, {h}] tensor, got {tuple(t.shape)}")
    return h


def _length_tensors(qlen: torch.Tensor | int, wlen: torch.Tensor | int, b: int, h: int,
                    device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths given as [B, H] tensors or as one number each -> contiguous int32 [B, H] tensors."""
    return tuple(t.to(device=device, dtype=torch.int32).contiguous() if isinstance(t, torch.Tensor)
                 else torch.full((b, h), t, dtype=torch.int32, device=device) for t in (qlen, wlen))


def _gather(flat: torch.Tensor, start: torch.Tensor, n: int, length: torch.Tensor):
    """Rows start .. start + n of ``flat`` [T, ...] for every [B, H] start, and which are real."""
    i = torch.arange(n, device=flat.device)
    valid = i < length.unsqueeze(-1)
    pos = torch.where(valid, start.unsqueeze(-1) + i, 0)
    return pos, valid


def _dense_run(r: PackedRun, b: int, h: int, device: torch.device):
    """A run dequantized: float32 keys and values [B, H, n, D] and the [B, H, n] mask of real ones."""
    d = r.kw.shape[-1]
    qlen, wlen = _length_tensors(r.qlen, r.wlen, b, h, device)
    rows = torch.arange(b * h, device=device).reshape(b, h)
    keys, values, valid = [], [], []
    if r.max_q:
        n = r.kc.shape[2]
        start = r.qoff if r.offsets else rows * n  # per-row-and-head storage read as one flat run
        pos, ok = _gather(r.kc.reshape(-1, r.kc.shape[-1]), start, r.max_q, qlen.clamp(max=r.max_q))
        g = r.kgroup
        k = unpack(r.kc, r.bits).float().reshape(-1, d)[pos] * r.ks.float().reshape(-1, d)[pos // g] \
            + r.kz.float().reshape(-1, d)[pos // g]
        if r.rope is not None:  # stored before RoPE: rotated at each token's index in its run
            ang = torch.arange(r.max_q, device=device, dtype=torch.float32)[:, None] * r.rope.to(device)[None, :]
            cos, sin = (torch.cat((t, t), dim=-1) * r.rope_scaling for t in (ang.cos(), ang.sin()))
            k1, k2 = k.chunk(2, dim=-1)
            k = k * cos + torch.cat((-k2, k1), dim=-1) * sin
        nvg = r.vs.shape[-1]
        codes = unpack(r.vc, r.value_bits).float().reshape(-1, nvg, d // nvg)[pos]
        v = codes * r.vs.float().reshape(-1, nvg)[pos].unsqueeze(-1) + r.vz.float().reshape(-1, nvg)[pos].unsqueeze(-1)
        v = v.reshape(b, h, -1, d)
        for t, o in ((k, r.kout), (v, r.vout)):  # sparse corrections, in place
            if o is not None:
                rh, tok, ch, val = o.per_row_head(b, h)
                keep = tok < r.max_q  # (where, not a mask: no host sync, so that CUDA graphs capture it)
                t.view(b * h, -1, d).index_put_((rh, torch.where(keep, tok, 0), ch), torch.where(keep, val, 0.0),
                                                accumulate=True)
        keys.append(k)
        values.append(v)
        valid.append(ok)
    if r.max_w:
        start = r.woff if r.offsets else rows * r.kw.shape[2]
        pos, ok = _gather(r.kw.reshape(-1, d), start, r.max_w, wlen.clamp(max=r.max_w))
        keys.append(r.kw.float().reshape(-1, d)[pos])
        values.append(r.vw.float().reshape(-1, d)[pos])
        valid.append(ok)
    if r.rotation is not None:  # back from the rotated basis the run was stored in
        rt = r.rotation.float().T
        keys, values = [k @ rt for k in keys], [v @ rt for v in values]
    return keys, values, valid


def decode_attention_runs_reference(q: torch.Tensor, runs: list[PackedRun], scale: float | None = None,
                                    lse: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, D] -> attention over every run's tokens [B, Hq, D] (float32), dequantizing then
    attending: the definition the kernels are tested against. ``lse``: also each query head's
    log-sum-exp of its logits [B, Hq] (float32)."""
    b, hq, d = q.shape
    h = {_check_run(q, r) for r in runs}
    if len(h) != 1:
        raise ValueError(f"runs of different KV head counts: {sorted(h)}")
    h = h.pop()
    parts = [_dense_run(r, b, h, q.device) for r in runs]
    keys = torch.cat([k for p in parts for k in p[0]], dim=2)
    values = torch.cat([v for p in parts for v in p[1]], dim=2)
    valid = torch.cat([m for p in parts for m in p[2]], dim=2)
    scale = d ** -0.5 if scale is None else scale
    logits = (q.float().reshape(b, h, hq // h, d) @ keys.transpose(-1, -2)) * scale  # [B, H, g, n]
    logits = logits.masked_fill(~valid.unsqueeze(2), float("-inf"))
    out = (logits.softmax(dim=-1).nan_to_num(0.0) @ values).reshape(b, hq, d)
    return (out, logits.logsumexp(dim=-1).reshape(b, hq)) if lse else out


def attention_received(q: torch.Tensor, run: PackedRun, lse: torch.Tensor, scale: float | None = None
                       ) -> list[torch.Tensor]:
    """The attention each token of ``run`` receives from the query [B, Hq, D], summed over the query
    heads of its KV head, given each query head's log-sum-exp over everything it attends (``lse``
    [B, Hq], as ``decode_attention_runs(..., lse=True)`` returns it): float32 [B, H, n] for the
    run's codes (n = ``max_q``), then for its 16-bit tokens (n = ``max_w``), each part present where
    the run has it; 0 past the lengths. Fixed shapes, no host sync: a CUDA graph captures it (H2O's
    score in a static decode step)."""
    b, hq, d = q.shape
    h = _check_run(q, run)
    keys, _, valid = _dense_run(run, b, h, q.device)
    scale = d ** -0.5 if scale is None else scale
    qf = q.float().reshape(b, h, hq // h, 1, d)
    base = lse.float().reshape(b, h, hq // h, 1)
    return [torch.where(ok, ((qf @ k.unsqueeze(2).transpose(-1, -2)).squeeze(-2) * scale - base).exp().sum(2), 0.0)
            for k, ok in zip(keys, valid)]


def _one_run(kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, bits) -> PackedRun:
    n = kc.shape[2]
    kgroup = n // ks.shape[2] if ks.shape[2] else 64
    return PackedRun(kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, bits, kgroup)


def decode_attention_reference(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor,
                               vc: torch.Tensor, vs: torch.Tensor, vz: torch.Tensor, kw: torch.Tensor,
                               vw: torch.Tensor, qlen: torch.Tensor | int, wlen: torch.Tensor | int, bits: int,
                               scale: float | None = None) -> torch.Tensor:
    """q [B, Hq, D] -> attention output [B, Hq, D] (float32), dequantizing then attending. ``qlen`` /
    ``wlen``: [B, H] lengths, or one int when every row and head holds as many."""
    return decode_attention_runs_reference(q, [_one_run(kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, bits)], scale)


if triton is not None:

    def _magic_asm(shift: int, bits: int) -> str:
        """PTX for four packed codes -> (codes >> shift & mask) * scale + zero as four float16:
        $2 = four code bytes, $3 $4 = scales, $5 $6 = zero points (pairs), $0 $1 = the results."""
        mask = ((1 << bits) - 1) * 0x10001
        shr = f"shr.b32 t0, t0, {shift}; shr.b32 t1, t1, {shift};" if shift else ""
        return f"""{{ .reg .b32 t0, t1, m; mov.b32 m, 0x64006400;
            prmt.b32 t0, $2, 0, 0x4140; prmt.b32 t1, $2, 0, 0x4342; {shr}
            lop3.b32 t0, t0, {mask}, m, 0xEA; lop3.b32 t1, t1, {mask}, m, 0xEA;
            sub.f16x2 t0, t0, m; sub.f16x2 t1, t1, m;
            fma.rn.f16x2 $0, t0, $3, $5; fma.rn.f16x2 $1, t1, $4, $6; }}"""

    _MAGIC_4_0, _MAGIC_4_4 = tl.constexpr(_magic_asm(0, 4)), tl.constexpr(_magic_asm(4, 4))
    _MAGIC_2_0, _MAGIC_2_2 = tl.constexpr(_magic_asm(0, 2)), tl.constexpr(_magic_asm(2, 2))
    _MAGIC_2_4, _MAGIC_2_6 = tl.constexpr(_magic_asm(4, 2)), tl.constexpr(_magic_asm(6, 2))
    _MAGIC_8_0 = tl.constexpr(_magic_asm(0, 8))  # a byte a code: 1024 + code is still exact in float16

    @triton.jit
    def _magic(codes, scale, zero, ASM: tl.constexpr):
        return tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,r,r,r,r,r", args=[codes, scale, zero],
                                         dtype=tl.float16, is_pure=True, pack=4)

    @triton.jit
    def _outlier_entries(TOK, CH, VAL, j0, end, n0, OB: tl.constexpr):
        """Entries j0 .. j0 + OB (those before ``end``): token within the tile (-1 past ``end``), channel, value."""
        j = j0 + tl.arange(0, OB)
        jm = j < end
        t = tl.where(jm, tl.load(TOK + j, mask=jm, other=0) - n0, -1)
        return t, tl.load(CH + j, mask=jm, other=0), tl.load(VAL + j, mask=jm, other=0.0)

    @triton.jit
    def _length(LEN, b, h, H, N, PER_HEAD: tl.constexpr):
        """A row and head's length, clamped to its buffers (a length past them reads nothing out of
        bounds): from a [B, H] tensor, or one number for every row and head."""
        if PER_HEAD:
            n = tl.minimum(tl.load(LEN + b * H + h), N)
        else:
            n = tl.minimum(LEN, N)
        return n

    @triton.jit
    def _online_softmax(qk, valid, m_i, l_i):
        """One tile of flash attention's running softmax: probabilities of the tile (scaled to the
        new running max), the factor that rescales what came before, the new max and sum."""
        qk = tl.where(valid[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(qk - m_new[:, None])
        return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)

    @triton.jit
    def _dq(codes, scale, zero, DQ: tl.constexpr, SHIFT: tl.constexpr = 0, BITS: tl.constexpr = 4):
        """(codes >> SHIFT) & mask, times scale plus zero, as MMA operands.

        DQ == 2 (float16 MMA): four codes at a time in PTX: their bytes are spread to the two
        halves of two registers (prmt), shifted and masked into the mantissa of the float16 1024
        (lop3 with 0x6400), less 1024 gives the exact code, then one packed FMA per pair: about
        2.5 instructions a code and no conversion instruction (on an H100 int-to-float and
        float-to-float conversions run 16 a clock per SM and bound the other modes).
        DQ == 1: float16 arithmetic, bf16 operands; DQ == 0: float32 arithmetic, bf16 operands."""
        if DQ == 2:  # the PTX is a constant per (bits, shift)
            if BITS == 8:
                out = _magic(codes, scale, zero, _MAGIC_8_0)
            elif BITS == 4:
                if SHIFT == 0:
                    out = _magic(codes, scale, zero, _MAGIC_4_0)
                else:
                    out = _magic(codes, scale, zero, _MAGIC_4_4)
            elif SHIFT == 0:
                out = _magic(codes, scale, zero, _MAGIC_2_0)
            elif SHIFT == 2:
                out = _magic(codes, scale, zero, _MAGIC_2_2)
            elif SHIFT == 4:
                out = _magic(codes, scale, zero, _MAGIC_2_4)
            else:
                out = _magic(codes, scale, zero, _MAGIC_2_6)
        elif DQ == 1:
            out = (((codes >> SHIFT) & ((1 << BITS) - 1)).to(tl.float16) * scale + zero).to(tl.bfloat16)
        else:
            out = (((codes >> SHIFT) & ((1 << BITS) - 1)).to(tl.float32) * scale.to(tl.float32)
                   + zero.to(tl.float32)).to(tl.bfloat16)
        return out

    @triton.jit
    def _q_operand(ptr, rows, scale, DQ: tl.constexpr):
        """Scaled query channels as the MMA operand: float16 with DQ == 2 (clamped to its range, so a
        huge query logit saturates instead of becoming inf - nan), else bf16."""
        x = tl.load(ptr, mask=rows[:, None], other=0.0).to(tl.float32) * scale
        if DQ == 2:
            out = tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16)
        else:
            out = x.to(tl.bfloat16)
        return out

    @triton.jit
    def _rope_start(ROPE, ch, n0, BLOCK: tl.constexpr, D: tl.constexpr):
        """For channels ``ch`` [1, C]: cos and sin of n0 * f exactly (libdevice), and of BLOCK * f,
        the step from one tile to the next (a precise cos and sin per tile and column cost more
        than the tile's dequantization)."""
        f = tl.load(ROPE + ch % (D // 2))
        a = n0.to(tl.float32) * f
        return libdevice.cos(a), libdevice.sin(a), libdevice.cos(BLOCK * f), libdevice.sin(BLOCK * f)

    @triton.jit
    def _rope_cos_sin(cb, sb, ch, ROPE_T, BLOCK: tl.constexpr, D: tl.constexpr):
        """cos and sin at positions n0 + i of channels ``ch`` [1, C]: ``cb``, ``sb`` = cos, sin(n0 * f),
        those of i * f from the table, joined by the angle-addition formulas."""
        t = tl.arange(0, BLOCK)[:, None] * (D // 2) + ch % (D // 2)
        co, so = tl.load(ROPE_T + t), tl.load(ROPE_T + BLOCK * (D // 2) + t)
        return cb * co - sb * so, sb * co + cb * so

    @triton.jit
    def _rope(k, ksw, cb, sb, ch, sgn, ROPE_T, rope_scale, BLOCK: tl.constexpr, D: tl.constexpr):
        """Pre-RoPE keys ``k`` [BLOCK, DP] (channels ``ch`` [1, DP]; ``ksw``: their rotate_half
        partners, ``sgn`` its sign) rotated at positions n0 + i."""
        cos, sin = _rope_cos_sin(cb, sb, ch, ROPE_T, BLOCK, D)
        return ((k.to(tl.float32) * cos + sgn * ksw.to(tl.float32) * sin) * rope_scale).to(k.dtype)

    @triton.jit
    def _rope_halves(k, cb, sb, ch, ROPE_T, rope_scale, BLOCK: tl.constexpr, DP: tl.constexpr, D: tl.constexpr):
        """Pre-RoPE keys ``k`` [BLOCK, DP] rotated at positions n0 + i, each rotate_half pair within the
        tile's registers: column j < DP/2 holds channel ``ch`` [1, DP/2] (< D/2), column DP/2 + j its
        partner ch + D/2 (no second load and dequantization of the partner's codes)."""
        cos, sin = _rope_cos_sin(cb, sb, ch, ROPE_T, BLOCK, D)
        lo, hi = tl.split(tl.permute(tl.reshape(k.to(tl.float32), [BLOCK, 2, DP // 2]), (0, 2, 1)))
        out = tl.join((lo * cos - hi * sin) * rope_scale, (hi * cos + lo * sin) * rope_scale)
        return tl.reshape(tl.permute(out, (0, 2, 1)), [BLOCK, DP]).to(k.dtype)

    @triton.jit
    def _rope_next(cb, sb, cB, sB):
        """cos and sin one tile on: (n0 + BLOCK) * f."""
        return cb * cB - sb * sB, sb * cB + cb * sB

    # lengths change every decode step: specializing on them (divisible by 16 or not) would compile
    # new variants while a model decodes
    @triton.jit(do_not_specialize=["QLEN", "WLEN", "NSPLIT", "S0", "NQS", "NQ", "NW"])
    def _split_kernel(Q, KC, KS, KZ, VC, VS, VZ, KW, VW, QLEN, WLEN, QOFF, WOFF, ACC, M, L, ROPE, ROPE_T, KCOR, VLOG,
                      sqb, sqh, skcb, skch, skcn, sksb, sksh, sksg, svcb, svch, svcn, svsb, svsh, svsn,
                      swb, swh, swn, H, NSPLIT, S0, NQS, SPLIT_LEN, NQ, NW, NQC, scale, rope_scale,
                      G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                      VGROUP: tl.constexpr, NVG: tl.constexpr, BLOCK: tl.constexpr, WBLOCK: tl.constexpr,
                      DQ: tl.constexpr, PER_HEAD: tl.constexpr, OFFSETS: tl.constexpr, HAS_ROPE: tl.constexpr,
                      KOUT: tl.constexpr = False, VOUT: tl.constexpr = False):
        """Slices 0..NQS-1 of the quantized tokens, then one slice of the 16-bit window, written as
        slices S0.. of NSPLIT. ``OFFSETS``: each row and head's tokens start at QOFF / WOFF [B, H]
        in flat storage (ragged heads and batches; the row and head strides are then 0).
        ``HAS_ROPE``: the quantized keys are pre-RoPE, rotated here at their index in the run (``ROPE``:
        inv_freq [D/2]; ``ROPE_T``: cos and sin of i * inv_freq for i < BLOCK, [2, BLOCK, D/2]).
        Sparse outliers (:class:`Outliers`) cost the tile loop one load or store a token and query
        head: ``KOUT``: the keys' corrections, summed per token by ``_key_outlier_kernel`` into KCOR
        [B, H * G, NQC], are added to the logits; ``VOUT``: the logits are saved to VLOG (same shape), from
        which ``_value_outlier_kernel`` adds the values' corrections after this kernel."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        s = tl.program_id(2)
        if OFFSETS:
            qo = tl.load(QOFF + b * H + h)
            wo = tl.load(WOFF + b * H + h)
        else:
            qo = 0
            wo = 0
        row = (b * H + h) * NSPLIT + S0 + s
        PB: tl.constexpr = 8 // BITS
        DP: tl.constexpr = D // PB
        # pre-RoPE keys rotated in registers, halves of a tile: on an H100 (Triton 3.6) wrong at half
        # tiles of 8 columns (head_dim 64, 2 bits), so narrower tiles load their partners' codes again
        HALVES: tl.constexpr = DP // 2 >= 16
        og = tl.arange(0, GP)
        gm = og < G
        oi = tl.arange(0, DP)
        od = tl.arange(0, D)
        qrow = Q + b * sqb + (h * G + og)[:, None] * sqh
        trow = ((b * H + h) * G + og).to(tl.int64)[:, None] * NQC  # a query head's row of KCOR / VLOG
        m_i = tl.full((GP,), float("-inf"), tl.float32)
        l_i = tl.zeros((GP,), tl.float32)
        if s < NQS:  # a slice of the quantized tokens
            qlen = _length(QLEN, b, h, H, NQ, PER_HEAD)
            start = s * SPLIT_LEN
            end = tl.minimum(start + SPLIT_LEN, qlen)
            c0 = (oi * PB)[None, :]  # the channels that packed position j holds: c0 + j
            c1, c2, c3 = c0 + 1, c0 + 2, c0 + 3
            q0 = _q_operand(qrow + c0, gm, scale, DQ)
            if PB >= 2:
                q1 = _q_operand(qrow + c1, gm, scale, DQ)
            if PB == 4:
                q2 = _q_operand(qrow + c2, gm, scale, DQ)
                q3 = _q_operand(qrow + c3, gm, scale, DQ)
            a0 = tl.zeros((GP, DP), tl.float32)
            if PB >= 2:
                a1 = tl.zeros((GP, DP), tl.float32)
            if PB == 4:
                a2 = tl.zeros((GP, DP), tl.float32)
                a3 = tl.zeros((GP, DP), tl.float32)
            first = (oi * PB < VGROUP)[None, :]  # the value channel group of each packed column
            if HAS_ROPE:  # rotate_half pairs channel c with c +- D/2: column j with j +- DP/2, same position
                if HALVES:  # the first half's columns: their partners are the second half's, in registers
                    rc = (tl.arange(0, DP // 2) * PB)[None, :]
                else:  # the partners' codes loaded again, reordered
                    rc = c0
                    osw = (oi + DP // 2) % DP
                    sgn = tl.where(oi < DP // 2, -1.0, 1.0)[None, :]
                    cs0 = (osw * PB)[None, :]
                cb0, sb0, cB0, sB0 = _rope_start(ROPE, rc, start, BLOCK, D)
                if PB >= 2:
                    cb1, sb1, cB1, sB1 = _rope_start(ROPE, rc + 1, start, BLOCK, D)
                if PB == 4:
                    cb2, sb2, cB2, sB2 = _rope_start(ROPE, rc + 2, start, BLOCK, D)
                    cb3, sb3, cB3, sB3 = _rope_start(ROPE, rc + 3, start, BLOCK, D)
            for n0 in range(start, end, BLOCK):
                on = n0 + tl.arange(0, BLOCK)
                nm = on < end
                kb = tl.load(KC + b * skcb + h * skch + (qo + on)[:, None] * skcn + oi[None, :], mask=nm[:, None],
                             other=0)
                # BLOCK == key group: one row of scales per tile (larger tiles that gather each
                # row's scales measured 1.7x slower on an H100)
                kp = KS + b * sksb + h * sksh + ((qo + n0) // BLOCK) * sksg
                zp = KZ + b * sksb + h * sksh + ((qo + n0) // BLOCK) * sksg
                k0 = _dq(kb, tl.load(kp + c0), tl.load(zp + c0), DQ, 0, BITS)
                if HAS_ROPE:
                    if HALVES:
                        k0 = _rope_halves(k0, cb0, sb0, rc, ROPE_T, rope_scale, BLOCK, DP, D)
                    else:  # the partner columns' codes (the same bytes, reordered; from L1)
                        kbs = tl.load(KC + b * skcb + h * skch + (qo + on)[:, None] * skcn + osw[None, :],
                                      mask=nm[:, None], other=0)
                        k0s = _dq(kbs, tl.load(kp + cs0), tl.load(zp + cs0), DQ, 0, BITS)
                        k0 = _rope(k0, k0s, cb0, sb0, c0, sgn, ROPE_T, rope_scale, BLOCK, D)
                qk = tl.dot(q0, tl.trans(k0))
                if PB >= 2:
                    k1 = _dq(kb, tl.load(kp + c1), tl.load(zp + c1), DQ, BITS, BITS)
                    if HAS_ROPE:
                        if HALVES:
                            k1 = _rope_halves(k1, cb1, sb1, rc + 1, ROPE_T, rope_scale, BLOCK, DP, D)
                        else:
                            k1s = _dq(kbs, tl.load(kp + cs0 + 1), tl.load(zp + cs0 + 1), DQ, BITS, BITS)
                            k1 = _rope(k1, k1s, cb1, sb1, c1, sgn, ROPE_T, rope_scale, BLOCK, D)
                    qk += tl.dot(q1, tl.trans(k1))
                if PB == 4:
                    k2 = _dq(kb, tl.load(kp + c2), tl.load(zp + c2), DQ, 4, BITS)
                    k3 = _dq(kb, tl.load(kp + c3), tl.load(zp + c3), DQ, 6, BITS)
                    if HAS_ROPE:
                        if HALVES:
                            k2 = _rope_halves(k2, cb2, sb2, rc + 2, ROPE_T, rope_scale, BLOCK, DP, D)
                            k3 = _rope_halves(k3, cb3, sb3, rc + 3, ROPE_T, rope_scale, BLOCK, DP, D)
                        else:
                            k2s = _dq(kbs, tl.load(kp + cs0 + 2), tl.load(zp + cs0 + 2), DQ, 4, BITS)
                            k3s = _dq(kbs, tl.load(kp + cs0 + 3), tl.load(zp + cs0 + 3), DQ, 6, BITS)
                            k2 = _rope(k2, k2s, cb2, sb2, c2, sgn, ROPE_T, rope_scale, BLOCK, D)
                            k3 = _rope(k3, k3s, cb3, sb3, c3, sgn, ROPE_T, rope_scale, BLOCK, D)
                    qk += tl.dot(q2, tl.trans(k2)) + tl.dot(q3, tl.trans(k3))
                if HAS_ROPE:  # the next tile's first position
                    cb0, sb0 = _rope_next(cb0, sb0, cB0, sB0)
                    if PB >= 2:
                        cb1, sb1 = _rope_next(cb1, sb1, cB1, sB1)
                    if PB == 4:
                        cb2, sb2 = _rope_next(cb2, sb2, cB2, sB2)
                        cb3, sb3 = _rope_next(cb3, sb3, cB3, sB3)
                if KOUT:  # the keys' outliers: each token's q . delta, summed beforehand
                    qk += tl.load(KCOR + trow + on[None, :], mask=gm[:, None] & nm[None, :], other=0.0)
                if VOUT:  # the logits the values' outliers are weighted by, after this kernel
                    tl.store(VLOG + trow + on[None, :], qk, mask=gm[:, None] & nm[None, :])
                p, alpha, m_i, l_i = _online_softmax(qk, nm, m_i, l_i)
                pb = p.to(tl.float16) if DQ == 2 else p.to(tl.bfloat16)
                vb = tl.load(VC + b * svcb + h * svch + (qo + on)[:, None] * svcn + oi[None, :], mask=nm[:, None],
                             other=0)
                vsp = VS + b * svsb + h * svsh + (qo + on) * svsn
                vzp = VZ + b * svsb + h * svsh + (qo + on) * svsn
                vsc = tl.load(vsp, mask=nm, other=0.0)[:, None]
                vzc = tl.load(vzp, mask=nm, other=0.0)[:, None]
                if NVG == 2:  # two channel groups per token: each packed column picks its group's
                    vsc = tl.where(first, vsc, tl.load(vsp + 1, mask=nm, other=0.0)[:, None])
                    vzc = tl.where(first, vzc, tl.load(vzp + 1, mask=nm, other=0.0)[:, None])
                a0 = a0 * alpha[:, None] + tl.dot(pb, _dq(vb, vsc, vzc, DQ, 0, BITS))
                if PB >= 2:
                    a1 = a1 * alpha[:, None] + tl.dot(pb, _dq(vb, vsc, vzc, DQ, BITS, BITS))
                if PB == 4:
                    a2 = a2 * alpha[:, None] + tl.dot(pb, _dq(vb, vsc, vzc, DQ, 4, BITS))
                    a3 = a3 * alpha[:, None] + tl.dot(pb, _dq(vb, vsc, vzc, DQ, 6, BITS))
            base = ACC + row * G * D + og[:, None] * D
            tl.store(base + c0, a0, mask=gm[:, None])
            if PB >= 2:
                tl.store(base + c1, a1, mask=gm[:, None])
            if PB == 4:
                tl.store(base + c2, a2, mask=gm[:, None])
                tl.store(base + c3, a3, mask=gm[:, None])
        else:  # the 16-bit window
            wlen = _length(WLEN, b, h, H, NW, PER_HEAD)
            qf = (tl.load(qrow + od[None, :], mask=gm[:, None], other=0.0).to(tl.float32) * scale).to(tl.bfloat16)
            acc = tl.zeros((GP, D), tl.float32)
            for n0 in range(0, wlen, WBLOCK):
                on = n0 + tl.arange(0, WBLOCK)
                nm = on < wlen
                k = tl.load(KW + b * swb + h * swh + (wo + on)[:, None] * swn + od[None, :], mask=nm[:, None],
                            other=0.0).to(tl.bfloat16)
                p, alpha, m_i, l_i = _online_softmax(tl.dot(qf, tl.trans(k)), nm, m_i, l_i)
                v = tl.load(VW + b * swb + h * swh + (wo + on)[:, None] * swn + od[None, :], mask=nm[:, None],
                            other=0.0).to(tl.bfloat16)
                acc = acc * alpha[:, None] + tl.dot(p.to(tl.bfloat16), v)
            tl.store(ACC + row * G * D + og[:, None] * D + od[None, :], acc, mask=gm[:, None])
        tl.store(M + row * G + og, m_i, mask=gm)
        tl.store(L + row * G + og, l_i, mask=gm)

    @triton.jit
    def _skipped(CNT, SKIP0, SKIP_END, b, h, H, HAS_SKIP: tl.constexpr):
        """The slices a work-list launch left unwritten in this row and head: lo .. hi - 1 (empty
        when lo == hi), past the slices that hold its tokens."""
        if HAS_SKIP:
            lo = SKIP0 + tl.load(CNT + b * H + h)
            hi = SKIP_END
        else:
            lo = 0
            hi = 0
        return lo, hi

    @triton.jit
    def _written(s0, NSPLIT, lo, hi, SP: tl.constexpr):
        """Slices s0 .. s0+SP-1, and which of them hold partial results (below NSPLIT, outside the
        unwritten lo .. hi - 1 of a work-list launch)."""
        os_ = s0 + tl.arange(0, SP)
        return os_, (os_ < NSPLIT) & ((os_ < lo) | (os_ >= hi))

    @triton.jit
    def _key_outlier_kernel(Q, KOP, KOT, KOC, KOV, KCOR, sqb, sqh, skob, skoh, H, NQC, scale,
                            G: tl.constexpr, GP: tl.constexpr, BLOCK: tl.constexpr, EB: tl.constexpr):
        """The keys' outliers of one key group of one row and head, summed per token and query head:
        ``KCOR[b, h * G + g, n] = scale * sum q[g, ch] * delta`` over the entries of token ``n`` (0 where
        it has none; every token of the group written). The program zeroes its group's tokens, then
        adds EB entries a step with float32 atomics (their order, hence the last bits, may vary)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        t = tl.program_id(2)
        og = tl.arange(0, GP)
        gm = og < G
        qrow = Q + b * sqb + (h * G + og)[:, None] * sqh
        kop = KOP + b * skob + h * skoh + t
        lo, hi = tl.load(kop), tl.load(kop + 1)
        n0 = t * BLOCK
        rows = ((b * H + h) * G + og).to(tl.int64)[:, None] * NQC + n0
        tl.store(KCOR + rows + tl.arange(0, BLOCK)[None, :], tl.zeros((GP, BLOCK), tl.float32), mask=gm[:, None])
        tl.debug_barrier()  # the zeros before any add (this program alone writes its group's tokens)
        for j0 in range(lo, hi, EB):
            tk, c, dv = _outlier_entries(KOT, KOC, KOV, j0, hi, n0, EB)  # tk: -1 past the range
            m = gm[:, None] & (tk >= 0)[None, :]
            qc = tl.load(qrow + c[None, :], mask=m, other=0.0).to(tl.float32) * scale
            tl.atomic_add(KCOR + rows + tk[None, :], qc * dv[None, :], mask=m, sem="relaxed")

    @triton.jit(do_not_specialize=["QLEN", "NQ", "NQC", "NT", "TPP", "NMAIN", "S0", "NSPLIT", "SKIP0", "SKIP_END"])
    def _value_outlier_kernel(VLOG, ACC, M, L, VOP, VOT, VOC, VOV, CNT, QLEN, svob, svoh, H, NQ, NQC, NT, TPP, NMAIN,
                              S0, NSPLIT, SKIP0, SKIP_END, G: tl.constexpr, GP: tl.constexpr, D: tl.constexpr,
                              SP: tl.constexpr, EB: tl.constexpr, PER_HEAD: tl.constexpr,
                              HAS_SKIP: tl.constexpr = False):
        """The values' outliers of key groups ``p * TPP ..`` of one row and head, after the split kernels:
        ``sum exp(logit - max) * delta`` onto their channels (float32 atomics), ``max`` the largest logit of
        the row and head's slices 0 .. NMAIN - 1, written as slice ``S0 + p`` of the partial results with
        that max and a probability sum of 0: the merge adds it to the output as it is. Entries past the
        run's length (``QLEN``, as the split kernel reads it) were not attended: left out."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        p = tl.program_id(2)
        qlen = _length(QLEN, b, h, H, NQ, PER_HEAD)
        og = tl.arange(0, GP)
        gm = og < G
        od = tl.arange(0, D)
        lo, hi = _skipped(CNT, SKIP0, SKIP_END, b, h, H, HAS_SKIP)
        # elementwise in the loop, reduced after it (a reduction carried by the loop fails to compile:
        # Triton 3.6's OptimizeThreadLocality pass asserts when its result has several uses)
        mv = tl.full((GP, SP), float("-inf"), tl.float32)
        for s0 in range(0, NMAIN, SP):
            os_, sm = _written(s0, NMAIN, lo, hi, SP)
            mrow = ((b * H + h) * NSPLIT + os_) * G
            mv = tl.maximum(mv, tl.load(M + mrow[None, :] + og[:, None], mask=gm[:, None] & sm[None, :],
                                        other=float("-inf")))
        mx = tl.max(mv, 1)
        base = tl.where(mx > float("-inf"), mx, 0.0)
        row = (b * H + h) * NSPLIT + S0 + p
        slot = ACC + row * G * D + og[:, None] * D
        tl.store(slot + od[None, :], tl.zeros((GP, D), tl.float32), mask=gm[:, None])
        tl.store(M + row * G + og, mx, mask=gm)
        tl.store(L + row * G + og, tl.zeros((GP,), tl.float32), mask=gm)
        tl.debug_barrier()  # the slice's zeros before any add (this program alone writes its slice)
        vop = VOP + b * svob + h * svoh
        e0 = tl.load(vop + tl.minimum(p * TPP, NT))
        e1 = tl.load(vop + tl.minimum(p * TPP + TPP, NT))
        rows = ((b * H + h) * G + og).to(tl.int64)[:, None] * NQC
        for j0 in range(e0, e1, EB):
            tk, c, dv = _outlier_entries(VOT, VOC, VOV, j0, e1, 0, EB)  # tk: -1 past the range
            m = gm[:, None] & ((tk >= 0) & (tk < qlen))[None, :]
            lg = tl.load(VLOG + rows + tk[None, :], mask=m, other=float("-inf"))
            tl.atomic_add(slot + c[None, :], tl.exp(lg - base[:, None]) * dv[None, :], mask=m, sem="relaxed")

    @triton.jit
    def _merge_block(M, L, b, h, g, s0, H, NSPLIT, G: tl.constexpr, SP: tl.constexpr, m_run, denom, lo, hi):
        """Slices s0 .. s0+SP-1 of a query head's running merge (those in lo .. hi - 1 were never
        written: left out): their rows and mask, their weights (scaled to the new running max), the
        factor that rescales what came before, the new max and denominator."""
        os_, sm = _written(s0, NSPLIT, lo, hi, SP)
        row = ((b * H + h) * NSPLIT + os_) * G + g
        m = tl.load(M + row, mask=sm, other=float("-inf"))
        m_new = tl.maximum(m_run, tl.max(m, 0))
        alpha = tl.where(m_run > float("-inf"), tl.exp(m_run - m_new), 0.0)
        w = tl.where(m > float("-inf"), tl.exp(m - m_new), 0.0)
        return row, sm, w, alpha, m_new, denom * alpha + tl.sum(w * tl.load(L + row, mask=sm, other=0.0), 0)

    @triton.jit(do_not_specialize=["NSPLIT", "SKIP0", "SKIP_END"])
    def _merge_kernel(ACC, M, L, OUT, LSE, H, NSPLIT, CNT, SKIP0, SKIP_END, G: tl.constexpr, D: tl.constexpr,
                      SP: tl.constexpr, DB: tl.constexpr, HAS_SKIP: tl.constexpr = False,
                      HAS_LSE: tl.constexpr = False):
        """out = sum_s exp(m_s - max) acc_s / sum_s exp(m_s - max) l_s over the slices s, for one
        query head and DB of its channels a program (many programs, one pass over the partials),
        SP slices at a time with a running max: one variant for any number of slices. ``HAS_LSE``:
        the first program of each query head also writes max + log(denominator) to LSE."""
        b = tl.program_id(0)
        hq = tl.program_id(1)
        h = hq // G
        g = hq % G
        od = tl.program_id(2) * DB + tl.arange(0, DB)
        lo, hi = _skipped(CNT, SKIP0, SKIP_END, b, h, H, HAS_SKIP)
        m_run = float("-inf")
        denom = 0.0
        out = tl.zeros([DB], dtype=tl.float32)
        for s0 in range(0, NSPLIT, SP):
            row, sm, w, alpha, m_run, denom = _merge_block(M, L, b, h, g, s0, H, NSPLIT, G, SP, m_run, denom, lo, hi)
            acc = tl.load(ACC + row[:, None] * D + od[None, :], mask=sm[:, None], other=0.0)
            out = out * alpha + tl.sum(acc * w[:, None], 0)
        tl.store(OUT + (b * H * G + hq) * D + od, out / denom)
        if HAS_LSE:
            if tl.program_id(2) == 0:
                tl.store(LSE + b * H * G + hq, m_run + tl.log(denom))


    @triton.jit(do_not_specialize=["NSPLIT", "NROT", "SKIP0", "SKIP_END"])
    def _merge_rotated_kernel(ACC, M, L, OUT, LSE, ROT, H, NSPLIT, NROT, CNT, SKIP0, SKIP_END, G: tl.constexpr,
                              D: tl.constexpr, SP: tl.constexpr, JB: tl.constexpr, HAS_SKIP: tl.constexpr = False,
                              HAS_LSE: tl.constexpr = False):
        """``_merge_kernel`` when slices 0..NROT-1 were attended in a rotated basis (runs stored
        rotated): their weighted sum ``t`` is kept apart and rotated back once, out = (plain + ROT t)
        / denominator, one query head a program (ROT [D, D] read JB rows at a time)."""
        b = tl.program_id(0)
        hq = tl.program_id(1)
        h = hq // G
        g = hq % G
        od = tl.arange(0, D)
        lo, hi = _skipped(CNT, SKIP0, SKIP_END, b, h, H, HAS_SKIP)
        m_run = float("-inf")
        denom = 0.0
        plain = tl.zeros([D], dtype=tl.float32)
        turned = tl.zeros([D], dtype=tl.float32)
        for s0 in range(0, NSPLIT, SP):
            row, sm, w, alpha, m_run, denom = _merge_block(M, L, b, h, g, s0, H, NSPLIT, G, SP, m_run, denom, lo, hi)
            acc = tl.load(ACC + row[:, None] * D + od[None, :], mask=sm[:, None], other=0.0)
            rot = s0 + tl.arange(0, SP) < NROT
            plain = plain * alpha + tl.sum(acc * tl.where(rot, 0.0, w)[:, None], 0)
            turned = turned * alpha + tl.sum(acc * tl.where(rot, w, 0.0)[:, None], 0)
        for j0 in range(0, D, JB):  # out[j] = plain[j] + sum_i ROT[j, i] turned[i], JB rows of ROT at a time
            oj = j0 + tl.arange(0, JB)
            r = tl.load(ROT + oj[:, None] * D + od[None, :])
            pj = tl.sum(tl.where(oj[:, None] == od[None, :], plain[None, :], 0.0), 1)
            tl.store(OUT + (b * H * G + hq) * D + oj, (pj + tl.sum(r * turned[None, :], 1)) / denom)
        if HAS_LSE:
            tl.store(LSE + b * H * G + hq, m_run + tl.log(denom))


# one wave of 8 one-warp programs an SM (or fewer where fewer fit): on the H200 a 9th or 10th
# program of 64-token tiles ran as a second wave (4-bit 8 x 32K 0.0985 ms with 8, 0.124 with 10),
# and so did a 9th of 2-bit 32-token tiles (1 x 128K 0.056 -> 0.080 ms); 4-bit codes in 32-token
# tiles (half the shared memory) ran 12 in one wave: 8 x 32K 0.0978 ms, 1 x 128K 0.0505 (0.0538
# with 64-token tiles)
GLUON_PROGRAMS_PER_SM = 8
GLUON_PROGRAMS_PER_SM_4BIT_32 = 12
# runs of uneven lengths (ragged heads, batches of different contexts): slices short enough for
# about this many waves, which the block scheduler balances as programs finish; one wave of long
# slices left its tail to the longest runs (H200, 4-bit, lengths 1/4..7/4 of the mean: 8 x 32K
# 0.153 -> 0.126 ms, 1 x 128K 0.082 -> 0.077 ms; a sweep of 1-8 waves in docs/gpu.md)
RAGGED_WAVES = 3
# uneven runs the Gluon kernel reads through a work list (only the slices that hold tokens, one
# program each): slices sized for this many waves, as equal runs are (no idle programs to spread)
WORK_WAVES = 1
MERGE_SP, MERGE_DB = 128, 16  # measured on the H200: within 2% of the best of 7 settings at 1x128K, 8x32K, 1x8K
MERGE_ROT = (64, 32, 4)  # the rotated merge: slices a step, rotation rows a step, warps (H200 sweep: see docs/gpu.md)


def _gluon_fits(q: torch.Tensor, r: PackedRun) -> bool:
    """The Gluon kernel's shapes, with rows of codes and scales contiguous (their strides are
    constants there) and its words aligned (the key scales a code byte needs are read as one word,
    value codes as 16- or 32-bit words; runs read from offsets start at whole key groups)."""
    kc, ks, kz, vc, vs, vz, kw, vw = r.kc, r.ks, r.kz, r.vc, r.vs, r.vz, r.kw, r.vw
    d, dp, vp, nvg = kc.shape[-1] * 8 // r.bits, kc.shape[-1], vc.shape[-1], vs.shape[-1]
    word = 8 if r.bits == 2 else 4
    rows_aligned = r.offsets or (all(st * 2 % word == 0 for st in ks.stride()[:2])
                                 and all(st % 4 == 0 for st in vc.stride()[:2]))
    # a run of window tokens only takes the Triton kernel (Gluon does not compile empty code tensors)
    # nor pre-RoPE codes: it folds the key scales into the query per tile, which a rotation per token does not allow;
    # sparse outliers: its token-major variant only
    g = q.shape[1] // r.heads()
    outliers = r.kout is not None or r.vout is not None
    return (r.max_q > 0 and r.rope is None and gluon_decode.supports(d, r.bits, r.kgroup, nvg, g, r.vbits)
            and (not outliers or gluon_decode.takes_outliers(d, r.value_bits, nvg, g))
            and all(t.data_ptr() % 16 == 0 for t in (kc, ks, kz, vc, vs, vz)) and rows_aligned
            and kc.stride(2) == dp and vc.stride(2) == vp and ks.stride(2) == d and vs.stride(2) == nvg
            and kz.stride() == ks.stride() and vz.stride() == vs.stride()
            and kw.stride(2) == d and vw.stride() == kw.stride())


def _kernel_takes(q: torch.Tensor, r: PackedRun) -> bool:
    d = q.shape[-1]
    if r.value_bits != r.bits:  # two widths: the Gluon kernel only
        return triton is not None and q.is_cuda and _gluon_fits(q, r)
    return (triton is not None and q.is_cuda and r.bits in (2, 4, 8) and r.kgroup in (32, 64, 128) and d in (64, 128)
            and r.vs.shape[-1] in (1, 2))


def kernel_supports(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, vs: torch.Tensor, bits: int) -> bool:
    """Whether :func:`decode_attention` runs a kernel for these inputs (else the reference): CUDA,
    2/4/8-bit codes (8: the Triton kernel only), key groups of 32/64/128 tokens, head_dim 64/128,
    one or two value groups."""
    n = kc.shape[2]
    kgroup = n // ks.shape[2] if ks.shape[2] else 64
    return _kernel_takes(q, PackedRun(kc, ks, ks, kc, vs, vs, kc, kc, 0, 0, bits, kgroup))


_DEQUANT = {"fp32": 0, "fp16": 1, "magic": 2}


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def decode_attention(q: torch.Tensor, kc: torch.Tensor, ks: torch.Tensor, kz: torch.Tensor, vc: torch.Tensor,
                     vs: torch.Tensor, vz: torch.Tensor, kw: torch.Tensor, vw: torch.Tensor, qlen: torch.Tensor | int,
                     wlen: torch.Tensor | int, bits: int, scale: float | None = None, **options) -> torch.Tensor:
    """Same contract as :func:`decode_attention_reference`, for one run of packed tokens and a
    window (see :func:`decode_attention_runs` for the ``options``)."""
    return decode_attention_runs(q, [_one_run(kc, ks, kz, vc, vs, vz, kw, vw, qlen, wlen, bits)], scale, **options)


def decode_attention_runs(q: torch.Tensor, runs: list[PackedRun], scale: float | None = None, *,
                          split_len: int | None = None, programs_per_sm: int | None = None, num_warps: int = 4,
                          num_stages: int | None = None, dequant: str = "magic",
                          out_dtype: torch.dtype = torch.float32, impl: str = "auto", lse: bool = False
                          ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention of one query token a row over every run (see :class:`PackedRun`): a kernel on CUDA
    for 2/4/8-bit codes with the key group as the tile (32, 64 or 128 tokens), the reference
    elsewhere. Each run's slices go to one buffer of partial results, merged once. The output is
    ``out_dtype``; ints for ``qlen`` / ``wlen`` spare a decode step building tensors.
    ``impl``: "auto" (the Gluon kernel where it takes a run, see ``gluon_decode.supports``; on an
    H100, 4-bit over 128K tokens 0.063 ms), "gluon" (an error where it does not) or "triton".
    The Triton kernel's ``dequant``: "magic" (default) builds float16 operands from the code bits
    in a few integer and packed-float16 instructions (0.13 ms); "fp16" and "fp32" convert codes to
    float and multiply in bf16 (0.16 / 0.25 ms). ``split_len``, ``programs_per_sm``, ``num_warps``
    and ``num_stages`` tune the launch (defaults suit an H100). ``lse``: also return each query head's
    log-sum-exp of its logits [B, Hq] (float32; what :func:`attention_received` normalizes by)."""
    if dequant not in _DEQUANT:
        raise ValueError(f"dequant must be one of {sorted(_DEQUANT)}, got {dequant!r}")
    if impl not in ("auto", "gluon", "triton"):
        raise ValueError(f"impl must be 'auto', 'gluon' or 'triton', got {impl!r}")
    if not runs:
        raise ValueError("decode attention needs at least one run of stored tokens")
    heads = {_check_run(q, r) for r in runs}
    if len(heads) != 1:
        raise ValueError(f"runs of different KV head counts: {sorted(heads)}")
    rotations = {id(r.rotation): r.rotation for r in runs if r.rotation is not None}
    if len(rotations) > 1:
        raise ValueError("runs stored in different rotated bases: one rotation a call")
    if not all(_kernel_takes(q, r) for r in runs):
        ref = decode_attention_runs_reference(q, runs, scale, lse=lse)
        return (ref[0].to(out_dtype), ref[1]) if lse else ref.to(out_dtype)
    for r in runs:
        for t in (r.kc, r.ks, r.kz, r.vc, r.vs, r.vz, r.kw, r.vw):
            if t.stride(-1) != 1 and t.numel():
                raise ValueError("decode_attention needs tensors contiguous in their last dimension")
    b, hq, d = q.shape
    h = heads.pop()
    g = hq // h
    scale = d ** -0.5 if scale is None else scale
    # rotated runs' slices first (the merge is the same in any order): the merge rotates slices 0..n-1 back
    runs = sorted(runs, key=lambda r: r.rotation is None)
    plans, skip = [], None  # skip: the work list of the run launched through one (at most one a call)
    for r in runs:
        use_gluon = impl != "triton" and _gluon_fits(q, r)
        if impl == "gluon" and not use_gluon:
            raise ValueError("the Gluon kernel does not take these inputs (see gluon_decode.supports)")
        if r.value_bits != r.bits and not use_gluon:
            raise ValueError("the Triton kernel reads keys and values of one width: impl='triton' cannot take "
                             f"{r.bits}-bit keys with {r.value_bits}-bit values")
        per_head = r.offsets or isinstance(r.qlen, torch.Tensor) or isinstance(r.wlen, torch.Tensor)
        lens = _length_tensors(r.qlen, r.wlen, b, h, q.device) if per_head else (r.qlen, r.wlen)
        n, kg = r.max_q, r.kgroup
        total = r.total_q if r.total_q is not None else n * b * h
        whole = lambda sl: split_len or max(kg, math.ceil(sl / kg) * kg)  # noqa: E731 (whole key groups a slice)
        work = None
        if use_gluon:  # one wave of as many programs (one warp each) as the SMs hold
            small = r.bits == r.value_bits == 4 and gluon_decode.tile_tokens(kg, r.bits, r.value_bits) == 32
            cap = GLUON_PROGRAMS_PER_SM_4BIT_32 if small else GLUON_PROGRAMS_PER_SM
            pps = programs_per_sm or min(cap, gluon_decode.programs_per_sm(
                q, r.kc, r.ks, r.kz, r.vc, r.vs, r.vz, r.kw, r.vw, *lens, r.qoff, r.woff, h=h, bits=r.bits,
                kgroup=kg, per_head=per_head, vbits=r.value_bits, outliers=(r.kout is not None, r.vout is not None)))
            slots = pps * _sms(q.device)
            nwin = math.ceil(r.max_w / gluon_decode.WINDOW_TILE)  # window slices (beside the rest)
            if n * b * h > 1.1 * total:  # uneven runs: a work list of the busy slices, else several waves of short ones
                sl = whole(math.ceil(total / max(WORK_WAVES * slots - b * h, slots // 2)))
                nqs = math.ceil(n / sl)
                # entries hold a row and head under 2**15 and a slice under 2**16
                if skip is None and isinstance(r.qlen, torch.Tensor) and b * h < 32768 and nqs + nwin < 65536:
                    work = _cached_work(r.qlen, n, sl, nqs, nwin, q.device)
                if work is None:
                    sl = math.ceil(total / (RAGGED_WAVES * slots))
            elif r.offsets or r.total_q is not None:  # total / sl slices, and a part slice a row and head
                sl = math.ceil(total / max(slots - b * h, slots // 2))
            else:  # as many slices a row and head as fit
                sl = math.ceil(n / max(1, slots // (b * h)))
        else:  # enough slices to fill the GPU; the window one slice
            sl, nwin = math.ceil(total / ((programs_per_sm or 4) * _sms(q.device))), 1
        # slices past a short run's end return at once
        sl = whole(sl)
        nqs = math.ceil(n / sl)  # slices of the quantized tokens
        if work is not None:
            skip = work
        plans.append((use_gluon, sl, nqs, nqs + max(nwin, 0), per_head, lens, work))
    nmain = sum(p[3] for p in plans)
    # the values' outliers: slices of their own after every run's (they need the max over all of them)
    post = [(r, *_value_outlier_programs(r, b * h, q.device)) for r in runs if r.vout is not None]
    nsplit = nmain + sum(x[1] for x in post)
    rows = b * h * nsplit * g
    # one allocation: acc, max, sum, each starting 16-byte aligned (Triton specializes pointers on
    # it: a part that moved with the row count would compile another variant in a first request)
    r4 = rows + -rows % 4
    work = torch.empty(r4 * (d + 2), device=q.device, dtype=torch.float32)
    acc, m, lsum = work[: rows * d], work[r4 * d : r4 * d + rows], work[r4 * (d + 1) : r4 * (d + 1) + rows]
    s0, nrot = 0, 0
    rot = next(iter(rotations.values())).to(q.device, torch.float32).contiguous() if rotations else None
    turned = q.float() @ rot if rot is not None else None  # the query in the rotated basis (float32)
    cnt, skip0, skip_end = m, 0, 0
    vlogs = {}  # id(run) -> the logits its values' outliers are weighted by
    for r, (use_gluon, sl, nqs, nslices, per_head, (qlen, wlen), work) in zip(runs, plans):
        if not nslices:
            continue
        if work is not None:  # the merge leaves out each row and head's slices past its count
            cnt, skip0, skip_end = work[1], s0, s0 + nqs
        qr = q
        if r.rotation is not None:  # its slices' outputs are rotated back by the merge
            qr, nrot = turned, s0 + nslices
        if use_gluon:
            kcor, vlog, nqc = _outlier_buffers(qr, r, h, scale)
            vlogs[id(r)] = qlen, per_head, vlog, nqc
            if work is None or work[0].numel():
                gluon_decode.launch(qr, r.kc, r.ks, r.kz, r.vc, r.vs, r.vz, r.kw, r.vw, qlen, wlen, r.qoff, r.woff,
                                    acc, m, lsum, h=h, bits=r.bits, kgroup=r.kgroup, nq=r.max_q, nw=r.max_w, s0=s0,
                                    nslices=nslices, nsplit=nsplit, nqs=nqs, split_len=sl, scale=scale,
                                    per_head=per_head, vbits=r.value_bits, work=None if work is None else work[0],
                                    kcor=kcor, vlog=vlog)
        else:
            # pre-RoPE runs: 8 warps, 2 stages (at 4 warps the rotation's operands spill: 540 bytes at 4 bits, sm_90);
            # with outliers 1 stage (H100, 1x128K, 1%: 2-bit 1.70 ms against 3.22 at 2 stages, 4-bit 1.70 / 3.31)
            rope = r.rope is not None
            vlogs[id(r)] = qlen, per_head, *_launch_triton(
                qr, r, qlen, wlen, acc, m, lsum, h=h, s0=s0, nslices=nslices, nsplit=nsplit, nqs=nqs, split_len=sl,
                scale=scale, per_head=per_head, dequant=dequant, num_warps=max(num_warps, 8) if rope else num_warps,
                num_stages=num_stages or (3 if r.bits == 4 and not rope else 1 if rope and r.kout is not None else 2))
        s0 += nslices
    for r, nprog, tpp in post:
        qlen, per_head, vlog, nqc = vlogs[id(r)]
        o = r.vout
        _value_outlier_kernel[(b, h, nprog)](
            vlog, acc, m, lsum, o.ptr, o.tok, o.ch, o.val, cnt, qlen, *o.ptr.stride()[:2], h, r.max_q, nqc,
            o.ptr.shape[-1] - 1, tpp, nmain, s0, nsplit, skip0, skip_end, G=g, GP=_outlier_heads(g), D=d,
            SP=MERGE_SP, EB=OUTLIER_ENTRIES, PER_HEAD=per_head, HAS_SKIP=skip is not None)
        s0 += nprog
    out = torch.empty(b, hq, d, device=q.device, dtype=out_dtype)
    lses = torch.empty(b, hq, device=q.device, dtype=torch.float32) if lse else m
    if nrot:  # the partial sums are linear in the values: the rotated ones' sum is rotated back once
        sp, jb, warps = MERGE_ROT
        _merge_rotated_kernel[(b, hq)](acc, m, lsum, out, lses, rot, h, nsplit, nrot, cnt, skip0, skip_end, G=g,
                                       D=d, SP=sp, JB=jb, HAS_SKIP=skip is not None, HAS_LSE=lse, num_warps=warps)
        return (out, lses) if lse else out
    # MERGE_SP slices at a time whatever their number (no compile as a fork grows or from layer to
    # layer), MERGE_DB channels a program: many small programs over the partials
    db = min(d, MERGE_DB)
    _merge_kernel[(b, hq, d // db)](acc, m, lsum, out, lses, h, nsplit, cnt, skip0, skip_end, G=g, D=d, SP=MERGE_SP,
                                    DB=db, HAS_SKIP=skip is not None, HAS_LSE=lse)
    return (out, lses) if lse else out


_PER_TENSOR: dict[int, tuple] = {}  # id(t) -> (a weak reference to t, {key: what was built from it})


def _built_from(t: torch.Tensor) -> dict:
    """What was built once from tensor ``t`` (a RoPE table, a work list), dropped with ``t``."""
    hit = _PER_TENSOR.get(id(t))
    if hit is None or hit[0]() is not t:
        hit = _PER_TENSOR[id(t)] = (weakref.ref(t), {})
        weakref.finalize(t, _PER_TENSOR.pop, id(t), None)
    return hit[1]


def _rope_table(inv_freq: torch.Tensor, block: int) -> torch.Tensor:
    """cos and sin of i * inv_freq for the offsets i < block within a tile, float32 [2, block, D/2]:
    built once per inv_freq tensor (memfit.kv.rope.RoPE keeps one copy a device), not at every decode step."""
    built = _built_from(inv_freq)
    if ("rope", block) not in built:
        ang = torch.arange(block, device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
        built["rope", block] = torch.stack((ang.cos(), ang.sin())).contiguous()
    return built["rope", block]


def work_list(lens: list[int], split_len: int, nqs: int, nwin: int) -> tuple[list[int], list[int]]:
    """The programs of a work-list launch over runs of ``lens`` quantized tokens (one a row and head,
    row-major): entries ``row_head * 65536 + slice`` for every slice of ``split_len`` tokens that
    holds some (slice-major: each row and head's first slices, then their second ...), then the
    ``nwin`` window slices of every row and head (they write an empty slice where it has no window,
    which the merge reads). Also each row and head's count of quantized slices."""
    counts = [min(nqs, -(-max(n, 0) // split_len)) for n in lens]
    entries = [rh * 65536 + s for s in range(nqs) for rh, c in enumerate(counts) if s < c]
    entries += [rh * 65536 + nqs + j for j in range(nwin) for rh in range(len(lens))]
    return entries, counts


def _cached_work(qlen: torch.Tensor, n: int, split_len: int, nqs: int, nwin: int, device: torch.device):
    """The work list and counts (int32 tensors on ``device``) of runs whose lengths are ``qlen``
    (clamped to ``n``), built once per lengths tensor and launch shape; None while a CUDA graph is
    being captured and they were not built yet (building reads the lengths on the host)."""
    built = _built_from(qlen)
    key = ("work", qlen._version, n, split_len, nqs, nwin, device)
    if key not in built:
        if _capturing(qlen):
            return None
        entries, counts = work_list([min(x, n) for x in qlen.flatten().tolist()], split_len, nqs, nwin)
        built[key] = tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in (entries, counts))
    return built[key]


# outlier entries a step of the outlier kernels
OUTLIER_ENTRIES = 64
# the values' outlier kernel: about this many programs an SM (each walks its key groups' entries)
VALUE_OUTLIER_PROGRAMS_PER_SM = 8


def _padded_heads(g: int) -> int:
    """A GQA group's query heads padded to an MMA's rows (16 at least, a power of two)."""
    return max(16, triton.next_power_of_2(g))


def _outlier_heads(g: int) -> int:
    """A GQA group's query heads padded for the outlier kernels, which use no MMA: a power of two
    (at least 2: no size-1 blocks)."""
    return max(2, triton.next_power_of_2(g))


def _value_outlier_programs(r: PackedRun, rows_heads: int, device: torch.device) -> tuple[int, int]:
    """How ``_value_outlier_kernel`` splits a run's key groups: (programs a row and head, key groups a
    program), about ``VALUE_OUTLIER_PROGRAMS_PER_SM`` programs an SM in all."""
    nt = r.vout.ptr.shape[-1] - 1
    tpp = max(1, math.ceil(nt * rows_heads / (VALUE_OUTLIER_PROGRAMS_PER_SM * _sms(device))))
    return max(1, math.ceil(nt / tpp)), tpp


def _outlier_buffers(q: torch.Tensor, r: PackedRun, h: int, scale: float
                     ) -> tuple[torch.Tensor | None, torch.Tensor | None, int]:
    """Sparse outliers of a run, before its split kernel: per token and query head, the keys' logit
    corrections (summed here by ``_key_outlier_kernel``) and, for the values' (added after every run's
    slices), a buffer for the logits; rows of ``nqc`` tokens. None where the run has none."""
    b, hq, _ = q.shape
    g = hq // h
    tiles = [o.ptr.shape[-1] - 1 for o in (r.kout, r.vout) if o is not None]
    nqc = max([math.ceil(r.max_q / r.kgroup), *tiles]) * r.kgroup
    kcor = vlog = None
    if r.kout is not None:
        o = r.kout
        nt = o.ptr.shape[-1] - 1
        # tokens past the key groups ptr covers have no outliers: 0 (only where a run's lists are shorter)
        kcor = (torch.zeros if nt * r.kgroup < nqc else torch.empty)(b, hq, nqc, device=q.device, dtype=torch.float32)
        _key_outlier_kernel[(b, h, nt)](q, o.ptr, o.tok, o.ch, o.val, kcor, q.stride(0), q.stride(1),
                                        *o.ptr.stride()[:2], h, nqc, scale, G=g, GP=_outlier_heads(g), BLOCK=r.kgroup,
                                        EB=OUTLIER_ENTRIES)
    if r.vout is not None:
        vlog = torch.empty(b, hq, nqc, device=q.device, dtype=torch.float32)
    return kcor, vlog, nqc


def _launch_triton(q, r: PackedRun, qlen, wlen, acc, m, lsum, *, h, s0, nslices, nsplit, nqs, split_len, scale,
                   per_head, dequant, num_warps, num_stages) -> tuple[torch.Tensor, int]:
    """The Triton kernel's slices ``s0 .. s0 + nslices`` of run ``r`` (2-bit at 3 stages needs 140
    registers a thread: 3 programs an SM instead of 4, hence 2 stages there by default)."""
    b, hq, d = q.shape
    g, nvg = hq // h, r.vs.shape[-1]
    st = (lambda t: (0, 0, t.stride(2))) if r.offsets else (lambda t: t.stride()[:3])  # noqa: E731
    rope = r.rope.to(q.device) if r.rope is not None else m
    table = _rope_table(rope, r.kgroup) if r.rope is not None else m
    gp = _padded_heads(g)
    kcor, vlog, nqc = _outlier_buffers(q, r, h, scale)
    kcor, vlog = m if kcor is None else kcor, m if vlog is None else vlog
    _split_kernel[(b, h, nslices)](
        q, r.kc, r.ks, r.kz, r.vc, r.vs, r.vz, r.kw, r.vw, qlen, wlen, r.qoff if r.offsets else m,
        r.woff if r.offsets else m, acc, m, lsum, rope, table, kcor, vlog, q.stride(0), q.stride(1),
        *st(r.kc), *st(r.ks), *st(r.vc), *st(r.vs), *st(r.kw), h, nsplit, s0, nqs,
        split_len, r.max_q, r.max_w, nqc, scale, r.rope_scaling,
        G=g, GP=gp, D=d, BITS=r.bits, VGROUP=d // nvg, NVG=nvg, BLOCK=r.kgroup,
        WBLOCK=32, DQ=_DEQUANT[dequant], PER_HEAD=per_head, OFFSETS=r.offsets, HAS_ROPE=r.rope is not None,
        KOUT=r.kout is not None, VOUT=r.vout is not None, num_warps=num_warps, num_stages=num_stages)
    return vlog, nqc
