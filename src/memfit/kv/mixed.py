"""Two widths in one rotated run (MiKV-style importance-aware mixed precision, KVzip's scores).

At 2 bits the rotated quantizer (:mod:`memfit.kv.rotate`) keeps perplexity within about 1% of 16-bit
but loses retrieval: on SmolLM2's 4K-token tasks 2-bit KV keeps about a fifth of the uncompressed
accuracy. The few tokens a retrieval reads (a needle's digits, a key's name) are the ones four
levels blur, and they are the ones KVzip's reconstruction scores rank highest: the model needs them
to repeat the context. ``hadamard(bits=2, salient=0.1)`` stores the ``salient`` fraction of each
head's tokens with the highest scores at ``high_bits`` (keys and values; a rotated run of their own
with its own groups and grid, unclipped) and the others at ``bits``, in the run's order with the
salient tokens' positions (int16, int32 past 32K tokens). Nothing is evicted: the scores only decide
widths. The salient count of a head is rounded down to whole key groups, and a head's first
``sinks`` tokens (already exact) are never salient.

Where no scores were recorded (a cache filled by plain ``generate``, ``prefill_parts``) and for
tokens the 16-bit window spills while decoding, every token is stored at ``bits``, so the bytes stay
within the planner's bound. Like an eviction's, the choice is a function of the whole context, so
such a run is not reused as a prefix of a longer one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memfit.kv.quant import STORED, Stored, load_quantized
from memfit.kv.rotate import Hadamard, RotatedTensor
from memfit.kv.zipcache import _others, _position_dtype
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass
class MixedTensor(Stored):
    """A rotated run at two widths: ``low`` (the other tokens, in order, with the run's sinks) and
    ``high`` (the salient ones, in order; None when there are none); ``index`` [B, H, S]: the salient
    tokens' positions in the run, ascending (a ragged layer's flat run: positions in it)."""

    low: RotatedTensor
    high: RotatedTensor | None
    index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.low.num_tokens + (self.high.num_tokens if self.high is not None else 0)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, _, d = self.low.shape
        return b, h, self.num_tokens, d

    @property
    def extends(self) -> bool:
        return self.low.extends

    def tensors(self) -> dict[str, torch.Tensor]:
        high = {"hi_" + n: t for n, t in self.high.tensors().items()} if self.high is not None else {}
        return {**{"lo_" + n: t for n, t in self.low.tensors().items()}, **high, "salient_at": self.index}

    def meta(self) -> dict:
        return {"kind": "mixed", "low": self.low.meta(), "high": self.high.meta() if self.high is not None else None}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "MixedTensor":
        high = load_quantized(t, prefix + "hi_", meta["high"]) if meta["high"] is not None else None
        return cls(load_quantized(t, prefix + "lo_", meta["low"]), high, t[prefix + "salient_at"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        low = self.low.dequantize(torch.float32)
        if self.high is None:
            return low.to(dtype or torch.float32)
        b, h, n, d = self.shape
        order = torch.cat([_others(self.index.long(), n), self.index.long()], dim=-1)  # how the tokens are stored
        vals = torch.cat([low, self.high.dequantize(torch.float32)], dim=2)
        out = vals.new_empty(b, h, n, d).scatter_(2, order.unsqueeze(-1).expand(-1, -1, -1, d), vals)
        return out.to(dtype or torch.float32)

    def _after(self, low: RotatedTensor, added: int) -> "MixedTensor":
        """This run with ``added`` low-width tokens after it (``low``: its low part with them)."""
        return MixedTensor(low, self.high, self.index.to(_position_dtype(self.num_tokens + added)))

    def like(self, x: torch.Tensor) -> "MixedTensor":
        """Tokens ``x`` (a fork's first spill) at the low width, on this run's grid ranges."""
        low = self.low.like(x)
        return MixedTensor(low, None, _no_index(low))

    def extend(self, x: torch.Tensor) -> "MixedTensor":
        """Tokens ``x`` after these (the window spilling, unscored): at the low width."""
        return self._after(self.low.extend(x), x.shape[-2])

    def cat(self, other: "MixedTensor") -> "MixedTensor":
        if not isinstance(other, MixedTensor):
            raise ValueError(f"cannot concatenate a mixed-width run and {type(other).__name__}")
        n = self.num_tokens
        high = self.high if other.high is None else other.high if self.high is None else self.high.cat(other.high)
        index = torch.cat([self.index.long(), other.index.long() + n], dim=-1)
        return MixedTensor(self.low.cat(other.low), high, index.to(_position_dtype(n + other.num_tokens)))

    def prefix(self, n: int) -> "MixedTensor":
        raise ValueError("a mixed-width run's salient tokens are chosen over the whole run: its prefix cannot be cut")


STORED["mixed"] = MixedTensor


def _no_index(low: RotatedTensor) -> torch.Tensor:
    b, h = low.shape[:2]
    return torch.empty(b, h, 0, dtype=_position_dtype(low.num_tokens), device=low.q.codes.device)


def salient_count(quant: Hadamard, n: int) -> int:
    """Salient tokens of a head's run of ``n`` (whole key groups, rounded down; sinks excluded)."""
    return min(int(quant.salient * n) // quant.group * quant.group, max(0, n - quant.sinks) // quant.group * quant.group)


def _pick(scores: torch.Tensor, count: int, sinks: int) -> torch.Tensor:
    """The ``count`` best of ``scores`` [B, H, n] per head, its first ``sinks`` left out: [B, H, count], ascending."""
    s = scores.float().clone()
    s[..., :sinks] = float("-inf")
    return s.topk(count, dim=-1).indices.sort(dim=-1).values


def encode(quant: Hadamard, x: torch.Tensor, kind: str, starts: "list[int] | None", first: bool,
           scores: torch.Tensor | None) -> MixedTensor:
    """``x`` [B, H, n, D] (keys with ``kind`` "keys", else values) as a mixed-width run: per head, the
    :func:`salient_count` tokens with the highest ``scores`` [B, H, n] at ``quant.high_bits``. With
    ``starts`` ``x`` is a ragged layer's heads back to back ([1, 1, n, D]): each head chooses its own."""
    low_cfg = dataclasses.replace(quant, salient=0.0)
    high_cfg = dataclasses.replace(quant, bits=quant.high_bits, value_bits=None, clip=None, salient=0.0)
    fn = "quantize_keys" if kind == "keys" else "quantize_values"
    b, h, n, d = x.shape
    sinks = quant.sinks if first else 0
    if scores is not None and scores.shape != (b, h, n):
        raise ValueError(f"hadamard: salient scores must be [B, H, N] = {[b, h, n]}, got {list(scores.shape)}")
    if starts is None:
        count = salient_count(quant, n) if scores is not None else 0
        if count == 0:
            low = getattr(low_cfg, fn)(x, first=first)
            return MixedTensor(low, None, _no_index(low))
        idx = _pick(scores, count, sinks)
        rest = _others(idx, n)
        take = lambda i: x.gather(2, i.unsqueeze(-1).expand(-1, -1, -1, d))  # noqa: E731
        low = getattr(low_cfg, fn)(take(rest), first=first)
        return MixedTensor(low, getattr(high_cfg, fn)(take(idx), first=False), idx.to(_position_dtype(n)))
    ends = [*starts[1:], n]
    picks, low_starts, at = [], [], 0
    for s, e in zip(starts, ends):  # each head its own salient tokens
        c = salient_count(quant, e - s) if scores is not None else 0
        picks.append(_pick(scores[..., s:e], c, sinks)[0, 0] + s if c else torch.empty(0, dtype=torch.long,
                                                                                     device=x.device))
        low_starts.append(at)
        at += e - s - c
    idx = torch.cat(picks).view(1, 1, -1)
    rest = _others(idx, n)
    low = getattr(low_cfg, fn)(x[:, :, rest[0, 0]], starts=low_starts, first=first)
    if idx.shape[-1] == 0:
        return MixedTensor(low, None, _no_index(low))
    return MixedTensor(low, getattr(high_cfg, fn)(x[:, :, idx[0, 0]], first=False), idx.to(_position_dtype(n)))
