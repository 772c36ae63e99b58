"""Ragged storage: a layer whose KV heads (and rows) keep different numbers of tokens (adaptive or
global eviction, contexts batched together), stored back to back without padding."""

from __future__ import annotations

import itertools
from dataclasses import replace

import torch

from memfit.kernels import packing
from memfit.kernels.decode_attention import PackedRun
from memfit.kv import rotate
from memfit.kv.quant import KIVI, MetaQTensor, QTensor, kernel_outliers, load_pair, load_quantized
from memfit.kv.rope import RoPE
from memfit.kv.rotate import RotatedTensor

KEYS, VALUES = "r_k_", "r_v_"  # the prefixes of the quantized keys' and values' tensors in a layer's state
TIER = "r_t_"  # and of the key-only tier's


def _starts(lens: torch.Tensor) -> torch.Tensor:
    """Where each run of ``lens`` starts when they are stored back to back (int64)."""
    return torch.cumsum(lens.long(), 0) - lens.long()


def _kept_bits(positions: list[torch.Tensor], start: int, n: int) -> torch.Tensor:
    """Which of the context's ``n`` tokens (from position ``start``) each head holds, one bit a token
    (uint8 [H, ceil(n / 8)]): what puts RoPE back on keys stored before it."""
    bits = torch.zeros(len(positions), n, dtype=torch.uint8, device=positions[0].device)
    for h, p in enumerate(positions):
        bits[h, p - start] = 1
    return packing.pack_planes(bits, 1)[0]


