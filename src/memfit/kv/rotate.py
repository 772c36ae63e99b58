"""Rotated low-bit KV (QuaRot-style Hadamard rotation, with OSCAR's 16-bit sinks and clipping).

At 2 bits a group has four levels, so whatever sets its min-max range decides its precision. Three
things set it badly on real KV, and each has a fix that costs (almost) no bytes:

1. **Channel outliers.** Keys and values are multiplied by a fixed orthonormal Hadamard matrix
   ``H`` (``D x D``; block-diagonal of the largest power of two dividing ``D``) before quantization and
   by ``H^T`` on read, which spreads a channel's outlier over all channels. ``H`` is rebuilt from
   ``D``, never stored. Keys are then quantized per channel in groups of ``group`` tokens and values
   per token, as KIVI does (on SmolLM2 per-token keys after the rotation are far worse).
2. **Attention sinks.** The first tokens draw much of every query's attention and carry keys far
   from the rest; their quantization error moves every softmax. The first ``sinks`` tokens of a
   layer (of each head, in a ragged layer) are kept exactly in 16-bit beside their codes (OSCAR
   keeps them in BF16 too).
3. **The tails.** The min-max range of a group is set by its extreme elements; 4 levels spread over
   it leave the bulk with one or two. Each group's range is shrunk towards its mean to ``clip`` of
   itself (the elements beyond are clipped), which trades a large error on a few elements for a
   smaller one on all the others. Default: 0.8 at 2 bits (close to the MSE-optimal clip of a
   Gaussian there), none at 4 and 8 bits, where 16 levels already resolve the bulk (on SmolLM2's
   tasks at 4 bits, clip 0.9 lost 8 points that clip 1.0 kept).

Perplexity of SmolLM2 on the shipped essay (2,048 tokens, the second half scored, ``residual=32``):
16-bit 27.57, ``kivi(bits=2)`` 34.44, sinks alone 32.07, Hadamard + sinks 29.82, Hadamard + sinks +
clip 0.8 27.50 (Hadamard + clip without sinks 32.79; sinks + clip without Hadamard 28.82).
On the 5 default tasks at 1K tokens (20 samples, accuracy relative to 16-bit's 89.7%) 2-bit rises from
KIVI's 16% to 58%: the retrieval tasks still need more than four levels. At 4 bits it keeps 96%
(``kivi(bits=4)`` 93%). ``value_bits`` gives values a width of their own. ``meta_bits=8`` stores each
group's scale and zero in 8 bits (``quant.MetaQTensor``), halving what the grids cost: on the full essay
(2,980 tokens, half as context) 2-bit KV is then +1.0% at 2.46 bits an element, everything counted.

On CUDA the decode kernel reads the codes as KIVI's (:func:`packed_run`): it attends with the query
times ``H`` and rotates its output back, so nothing is dequantized (keys and values at one width).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field

from memfit.kv.quant import (_FP16_MAX, KIVI, STORED, MetaQTensor, OnCodes, OnKIVI, QTensor, kivi_token_bytes,
                             load_quantized, quantize_keys, quantize_values)
from memfit.lazy import lazy_module

torch = lazy_module("torch")


def hadamard_block(d: int) -> int:
    """Size of the Hadamard blocks used for head dimension ``d``: its largest power-of-two divisor."""
    if d < 1:
        raise ValueError(f"head_dim must be >= 1, got {d}")
    return d & -d


@functools.cache
def _hadamard(d: int, device: str) -> torch.Tensor:
    if device != "cpu":  # built once per device: the torch path reads it at every attention step
        return _hadamard(d, "cpu").to(device)
    n = hadamard_block(d)
    h = torch.ones(1, 1)
    while h.shape[0] < n:  # Sylvester: [[H, H], [H, -H]]
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return torch.block_diag(*[h / math.sqrt(n)] * (d // n))


def hadamard(d: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The orthonormal (block-)Hadamard matrix [d, d] (float32) that rotates a head of width ``d``."""
    return _hadamard(d, str(device))


