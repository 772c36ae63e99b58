"""Transform-coded keys: a KLT basis per head fitted on the context, and bits where the error is.

Pre-RoPE keys of a head are far from isotropic: a few directions carry most of their variance (the
projection ``W_k`` of a residual stream with a few dominant directions). Giving every channel the
same two bits, as KIVI and the rotated quantizer do, spends as much on a near-constant direction as
on the one that moves attention. Transform coding does what image codecs do instead:

1. **Weights.** A key error ``e`` moves the logits by ``q . e``. The context's last ``queries``
   queries (the prefill records them) give each channel's mean square ``E[q_i^2]``, the two channels
   of a RoPE pair averaged (RoPE rotates them into each other by the query-key distance): keys are
   scaled by its root, so that a squared error is one of the logits (none without a prefill).
2. **Basis.** At the context's first spill each KV head's scaled pre-RoPE keys are rotated into
   the eigenbasis of their covariance (the Karhunen-Loeve transform), fitted on the context itself
   and stored with it (int8 columns with a float16 scale: ``head_dim**2`` bytes a head, counted).
3. **Widths.** Each component gets its own width, 0 to ``max_bits``, by greedy reverse
   water-filling of the layer's ``bits * heads * head_dim`` bits over all its heads' components
   (each bit where it removes the most logit error, modelling a component as a Gaussian of its
   variance on Max's levels). A 0-bit component is its mean over the fitted tokens: its column
   of the basis is not stored, only what it adds to every key (``offset``, one vector a head;
   per-group means of those components measured no better: perplexity +2.4% / +1.9% without,
   +2.6% / +2.0% with, at ``bits=1.5`` on the two texts below).
4. **Codes.** Each component is quantized per channel over groups of ``group`` tokens, as KIVI keys
   are, its range clipped towards the mean by its width (0.5 at 1 bit, 0.8 at 2, 0.9 at 3, none
   above), the grid stored as two 8-bit codes a group (``log2`` of the step on eighths of an
   octave, the zero in steps from the run's component mean). Codes of any width are bit planes,
   packed along tokens.
5. **Around it.** The first ``sinks`` tokens stay exact (float16); later spills and a fork's tokens
   are coded on the fitted basis; RoPE is put back on read (keys stored before it, as
   ``kivi(pre_rope=true)`` does; a fork takes it off at its own positions); values are the rotated
   quantizer's (``hadamard`` per-token ``value_bits`` codes, 8-bit grids); with ``salient`` that
   fraction of the tokens KVzip's scores rank highest keep their values at ``high_bits``
   (:mod:`memfit.kv.mixed`): a value's error reaches the output weighted by the attention it gets,
   and those scores are the largest attention a token gets while the model repeats the context.

SmolLM2, perplexity with half of a held-out text as context, ``residual=32``, everything counted
(``memfit.eval.perplexity.perplexity_and_bits``): the first 12,000 characters of docs/store.md (none
19.56) ``hadamard(bits=2,meta_bits=8)`` 22.21 (+13.5%) at 2.74 bits an element, ``klt(bits=1.5)``
20.07 (+2.6%) at 2.56, ``klt(bits=2)`` 20.02 (+2.3%) at 2.80; of docs/gpu.md (none 21.59) 23.28
(+7.8%) at 2.43, 22.02 (+2.0%) at 2.23, 21.91 (+1.5%) at 2.48.

After an eviction the layer is stored ragged with one bit a context token per head saying which
tokens the head kept (counted), so the keys are still coded before RoPE, each head on a basis of its
own (:meth:`KLT.quantize_heads`, the widths allocated over all heads); the tokens after that context
(the layer's own, a fork's) are coded on those bases (:meth:`KLTHeads.like`). ``pre_rope=false`` codes them
after RoPE instead, the heads of a ragged layer sharing one basis: measured, that loses most of what
eviction keeps (see docs/evaluation.md). Torch path only: the decode kernel reads KIVI's codes, not
these.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

from memfit.kv.quant import _FP16_MAX, KIVI, STORED, OnKIVI, Stored
from memfit.kv.rotate import Hadamard
from memfit.lazy import lazy_module

torch = lazy_module("torch")
packing = lazy_module("memfit.kernels.packing")
mixed = lazy_module("memfit.kv.mixed")

# Mean square error of Max's optimal b-level quantizer of a unit Gaussian (b = 0: the mean alone):
# the allocation's model of what one more bit removes from a component of variance s (s * difference).
GAUSS_MSE = (1.0, 0.3634, 0.1175, 0.03454, 0.009497, 0.002499, 0.000642)
CLIP = (1.0, 0.5, 0.8, 0.9, 1.0, 1.0, 1.0)  # each width's clip of a group's range (1-bit: near Max's +-0.8 sigma)
STEP_OCTAVES = 20  # 8-bit step codes cover 2**-20 .. 2**12 in eighths of an octave


def allocate(var: torch.Tensor, mean_bits: float, max_bits: int) -> torch.Tensor:
    """Widths [..., D] (int64, 0..``max_bits``) for components of variances ``var`` [..., D] with
    ``round(mean_bits * D)`` bits in all per row: each bit where it removes the most error. A bit's
    gain shrinks with the bits a component already has, so the greedy choice is the best gains
    over every (component, next bit) pair, taken at once."""
    mse = torch.tensor(GAUSS_MSE[: max_bits + 1], dtype=torch.float32, device=var.device)
    gain = var.float().clamp_min(0).unsqueeze(-1) * (mse[:-1] - mse[1:])  # [..., D, max_bits]
    flat = gain.flatten(-2)
    take = flat.topk(round(mean_bits * var.shape[-1]), dim=-1).indices
    picked = torch.zeros_like(flat, dtype=torch.int64).scatter_(-1, take, 1)
    return picked.reshape(gain.shape).sum(-1)


@dataclass
class KLTFit:
    """What a layer's first run fits and its later runs (spills, a fork's tokens) are coded on: the
    basis [B, H, D, D] (columns: components) as int8 ``basis_codes`` times a float16 ``basis_scale``
    [B, H, 1, D] a column (0.4% of a column's largest entry: far below 2-bit codes' error, half of
    float16's bytes), ``center`` [B, H, 1, D] float16 (each component's mean over the fitted
    tokens), ``widths`` [B, H, D] uint8 and ``weight`` [B, H, 1, D] float16: each channel's scale
    before the basis, the root of the queries' mean square there (ones: unweighted). Keys are coded
    as ``(k * weight) @ basis``, in whose units a squared error is one of the logits ``q . k``.

    0-bit components have zero columns and centers (neither stored): ``offset`` [B, H, 1, D]
    float16 is what their means add to every scaled key. None: a fit stored before offsets, whose
    0-bit components kept per-group means (still read)."""

    basis_codes: torch.Tensor
    basis_scale: torch.Tensor
    center: torch.Tensor
    widths: torch.Tensor
    weight: torch.Tensor
    offset: torch.Tensor | None = None

    @classmethod
    def fit(cls, k: torch.Tensor, mean_bits: float, max_bits: int, weight: torch.Tensor | None = None) -> "KLTFit":
        """``weight`` [B, H, D]: the queries' mean square per channel (see :func:`query_weight`)."""
        return cls.fit_runs([k], mean_bits, max_bits, None if weight is None else [weight])[0]

    @classmethod
    def fit_runs(cls, ks: "list[torch.Tensor]", mean_bits: float, max_bits: int,
                 weights: "list[torch.Tensor] | None" = None) -> "list[KLTFit]":
        """One fit per run of keys ``ks[i]`` [B, H, N_i, D] (a ragged layer's heads: one run each),
        the bits allocated over all their components together; ``weights[i]`` [B, H, D] as in :meth:`fit`."""
        if weights is None:
            weights = [torch.ones(k.shape[0], k.shape[1], k.shape[-1], device=k.device) for k in ks]
        ws = [w.float().clamp_min(0).sqrt() for w in weights]
        # one scale for all the runs' heads: their errors compare
        mean = torch.cat([w.flatten(1) for w in ws], 1).mean(1).clamp_min(1e-12).reshape(-1, 1, 1)
        ws = [(w / mean).clamp(2.0**-12, 2.0**12).unsqueeze(-2).to(torch.float16) for w in ws]  # float16-safe
        xs = [k.float() * w.float() for k, w in zip(ks, ws)]
        eig = []
        for x in xs:
            xc = x - x.mean(-2, keepdim=True)
            eig.append(torch.linalg.eigh(xc.transpose(-1, -2) @ xc / max(x.shape[-2], 1)))
        # the bits go where they remove the most logit error, whichever head that is
        b = ks[0].shape[0]
        widths = allocate(torch.cat([var.reshape(b, -1) for var, _ in eig], 1), mean_bits, max_bits)
        fits, at = [], 0
        for x, w, (var, basis) in zip(xs, ws, eig):
            scale = (basis.abs().amax(-2, keepdim=True) / 127).clamp_min(1e-8).to(torch.float16)
            codes = (basis / scale.float()).round().clamp(-127, 127).to(torch.int8)
            width = widths[:, at : at + var[0].numel()].reshape(var.shape)
            at += var[0].numel()
            # coded on the basis as stored, so that encoding and decoding use one matrix
            matrix = codes.float() * scale.float()
            center = (x @ matrix).mean(-2, keepdim=True)
            zero = (width == 0).unsqueeze(-2)  # [B, H, 1, D]: components coded as their mean alone
            offset = (center * zero) @ matrix.transpose(-1, -2)
            codes = codes.masked_fill(zero, 0)
            center = center.masked_fill(zero, 0)
            fp16 = lambda t: t.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16)  # noqa: E731
            fits.append(cls(codes, scale, fp16(center), width.to(torch.uint8), w, fp16(offset)))
        return fits

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor], prefix: str) -> "KLTFit":
        """The fit :meth:`tensors` stored (or one stored whole, before offsets)."""
        names = ("basis_codes", "basis_scale", "center", "widths", "weight")
        codes, scale, center, widths, weight = (t[prefix + name] for name in names)
        if prefix + "offset" not in t:
            return cls(codes, scale, center, widths, weight)
        live = widths != 0
        b, h, d = widths.shape
        if codes.shape != (int(live.sum()), d) or scale.shape != codes.shape[:1]:
            raise ValueError(f"klt: stored basis {tuple(codes.shape)} does not match its widths' "
                             f"{int(live.sum())} coded components of {d} channels")
        full = codes.new_zeros(b, h, d, d)
        full[live] = codes  # [B, H, component, channel]
        sc = scale.new_ones(b, h, d)
        sc[live] = scale
        return cls(full.transpose(-1, -2), sc.unsqueeze(-2), center, widths, weight, t[prefix + "offset"])

    @functools.cached_property
    def matrix(self) -> torch.Tensor:
        """The basis as stored, float32 [B, H, D, D]."""
        return self.basis_codes.float() * self.basis_scale.float()

    def forward(self, k: torch.Tensor) -> torch.Tensor:
        """Keys [B, H, N, D] -> their components (centered), float32."""
        return (k.float() * self.weight.float()) @ self.matrix - self.center.float()

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        x = (y + self.center.float()) @ self.matrix.transpose(-1, -2)
        if self.offset is not None:
            x = x + self.offset.float()
        return x / self.weight.float()

    @functools.cached_property
    def channels(self) -> dict[int, torch.Tensor]:
        """Width -> the flat indices (into B * H * D) of the components of that width (0-bit ones
        only in a fit from before offsets, where they kept group means)."""
        flat = self.widths.reshape(-1).long()
        return {int(w): (flat == w).nonzero().squeeze(1) for w in flat.unique() if w or self.offset is None}

    def tensors(self) -> dict[str, torch.Tensor]:
        if self.offset is None:
            return {"basis_codes": self.basis_codes, "basis_scale": self.basis_scale, "center": self.center,
                    "widths": self.widths, "weight": self.weight}
        live = self.widths != 0  # only the coded components' columns: the others are zero
        return {"basis_codes": self.basis_codes.transpose(-1, -2)[live],
                "basis_scale": self.basis_scale.squeeze(-2)[live], "center": self.center, "widths": self.widths,
                "weight": self.weight, "offset": self.offset}


