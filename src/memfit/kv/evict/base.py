from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

from memfit.lazy import lazy_module

torch = lazy_module("torch")

HEAD_MODES = ("uniform", "adaptive", "global")
ADAPTIVE_FLOOR = 0.2  # adaptive heads: each head keeps at least this share of its uniform budget (AdaKV's safeguard)


@dataclass
class Observation:
    """What the model showed during prefill, for one layer (each field only if some method asked).

    ``queries`` [B, Hq, W, D]: the context's last W query states (after RoPE); ``attention_sum``
    [B, H, N]: attention each key received from every context query (H2O); ``reconstruction``
    [B, H, N]: the most attention each key received while the model repeated the context (KVzip);
    ``probe``: (positions [P], query states [B, Hq, P, D]) of a random sample of the context's
    queries (ZipCache); ``saliency`` [B, H, N]: a quantizer's per-token scores computed from them;
    ``positions`` [B, H, N]: each token's position, which the cache follows through evictions when
    it codes keys before RoPE."""

    queries: torch.Tensor | None = None
    attention_sum: torch.Tensor | None = None
    reconstruction: torch.Tensor | None = None
    probe: tuple[torch.Tensor, torch.Tensor] | None = None
    saliency: torch.Tensor | None = None
    positions: torch.Tensor | None = None

    #: the fields with one entry per context token, which follow the tokens an eviction keeps
    PER_TOKEN: ClassVar[tuple[str, ...]] = ("attention_sum", "reconstruction", "saliency", "positions")

    def kept(self, idx: torch.Tensor) -> "Observation":
        """This observation for the tokens ``idx`` [B, H, k] of each head."""
        return dataclasses.replace(self, **{n: getattr(self, n).gather(-1, idx) for n in self.PER_TOKEN
                                            if getattr(self, n) is not None})

    def need(self, name: str, method: str) -> torch.Tensor:
        t = getattr(self, name)
        if t is None:
            raise ValueError(f"{method} scores with the prefill's {name.replace('_', ' ')}: use lm.prefill "
                             "(or pass the Observation it records to cache.compress)")
        return t


@dataclass(frozen=True)
class Eviction:
    """Base of the eviction methods. ``keep``: fraction of context tokens kept (on average over
    layers and heads). ``heads``: "uniform" keeps the same number in every KV head; "adaptive"
    (AdaKV) lets heads with peaked scores take budget from heads with flat ones within a layer;
    "global" (KVzip's pair-level threshold) pools the budget of every layer and head, so layers
    whose scores are peaked also take budget from flat ones. Adaptive and global are stored ragged.

    ``keys`` (ragged heads; 0: off): the fraction of context tokens whose keys are kept, more than
    ``keep``. The tokens ranked between ``keep`` and ``keys`` keep their keys alone (a key-only tier,
    after klt at ``tier_bits`` or in 16-bit without a quantizer) and share one mean value per head:
    the attention they draw stays on them instead of moving to the kept tokens, for under half of a
    kept token's bytes (at 32x on SmolLM2 much of what the eviction cost was that shift: see
    docs/evaluation.md)."""

    keep: float = 0.25
    heads: str = "uniform"
    keys: float = field(default=0.0, metadata={"spec": "if-set"})

    #: what ``score`` reads from the Observation: "queries", "attention_sum", "reconstruction" or None
    observes: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        name = type(self).__name__.lower()
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"{name}: keep must be in (0, 1], got {self.keep}")
        if self.heads not in HEAD_MODES:
            raise ValueError(f"{name}: heads must be one of {', '.join(HEAD_MODES)}, got {self.heads!r}")
        if self.keys and not self.keep < self.keys <= 1.0:
            raise ValueError(f"{name}: keys (the fraction whose keys are kept) must be in (keep={self.keep}, 1], "
                             f"got {self.keys}")
        if self.keys and not self.ragged:
            raise ValueError(f"{name}: keys= (a key-only tier) is stored ragged: use heads=adaptive or heads=global")

    def queries_needed(self) -> int:
        """How many of the context's last queries ``score`` needs (0: none)."""
        return 0

    def layer_keep(self, layer: int, num_layers: int) -> float:
        """Fraction kept in ``layer`` (uniform here; PyramidKV shrinks it with depth)."""
        return self.keep

    def budget(self, n: int, keep: float | None = None) -> int:
        """Tokens kept per head out of ``n``."""
        return min(n, max(1, math.ceil((self.keep if keep is None else keep) * n)))

    def keys_budget(self, n: int, layer: int, num_layers: int) -> int:
        """Tokens a head keeps at least the keys of, out of ``n`` (``keys``; scaled with depth as ``keep`` is)."""
        return self.budget(n, self.keys * self.layer_keep(layer, num_layers) / self.keep)

    def score(self, keys: torch.Tensor, values: torch.Tensor, obs: Observation) -> torch.Tensor:
        """keys/values [B, H, N, D] (RoPE applied) -> scores [B, H, N]; higher is kept first."""
        raise NotImplementedError

    @property
    def ragged(self) -> bool:
        """Whether heads keep different numbers of tokens (stored ragged)."""
        return self.heads != "uniform"

    def select(self, scores: torch.Tensor, k: int, unit: int = 1) -> "torch.Tensor | list[torch.Tensor]":
        """Kept token indices: [B, H, k] (uniform), or one sorted index tensor per head (adaptive,
        batch 1) whose lengths sum to about H * k, each a multiple of ``unit`` (see
        :func:`select_global`). A global eviction selects across layers in ``select_global``; given
        one layer alone it is adaptive within it."""
        if self.heads == "uniform" or k >= scores.shape[-1]:
            return select_topk(scores, k)
        return select_adaptive(scores, k, unit)