def rotated_clipped(x: torch.Tensor, axis: str, group: int, clip: float) -> torch.Tensor:
    """``x`` [B, H, N, D] times the Hadamard matrix, each KIVI group's range then clipped to ``clip`` of
    itself (``axis`` "token": keys, groups of ``group`` tokens per channel; "channel": values, groups of
    ``group`` channels per token); float32 [B, H, N, D]."""
    b, h, n, d = x.shape
    xr = x.float() @ hadamard(d, x.device)
    if axis == "token":
        return clip_towards_mean(xr.reshape(b, h, n // group, group, d), clip, 3).reshape(b, h, n, d)
    return clip_towards_mean(xr.reshape(b, h, n, d // group, group), clip, 4).reshape(b, h, n, d)


def clip_towards_mean(x: torch.Tensor, clip: "float | torch.Tensor", dim: int) -> torch.Tensor:
    """``x`` with each slice along ``dim`` clipped to its min-max range shrunk towards its mean by ``clip``
    (a number, or a tensor that broadcasts against ``x``: a fraction per head)."""
    if not isinstance(clip, torch.Tensor) and clip >= 1.0:
        return x
    mean = x.mean(dim, keepdim=True)
    lo = mean + clip * (x.amin(dim, keepdim=True) - mean)
    hi = mean + clip * (x.amax(dim, keepdim=True) - mean)
    return torch.minimum(torch.maximum(x, lo), hi)


@dataclass
class RotatedTensor(OnCodes):
    """KIVI codes of the rotated tensor (``q``), and ``sink`` [B, H, S, D]: some of its tokens exactly
    (16-bit, unrotated), at rows ``sink_at`` of the run (None: its first S), or None. A ragged layer
    stores its heads back to back as one run; each head's first tokens are then sinks of their own."""

    q: QTensor | MetaQTensor
    sink: torch.Tensor | None = None
    sink_at: tuple[int, ...] | None = None
    clip: float | None = None  # with 8-bit grids: the clip fraction spills are encoded with (:meth:`extend`)

    @property
    def extends(self) -> bool:
        """Whether the window's spills are encoded on this run's grid ranges (8-bit grids)."""
        return isinstance(self.q, MetaQTensor) and self.clip is not None

    def like(self, x: torch.Tensor) -> "RotatedTensor":
        """Tokens ``x`` [B, H, n, D] (unrotated; not the layer's first: no sinks) as a run of their own,
        rotated, clipped and encoded on this run's grid ranges (a fork's spills, on its parent's)."""
        return RotatedTensor(self.q.like(rotated_clipped(x, self.q.axis, self.q.group, self.clip)), clip=self.clip)

    def extend(self, x: torch.Tensor) -> "RotatedTensor":
        """Tokens ``x`` after these (the window spilling), encoded on this run's grid ranges."""
        return RotatedTensor(self.q.append(self.like(x).q), self.sink, self.sink_at, self.clip)

    def _rows(self) -> list[int]:
        return list(self.sink_at) if self.sink_at is not None else list(range(self.sink.shape[-2]))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**self.q.tensors(), **({"sink": self.sink} if self.sink is not None else {})}

    def meta(self) -> dict:
        return {"kind": "hadamard", "q": self.q.meta(), **({"sink_at": list(self.sink_at)} if self.sink_at else {}),
                **({"clip": self.clip} if self.clip is not None else {})}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "RotatedTensor":
        at = meta.get("sink_at")
        return cls(load_quantized(t, prefix, meta["q"]), t.get(prefix + "sink"), tuple(at) if at else None,
                   meta.get("clip"))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = self.q.dequantize(torch.float32) @ hadamard(self.shape[-1], self.q.codes.device).T
        if self.sink is not None:
            out[:, :, self._rows()] = self.sink.float()
        return out.to(dtype or torch.float32)

    def rotated_rows(self, rows: list[int], dtype: torch.dtype) -> torch.Tensor:
        """Tokens ``rows`` [B, H, len(rows), D] in the rotated basis, as the codes give them, the sinks
        among them exact (rotated too): what the decode kernel reads in 16-bit for them."""
        d, g = self.shape[-1], self.q.group
        n = min(self.num_tokens, -(-(max(rows) + 1) // g) * g)  # the key groups that hold them
        x = self.q.prefix(n).dequantize(torch.float32)
        if self.sink is not None:
            at = [(i, r) for i, r in enumerate(self._rows()) if r < n]
            x[:, :, [r for _, r in at]] = self.sink[:, :, [i for i, _ in at]].float() @ hadamard(d, x.device)
        return x[:, :, rows].to(dtype)

    def cat(self, other: "RotatedTensor") -> "RotatedTensor":
        """``other``'s tokens after these (a window spilled while decoding): its own sinks, tokens that
        are not the layer's first, are dropped."""
        return RotatedTensor(self.q.cat(other.q), self.sink, self.sink_at, self.clip)

    def join(self, other: "RotatedTensor") -> "RotatedTensor":
        """``other``'s tokens after these, each keeping its sinks (ragged contexts stacked into one
        batch: every head's first tokens stay its sinks)."""
        if (self.sink is None) != (other.sink is None):
            raise ValueError("cannot join rotated runs with and without sinks")
        if self.sink is None:
            return RotatedTensor(self.q.cat(other.q), clip=self.clip)
        at = (*self._rows(), *(r + self.num_tokens for r in other._rows()))
        return RotatedTensor(self.q.cat(other.q), torch.cat([self.sink, other.sink], 2), at, self.clip)

    @staticmethod
    def batch(parts: "list[RotatedTensor]") -> "RotatedTensor":
        """Rows of the same length and sinks (uniform storage) as one batch."""
        if len({p.sink_at for p in parts}) != 1 or len({p.sink is None for p in parts}) != 1:
            raise ValueError("cannot batch rotated runs whose sinks differ")
        sink = torch.cat([p.sink for p in parts]) if parts[0].sink is not None else None
        return RotatedTensor(type(parts[0].q).batch([p.q for p in parts]), sink, parts[0].sink_at, parts[0].clip)

    def prefix(self, n: int) -> "RotatedTensor":
        if self.sink is None:
            return RotatedTensor(self.q.prefix(n), clip=self.clip)
        keep = [i for i, r in enumerate(self._rows()) if r < n]
        at = tuple(self._rows()[i] for i in keep) if self.sink_at is not None else None
        return RotatedTensor(self.q.prefix(n), self.sink[:, :, keep].clone(), at, self.clip)


STORED["hadamard"] = RotatedTensor


@dataclass(frozen=True)
class Hadamard(OnKIVI):
    """``bits``-bit KIVI after a Hadamard rotation, the first ``sinks`` tokens kept in 16-bit and each
    group's range clipped to ``clip`` of itself (None: by ``bits``; see the module docstring).
    ``salient`` > 0: that fraction of a layer's tokens, chosen by KVzip's scores, at ``high_bits``
    (:mod:`memfit.kv.mixed`)."""

    bits: int = 2
    group: int = 64
    residual: int = 128
    sinks: int = 4
    clip: float | None = None  # None: 0.8 at 2 bits, 1.0 (no clipping) above
    value_bits: int | None = field(default=None, metadata={"spec": "if-set"})  # None: ``bits``
    meta_bits: int = field(default=0, metadata={"spec": "if-set"})  # 8: each group's scale and zero in 8 bits
    salient: float = field(default=0.0, metadata={"spec": "if-set"})  # tokens at high_bits, by KVzip's scores
    high_bits: int = field(default=4, metadata={"spec": "if-set"})

    def __post_init__(self) -> None:
        self._check_kivi("hadamard")
        if self.value_bits is not None:
            try:
                KIVI(self.value_bits)
            except ValueError as e:
                raise ValueError(f"hadamard: value_{e}") from None
        if self.sinks < 0:
            raise ValueError(f"hadamard: sinks must be >= 0, got {self.sinks}")
        if self.meta_bits not in (0, 8):
            raise ValueError(f"hadamard: meta_bits must be 0 (float16 scale and zero) or 8, got {self.meta_bits}")
        if self.clip is not None and not 0.0 < self.clip <= 1.0:
            raise ValueError(f"hadamard: clip is the fraction of each group's range kept, in (0, 1], got {self.clip}")
        if not 0.0 <= self.salient <= 1.0:
            raise ValueError(f"hadamard: salient must be a fraction in [0, 1], got {self.salient}")
        if self.salient:
            try:
                KIVI(self.high_bits)
            except ValueError as e:
                raise ValueError(f"hadamard: high_{e}") from None
            if self.high_bits < max(self.bits, self.vbits):
                raise ValueError(f"hadamard: high_bits ({self.high_bits}) must be at least bits and value_bits")

    @property
    def observes(self) -> str | None:
        """What the prefill must record for this quantizer: KVzip's scores, which choose the salient tokens."""
        return "reconstruction" if self.salient else None

    def saliency(self, keys: torch.Tensor, obs, start: int) -> torch.Tensor | None:
        """Each context token's score [B, H, N] for a width: KVzip's (see :mod:`memfit.kv.mixed`)."""
        return obs.reconstruction if self.salient else None

    @property
    def vbits(self) -> int:
        return self.value_bits if self.value_bits is not None else self.bits

    def clip_fraction(self, bits: int) -> float:
        return self.clip if self.clip is not None else (0.8 if bits <= 2 else 1.0)

    def _sink(self, x: torch.Tensor, starts: "list[int] | None",
              first: bool) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
        """The sinks of a run (a decode spill's are dropped again by ``RotatedTensor.cat``): its first
        tokens, or with ``starts`` (where each head begins in a ragged layer's run) each head's first;
        none when the run is not the first of its layer (``first=False``: a fork's, or what follows
        a ragged context)."""
        if not self.sinks or not first:
            return None, None
        rows = None
        if starts is not None:
            ends = [*starts[1:], x.shape[-2]]
            rows = tuple(r for s, e in zip(starts, ends) for r in range(s, min(s + self.sinks, e)))
        sink = x[:, :, : self.sinks] if rows is None else x[:, :, list(rows)]
        return sink.float().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16), rows  # float16 holds no more

    def quantize_keys(self, k: torch.Tensor, starts: "list[int] | None" = None, first: bool = True,
                      scores: torch.Tensor | None = None) -> "RotatedTensor | mixed.MixedTensor":
        """``starts``: where each head's tokens begin when ``k`` is a ragged layer's heads back to back;
        ``first``: whether these are the layer's first tokens (only those have sinks); ``scores``
        [B, H, N]: with ``salient``, which tokens take ``high_bits``."""
        if self.salient:
            return mixed.encode(self, k, "keys", starts, first, scores)
        n = k.shape[-2]
        if n % self.group:
            raise ValueError(f"key quantization needs a multiple of group={self.group} tokens, got {n}")
        x = rotated_clipped(k, "token", self.group, self.clip_fraction(self.bits))
        if self.meta_bits:
            return RotatedTensor(MetaQTensor.encode(x, self.bits, "token", self.group), *self._sink(k, starts, first),
                                 self.clip_fraction(self.bits))
        return RotatedTensor(quantize_keys(x, self.bits, self.group), *self._sink(k, starts, first))

    def quantize_values(self, v: torch.Tensor, starts: "list[int] | None" = None, first: bool = True,
                        scores: torch.Tensor | None = None) -> "RotatedTensor | mixed.MixedTensor":
        if self.salient:
            return mixed.encode(self, v, "values", starts, first, scores)
        g = self.value_group(v.shape[-1])
        x = rotated_clipped(v, "channel", g, self.clip_fraction(self.vbits))
        if self.meta_bits:
            return RotatedTensor(MetaQTensor.encode(x, self.vbits, "channel", g), *self._sink(v, starts, first),
                                 self.clip_fraction(self.vbits))
        return RotatedTensor(quantize_values(x, self.vbits, g), *self._sink(v, starts, first))

    def _token_bytes(self, bits: float, d: int) -> float:
        return kivi_token_bytes(bits, d, self.group, self.value_group(d), grid_bytes=2 if self.meta_bits else 4)

    def _two_widths(self, low: float, high: float, d: int) -> float:
        """``low`` tokens at ``bits`` / ``value_bits`` and ``high`` salient ones at ``high_bits``, each
        salient token with its int32 position for keys and for values."""
        return low * self._token_bytes((self.bits + self.vbits) / 2, d) \
            + high * (self._token_bytes(self.high_bits, d) + 2 * 4)

    def token_bytes(self, d: int) -> float:
        """A token's bytes; with ``salient``, a bound (the salient count is rounded down)."""
        return self._two_widths(1 - self.salient, self.salient, d)

    def run_bytes(self, n: int, d: int) -> float:
        """One head's run of ``n`` quantized tokens, exactly (the salient count rounds per run)."""
        s = mixed.salient_count(self, n) if self.salient else 0
        return self._two_widths(n - s, s, d)

    def fixed_bytes(self, heads: int, d: int) -> float:
        ranges = heads * (d + 1) * 4 * 2 if self.meta_bits else 0  # a run's grid ranges: each key channel, each head
        if self.salient and ranges:  # a row's heads stored back to back: the low and the salient run
            ranges = 2 * (d + 1) * 4 * 2  # have one set of grid ranges each
        return 2 * heads * self.sinks * d * 2 + ranges  # each head's sinks, keys and values, float16


def first_group(qk: RotatedTensor, qv: RotatedTensor, dtype: torch.dtype) -> list[torch.Tensor]:
    """Keys and values [B, H, group, D] of the first key group as the kernel reads them in 16-bit
    (rotated; the sinks exact)."""
    rows = list(range(qk.q.group))
    return [qk.rotated_rows(rows, dtype), qv.rotated_rows(rows, dtype)]


def past_first_group(k: QTensor, v: QTensor) -> list[torch.Tensor]:
    """Key and value codes, scales and zeros from the second key group on (views)."""
    g = k.group
    return [k.codes[:, :, g:], k.scale[:, :, 1:], k.zero[:, :, 1:], v.codes[:, :, g:], v.scale[:, :, g:],
            v.zero[:, :, g:]]


def packed_run(qk: RotatedTensor, qv: RotatedTensor, rows: int, dtype: torch.dtype, ragged: "dict | None" = None):
    """Rotated codes as a run the decode kernel reads (:class:`PackedRun` with ``rotation``): the
    query is rotated instead of every key. Each head's first key group, which holds its sinks, is
    read in 16-bit (the codes' values, the sinks exact; rotated), so that no sink is read twice, and
    the codes from its second group on (runs start at whole key groups). ``ragged``: the flat
    layout's per-head ``nq`` (host list) and ``rows`` (its batch), else the uniform [B, H, N] one."""
    from memfit.kernels.decode_attention import PackedRun

    g, bits = qk.q.group, qk.q.bits
    rot = hadamard(qk.shape[-1], qk.q.codes.device)
    if ragged is None:
        b, h, n, _ = qk.shape
        t = [*past_first_group(qk.q, qv.q), *first_group(qk, qv, dtype)]
        if b != rows:  # a parent's codes, read by every row of its fork
            t = [x.expand(rows, *x.shape[1:]) for x in t]
        return PackedRun(*t, n - g, g, bits, g, rotation=rot, vbits=qv.q.bits)
    nq, nrows = ragged["nq"], ragged["rows"]
    starts = [0, *itertools.accumulate(nq)][:-1]
    live = [q > 0 for q in nq]
    head_rows = [s + i for s, q in zip(starts, live) if q for i in range(g)]
    head = [x.rotated_rows(head_rows, dtype) for x in (qk, qv)]
    dev = qk.q.codes.device
    at = lambda xs: torch.tensor(xs, dtype=torch.int64, device=dev).reshape(nrows, -1)  # noqa: E731
    hstart = [0, *itertools.accumulate(g * q for q in live)][:-1]
    return PackedRun(qk.q.codes, qk.q.scale, qk.q.zero, qv.q.codes, qv.q.scale, qv.q.zero, *head,
                     at([q - g * a for q, a in zip(nq, live)]).int(), at([g * a for a in live]).int(), bits, g,
                     qoff=at([s + g * a for s, a in zip(starts, live)]), woff=at(hstart),
                     nq=max(q - g * a for q, a in zip(nq, live)), nw=g if any(live) else 0,
                     total_q=sum(nq) - g * sum(live), rotation=rot, vbits=qv.q.bits)


from memfit.kv import mixed  # noqa: E402  (its storage, registered on import, builds on this module's)
