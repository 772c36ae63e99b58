"""KIVI-style asymmetric KV quantization, with bit-packing and a pure-torch dequantize reference,
and the protocol every KV quantizer follows.

A quantizer is a frozen config dataclass (``KIVI``, ``LayerBits``, ``GEAR``, ``QJL``, ``Hadamard``,
``Million``, ``ZipCache``) with ``quantize_keys(k)`` / ``quantize_values(v)`` ([B, H, N, D] -> a
stored run of tokens), ``spilled(n)`` (window tokens that go to the quantized part),
``value_group(d)``, ``group`` and ``residual`` (the 16-bit window), and ``token_bytes(d)`` /
``fixed_bytes(heads, d)`` (the planner's bound; ``run_bytes(n, d)`` where a run's bytes are not
``n`` times a token's, as ZipCache rounds its salient count). What it stores (:class:`QTensor` here, one class
per other method) has ``num_tokens``, ``shape``, ``nbytes``, ``tensors()``, ``meta()`` (JSON:
``kind`` plus what :func:`load_quantized` needs), ``cat``, ``prefix`` and ``dequantize(dtype)``; one
whose ``extends`` is true also has ``extend(x)`` (the window's spills encoded on what the run
fitted: MILLION's codebook, 8-bit grids' ranges) and may have ``like(x)`` (a fork's first spill, on
its parent's). The decode kernel reads KIVI's codes only (8-bit grids as float16); other layouts
attend through their dequantized keys and values.

Layout (shared with the GPU kernels):
- keys are quantized per channel, in groups of ``group`` consecutive tokens:
  codes [B, H, N, D] packed along D, scale/zero [B, H, N // group, D];
- values are quantized per token, in groups of ``vgroup`` consecutive channels:
  codes [B, H, N, D] packed along D, scale/zero [B, H, N, D // vgroup].
Codes are packed along the last dimension into uint8: four 2-bit or two 4-bit codes per byte, the
first code in the lowest bits. Scale and zero point (the group minimum) are float16 (see the nbytes
accounting in kv/layer.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memfit.lazy import lazy_module

if TYPE_CHECKING:
    from memfit.kernels.decode_attention import Outliers

# imported on first use: the spec parser and `memfit info` need only the config dataclasses
torch = lazy_module("torch")
pack_kernels = lazy_module("memfit.kernels.quantize_pack")
packing = lazy_module("memfit.kernels.packing")

_FP16_MAX = 65504.0


class Stored:
    """What every quantizer's storage shares: its bytes are those of its ``tensors()``."""

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())


class PackedCodes(Stored):
    """What KIVI-grid storage shares: ``codes`` [B, H, N, D * bits // 8] packed along the last dimension,
    grouped by ``axis`` in groups of ``group``."""

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """[B, H, N, D] of the tensor these codes stand for."""
        b, h, n, w = self.codes.shape
        return b, h, n, w * 8 // self.bits

    def _groups_at(self, n: int) -> int:
        """Grid rows that the first ``n`` tokens hold (keys: whole groups only)."""
        if self.axis != "token":
            return n
        if n % self.group:
            raise ValueError(f"cannot cut a key group of {self.group} tokens at token {n}")
        return n // self.group