def _kept_positions(kept: torch.Tensor, span: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    """Inverse of :func:`_kept_bits`: each head's first ``counts[h]`` positions, ascending."""
    start, n = span.tolist()
    bits = packing.unpack_planes(kept.unsqueeze(0), n).bool()
    return [row.nonzero().squeeze(1)[:q] + start for row, q in zip(bits, counts)]


def _widened(r: PackedRun, rows: int) -> PackedRun:
    """A one-row flat run read by ``rows`` rows: the same storage, each row its heads."""
    wide = {n: getattr(r, n).expand(rows, -1).contiguous() for n in ("qoff", "woff", "qlen", "wlen")
            if isinstance(getattr(r, n), torch.Tensor)}
    if r.total_q is not None:
        wide["total_q"] = r.total_q * rows
    for n in ("kout", "vout"):  # each row reads the same outliers
        o = getattr(r, n)
        if o is not None:
            wide[n] = replace(o, ptr=o.ptr.expand(rows, -1, -1))
    return PackedRun(**{**r.__dict__, **wide})


class Ragged:
    """Per-head token counts that differ (adaptive eviction), stored without padding: every row and
    head's tokens back to back (row-major), as one flat [1, 1, T, D] sequence. With a quantizer each
    head's oldest tokens are quantized in whole key groups (so no group spans two heads) and the rest
    kept in 16-bit, as the uniform window would be. ``rows``: the batch size (contexts compressed
    one by one and stacked for decoding together).

    Keys quantized before RoPE (klt after an eviction) come back at each kept token's own position:
    ``span`` (int64 [2]: the context's first position and its length) and ``kept`` (uint8
    [H, ceil(length / 8)], one bit a context token per head, set where the head kept it; counted,
    about 1 / keep bits a stored token) say where."""

    def __init__(self, lens: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qk: QTensor | None = None,
                 qv: QTensor | None = None, rows: int = 1, span: torch.Tensor | None = None,
                 kept: torch.Tensor | None = None, tier: "KeyTier | None" = None):
        self.lens = lens  # int32 [2, rows * H]: tokens per row and head, of which quantized
        self.k, self.v, self.qk, self.qv, self.rows = k, v, qk, qv, rows
        self.span, self.kept = span, kept
        self.tier = tier  # the eviction's key-only tokens (``keys=``), read after each head's own
        self._pos: list[torch.Tensor] | None = None
        total, nq = lens[0].tolist(), lens[1].tolist()  # one read of the small table: sizes are host numbers
        padded = total if tier is None else [n + t for n, t in zip(total, tier.counts)]
        self.max_len, self.max_q = max(padded), max(nq)
        self.max_w = max(n - q for n, q in zip(total, nq))
        self._host = (total, nq)
        self._runs: list[PackedRun] | None = None
        self._wide: dict[int, list[PackedRun]] = {}  # the runs as read by a fork of so many rows

    @property
    def heads(self) -> int:
        return self.lens.shape[1] // self.rows

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, idx: list[torch.Tensor], quant: KIVI | None,
              scores: torch.Tensor | None = None, weight: torch.Tensor | None = None,
              positions: torch.Tensor | None = None, span: tuple[int, int] | None = None,
              rope: RoPE | None = None, tier: list[torch.Tensor] | None = None) -> "Ragged":
        """Each head's tokens ``idx[h]`` of ``keys``/``values`` [1, H, N, D]; ``scores`` [1, H, N]: a
        quantizer's saliency of the tokens (ZipCache's, salient widths'), if it scored them; ``weight`` [1, H, D]: the
        queries' mean square per channel (klt's fit). A quantizer that codes keys before RoPE
        (``pre_rope``) also takes each token's position ``positions`` [1, H, N], the context's
        ``span`` (first position, length) and the model's ``rope``: each head's quantized keys come
        off RoPE at their own positions and are coded on a basis of their own. ``tier``: each head's
        key-only tokens (an eviction's ``keys=``, see :class:`KeyTier`)."""
        ks = [keys[0, h, i] for h, i in enumerate(idx)]
        vs = [values[0, h, i] for h, i in enumerate(idx)]
        lens = [len(i) for i in idx]
        nq = [quant.spilled(n) if quant is not None else 0 for n in lens]
        flat = lambda parts: torch.cat(parts).unsqueeze(0).unsqueeze(0)  # noqa: E731
        qk = qv = kept = None
        if positions is not None:
            if rope is None or span is None:
                raise ValueError("keys coded before RoPE need the model's RoPE and the context's span")
            pos = [positions[0, h, i] for h, i in enumerate(idx)]
            span = torch.tensor(span, dtype=torch.int64, device=keys.device)
            kept = _kept_bits(pos, int(span[0]), int(span[1]))
        if sum(nq):
            # a quantizer that keeps a run's first tokens apart (sinks) keeps each head's
            runs = {"starts": [s for s, q in zip(itertools.accumulate([0, *nq]), nq) if q]} if getattr(quant, "sinks", 0) else {}
            if scores is not None:
                runs["scores"] = flat([scores[0, h, i][:q] for h, (i, q) in enumerate(zip(idx, nq))])
            if positions is not None:  # off RoPE at each token's own position, a basis a head
                rope.check(keys.shape[-1])
                qk = quant.quantize_heads([rope.unrotate(k[:q].unsqueeze(0).unsqueeze(0), p[:q])[0, 0]
                                           for k, p, q in zip(ks, pos, nq)], weight)
            else:
                if weight is not None:
                    runs["weight"] = weight.mean(1, keepdim=True)
                qk = quant.quantize_keys(flat([k[:q] for k, q in zip(ks, nq)]), **runs)
            qv = quant.quantize_values(flat([v[:q] for v, q in zip(vs, nq)]), **runs)
        lens_t = torch.tensor([lens, nq], dtype=torch.int32, device=keys.device)
        key_tier = None
        if tier is not None:
            where = None if positions is None else (positions, span, rope)
            key_tier = KeyTier.build(keys, values, tier, quant, weight, where)
        return cls(lens_t, flat([k[q:] for k, q in zip(ks, nq)]), flat([v[q:] for v, q in zip(vs, nq)]), qk, qv,
                   span=span if kept is not None else None, kept=kept, tier=key_tier)

    @property
    def end(self) -> int | None:
        """The position after the context's last token (None: keys stored after RoPE)."""
        return None if self.span is None else int(self.span.sum())

    def positions(self) -> list[torch.Tensor]:
        """Each head's quantized tokens' positions (pre-RoPE storage), decoded once from ``kept``."""
        if self._pos is None:
            self._pos = _kept_positions(self.kept, self.span, self._host[1])
        return self._pos

    @classmethod
    def stack(cls, parts: "list[Ragged]") -> "Ragged":
        """The rows of ``parts`` as one batch (their heads and quantization must agree)."""
        if len({p.heads for p in parts}) != 1:
            raise ValueError("cannot stack ragged layers with different numbers of KV heads")
        if any(p.span is not None for p in parts):
            raise ValueError("cannot stack ragged layers with keys stored before RoPE")
        if any(p.tier is not None for p in parts):
            raise ValueError("cannot stack ragged layers with a key-only tier (keys=)")
        quantized = [p.qk is not None for p in parts]
        qk = qv = None
        if any(quantized):
            if not all(quantized):  # a part whose heads all fit in their windows: nothing to concatenate
                raise ValueError("cannot stack ragged layers of which only some hold quantized tokens")
            if any(isinstance(getattr(p.qk, "q", p.qk), MetaQTensor) for p in parts):
                raise ValueError("cannot stack ragged layers with 8-bit grids (meta_bits=8): each context's codes "
                                 "are on grid ranges of their own")
            qk, qv = parts[0].qk, parts[0].qv
            for p in parts[1:]:  # rotated codes keep every context's sinks
                join = "join" if isinstance(qk, RotatedTensor) else "cat"
                qk, qv = getattr(qk, join)(p.qk), getattr(qv, join)(p.qv)
        return cls(torch.cat([p.lens for p in parts], 1), torch.cat([p.k for p in parts], 2),
                   torch.cat([p.v for p in parts], 2), qk, qv, rows=sum(p.rows for p in parts))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"r_lens": self.lens, "r_k": self.k, "r_v": self.v}
        if self.span is not None:
            out.update({"r_span": self.span, "r_kept": self.kept})
        if self.qk is not None:
            out.update({f"{KEYS}{n}": t for n, t in self.qk.tensors().items()})
            out.update({f"{VALUES}{n}": t for n, t in self.qv.tensors().items()})
        if self.tier is not None:
            out.update({f"{TIER}{n}": t for n, t in self.tier.tensors().items()})
        return out

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], q: dict | None, rows: int = 1,
                     tier: dict | None = None) -> "Ragged":
        """Inverse of :meth:`tensors`; ``tier``: the key-only tier's description (:meth:`KeyTier.meta`)."""
        qk = qv = None
        if q is not None and any(n.startswith(KEYS) for n in t):
            qk, qv = load_pair(t, KEYS, VALUES, q)
        key_tier = None
        if tier is not None:
            key_tier = KeyTier.from_tensors({n.removeprefix(TIER): v for n, v in t.items() if n.startswith(TIER)}, tier)
        return cls(t["r_lens"], t["r_k"], t["r_v"], qk, qv, rows, t.get("r_span"), t.get("r_kept"), key_tier)

    def runs(self, rows: int, quant: KIVI | None) -> list[PackedRun]:
        """This storage as the decode kernel reads it (flat, from per-row-and-head offsets); a
        single-row ragged layer read by ``rows`` rows (a fork's parent) gives each row its heads.
        Rotated codes (``RotatedTensor``) are one run and the 16-bit tails another (unrotated)."""
        if self._runs is None:
            h = self.heads
            total, nq = self.lens[0], self.lens[1]
            qoff, woff = _starts(nq).reshape(self.rows, h), _starts(total - nq).reshape(self.rows, h)
            qlen, wlen = nq.reshape(self.rows, h), (total - nq).reshape(self.rows, h)
            bits, group = (quant.bits, quant.group) if quant is not None else (4, 64)
            if self.qk is None:
                runs = [PackedRun.window_only(self.k, self.v, wlen, bits, group, qoff=qoff, woff=woff, nw=self.max_w)]
            elif isinstance(self.qk, RotatedTensor):
                runs = [rotate.packed_run(self.qk, self.qv, self.rows, self.k.dtype,
                                          ragged={"nq": self._host[1], "rows": self.rows}),
                        PackedRun.window_only(self.k, self.v, wlen, bits, group, qoff=qoff, woff=woff, nw=self.max_w)]
            else:
                out = {n: kernel_outliers(t, self.rows, self.qk.group, ragged=(qoff, qlen))  # sparse outliers
                       for n, t in (("kout", self.qk), ("vout", self.qv))}
                runs = [PackedRun(self.qk.codes, self.qk.scale, self.qk.zero, self.qv.codes, self.qv.scale,
                                  self.qv.zero, self.k, self.v, qlen, wlen, self.qk.bits, self.qk.group, qoff=qoff,
                                  woff=woff, nq=self.max_q, nw=self.max_w, total_q=sum(self._host[1]), **out)]
            self._runs = runs
        if rows == self.rows:
            return self._runs
        if self.rows != 1:
            raise ValueError(f"ragged storage of {self.rows} rows read by {rows}")
        if rows not in self._wide:  # built once: a fork's every decode step reads them
            self._wide[rows] = [_widened(r, rows) for r in self._runs]
        return self._wide[rows]

    def dense(self, dtype: torch.dtype, rope: RoPE | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Padded [rows, H, max_len, D] keys and values and the [rows, H, max_len] mask of real entries
        (``rope``: the model's, which keys stored before RoPE need back)."""
        lens, nq = self._host
        if self.span is not None and self.qk is not None:
            if rope is None:
                raise ValueError("this ragged layer's keys are stored before RoPE: reading them needs the model's RoPE")
            pre = self.qk.dequantize(torch.float32)[0, 0].split(nq)
            qk = [rope.rotate(k.unsqueeze(0).unsqueeze(0), p)[0, 0].to(dtype) for k, p in zip(pre, self.positions())]
        else:
            qk = self.qk.dequantize(dtype)[0, 0].split(nq) if self.qk is not None else [None] * len(lens)
        qv = self.qv.dequantize(dtype)[0, 0].split(nq) if self.qv is not None else [None] * len(lens)
        wk = self.k[0, 0].split([n - q for n, q in zip(lens, nq)])
        wv = self.v[0, 0].split([n - q for n, q in zip(lens, nq)])
        m, d, h = self.max_len, self.k.shape[-1], self.heads
        k = self.k.new_zeros(self.rows * h, m, d, dtype=dtype)
        v = self.v.new_zeros(self.rows * h, m, self.v.shape[-1], dtype=dtype)
        mask = torch.zeros(self.rows * h, m, dtype=torch.bool, device=self.k.device)
        tk = self.tier.keys(dtype, rope) if self.tier is not None else None
        for i, n in enumerate(lens):
            k[i, :n] = torch.cat([t for t in (qk[i], wk[i]) if t is not None])
            v[i, :n] = torch.cat([t for t in (qv[i], wv[i]) if t is not None])
            mask[i, :n] = True
            if tk is not None and len(tk[i]):  # the key-only tokens: their keys, and the head's one mean value
                t = len(tk[i])
                k[i, n : n + t], v[i, n : n + t], mask[i, n : n + t] = tk[i], self.tier.mean[i].to(dtype), True
        return (k.reshape(self.rows, h, m, d), v.reshape(self.rows, h, m, -1), mask.reshape(self.rows, h, m))


class KeyTier:
    """The tokens an eviction keeps for their keys alone (``keys=``, one context row): attention over
    them stays on them instead of moving to the kept tokens, and what they add to a head's output is
    that attention times one value, the mean of their values. Their keys are coded as the layer's
    quantizer codes keys at its ``tier_bits`` (``tier_coder``: klt, before RoPE, a basis a head) in
    whole key groups, the rest kept in 16-bit after RoPE; without a quantizer all in 16-bit.

    ``lens`` int32 [2, H]: each head's key-only tokens, of which coded; ``k`` [1, 1, T, D]: the
    16-bit rest, heads back to back; ``mean`` [H, Dv]; ``span`` and ``kept`` as :class:`Ragged`'s
    (where the coded keys sit, for RoPE)."""

    def __init__(self, lens: torch.Tensor, k: torch.Tensor, mean: torch.Tensor, qk=None,
                 span: torch.Tensor | None = None, kept: torch.Tensor | None = None):
        self.lens, self.k, self.mean, self.qk, self.span, self.kept = lens, k, mean, qk, span, kept
        self.counts, self.coded = lens[0].tolist(), lens[1].tolist()

    @classmethod
    def build(cls, keys: torch.Tensor, values: torch.Tensor, idx: list[torch.Tensor], quant, weight=None,
              where: tuple | None = None) -> "KeyTier":
        """Each head's key-only tokens ``idx[h]`` (sorted) of ``keys``/``values`` [1, H, N, D];
        ``where``: (positions [1, H, N], span, rope) when the quantizer codes keys before RoPE."""
        coder = None
        if quant is not None:
            if not hasattr(quant, "tier_coder"):
                raise ValueError(f"a key-only tier (keys=) is coded by klt or kept in 16-bit without a quantizer, "
                                 f"not by {type(quant).__name__}")
            coder = quant.tier_coder()
        ks = [keys[0, h, i] for h, i in enumerate(idx)]
        mean = torch.stack([values[0, h, i].float().mean(0) if len(i) else values.new_zeros(values.shape[-1]).float()
                            for h, i in enumerate(idx)]).to(values.dtype)
        nq = [len(i) // coder.group * coder.group if coder is not None else 0 for i in idx]
        qk = span = kept = None
        if sum(nq):
            pre = [k[:q].float() for k, q in zip(ks, nq)]
            if where is not None:  # off RoPE at each token's position, which ``kept`` records
                positions, span, rope = where
                start, n = (int(x) for x in span)
                pos = [positions[0, h, i][:q] for h, (i, q) in enumerate(zip(idx, nq))]
                pre = [rope.unrotate(k[None, None], p)[0, 0] for k, p in zip(pre, pos)]
                span = torch.tensor([start, n], dtype=torch.int64, device=keys.device)
                kept = _kept_bits(pos, start, n)
            qk = coder.quantize_heads(pre, weight)
        lens = torch.tensor([[len(i) for i in idx], nq], dtype=torch.int32, device=keys.device)
        rest = torch.cat([k[q:] for k, q in zip(ks, nq)]).unsqueeze(0).unsqueeze(0)
        return cls(lens, rest, mean, qk, span, kept)

    def keys(self, dtype: torch.dtype, rope: RoPE | None = None) -> list[torch.Tensor]:
        """Each head's key-only keys [t_h, D], after RoPE."""
        h = len(self.counts)
        coded = [None] * h
        if self.qk is not None:
            coded = list(self.qk.dequantize(torch.float32)[0, 0].split(self.coded))
            if self.span is not None:
                if rope is None:
                    raise ValueError("this layer's key-only keys are stored before RoPE: reading them needs the "
                                     "model's RoPE")
                coded = [rope.rotate(c[None, None], p)[0, 0]
                         for c, p in zip(coded, _kept_positions(self.kept, self.span, self.coded))]
        rest = self.k[0, 0].split([n - q for n, q in zip(self.counts, self.coded)])
        return [torch.cat([t.to(dtype) for t in (c, r) if t is not None]) for c, r in zip(coded, rest)]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"lens": self.lens, "k": self.k, "mean": self.mean}
        if self.span is not None:
            out.update({"span": self.span, "kept": self.kept})
        if self.qk is not None:
            out.update({f"q_{n}": t for n, t in self.qk.tensors().items()})
        return out

    def meta(self) -> dict:
        return {"qk": None if self.qk is None else self.qk.meta()}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], meta: dict) -> "KeyTier":
        qk = load_quantized(t, "q_", meta["qk"]) if meta.get("qk") is not None else None
        return cls(t["lens"], t["k"], t["mean"], qk, t.get("span"), t.get("kept"))