def query_weight(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The mean square of ``queries`` [B, Hq, W, D] (after RoPE) per KV head and channel [B, H, D],
    each RoPE pair (channels ``i`` and ``i + D/2``, which RoPE rotates into each other by the
    distance between query and key) given their mean: what a key channel's error costs in the
    logits, whatever the distance."""
    b, hq, w, d = queries.shape
    m = queries.float().pow(2).reshape(b, kv_heads, hq // kv_heads * w, d).mean(2)
    half = d // 2
    pair = (m[..., :half] + m[..., half : 2 * half]) / 2
    return torch.cat([pair, pair, m[..., 2 * half :]], -1)


def _encode(y: torch.Tensor, w: int, group: int) -> tuple[torch.Tensor, ...]:
    """Components ``y`` [N, C] (centered) of width ``w`` per channel over groups of ``group`` tokens:
    (bit planes, step codes, zeros) or, at 0 bits, (group means float16,)."""
    n, c = y.shape
    g = y.reshape(n // group, group, c)
    mean = g.mean(1, keepdim=True)
    if w == 0:
        return (mean.squeeze(1).clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16),)
    qmax = (1 << w) - 1
    lo = mean + CLIP[w] * (g.amin(1, keepdim=True) - mean)
    hi = mean + CLIP[w] * (g.amax(1, keepdim=True) - mean)
    need = ((hi - lo) / qmax).clamp_min(2.0**-STEP_OCTAVES).log2()
    sc = ((need + STEP_OCTAVES) * 8).ceil().clamp(0, 255)
    step = torch.exp2(sc / 8 - STEP_OCTAVES)
    zc = (lo / step).floor().clamp(-128, 127)
    codes = (g / step - zc).round().clamp(0, qmax).to(torch.uint8).reshape(n, c)
    # packed along tokens (whole groups: multiples of 8), so no width pads its channels to a byte
    return packing.pack_planes(codes.T, w), sc.squeeze(1).to(torch.uint8), zc.squeeze(1).to(torch.int8)


def _decode(part: tuple[torch.Tensor, ...], w: int, n: int, group: int) -> torch.Tensor:
    if w == 0:
        return part[0].float().repeat_interleave(group, 0)
    planes, sc, zc = part
    step = torch.exp2(sc.float() / 8 - STEP_OCTAVES).repeat_interleave(group, 0)
    codes = packing.unpack_planes(planes, n).T.float()
    return (codes + zc.float().repeat_interleave(group, 0)) * step


@dataclass
class KLTKeys(Stored):
    """A run of ``n`` keys coded on ``fit``: per width, its components' codes (``parts``), and the
    run's first tokens exactly (``sink`` [B, H, S, D] float16, or None). ``owner``: this run holds
    the fit's tensors (a layer's first run; later runs of the layer extend it, a fork's read it)."""

    fit: KLTFit
    parts: dict[int, tuple[torch.Tensor, ...]]
    n: int
    group: int
    sink: torch.Tensor | None = None
    owner: bool = True
    sink_at: tuple[int, ...] | None = None  # rows of the sinks (a ragged layer's: each head's first); None: the first
    rows: int = 1  # batch rows (a fork of several rows codes them all on its parent's one-row fit)
    # coded on a ragged context's heads' fits (KLTHeads.like; restored from them): its heads, else 0
    on_heads: int = 0
    extends = True  # spills are coded on the fitted basis (:meth:`extend`)

    @classmethod
    def encode(cls, k: torch.Tensor, fit: KLTFit, group: int, sinks: int = 0, owner: bool = True,
               starts: "list[int] | None" = None, on_heads: int = 0) -> "KLTKeys":
        b, h, n, d = k.shape
        fb = fit.matrix.shape[0]
        if n % group:
            raise ValueError(f"klt: keys come in whole groups of {group} tokens, got {n}")
        if fit.matrix.shape[1:] != (h, d, d) or b % fb or fb not in (1, b):
            raise ValueError(f"klt: keys [{b}, {h}, {n}, {d}] do not match the fitted basis {tuple(fit.matrix.shape)}")
        # [n, rows a fit serves, channels of one fit]: a one-row fit (a fork's parent) serves every row
        y = fit.forward(k).permute(2, 0, 1, 3).reshape(n, b // fb, -1)
        parts = {w: _encode(y[:, :, idx].reshape(n, -1), w, group) for w, idx in fit.channels.items()}
        at = None
        if sinks and starts is not None:  # heads back to back: each head's first tokens
            ends = [*starts[1:], n]
            at = tuple(r for s, e in zip(starts, ends) for r in range(s, min(s + sinks, e)))
        rows = list(at) if at is not None else list(range(min(sinks, n)))
        sink = k[:, :, rows].float().clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16) if sinks else None
        return cls(fit, parts, n, group, sink, owner, at, b, on_heads)

    def _rows(self) -> list[int]:
        return list(self.sink_at) if self.sink_at is not None else list(range(self.sink.shape[-2]))

    @property
    def num_tokens(self) -> int:
        return self.n

    @property
    def shape(self) -> tuple[int, int, int, int]:
        _, h, d, _ = self.fit.matrix.shape
        return self.rows, h, self.n, d

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        b, h, n, d = self.shape
        rep = b // self.fit.matrix.shape[0]
        y = torch.zeros(n, rep, b // rep * h * d, device=self.fit.matrix.device)  # 0-bit: the center
        for w, idx in self.fit.channels.items():
            y[:, :, idx] = _decode(self.parts[w], w, n, self.group).reshape(n, rep, -1)
        x = self.fit.inverse(y.reshape(n, b, h, d).permute(1, 2, 0, 3))
        if self.sink is not None:
            x[:, :, self._rows()] = self.sink.float()
        return x.to(dtype or torch.float32)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(self.fit.tensors()) if self.owner else {}
        for w, part in self.parts.items():
            names = ("mean",) if w == 0 else ("planes", "step", "zero")
            out.update({f"w{w}_{name}": t for name, t in zip(names, part)})
        if self.sink is not None:
            out["sink"] = self.sink
        return out

    def meta(self) -> dict:
        return {"kind": "klt", "n": self.n, "group": self.group, "owner": self.owner, "rows": self.rows,
                **({"sink_at": list(self.sink_at)} if self.sink_at is not None else {}),
                **({"on_heads": self.on_heads} if self.on_heads else {})}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "KLTKeys":
        on_heads = meta.get("on_heads", 0)
        if on_heads:  # the layer's own tokens after its ragged context, coded on that context's heads' fits
            from memfit.kv.ragged import KEYS  # here: ragged imports torch, the spec parser imports this module

            fit = KLTHeads.stack([KLTFit.from_tensors(t, KLTHeads.run_prefix(KEYS, h)) for h in range(on_heads)])
        elif not meta.get("owner", True):
            raise ValueError("klt: a run coded on another's basis (a fork's) cannot be restored on its own")
        else:
            fit = KLTFit.from_tensors(t, prefix)
        names = lambda w: ("mean",) if w == 0 else ("planes", "step", "zero")  # noqa: E731
        parts = {w: tuple(t[f"{prefix}w{w}_{name}"] for name in names(w)) for w in fit.channels}
        at = meta.get("sink_at")
        return cls(fit, parts, meta["n"], meta["group"], t.get(prefix + "sink"), not on_heads,
                   tuple(at) if at else None, meta.get("rows", 1), on_heads)

    def like(self, x: torch.Tensor) -> "KLTKeys":
        """Keys ``x`` (not the layer's first: no sinks) as a run of their own on this run's fit."""
        return KLTKeys.encode(x, self.fit, self.group, owner=False, on_heads=self.on_heads)

    def append(self, other: "KLTKeys") -> "KLTKeys":
        parts = {}
        for w in self.parts:
            if w == 0:
                parts[w] = (torch.cat([self.parts[w][0], other.parts[w][0]]),)
            else:
                (p1, s1, z1), (p2, s2, z2) = self.parts[w], other.parts[w]
                parts[w] = (torch.cat([p1, p2], -1), torch.cat([s1, s2]), torch.cat([z1, z2]))
        return KLTKeys(self.fit, parts, self.n + other.n, self.group, self.sink, self.owner, self.sink_at, self.rows,
                       self.on_heads)

    def extend(self, x: torch.Tensor) -> "KLTKeys":
        """Keys ``x`` after these (the window spilling), coded on this run's fit."""
        return self.append(self.like(x))

    def cat(self, other: "KLTKeys") -> "KLTKeys":
        if other.fit is self.fit:
            return self.append(other)
        return self.extend(other.dequantize(torch.float32))

    def prefix(self, n: int) -> "KLTKeys":
        if n % self.group:
            raise ValueError(f"cannot cut a key group of {self.group} tokens at token {n}")
        g = n // self.group
        parts = {w: (p[0][:g].clone(),) if w == 0 else (p[0][..., : n // 8].clone(), p[1][:g].clone(), p[2][:g].clone())
                 for w, p in self.parts.items()}
        sink, at = self.sink, self.sink_at
        if sink is not None:
            keep = [i for i, r in enumerate(self._rows()) if r < n]
            sink = sink[:, :, keep].clone()
            at = tuple(self._rows()[i] for i in keep) if at is not None else None
        return KLTKeys(self.fit, parts, n, self.group, sink, self.owner, at, self.rows, self.on_heads)


STORED["klt"] = KLTKeys


@dataclass
class KLTHeads(Stored):
    """A ragged layer's quantized tokens, heads back to back (as ``Ragged`` holds them), each head's
    run coded on a basis of its own (``runs[h]``; None: a head with no quantized tokens). The widths
    are allocated over every head's components together, as one uniform layer's are."""

    runs: list[KLTKeys | None]

    @staticmethod
    def run_prefix(prefix: str, h: int) -> str:
        """Where head ``h``'s run keeps its tensors under ``prefix``."""
        return f"{prefix}h{h}_"

    @staticmethod
    def stack(fits: "list[KLTFit]") -> KLTFit:
        """One-head fits as one fit of their heads."""
        cat = lambda name: torch.cat([getattr(f, name) for f in fits], 1)  # noqa: E731
        offset = cat("offset") if all(f.offset is not None for f in fits) else None
        return KLTFit(cat("basis_codes"), cat("basis_scale"), cat("center"), cat("widths"), cat("weight"), offset)

    @functools.cached_property
    def fit(self) -> KLTFit | None:
        """The heads' fits as one (None where a head kept no quantized tokens: it has none)."""
        if any(r is None for r in self.runs):
            return None
        return self.stack([r.fit for r in self.runs])

    def like(self, x: torch.Tensor) -> KLTKeys:
        """Keys ``x`` [B, H, N, D] (before RoPE, after the context) coded on the heads' fits: a
        basis fitted to a few new tokens alone is far worse (perplexity +6.8% against +2.7% for the
        same context uniform, at ``klt(bits=1.5)``)."""
        return KLTKeys.encode(x, self.fit, self.runs[0].group, owner=False, on_heads=len(self.runs))

    @property
    def num_tokens(self) -> int:
        return sum(r.n for r in self.runs if r is not None)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        d = next(r for r in self.runs if r is not None).shape[-1]
        return 1, 1, self.num_tokens, d

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The heads' keys back to back, [1, 1, T, D] (before RoPE, as they were coded)."""
        return torch.cat([r.dequantize(dtype) for r in self.runs if r is not None], -2)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {self.run_prefix("", h) + n: t for h, r in enumerate(self.runs) if r is not None
                for n, t in r.tensors().items()}

    def meta(self) -> dict:
        return {"kind": "klt-heads", "runs": [None if r is None else r.meta() for r in self.runs]}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "KLTHeads":
        return cls([None if m is None else KLTKeys.from_meta(t, cls.run_prefix(prefix, h), m)
                    for h, m in enumerate(meta["runs"])])


STORED["klt-heads"] = KLTHeads


@dataclass(frozen=True)
class KLT(OnKIVI):
    """Keys transform-coded at a mean of ``bits`` an element (a KLT basis per head fitted on the
    context, each component 0..``max_bits`` wide; see the module docstring), before RoPE, the first
    ``sinks`` tokens exact; values as ``hadamard(bits=value_bits, meta_bits=8)`` stores them. (Values
    coded as the keys are, on a basis of their own over token groups, measured far worse: perplexity
    +11% / +21% at ``value_bits=2`` on the two texts above, against +2.7% / +2.0% with these; a value
    head's spectrum is flatter, about 0.24 bit an element of transform gain, and its tokens' norms
    vary, which per-token groups absorb.)"""

    bits: float = 2.0
    value_bits: int = 2
    group: int = 64
    residual: int = 128
    sinks: int = 4
    max_bits: int = 6
    # keys coded before RoPE, put back on read at positions the layer knows (after an eviction: stored)
    pre_rope: bool = field(default=True, metadata={"spec": "if-set"})
    queries: int = field(default=32, metadata={"spec": "if-set"})  # the context's last queries that weight the fit
    # values only: that fraction of the context's tokens, ranked by KVzip's scores, at high_bits (see below)
    salient: float = field(default=0.0, metadata={"spec": "if-set"})
    high_bits: int = field(default=4, metadata={"spec": "if-set"})
    # the keys of an eviction's key-only tier (``kvzip(..., keys=...)``): their mean width
    tier_bits: float = field(default=1.0, metadata={"spec": "if-set"})

    @property
    def rope_in_forks(self) -> bool:  # a fork's spills too: they are coded on its parent's pre-RoPE basis
        return self.pre_rope

    def __post_init__(self) -> None:
        self._check_kivi("klt")
        if self.group < 8:
            raise ValueError(f"klt: group must be at least 8 tokens (codes are packed 8 tokens a byte), "
                             f"got {self.group}")
        if not 0.0 <= self.bits <= self.max_bits:
            raise ValueError(f"klt: bits (the keys' mean width) must be in [0, max_bits={self.max_bits}], "
                             f"got {self.bits}")
        if not 1 <= self.max_bits <= len(GAUSS_MSE) - 1:
            raise ValueError(f"klt: max_bits must be in 1..{len(GAUSS_MSE) - 1}, got {self.max_bits}")
        if self.sinks < 0:
            raise ValueError(f"klt: sinks must be >= 0, got {self.sinks}")
        if self.queries < 0:
            raise ValueError(f"klt: queries must be >= 0 (0: an unweighted fit), got {self.queries}")
        if not 0.0 <= self.tier_bits <= self.max_bits:
            raise ValueError(f"klt: tier_bits (the key-only tier's mean width) must be in [0, max_bits="
                             f"{self.max_bits}], got {self.tier_bits}")
        # value_bits, salient and high_bits checked as the rotated quantizer checks them
        try:
            Hadamard(self.value_bits, self.group, self.residual, self.sinks, meta_bits=8)
        except ValueError as e:
            raise ValueError(f"klt: value_{str(e).removeprefix('hadamard: ')}") from None
        try:
            self.values  # noqa: B018
        except ValueError as e:
            why = str(e).removeprefix("hadamard: ").replace("bits and value_bits", "value_bits")
            raise ValueError(f"klt: {why}") from None

    @property
    def kivi(self) -> KIVI:  # the window and groups: KIVI's
        return KIVI(2, self.group, self.residual)

    @property
    def values(self) -> Hadamard:
        return Hadamard(self.value_bits, self.group, self.residual, self.sinks, meta_bits=8,
                        salient=self.salient, high_bits=self.high_bits)

    @property
    def observes(self) -> str | None:
        """What the prefill must record: KVzip's scores, with ``salient``, which choose the wider values."""
        return self.values.observes

    def saliency(self, keys: torch.Tensor, obs, start: int) -> torch.Tensor | None:
        return self.values.saliency(keys, obs, start)

    @property
    def vbits(self) -> int:
        return self.value_bits

    def tier_coder(self) -> "KLT":
        """What codes an eviction's key-only tier (:class:`memfit.kv.ragged.KeyTier`): these keys at
        ``tier_bits``, on bases of their own, no sinks."""
        return dataclasses.replace(self, bits=self.tier_bits, sinks=0, salient=0.0)

    def tier_token_bytes(self, d: int) -> float:
        """One key-only token of one head (codes and its share of the group grids, as :meth:`_bytes`)."""
        return d * self.tier_bits / 8 + 2 * d / self.group

    def quantize_keys(self, k: torch.Tensor, starts: "list[int] | None" = None, first: bool = True,
                      weight: torch.Tensor | None = None, scores: torch.Tensor | None = None) -> KLTKeys:
        """Keys [B, H, N, D]: a basis fitted to them, and their codes (``first``: the layer's first
        tokens, which keep their sinks; ``starts``: where each head begins when ``k`` is a ragged layer's
        heads back to back, which then share one basis; ``weight`` [B, H, D]: the queries' mean square
        per channel, :func:`query_weight`, None: unweighted; ``scores``: the values', unused here)."""
        fit = KLTFit.fit(k, self.bits, self.max_bits, weight)
        return KLTKeys.encode(k, fit, self.group, self.sinks if first else 0, starts=starts)

    def quantize_heads(self, ks: "list[torch.Tensor]", weight: torch.Tensor | None = None) -> KLTHeads:
        """A ragged layer's keys (before RoPE), one [n_h, D] tensor per head (n_h a multiple of
        ``group``, possibly 0), each head on a basis of its own; ``weight`` [1, H, D] as in
        :meth:`quantize_keys`. Each head keeps its first ``sinks`` tokens exact."""
        live = [h for h, k in enumerate(ks) if len(k)]
        w = None if weight is None else [weight[:, h : h + 1] for h in live]
        fits = KLTFit.fit_runs([ks[h][None, None] for h in live], self.bits, self.max_bits, w)
        runs: list[KLTKeys | None] = [None] * len(ks)
        for h, fit in zip(live, fits):
            runs[h] = KLTKeys.encode(ks[h][None, None], fit, self.group, self.sinks)
        return KLTHeads(runs)

    def quantize_values(self, v: torch.Tensor, starts: "list[int] | None" = None, first: bool = True,
                        weight: torch.Tensor | None = None, scores: torch.Tensor | None = None):
        """Values as the rotated quantizer stores them (``weight`` is the keys'); ``scores`` [B, H, N]:
        with ``salient``, which tokens' values take ``high_bits``."""
        return self.values.quantize_values(v, starts, first, scores)

    def _value_bytes(self, bits: int, d: int) -> float:
        return d * bits / 8 + 2 * d / self.value_group(d)

    def _bytes(self, low: float, high: float, d: int) -> float:
        """``low`` tokens with ``value_bits`` values and ``high`` salient ones with ``high_bits`` values
        and their int32 positions; keys at the mean width, at most two grid bytes a key group and
        component (0-bit components have none)."""
        keys = (low + high) * (d * self.bits / 8 + 2 * d / self.group)
        return keys + low * self._value_bytes(self.vbits, d) + high * (self._value_bytes(self.high_bits, d) + 4)

    def token_bytes(self, d: int) -> float:
        """One token of one head (with ``salient``, a bound: the salient count is rounded down)."""
        return self._bytes(1 - self.salient, self.salient, d)

    def run_bytes(self, n: int, d: int) -> float:
        """One head's run of ``n`` quantized tokens (the salient count rounds per run)."""
        s = mixed.salient_count(self.values, n) if self.salient else 0
        return self._bytes(n - s, s, d)

    def fixed_bytes(self, heads: int, d: int) -> float:
        """A layer's fit (at most: basis codes and column scales of every component, component means,
        widths, channel weights, the 0-bit components' offset), sinks (keys and values) and the
        values' grid ranges."""
        ranges = 4 * 2 * (2 if self.salient else 1)  # the values' grid ranges (salient ones: a run of their own)
        return heads * (d * d + d * 2 + d * 2 + d + d * 2 + d * 2 + 2 * self.sinks * d * 2 + ranges)