def key_only(wide: list[torch.Tensor], kept: list[torch.Tensor]) -> list[torch.Tensor]:
    """Per head, the sorted tokens of ``wide`` (the selection at ``keys``) not in ``kept``: the key-only tier."""
    return [w[~torch.isin(w, k)] for w, k in zip(wide, kept)]


def head_floor(k: int) -> int:
    """The tokens every ragged head keeps of a per-head budget ``k`` (``ADAPTIVE_FLOOR`` of it):
    its own best, whatever the other heads score."""
    return min(k, math.ceil(ADAPTIVE_FLOOR * k))


def select_topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, H, k] of the ``k`` best tokens per head, in their original order."""
    return scores.topk(k, dim=-1).indices.sort(dim=-1).values


def select_adaptive(scores: torch.Tensor, k: int, unit: int = 1) -> list[torch.Tensor]:
    """AdaKV-style allocation of ``H * k`` tokens over the heads of one row: every head keeps its
    ``ADAPTIVE_FLOOR * k`` best tokens, the rest go to the best scores of any head. Scores must be
    comparable across heads (attention probabilities, norms). ``unit``: as in :func:`select_global`."""
    return select_global([scores], [k], unit)[0]


def select_global(scores: list[torch.Tensor], ks: list[int], unit: int = 1) -> list[list[torch.Tensor]]:
    """Allocation of ``sum(H * ks[l])`` tokens over the heads of several layers of one row
    (``scores[l]``: [1, H, N_l]): every head of layer ``l`` keeps its ``ADAPTIVE_FLOOR * ks[l]``
    best tokens, the rest go to the best scores of any head of any layer. Returns, per layer, one
    sorted index tensor per head.

    ``unit`` > 1 (a quantizer's token group): each head's count is then rounded to whole units
    (largest remainders first; the total at most the allocation, less than a unit under it), as a ragged
    head quantizes whole groups of its tokens and keeps the rest in 16-bit: an unrounded head holds
    ``unit / 2`` tokens of 16-bit on average, 13% of a klt cache's bytes at 16x. A head that keeps
    fewer than ``unit`` tokens (all of them 16-bit) is completed to one unit from the tokens the
    roundings freed, fullest first, while they suffice, else left as chosen, as is one that keeps every
    token of its layer."""
    flat, shapes = [], []
    for s, k in zip(scores, ks):
        b, h, n = s.shape
        if b != 1:
            raise ValueError(f"adaptive head budgets need batch size 1, got {b}")
        s = s[0].float().clone()
        s.scatter_(-1, s.topk(head_floor(k), dim=-1).indices, float("inf"))
        flat.append(s.flatten())
        shapes.append((h, n))
    total = sum(h * k for (h, _), k in zip(shapes, ks))
    chosen = torch.zeros(sum(h * n for h, n in shapes), dtype=torch.bool, device=scores[0].device)
    chosen[torch.cat(flat).topk(total).indices] = True
    out, start = [], 0
    counts = _whole_units(chosen, shapes, unit) if unit > 1 else None
    for layer, (h, n) in enumerate(shapes):
        if counts is None:
            out.append([row.nonzero().squeeze(-1) for row in chosen[start : start + h * n].view(h, n)])
        else:
            # a head's floor is its own best scores: its best ``c`` by score are what it keeps
            s = scores[layer][0].float()
            out.append([s[i].topk(int(c)).indices.sort().values for i, c in enumerate(counts[layer])])
        start += h * n
    return out


def _whole_units(chosen: torch.Tensor, shapes: list[tuple[int, int]], unit: int) -> list[list[int]]:
    """Per layer and head, its count in ``chosen`` rounded to whole ``unit`` tokens (see
    :func:`select_global`): every roundable head first rounded down, then the tokens the roundings
    freed complete heads under one unit, then the whole units left go back to the largest remainders."""
    counts, caps, start = [], [], 0
    for h, n in shapes:
        counts += chosen[start : start + h * n].view(h, n).sum(-1).tolist()
        caps += [n] * h
        start += h * n
    out = list(counts)
    roundable = [i for i, (c, n) in enumerate(zip(counts, caps)) if unit <= c < n]
    for i in roundable:
        out[i] = counts[i] // unit * unit
    freed = sum(counts[i] - out[i] for i in roundable)
    # a head under one group holds its tokens in 16-bit, several times a quantized token's bytes: the
    # tokens the roundings freed first complete such heads to one whole group, fullest first
    for i in sorted((i for i, (c, n) in enumerate(zip(counts, caps)) if 0 < c < unit <= n),
                    key=lambda i: counts[i], reverse=True):
        if freed < unit - counts[i]:
            break
        freed -= unit - counts[i]
        out[i] = unit
    spare = freed // unit  # never more than allocated: bounds hold
    for i in sorted(roundable, key=lambda i: counts[i] - out[i], reverse=True):
        if spare <= 0:
            break
        if out[i] + unit <= caps[i]:
            out[i] += unit
            spare -= 1
    res, at = [], 0
    for h, _ in shapes:
        res.append(out[at : at + h])
        at += h
    return res
