"""ZipCache (He et al., NeurIPS 2024): mixed-precision KV quantization by token saliency.

Two parts:

- **Channel-separable token-wise quantization (CST)**: each key channel is divided by
  ``c_i = sqrt(max_t |k_t,i|)`` (one float16 per channel, head and layer), which flattens the outlier
  channels that make plain token-wise key quantization fail, and the normalized keys are then
  quantized per token (one scale and zero a token, in groups of ``group`` channels) instead of
  KIVI's per-channel groups of tokens. Values are quantized per token as KIVI does. Every token's
  codes stand alone, so tokens of different widths can sit side by side.
- **Salient tokens at higher precision**: the ``salient`` fraction of each head's tokens with the
  highest *normalized attention* (the attention a token receives, summed over the queries that can
  see it and divided by their number, which removes the causal mask's bias towards early tokens)
  are stored at ``high_bits``, the rest at ``bits``. Full attention is never materialized: the
  saliency comes from a probe of query rows recorded during prefill (the last ``recent`` queries
  and a random ``probe`` fraction of the others), as the paper's efficient approximation does.

Where no probe was recorded (a cache filled by plain ``generate``, ``prefill_parts``) and for tokens
the 16-bit window spills while decoding, the salient tokens are those whose low-bit codes lose the
most (largest quantization error): a query-free rule, the same fraction, so the byte count holds.
The saliency is a function of the whole context (as an eviction's scores are), so a stored
ZipCache context is not reused as a prefix of a longer one.

Storage a run of tokens: low-bit codes of the others, high-bit codes of the salient ones, the
salient tokens' positions (int16, int32 past 32K tokens) and, for keys, the channel divisors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from memfit.kv.quant import STORED, OnKIVI, QTensor, Stored, in_run_order, other_positions, quantize_values
from memfit.kv.rotate import hadamard
from memfit.lazy import lazy_module

torch = lazy_module("torch")
packing = lazy_module("memfit.kernels.packing")

_PROBE_ROWS = 512  # probe query rows scored at a time (bounds the [rows, N] logits on long contexts)


def normalized_attention(queries: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor,
                         start: int) -> torch.Tensor:
    """ZipCache's saliency: the attention each key of ``keys`` [B, H, N, D] (at positions ``start``,
    ``start + 1``, ...) receives from probe ``queries`` [B, Hq, P, D] at ``positions`` [P], summed over
    the probe rows (and query heads of its GQA group) that can see it, divided by their number
    -> [B, H, N] float32. Each row's softmax runs over the keys it sees causally."""
    b, hq, p, d = queries.shape
    h, n = keys.shape[1], keys.shape[2]
    g = hq // h
    q = queries.float().reshape(b, h, g * p, d) / math.sqrt(d)  # query head i reads KV head i // g
    qpos = positions.to(keys.device).long().repeat(g)  # row r of a group is probe r % p
    kpos = torch.arange(start, start + n, device=keys.device)
    kt = keys.float().transpose(-1, -2)
    total = torch.zeros(b, h, n, device=keys.device)
    count = torch.zeros(n, device=keys.device)
    for s in range(0, g * p, _PROBE_ROWS):
        seen = kpos <= qpos[s : s + _PROBE_ROWS, None]  # [rows, N]
        logits = (q[:, :, s : s + _PROBE_ROWS] @ kt).masked_fill_(~seen, float("-inf"))
        total += logits.softmax(dim=-1).nan_to_num_(0.0).sum(dim=2)  # a row that sees nothing adds nothing
        count += seen.sum(dim=0)
    return total / count.clamp_min(1)


def _take(q: QTensor, idx: torch.Tensor) -> QTensor:
    """Tokens ``idx`` [B, H, m] of per-token codes ``q`` (each token's codes stand alone)."""
    pick = lambda t: t.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, t.shape[-1]))  # noqa: E731
    return QTensor(pick(q.codes), pick(q.scale), pick(q.zero), q.bits, q.axis, q.group)


def _position_dtype(n: int) -> torch.dtype:
    return torch.int16 if n <= 2**15 else torch.int32