@dataclass
class QTensor(PackedCodes):
    """Packed codes with their per-group scale and zero point (see module docstring for the layout)."""

    codes: torch.Tensor  # uint8, [B, H, N, D * bits // 8]
    scale: torch.Tensor  # float16
    zero: torch.Tensor  # float16
    bits: int
    axis: str  # "token" (keys: groups along tokens) or "channel" (values: groups along channels)
    group: int
    # dense-and-sparse (KVQuant): elements kept exactly, as flat indices into the [B, H, N, D]
    # tensor (int32, or int64 past 2**31 elements) and their float16 values; None: no outliers
    out_idx: torch.Tensor | None = None
    out_val: torch.Tensor | None = None

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scale": self.scale, "zero": self.zero}
        if self.out_idx is not None:
            out.update(out_idx=self.out_idx, out_val=self.out_val)
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str, bits: int, axis: str, group: int) -> "QTensor":
        """Inverse of :meth:`tensors`, the names prefixed with ``prefix``."""
        return cls(t[prefix + "codes"], t[prefix + "scale"], t[prefix + "zero"], bits, axis, group,
                   t.get(prefix + "out_idx"), t.get(prefix + "out_val"))

    def meta(self) -> dict:
        return {"kind": "kivi", "bits": self.bits, "axis": self.axis, "group": self.group}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "QTensor":
        return cls.from_tensors(t, prefix, meta["bits"], meta["axis"], meta["group"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self, dtype)

    def _outliers_at(self, n: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The outliers re-indexed for a tensor of ``n`` tokens in which this one starts at token
        ``offset`` (dropping those at or past token ``n``)."""
        if self.out_idx is None:
            return None
        _, _, m, d = self.shape
        return moved_outliers(self.out_idx, self.out_val, m, d, n, offset)

    def _with_outliers(self, parts: list[tuple[torch.Tensor, torch.Tensor] | None], numel: int):
        parts = [p for p in parts if p is not None and len(p[0])]
        if not parts:  # no outliers at all: None, so that readers (the decode kernel) need not check
            return None, None
        idx = torch.cat([p[0] for p in parts])
        return idx.to(_index_dtype(numel)), torch.cat([p[1] for p in parts])

    @staticmethod
    def batch(parts: "list[QTensor]") -> "QTensor":
        """Rows of the same length and format (no outliers) as one batch."""
        p0 = parts[0]
        return QTensor(*(torch.cat([getattr(q, n) for q in parts]) for n in ("codes", "scale", "zero")), p0.bits,
                       p0.axis, p0.group)

    def cat(self, other: "QTensor") -> "QTensor":
        if (other.bits, other.axis, other.group) != (self.bits, self.axis, self.group):
            raise ValueError("cannot concatenate quantized tensors of different formats")
        b, h, n1, d = self.shape
        n = n1 + other.num_tokens
        idx, val = self._with_outliers([self._outliers_at(n), other._outliers_at(n, n1)], b * h * n * d)
        return QTensor(
            torch.cat([self.codes, other.codes], dim=-2),
            torch.cat([self.scale, other.scale], dim=-2),
            torch.cat([self.zero, other.zero], dim=-2),
            self.bits,
            self.axis,
            self.group,
            idx,
            val,
        )

    def prefix(self, n: int) -> "QTensor":
        """The first ``n`` tokens, as a copy (a slice would keep the whole storage alive). For keys,
        ``n`` must not cut a token group."""
        groups = self._groups_at(n)
        b, h, _, d = self.shape
        idx, val = self._with_outliers([self._outliers_at(n)], b * h * n * d)
        return QTensor(self.codes[:, :, :n].clone(), self.scale[:, :, :groups].clone(), self.zero[:, :, :groups].clone(),
                       self.bits, self.axis, self.group, idx, val)


META_LEVELS = 255  # 8-bit codes for a group's scale and zero (``MetaQTensor``)


def _half_up(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded to float16, up where float16 cannot hold it (a step must not shrink when stored)."""
    return (x * (1 + 2**-10)).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)  # float16 rounds within 2**-11


@dataclass
class MetaQTensor(PackedCodes):
    """KIVI codes whose per-group scale and zero are 8-bit codes instead of float16 (as HQQ and QLoRA
    store weights' grids): ``log2(scale)`` and the zero on 256 levels of ranges fitted once per run
    of tokens and per key channel (keys) or per head (values), with headroom, so that the window's
    later spills are encoded on the same ranges (:meth:`extend`). A group's zero is rounded down and
    its scale up, and its codes are chosen for the grid as stored: a group still spans its range
    (unless a later group falls outside the headroom, where it is clipped). ``ranges`` float16
    [B, H, 1, R, 4]: log2-scale low and step, zero low and step; R = D (keys) or 1 (values). At 2
    bits, head_dim 64, the grids cost 0.25 bits an element instead of 0.5."""

    codes: torch.Tensor  # uint8 [B, H, N, D * bits // 8]
    scale_codes: torch.Tensor  # uint8, the shape of QTensor.scale
    zero_codes: torch.Tensor
    ranges: torch.Tensor
    bits: int
    axis: str
    group: int
    out_idx = None  # no sparse outliers (read by the kernels' checks)

    @classmethod
    def encode(cls, x: torch.Tensor, bits: int, axis: str, group: int,
               ranges: torch.Tensor | None = None) -> "MetaQTensor":
        """``x`` [B, H, N, D] quantized as KIVI groups it (``axis`` "token": keys, per channel over
        ``group`` tokens; "channel": values, per token over ``group`` channels), on ``ranges`` (None:
        fitted to ``x``)."""
        b, h, n, d = x.shape
        x = x.float()
        if axis == "token":
            xg, dim = x.reshape(b, h, n // group, group, d), 3
        else:
            xg, dim = x.reshape(b, h, n, d // group, group), 4
        lo = xg.amin(dim).clamp(-_FP16_MAX, _FP16_MAX)
        hi = xg.amax(dim).clamp(-_FP16_MAX, _FP16_MAX)
        qmax = (1 << bits) - 1
        if ranges is None:
            ranges = cls.fit_ranges(lo, hi, qmax, axis)
        r = ranges.float()
        zc = ((lo - r[..., 2]) / r[..., 3]).floor().clamp(0, META_LEVELS)
        zero = (r[..., 2] + zc * r[..., 3]).to(torch.float16).float()
        need = ((hi - zero) / qmax).clamp_min(1e-30).log2()
        sc = ((need - r[..., 0]) / r[..., 1]).ceil().clamp(0, META_LEVELS)
        scale = torch.exp2(r[..., 0] + sc * r[..., 1]).to(torch.float16).float()
        codes = ((xg - zero.unsqueeze(dim)) / scale.unsqueeze(dim)).round().clamp(0, qmax).to(torch.uint8)
        return cls(packing.pack(codes.reshape(b, h, n, d), bits), sc.to(torch.uint8), zc.to(torch.uint8), ranges,
                   bits, axis, group)

    @classmethod
    def from_grid(cls, q: QTensor, ranges: torch.Tensor) -> "MetaQTensor":
        """``q``'s codes with its float16 grid given back as codes on ``ranges`` (a grid that was encoded
        on them, as static decode holds it: each value is the nearest level, or one that rounds to the
        same float16)."""
        r = ranges.float()
        sc = ((q.scale.float().log2() - r[..., 0]) / r[..., 1]).round().clamp(0, META_LEVELS)
        zc = ((q.zero.float() - r[..., 2]) / r[..., 3]).round().clamp(0, META_LEVELS)
        return cls(q.codes, sc.to(torch.uint8), zc.to(torch.uint8), ranges, q.bits, q.axis, q.group)

    @staticmethod
    def fit_ranges(lo: torch.Tensor, hi: torch.Tensor, qmax: int, axis: str) -> torch.Tensor:
        """Ranges for groups of minima ``lo`` and maxima ``hi``: over the run's groups of each key channel
        (keys) or head (values), widened for later spills (scales by 2x each way, zeros by a quarter
        of their span and a step of their groups)."""
        dims = (2,) if axis == "token" else (2, 3)
        ls = ((hi - lo) / qmax).clamp_min(1e-30).log2()
        smax = ls.amax(dims, keepdim=True)
        smin = torch.maximum(ls.amin(dims, keepdim=True), smax - 16)  # 2**-16 of the widest: a constant group
        zmin, zmax = lo.amin(dims, keepdim=True), lo.amax(dims, keepdim=True)
        pad = 0.25 * (zmax - zmin) + torch.exp2(smax)
        slo, zlo = smin - 1, zmin - pad
        sstep = _half_up((smax + 1 - slo) / META_LEVELS)
        zstep = _half_up(((zmax + pad - zlo) / META_LEVELS).clamp_min(1e-6))
        out = torch.stack([slo.to(torch.float16), sstep, zlo.to(torch.float16), zstep], -1)
        return out.reshape(lo.shape[0], lo.shape[1], 1, -1, 4)  # [B, H, 1, R, 4]

    def _grid(self, codes: torch.Tensor, k: int) -> torch.Tensor:
        r = self.ranges.float()
        return r[..., 2 * k] + codes.float() * r[..., 2 * k + 1]

    @property
    def scale(self) -> torch.Tensor:
        """The groups' scales as the codes were chosen for (float16, QTensor's shape)."""
        return torch.exp2(self._grid(self.scale_codes, 0)).to(torch.float16)

    @property
    def zero(self) -> torch.Tensor:
        return self._grid(self.zero_codes, 1).to(torch.float16)

    def plain(self) -> QTensor:
        """The same codes with their grid in float16: what the decode kernel reads."""
        return QTensor(self.codes, self.scale, self.zero, self.bits, self.axis, self.group)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize(self.plain(), dtype)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"codes": self.codes, "scale_codes": self.scale_codes, "zero_codes": self.zero_codes,
                "ranges": self.ranges}

    def meta(self) -> dict:
        return {"kind": "kivi-meta", "bits": self.bits, "axis": self.axis, "group": self.group}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "MetaQTensor":
        return cls(t[prefix + "codes"], t[prefix + "scale_codes"], t[prefix + "zero_codes"], t[prefix + "ranges"],
                   meta["bits"], meta["axis"], meta["group"])

    def _with(self, codes, scale_codes, zero_codes) -> "MetaQTensor":
        return MetaQTensor(codes, scale_codes, zero_codes, self.ranges, self.bits, self.axis, self.group)

    def like(self, x: torch.Tensor) -> "MetaQTensor":
        """Tokens ``x`` [B, H, n, D] as a run of their own, encoded on these ranges."""
        return MetaQTensor.encode(x, self.bits, self.axis, self.group, self.ranges)

    def append(self, other: "MetaQTensor") -> "MetaQTensor":
        """``other``'s codes after these (``other`` encoded on these ranges: :meth:`like`)."""
        return self._with(*(torch.cat([getattr(self, f), getattr(other, f)], dim=-2)
                            for f in ("codes", "scale_codes", "zero_codes")))

    def extend(self, x: torch.Tensor) -> "MetaQTensor":
        """Tokens ``x`` [B, H, n, D] after these, encoded on these ranges."""
        return self.append(self.like(x))

    def cat(self, other: "MetaQTensor") -> "MetaQTensor":
        """``other``'s tokens after these: what its codes stand for, encoded again on these ranges."""
        if (other.bits, other.axis, other.group) != (self.bits, self.axis, self.group):
            raise ValueError("cannot concatenate quantized tensors of different formats")
        return self.extend(other.dequantize(torch.float32))

    @staticmethod
    def batch(parts: "list[MetaQTensor]") -> "MetaQTensor":
        p0 = parts[0]
        return MetaQTensor(*(torch.cat([getattr(q, f) for q in parts]) for f in
                             ("codes", "scale_codes", "zero_codes", "ranges")), p0.bits, p0.axis, p0.group)

    def prefix(self, n: int) -> "MetaQTensor":
        groups = self._groups_at(n)
        return self._with(self.codes[:, :, :n].clone(), self.scale_codes[:, :, :groups].clone(),
                          self.zero_codes[:, :, :groups].clone())


class OnCodes(Stored):
    """Storage that adds something to KIVI codes ``q`` (GEAR's error correction, the rotated
    quantizer's sinks): its tokens and shape are the codes'."""

    q: QTensor

    @property
    def num_tokens(self) -> int:
        return self.q.num_tokens

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return self.q.shape


def _minmax_quantize(x: torch.Tensor, bits: int, reduce_dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric quantization of ``x`` with one (scale, zero) per slice along ``reduce_dim``."""
    x = x.float()
    qmax = (1 << bits) - 1
    lo = x.amin(dim=reduce_dim, keepdim=True).clamp(-_FP16_MAX, _FP16_MAX)
    hi = x.amax(dim=reduce_dim, keepdim=True).clamp(-_FP16_MAX, _FP16_MAX)
    # Round the parameters to their stored precision first, so that the codes are chosen for the
    # scale and zero that dequantization will actually use.
    zero = lo.to(torch.float16)
    # times the reciprocal, as torch does on CUDA for a scalar divisor anyway: the same on every device and
    # in the quantize-and-pack kernel
    scale = ((hi - zero.float()) * (1.0 / qmax)).clamp_min(1e-6).to(torch.float16)
    codes = torch.round((x - zero.float()) / scale.float()).clamp_(0, qmax).to(torch.uint8)
    return codes, scale, zero


def kernel_outliers(qt: QTensor, rows: int, kgroup: int, rope: dict | None = None, start: int = 0,
                    ragged: tuple[torch.Tensor, torch.Tensor] | None = None) -> Outliers | None:
    """``qt``'s sparse outliers as the decode kernel adds them (``decode_attention.Outliers``): each the
    exact value less what the dense codes give at its place, grouped by row, head and key group (of
    ``kgroup`` tokens: the kernel's tile, for keys and values alike); keys
    after RoPE where ``rope`` (``RoPE.kernel_args``) says the codes are stored before it (an outlier
    then corrects its channel and that channel's RoPE partner, at its token's index in the run, as the
    kernel rotates the codes; ``start``: the index of ``qt``'s first token in its run, for RoPE's angle).
    A tensor of one row read by ``rows`` rows (a fork's parent) is read by each. ``ragged``: ``qt`` is flat
    [1, 1, T, D] storage of runs back to back, each row and head's starting at token ``starts`` and
    ``lens`` long (both [R, H]). None without outliers."""
    from memfit.kernels.decode_attention import Outliers

    if qt.out_idx is None:
        return None
    b, h, n, d = qt.shape
    idx = qt.out_idx.long()
    delta = qt.out_val.float() - _dense_at(qt, idx)
    run, tok, ch = idx // (n * d), idx % (n * d) // d, idx % d
    if ragged is not None:  # each entry's row and head: the last run starting at or before its token
        starts = ragged[0].reshape(-1).to(idx.device)
        run = torch.searchsorted(starts, tok, right=True) - 1
        tok = tok - starts[run]
        (b, h), n = ragged[0].shape, max(int(ragged[1].max()), 1)
    if rope is not None:  # rotate_half: channel c < D/2 also moves c + D/2 by +sin, c >= D/2 moves c - D/2 by -sin
        ang = (tok + start).float() * rope["rope"].to(idx.device)[ch % (d // 2)]
        s = rope.get("rope_scaling", 1.0)
        sign = torch.where(ch < d // 2, 1.0, -1.0)
        run, tok = torch.cat((run, run)), torch.cat((tok, tok))
        ch = torch.cat((ch, (ch + d // 2) % d))
        delta = torch.cat((delta * ang.cos() * s, sign * delta * ang.sin() * s))
    # by row, head and token (a run appended to another lists its outliers after the other's)
    order = torch.argsort(run * n + tok, stable=True)
    run, tok, ch, delta = run[order], tok[order], ch[order], delta[order]
    nt = -(-n // kgroup)
    counts = torch.bincount(run * nt + tok // kgroup, minlength=b * h * nt)
    cum = torch.cat((counts.new_zeros(1), counts.cumsum(0)))
    ptr = cum[(torch.arange(b * h, device=idx.device) * nt)[:, None] + torch.arange(nt + 1, device=idx.device)]
    ptr = ptr.to(torch.int32).reshape(b, h, nt + 1)
    return Outliers(ptr if rows == b else ptr.expand(rows, h, nt + 1), tok.int(), ch.int(), delta)


def token_outliers(x: torch.Tensor, channels: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Each token's ``channels`` largest-magnitude channels taken out of ``x`` [..., D] (float32):
    (``x`` with them zeroed, their uint8 indices [..., channels], their float16 values, saturated);
    (``x``, None, None) for 0 channels. QJL's and MILLION's exact channels."""
    x = x.float()
    if not channels:
        return x, None, None
    idx = x.abs().topk(channels, dim=-1).indices
    val = x.gather(-1, idx)
    return x.scatter(-1, idx, 0.0), idx.to(torch.uint8), val.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)


def moved_outliers(idx: torch.Tensor, val: torch.Tensor, m: int, d: int, n: int,
                   offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Outliers at flat indices ``idx`` of a [B, H, m, D] tensor, re-indexed (int64) for a tensor of ``n``
    tokens in which it starts at token ``offset``; those at or past token ``n`` dropped."""
    bh, rest = idx // (m * d), idx % (m * d)
    keep = rest < (n - offset) * d
    return bh[keep].long() * (n * d) + rest[keep].long() + offset * d, val[keep]


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def _split_outliers(x: torch.Tensor, reduce_dim: int, fraction: float) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Dense-and-sparse split of grouped ``x`` (KVQuant): the ``fraction`` of each head's elements
    that stand furthest out of their quantization group (distance to the group mean in units of the
    group's standard deviation) are taken out, and replaced in the dense part by the group mean so
    that they no longer stretch its min-max range. Returns (dense x, flat indices into x as
    [B, H, ...], float16 values); (x, None, None) when the fraction of a head is not one element."""
    x = x.float()
    mean = x.mean(dim=reduce_dim, keepdim=True)
    z = (x - mean).abs() / x.std(dim=reduce_dim, keepdim=True, correction=0).clamp_min(1e-6)
    b, h = x.shape[:2]
    per_head = z.reshape(b, h, -1)
    k = int(fraction * per_head.shape[-1])  # never more than the fraction: the planner's byte bound
    if k == 0:
        return x, None, None
    top = per_head.topk(k, dim=-1).indices  # [B, H, k] within each head
    idx = (top + torch.arange(b * h, device=x.device).reshape(b, h, 1) * per_head.shape[-1]).reshape(-1)
    idx = idx.sort().values
    val = x.reshape(-1)[idx].clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)
    dense = x.reshape(-1).clone()
    dense[idx] = mean.expand_as(x).reshape(-1)[idx]
    return dense.reshape(x.shape), idx.to(_index_dtype(x.numel())), val


def _quantize(x: torch.Tensor, bits: int, reduce_dim: int, outliers: float, axis: str, group: int) -> QTensor:
    """Torch path of both quantizers: ``x`` grouped as [B, H, ..., group axis at reduce_dim, ...]."""
    b, h = x.shape[:2]
    idx = val = None
    if outliers > 0:
        x, idx, val = _split_outliers(x, reduce_dim, outliers)
    codes, scale, zero = _minmax_quantize(x, bits, reduce_dim)
    d = x.shape[-1] * (x.shape[-2] if axis == "channel" else 1)
    return QTensor(packing.pack(codes.reshape(b, h, -1, d), bits), scale.squeeze(reduce_dim), zero.squeeze(reduce_dim),
                   bits, axis, group, idx, val)


def _check_outliers(outliers: float) -> None:
    if not 0 <= outliers < 0.5:
        raise ValueError(f"outliers is the fraction of elements kept in 16-bit, in [0, 0.5), got {outliers}")


def quantize_keys(k: torch.Tensor, bits: int, group: int, use_kernels: bool = True, outliers: float = 0.0) -> QTensor:
    """Per-channel key quantization over groups of ``group`` tokens. ``k``: [B, H, N, D], N % group == 0.
    On CUDA the Triton quantize-and-pack kernel does it (``use_kernels=False``: this torch path, its reference).
    ``outliers``: the fraction of elements kept exactly in float16 beside the codes (dense-and-sparse)."""
    packing.check_bits(bits)
    _check_outliers(outliers)
    b, h, n, d = k.shape
    if n % group:
        raise ValueError(f"key quantization needs a multiple of group={group} tokens, got {n}")
    if use_kernels and not outliers and pack_kernels.supports(k, bits, group):
        return QTensor(*pack_kernels.quantize_keys_pack(k, bits, group), bits, "token", group)
    return _quantize(k.reshape(b, h, n // group, group, d), bits, 3, outliers, "token", group)


def quantize_values(v: torch.Tensor, bits: int, group: int, use_kernels: bool = True, outliers: float = 0.0) -> QTensor:
    """Per-token value quantization over groups of ``group`` channels. ``v``: [B, H, N, D], D % group == 0."""
    packing.check_bits(bits)
    _check_outliers(outliers)
    b, h, n, d = v.shape
    if d % group:
        raise ValueError(f"value quantization needs head_dim ({d}) to be a multiple of its group ({group})")
    if use_kernels and not outliers and pack_kernels.supports(v, bits, group, values=True):
        return QTensor(*pack_kernels.quantize_values_pack(v, bits, group), bits, "channel", group)
    return _quantize(v.reshape(b, h, n, d // group, group), bits, 4, outliers, "channel", group)


def dequantize(q: QTensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Pure-torch reference: QTensor -> [B, H, N, D] tensor of ``dtype`` (float32 if None)."""
    codes = packing.unpack(q.codes, q.bits).float()
    b, h, n, d = codes.shape
    if q.axis == "token":
        c = codes.reshape(b, h, n // q.group, q.group, d)
        out = c * q.scale.float().unsqueeze(3) + q.zero.float().unsqueeze(3)
    else:
        c = codes.reshape(b, h, n, d // q.group, q.group)
        out = c * q.scale.float().unsqueeze(4) + q.zero.float().unsqueeze(4)
    out = out.reshape(b, h, n, d)
    if q.out_idx is not None:
        out.view(-1)[q.out_idx.long()] = q.out_val.float()
    return out.to(dtype or torch.float32)


def _dense_at(q: QTensor, idx: torch.Tensor) -> torch.Tensor:
    """What ``q``'s codes alone (not its outliers) dequantize to at flat [B, H, N, D] indices ``idx``
    (float32): only those elements unpacked, as :func:`dequantize` would give them."""
    b, h, n, d = q.shape
    row, c = idx // d, idx % d  # row: the token's row in [B * H * N]
    per = 8 // q.bits  # codes a byte, code j at bits j * bits
    byte = q.codes.reshape(-1, q.codes.shape[-1])[row, c // per]
    code = ((byte.long() >> ((c % per) * q.bits)) & ((1 << q.bits) - 1)).float()
    bh, t = row // n, row % n
    at = (bh, t // q.group, c) if q.axis == "token" else (bh, t, c // q.group)
    grid = [x.reshape(b * h, -1, x.shape[-1])[at].float() for x in (q.scale, q.zero)]
    return code * grid[0] + grid[1]


def in_run_order(low: torch.Tensor, high: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """A run stored at two widths (ZipCache, the rotated quantizer's salient tokens) back in order:
    [B, H, n, D] from the tokens at the low width ``low`` [B, H, n - s, D] (in order) and the salient
    ones ``high`` [B, H, s, D] (in order) at positions ``index`` [B, H, s]."""
    b, h, s, d = high.shape
    n = low.shape[2] + s
    order = torch.cat([other_positions(index.long(), n), index.long()], dim=-1)  # how the tokens are stored
    vals = torch.cat([low, high], dim=2)
    return vals.new_empty(b, h, n, d).scatter_(2, order.unsqueeze(-1).expand(-1, -1, -1, d), vals)


def other_positions(idx: torch.Tensor, n: int) -> torch.Tensor:
    """The positions of ``range(n)`` not in ``idx`` [B, H, s], ascending: [B, H, n - s]."""
    b, h, s = idx.shape
    mask = torch.zeros(b, h, n, dtype=torch.bool, device=idx.device).scatter_(2, idx, True)
    return torch.argsort(mask.to(torch.uint8), dim=-1, stable=True)[..., : n - s]


# what a quantizer stores, by ``meta()["kind"]``: each method's module adds its class on import
STORED: dict[str, type] = {"kivi": QTensor, "kivi-meta": MetaQTensor}


def load_quantized(t: dict[str, torch.Tensor], prefix: str, meta: dict):
    """A stored run of tokens back from its tensors (names prefixed with ``prefix``) and ``meta()``."""
    kind = meta.get("kind", "kivi")
    if kind not in STORED:
        raise ValueError(f"unknown quantized storage {kind!r} (known: {', '.join(sorted(STORED))}); "
                         "was it saved by a newer memfit?")
    return STORED[kind].from_meta(t, prefix, meta)


def pair_info(qk, qv) -> dict:
    """JSON describing a layer's quantized keys and values. KIVI pairs keep the original fields
    (``bits``, ``kgroup``, ``vgroup``), which stored caches and the kernels' callers read."""
    if isinstance(qk, QTensor) and isinstance(qv, QTensor):
        return {"bits": qk.bits, "kgroup": qk.group, "vgroup": qv.group}
    return {"k": qk.meta(), "v": qv.meta()}


def load_pair(t: dict[str, torch.Tensor], kprefix: str, vprefix: str, info: dict) -> tuple:
    """Inverse of :func:`pair_info` with the tensors of ``tensors()`` under ``kprefix`` / ``vprefix``."""
    if "k" in info:
        return load_quantized(t, kprefix, info["k"]), load_quantized(t, vprefix, info["v"])
    return (QTensor.from_tensors(t, kprefix, info["bits"], "token", info["kgroup"]),
            QTensor.from_tensors(t, vprefix, info["bits"], "channel", info["vgroup"]))


def kivi_token_bytes(bits: float, d: int, kgroup: int, vgroup: int, outliers: float = 0.0,
                     grid_bytes: int = 4) -> float:
    """Keys and values of one quantized token of one head under KIVI: codes, plus its share of the
    groups' scales and zeros (``grid_bytes`` a group: float16 both, or 2 as 8-bit codes) and of the
    sparse outliers (6 bytes each)."""
    return 2 * d * bits / 8 + grid_bytes * d / kgroup + grid_bytes * d / vgroup + 2 * d * outliers * 6


@dataclass(frozen=True)
class KIVI:
    """KIVI quantization: ``bits``-bit keys per channel and values per token, in groups of ``group``,
    with the most recent ``residual`` tokens kept in 16-bit and quantized as the window fills.
    ``outliers`` > 0 adds KVQuant's dense-and-sparse split: that fraction of each head's elements,
    the ones furthest out of their group, kept exactly (float16 value + int32 index: 6 bytes each).
    ``pre_rope`` (KVQuant) quantizes keys before RoPE, whose per-channel structure RoPE scrambles
    by position, and puts RoPE back on read (needs ``CompressedCache.for_model``; not with
    eviction, where the cache would have to store positions)."""

    bits: int = 4
    group: int = 64
    residual: int = 128
    outliers: float = field(default=0.0, metadata={"spec": "if-set"})  # spelled in the spec only when set
    pre_rope: bool = field(default=False, metadata={"spec": "if-set"})

    def __post_init__(self) -> None:
        packing.check_bits(self.bits)
        _check_outliers(self.outliers)
        if self.group < 1 or self.group & (self.group - 1):
            raise ValueError(f"kivi: group must be a power of two >= 1, got {self.group}")
        if self.residual < 0:
            raise ValueError(f"kivi: residual must be >= 0, got {self.residual}")

    def spilled(self, n: int) -> int:
        """Tokens of ``n`` window tokens that go to the quantized part: whole key groups, leaving at
        most ``residual`` (and fewer than ``residual + group``) in 16-bit."""
        if n <= self.residual:
            return 0
        return min(math.ceil((n - self.residual) / self.group) * self.group, (n // self.group) * self.group)

    @property
    def vbits(self) -> int:
        """The values' width: KIVI's are its keys' (``Hadamard.vbits`` may differ)."""
        return self.bits

    def value_group(self, head_dim: int) -> int:
        g = min(self.group, head_dim)
        if head_dim % g:
            raise ValueError(f"kivi: head_dim {head_dim} is not a multiple of the value group {g}")
        return g

    def quantize_keys(self, k: torch.Tensor) -> QTensor:
        return quantize_keys(k, self.bits, self.group, outliers=self.outliers)

    def quantize_values(self, v: torch.Tensor) -> QTensor:
        return quantize_values(v, self.bits, self.value_group(v.shape[-1]), outliers=self.outliers)

    def token_bytes(self, d: int) -> float:
        return kivi_token_bytes(self.bits, d, self.group, self.value_group(d), self.outliers)

    def fixed_bytes(self, heads: int, d: int) -> float:
        return 0.0


class OnKIVI:
    """The config side of a quantizer built on KIVI's 16-bit window and groups (GEAR, QJL, the
    rotated quantizer): ``kivi`` is its KIVI (by default from ``bits``, ``group`` and ``residual``),
    which spills the window and groups values as KIVI does."""

    @property
    def kivi(self) -> KIVI:
        return KIVI(self.bits, self.group, self.residual)

    def _check_kivi(self, name: str) -> None:
        """KIVI's checks on the arguments, its errors under this quantizer's ``name``."""
        try:
            self.kivi  # noqa: B018
        except ValueError as e:
            raise ValueError(str(e).replace("kivi:", f"{name}:")) from None

    def spilled(self, n: int) -> int:
        return self.kivi.spilled(n)

    def value_group(self, head_dim: int) -> int:
        return self.kivi.value_group(head_dim)


@dataclass(frozen=True)
class LayerBits:
    """KIVI with bits chosen per layer (KVTuner-style) under a target average ``bits``.

    At the end of prefill each layer's sensitivity is measured on its own context: the relative
    error of the attention output of the context's last ``window`` queries when its keys and values
    are quantized at 2, 4 or 8 bits. Every layer starts at 2 bits; the upgrade with the largest error
    drop per extra bit is taken while the layers' mean stays within ``bits``. Without a prefill that
    measures (plain ``generate``), every layer uses the widest choice within ``bits``.
    """

    bits: float = 3.0
    group: int = 64
    residual: int = 128
    window: int = 32
    outliers: float = field(default=0.0, metadata={"spec": "if-set"})

    CHOICES = (2, 4, 8)

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 8:
            raise ValueError(f"kvtuner: bits (the target mean over layers) must be in [2, 8], got {self.bits}")
        KIVI(2, self.group, self.residual, self.outliers)  # same checks on group, residual and outliers
        if self.window < 1:
            raise ValueError(f"kvtuner: window must be >= 1, got {self.window}")

    def kivi(self, bits: int) -> KIVI:
        return KIVI(bits, self.group, self.residual, self.outliers)

    def uniform(self) -> KIVI:
        return self.kivi(max(b for b in self.CHOICES if b <= self.bits))

    def spilled(self, n: int) -> int:
        return self.uniform().spilled(n)

    def value_group(self, head_dim: int) -> int:
        return self.uniform().value_group(head_dim)

    # before the per-layer bits are assigned (or without a prefill that measures): the uniform width
    def quantize_keys(self, k: torch.Tensor) -> QTensor:
        return self.uniform().quantize_keys(k)

    def quantize_values(self, v: torch.Tensor) -> QTensor:
        return self.uniform().quantize_values(v)

    def token_bytes(self, d: int) -> float:  # the mean width over layers
        return kivi_token_bytes(self.bits, d, self.group, self.value_group(d), self.outliers)

    def fixed_bytes(self, heads: int, d: int) -> float:
        return 0.0

    def assign(self, errors: list[dict[int, float]]) -> list[int]:
        """Per-layer bits from each layer's error at each choice: greedy by error drop per bit."""
        bits = [self.CHOICES[0]] * len(errors)
        spare = self.bits * len(errors) - sum(bits)  # bits the mean still allows
        while True:
            best, gain = None, 0.0
            for i, b in enumerate(bits):
                nxt = next((c for c in self.CHOICES if c > b), None)
                if nxt is None or nxt - b > spare + 1e-9:
                    continue
                g = (errors[i][b] - errors[i][nxt]) / (nxt - b)
                if g > gain:
                    best, gain = (i, nxt), g
            if best is None:
                return bits
            i, nxt = best
            spare -= nxt - bits[i]
            bits[i] = nxt


def attention_error(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q: KIVI) -> float:
    """Relative error of softmax(QK^T)V when K and V are quantized as ``q`` would (the part that
    spills; the window stays exact). queries [B, Hq, W, D] (grouped over KV heads), keys/values [B, H, N, D]."""
    n = keys.shape[-2]
    f = q.spilled(n)
    if f == 0:
        return 0.0
    kq = torch.cat([dequantize(quantize_keys(keys[:, :, :f], q.bits, q.group, outliers=q.outliers)), keys[:, :, f:].float()], -2)
    vq = torch.cat([dequantize(quantize_values(values[:, :, :f], q.bits, q.value_group(keys.shape[-1]), outliers=q.outliers)),
                    values[:, :, f:].float()], -2)
    rep = queries.shape[1] // keys.shape[1]
    qf = queries.float() / math.sqrt(queries.shape[-1])

    def attend(k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k, v = k.float().repeat_interleave(rep, 1), v.float().repeat_interleave(rep, 1)
        return torch.softmax(qf @ k.transpose(-1, -2), -1) @ v

    ref = attend(keys, values)
    return float((attend(kq, vq) - ref).norm() / ref.norm().clamp_min(1e-12))
