"""Two widths in one rotated run (MiKV-style importance-aware mixed precision, KVzip's scores).

At 2 bits the rotated quantizer (:mod:`memfit.kv.rotate`) keeps perplexity within about 1% of 16-bit
but loses retrieval: on SmolLM2's 4K-token tasks 2-bit KV keeps about a fifth of the uncompressed
accuracy. The few tokens a retrieval reads (a needle's digits, a key's name) are the ones four
levels blur, and they are the ones KVzip's reconstruction scores rank highest: the model needs them
to repeat the context. ``hadamard(bits=2, salient=0.1)`` stores the ``salient`` fraction of a
layer's tokens with the highest scores at ``high_bits`` (keys and values; a rotated run of their own
with its own groups and grid, unclipped) and the others at ``bits``, with the salient tokens'
positions (int32). Nothing is evicted: the scores only decide widths. The heads of a layer share
one budget (each head's ``salient`` share rounded down to whole key groups, pooled), so a head
whose scores are peaked takes more of it, as KVzip's global eviction does; each head's count is
rounded to whole key groups, and its first ``sinks`` tokens (already exact) are never salient. A
layer's run is stored head after head (as a ragged layer's is).

Where no scores were recorded (a cache filled by plain ``generate``, ``prefill_parts``) and for
tokens the 16-bit window spills while decoding, every token is stored at ``bits``, so the bytes stay
within the planner's bound. Like an eviction's, the choice is a function of the whole context, so
such a run is not reused as a prefix of a longer one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from memfit.kv.quant import STORED, Stored, in_run_order, load_quantized, other_positions
from memfit.kv.rotate import Hadamard, RotatedTensor
from memfit.lazy import lazy_module

torch = lazy_module("torch")


@dataclass
class MixedTensor(Stored):
    """A rotated run at two widths: ``low`` (the other tokens, in order, with the run's sinks) and
    ``high`` (the salient ones, in order; None when there are none); ``index`` [B, H', S]: the salient
    tokens' positions in the run, ascending. ``heads`` > 0: a uniform [1, heads, n, D] run stored as
    its heads back to back ([1, 1, heads * n, D], as a ragged layer's is), so that its heads share one
    budget of salient tokens; ``index`` is then over the flat run. ``tail``: low-width tokens after
    the scored run (the window's later spills), uniform [B, H, m, D], or None."""

    low: RotatedTensor
    high: RotatedTensor | None
    index: torch.Tensor
    heads: int = 0
    tail: RotatedTensor | None = None

    @property
    def _scored(self) -> int:
        """Tokens of the scored run (all heads, when flat)."""
        return self.low.num_tokens + (self.high.num_tokens if self.high is not None else 0)

    @property
    def num_tokens(self) -> int:
        n = self._scored // self.heads if self.heads else self._scored
        return n + (self.tail.num_tokens if self.tail is not None else 0)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        b, h, _, d = self.low.shape
        return b, self.heads or h, self.num_tokens, d

    @property
    def extends(self) -> bool:
        return self.low.extends

    def tensors(self) -> dict[str, torch.Tensor]:
        parts = {"lo_": self.low, "hi_": self.high, "tl_": self.tail}
        out = {p + n: t for p, run in parts.items() if run is not None for n, t in run.tensors().items()}
        return {**out, "salient_at": self.index}

    def meta(self) -> dict:
        return {"kind": "mixed", "low": self.low.meta(), "high": self.high.meta() if self.high is not None else None,
                "heads": self.heads, "tail": self.tail.meta() if self.tail is not None else None}

    @classmethod
    def from_meta(cls, t: dict[str, torch.Tensor], prefix: str, meta: dict) -> "MixedTensor":
        runs = {k: load_quantized(t, prefix + p, meta[k]) if meta.get(k) is not None else None
                for p, k in (("lo_", "low"), ("hi_", "high"), ("tl_", "tail"))}
        return cls(runs["low"], runs["high"], t[prefix + "salient_at"], meta.get("heads", 0), runs["tail"])

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        out = self.low.dequantize(torch.float32)
        if self.high is not None:
            out = in_run_order(out, self.high.dequantize(torch.float32), self.index)
        if self.heads:
            out = out.reshape(1, self.heads, -1, out.shape[-1])
        if self.tail is not None:
            out = torch.cat([out, self.tail.dequantize(torch.float32)], dim=2)
        return out.to(dtype or torch.float32)

    def like(self, x: torch.Tensor) -> "MixedTensor":
        """Tokens ``x`` [B, H, n, D] (a fork's first spill) at the low width, on this run's grid ranges."""
        return MixedTensor(self.low.like(x), None, _no_index(x))

    def extend(self, x: torch.Tensor) -> "MixedTensor":
        """Tokens ``x`` after these (the window spilling, unscored): at the low width, on the low grid."""
        if not self.heads and self.tail is None:
            return dataclasses.replace(self, low=self.low.extend(x))
        tail = self.low.like(x) if self.tail is None else self.tail.extend(x)
        return dataclasses.replace(self, tail=tail)

    def cat(self, other: "MixedTensor") -> "MixedTensor":
        if not isinstance(other, MixedTensor):
            raise ValueError(f"cannot concatenate a mixed-width run and {type(other).__name__}")
        if other.heads or other.tail is not None or self.heads or self.tail is not None:
            if other.heads or other.tail is not None or other.high is not None:
                raise ValueError("only an unscored run can follow a mixed-width run stored head by head")
            return dataclasses.replace(self, tail=other.low if self.tail is None else self.tail.cat(other.low))
        n = self.num_tokens
        high = self.high if other.high is None else other.high if self.high is None else self.high.cat(other.high)
        index = torch.cat([self.index.long(), other.index.long() + n], dim=-1)
        return MixedTensor(self.low.cat(other.low), high, index.int())

    def prefix(self, n: int) -> "MixedTensor":
        raise ValueError("a mixed-width run's salient tokens are chosen over the whole run: its prefix cannot be cut")


STORED["mixed"] = MixedTensor


def _no_index(x: torch.Tensor) -> torch.Tensor:
    b, h = x.shape[:2]
    return torch.empty(b, h, 0, dtype=torch.int32, device=x.device)


def _groups_floor(n: int, group: int) -> int:
    return n // group * group


def allocate(quant: Hadamard, scores: torch.Tensor, starts: list[int], first: bool) -> list[int]:
    """Salient tokens of each head of a flat run (``scores`` [n], heads from ``starts``): one budget
    (each head's :func:`salient_count`, pooled) given to the best scores of any head
    (its first ``sinks`` tokens left out), each head's share then rounded to whole key groups
    (largest remainders first, no head beyond what it holds)."""
    n, g, sinks = scores.shape[-1], quant.group, quant.sinks if first else 0
    ends = [*starts[1:], n]
    caps = [_groups_floor(max(0, e - s - sinks), g) for s, e in zip(starts, ends)]
    total = min(sum(salient_count(quant, e - s) for s, e in zip(starts, ends)), sum(caps))
    if total == 0:
        return [0] * len(starts)
    s = scores.float().clone()
    for a in starts:
        s[a : a + sinks] = float("-inf")
    chosen = torch.zeros(n, dtype=torch.bool, device=s.device)
    chosen[s.topk(total).indices] = True
    raw = [int(chosen[a:e].sum()) for a, e in zip(starts, ends)]
    counts = [min(_groups_floor(r, g), c) for r, c in zip(raw, caps)]
    by_rest = sorted(range(len(raw)), key=lambda i: raw[i] - counts[i], reverse=True)
    while sum(counts) < total:  # the groups left go to the heads whose shares were cut the most
        i = next(i for i in by_rest if counts[i] < caps[i])
        counts[i] += g
        by_rest.remove(i)
        by_rest.append(i)
    return counts


def salient_count(quant: Hadamard, n: int) -> int:
    """A head's share of the salient tokens: ``salient * n`` rounded down to whole key groups (the
    heads of a layer pool their shares, :func:`allocate`)."""
    return _groups_floor(int(quant.salient * n), quant.group)


def _pick(scores: torch.Tensor, count: int, sinks: int) -> torch.Tensor:
    """The ``count`` best of ``scores`` [..., n], its first ``sinks`` left out: [..., count], ascending."""
    s = scores.float().clone()
    s[..., :sinks] = float("-inf")
    return s.topk(count, dim=-1).indices.sort(dim=-1).values


def encode(quant: Hadamard, x: torch.Tensor, kind: str, starts: "list[int] | None", first: bool,
           scores: torch.Tensor | None) -> MixedTensor:
    """``x`` [B, H, n, D] (keys with ``kind`` "keys", else values) as a mixed-width run: the heads of a
    row share one budget of ``quant.salient * H * n`` tokens (:func:`allocate`), given by ``scores``
    [B, H, n] at ``quant.high_bits``. With ``starts`` ``x`` is a ragged layer's heads back to back
    ([1, 1, n, D]); a uniform run of one row is stored that way too (``MixedTensor.heads``); rows of a
    batch choose per head."""
    low_cfg = dataclasses.replace(quant, salient=0.0)
    high_cfg = dataclasses.replace(quant, bits=quant.high_bits, value_bits=None, clip=None, salient=0.0)
    fn = "quantize_keys" if kind == "keys" else "quantize_values"
    b, h, n, d = x.shape
    if scores is not None and scores.shape != (b, h, n):
        raise ValueError(f"hadamard: salient scores must be [B, H, N] = {[b, h, n]}, got {list(scores.shape)}")
    if scores is None or salient_count(quant, n) == 0:
        return MixedTensor(getattr(low_cfg, fn)(x, starts=starts, first=first), None, _no_index(x))
    if b > 1:  # per row and head: a uniform run
        count = min(salient_count(quant, n), _groups_floor(n - (quant.sinks if first else 0), quant.group))
        idx = _pick(scores, count, quant.sinks if first else 0)
        take = lambda i: x.gather(2, i.unsqueeze(-1).expand(-1, -1, -1, d))  # noqa: E731
        low = getattr(low_cfg, fn)(take(other_positions(idx, n)), first=first)
        return MixedTensor(low, getattr(high_cfg, fn)(take(idx), first=False), idx.int())
    heads = 0
    if starts is None:  # one row: its heads back to back
        heads, starts = h, [i * n for i in range(h)]
        x, scores, n = x.reshape(1, 1, h * n, d), scores.reshape(1, 1, h * n), h * n
    counts = allocate(quant, scores[0, 0], starts, first)
    if not sum(counts):
        return MixedTensor(getattr(low_cfg, fn)(x, starts=starts, first=first), None, _no_index(x), heads)
    sinks = quant.sinks if first else 0
    ends = [*starts[1:], n]
    picks = [_pick(scores[0, 0, a:e], c, sinks) + a for a, e, c in zip(starts, ends, counts) if c]
    idx = torch.cat(picks).view(1, 1, -1)
    low_starts = [a - sum(counts[:i]) for i, a in enumerate(starts)]
    rest = other_positions(idx, n)
    low = getattr(low_cfg, fn)(x[:, :, rest[0, 0]], starts=low_starts, first=first)
    high = getattr(high_cfg, fn)(x[:, :, idx[0, 0]], first=False)
    return MixedTensor(low, high, idx.int(), heads)