@dataclass
class ZipTensor(Stored):
    """A run of tokens at two widths: ``low`` (the others, in order) and ``high`` (the salient ones, in
    order), per-token codes; ``index`` [B, H, S]: the salient tokens' positions in the run, ascending;
    ``chan`` [B, H, 1, D] float16: the channel divisors the codes were taken on (keys), or None."""

    low: QTensor
    high: QTensor
    index: torch.Tensor
    chan: torch.Tensor | None
    salient: float  # the fraction of later tokens (``extend``) stored at the high width
    rotated: bool = False  # codes taken after the Hadamard rotation

    extends: ClassVar[bool] = True  # the window's spills are encoded on these channel divisors

    @property
    def num_tokens(self) -> int:
        return self.low.num_tokens + self.high.num_tokens

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, _, d = self.low.shape
        return b, h, self.num_tokens, d

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {**{"lo_" + n: t for n, t in self.low.tensors().items()},
               **{"hi_" + n: t for n, t in self.high.tensors().items()}, "salient_at": self.index}
        if self.chan is not None:
            out["chan"] = self.chan
        return out

    def meta(self) -> dict:
        return {"kind": "zip", "low": self.low.meta(), "high": self.high.meta(), "salient": self.salient,
                "rotated": self.rotated}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "ZipTensor":
        low, high = (QTensor.from_meta(t, prefix + p, meta[k]) for p, k in (("lo_", "low"), ("hi_", "high")))
        return cls(low, high, t[prefix + "salient_at"], t.get(prefix + "chan"), meta["salient"],
                   meta.get("rotated", False))

    @classmethod
    def encode(cls, x: torch.Tensor, bits: int, high_bits: int, group: int, salient: float,
               scores: torch.Tensor | None = None, chan: torch.Tensor | bool | None = None,
               rotated: bool = False) -> "ZipTensor":
        """``x`` [B, H, n, D] as a run: the ``salient`` fraction of each head's tokens with the highest
        ``scores`` [B, H, n] (None: the largest low-bit error) at ``high_bits``. ``chan``: True fits
        channel divisors to ``x`` (keys), a tensor reuses them, None quantizes ``x`` as it is (values).
        ``rotated``: ``x``'s heads are Hadamard-rotated first (orthonormal: errors keep their size)."""
        b, h, n, d = x.shape
        x = x.float() @ hadamard(d, x.device) if rotated else x.float()
        if chan is True:
            chan = x.abs().amax(dim=2, keepdim=True).sqrt().clamp_min(1e-3).to(torch.float16)
        xn = x / chan.float() if chan is not None else x
        low = quantize_values(xn, bits, group)
        s = min(n, math.ceil(salient * n))
        if scores is None:  # query-free: the tokens that 'bits' serves worst
            err = low.dequantize(torch.float32) - xn
            if chan is not None:
                err = err * chan.float()
            scores = err.square().sum(-1)
        elif scores.shape != (b, h, n):
            raise ValueError(f"zipcache: scores must be [B, H, N] = {[b, h, n]}, got {list(scores.shape)}")
        idx = scores.float().topk(s, dim=-1).indices.sort(dim=-1).values  # [B, H, s]
        rest = other_positions(idx, n)
        high = quantize_values(xn.gather(2, idx.unsqueeze(-1).expand(-1, -1, -1, d)), high_bits, group)
        return cls(_take(low, rest), high, idx.to(_position_dtype(n)), chan, salient, rotated)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = in_run_order(self.low.dequantize(torch.float32), self.high.dequantize(torch.float32), self.index)
        if self.chan is not None:
            out = out * self.chan.float()
        if self.rotated:
            out = out @ hadamard(out.shape[-1], out.device).T
        return out.to(dtype or torch.float32)

    def like(self, x: torch.Tensor) -> "ZipTensor":
        """Tokens ``x`` [B, H, n, D] as a run of their own, on these channel divisors."""
        return ZipTensor.encode(x, self.low.bits, self.high.bits, self.low.group, self.salient, chan=self.chan,
                                rotated=self.rotated)

    def append(self, other: "ZipTensor") -> "ZipTensor":
        """``other``'s tokens after these (``other`` on the same channel divisors)."""
        n = self.num_tokens
        index = torch.cat([self.index.long(), other.index.long() + n], dim=-1)
        return ZipTensor(self.low.cat(other.low), self.high.cat(other.high),
                         index.to(_position_dtype(n + other.num_tokens)), self.chan, self.salient, self.rotated)

    def extend(self, x: torch.Tensor) -> "ZipTensor":
        """Tokens ``x`` [B, H, n, D] after these, on these channel divisors."""
        return self.append(self.like(x))

    def cat(self, other: "ZipTensor") -> "ZipTensor":
        if other.rotated != self.rotated:
            raise ValueError("cannot concatenate rotated and unrotated ZipCache runs")
        if other.chan is not self.chan and not (other.chan is not None and self.chan is not None
                                                and torch.equal(other.chan, self.chan)):
            raise ValueError("cannot concatenate ZipCache runs taken on different channel divisors")
        return self.append(other)

    def prefix(self, n: int) -> "ZipTensor":
        raise ValueError("a ZipCache run's salient tokens are chosen over the whole run: its prefix cannot be cut")


STORED["zip"] = ZipTensor


@dataclass(frozen=True)
class ZipCache(OnKIVI):
    """ZipCache: channel-separable token-wise codes, the ``salient`` fraction of tokens (by normalized
    attention from a probe of ``recent`` + ``probe`` fraction of the prefill's queries) at
    ``high_bits``, the rest at ``bits``; ``group`` channels share a token's scale and zero (and the
    16-bit window spills in whole groups of ``group`` tokens, as KIVI's); see the module docstring."""

    bits: int = 2
    high_bits: int = 4
    salient: float = 0.1
    group: int = 64
    residual: int = 128
    probe: float = 0.05
    recent: int = 64
    rotate: bool = field(default=False, metadata={"spec": "if-set"})

    def __post_init__(self) -> None:
        self._check_kivi("zipcache")
        for name in ("bits", "high_bits"):
            try:
                packing.check_bits(getattr(self, name))
            except ValueError as e:
                raise ValueError(f"zipcache: {name}: {e}") from None
        if self.high_bits < self.bits:
            raise ValueError(f"zipcache: high_bits ({self.high_bits}) must be at least bits ({self.bits})")
        if not 0.0 <= self.salient <= 1.0:
            raise ValueError(f"zipcache: salient must be a fraction in [0, 1], got {self.salient}")
        if not 0.0 <= self.probe <= 1.0 or self.recent < 0:
            raise ValueError(f"zipcache: probe must be in [0, 1] and recent >= 0, got {self.probe}, {self.recent}")

    def saliency(self, keys: torch.Tensor, obs, start: int) -> torch.Tensor | None:
        """Normalized attention of ``keys`` [B, H, N, D] (at positions ``start``...) from the probe the
        prefill recorded in ``obs`` (an ``Observation``); None when it recorded none."""
        parts = []
        if obs.probe is not None:
            parts.append(obs.probe)
        if obs.queries is not None and self.recent:
            q = obs.queries[:, :, -self.recent :]
            end = start + keys.shape[-2]
            parts.append((torch.arange(end - q.shape[2], end, device=q.device), q))
        if not parts:
            return None
        pos = torch.cat([p for p, _ in parts])
        queries = torch.cat([q for _, q in parts], dim=2)
        return normalized_attention(queries, pos, keys, start)

    def _encode(self, x: torch.Tensor, scores: torch.Tensor | None, chan: bool) -> ZipTensor:
        return ZipTensor.encode(x, self.bits, self.high_bits, self.value_group(x.shape[-1]), self.salient,
                                scores, chan or None, self.rotate)

    def quantize_keys(self, k: torch.Tensor, scores: torch.Tensor | None = None) -> ZipTensor:
        return self._encode(k, scores, True)

    def quantize_values(self, v: torch.Tensor, scores: torch.Tensor | None = None) -> ZipTensor:
        return self._encode(v, scores, False)

    def _token_bytes(self, bits: int, d: int) -> float:
        """Keys and values of one token of one head at ``bits``: codes, a scale and zero a group."""
        return 2 * (d * bits / 8 + 4 * d / self.value_group(d))

    def run_bytes(self, n: int, d: int) -> float:
        """One head's run of ``n`` tokens, exactly: ``ceil(salient * n)`` of them at the high width,
        each with its position (the channel divisors are :meth:`fixed_bytes`)."""
        s = min(n, math.ceil(self.salient * n))
        return s * self._token_bytes(self.high_bits, d) + (n - s) * self._token_bytes(self.bits, d) \
            + 2 * s * _position_dtype(n).itemsize

    def token_bytes(self, d: int) -> float:
        """A bound on a token's mean bytes (for ragged heads, each rounding its salient count up:
        counted as one salient token more in each 16 or more)."""
        s = min(1.0, self.salient + 1 / 16) if self.salient else 0.0
        return s * (self._token_bytes(self.high_bits, d) + 2 * 4) + (1 - s) * self._token_bytes(self.bits, d)

    def fixed_bytes(self, heads: int, d: int) -> float:
        return heads * d * 2  # the keys' float16 channel divisors
