"""Budget planner: the byte cost of a policy, computed before any prefill, and the policy that fits
a byte budget best.

"Best" is measured: a calibration table (``calibration.json`` beside this file, written by ``memfit
calibrate``) holds, for a few families of policies (a quantizer, or an eviction whose ``keep`` is free
followed by a quantizer, each with its 16-bit window), the accuracy they kept relative to an
uncompressed cache at several compressions. The file holds one table a context length it was
measured at; a plan reads the one nearest its own length. For a budget, every family is fitted to
it (the largest ``keep`` that fits) and the planner takes the one whose measured accuracy,
interpolated at the compression it reaches, is highest. Without a table it falls back to a fixed
ladder (none, 8-bit, 4-bit, then eviction in 4-bit).

The bytes are counted the way ``CompressedCache.nbytes`` counts them (codes, scales, zero points,
the 16-bit window, the per-head length table of ragged layers). For uniform heads the count is
exact; for adaptive and global (ragged) heads it is an upper bound, because each head rounds its own window.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from memfit.kv.evict.base import head_floor
from memfit.kv.policy import EVICTIONS, Policy, parse_policy
from memfit.kv.quant import KIVI

if TYPE_CHECKING:
    from memfit.kv.cache import CompressedCache
from memfit.units import parse_bytes

MIN_KEEP = 0.02  # below this, eviction leaves too little of any context to be worth planning
# Relative accuracy a policy is charged per e-fold of compression beyond what the budget asks: the
# table's points (30 samples) do not resolve a point or two, so a quantizer alone at 7x does not win
# a 2x budget over a family that fills it on a difference of that size, yet one a few points better does.
OVERSHOOT_COST = 0.03


@dataclass(frozen=True)
class KVShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype_bytes: int = 2  # element size of what is kept unquantized (the model's compute dtype)

    @classmethod
    def from_config(cls, cfg, dtype_bytes: int = 2) -> "KVShape":
        """The KV shape a text model's config describes: a transformers config, or its config.json
        read as a dict (head_dim defaults to hidden_size / heads, KV heads to the query heads)."""
        get = cfg.get if isinstance(cfg, dict) else (lambda name: getattr(cfg, name, None))
        heads = get("num_attention_heads")
        return cls(get("num_hidden_layers"), get("num_key_value_heads") or heads,
                   get("head_dim") or get("hidden_size") // heads, dtype_bytes)

    @property
    def full_bytes_per_token(self) -> int:
        """An uncompressed 16-bit cache: keys and values, 2 bytes each."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * 2


def _ragged_bytes(tokens: int, heads: int, q: KIVI | None, d: int, e: int, least: int = 0,
                  layer_tokens: int = 0) -> float:
    """Upper bound for ``heads`` ragged heads holding ``tokens`` in all, each at least ``least`` (the
    eviction's floor), of layers of ``layer_tokens`` (0: unknown). A 16-bit token costs more than a
    quantized one, so the bound is the most 16-bit window the heads can hold between them. A ragged
    eviction rounds each head to whole key groups (``select_global``), whose window is at most the
    residual's whole groups; a head under one group holds it all in 16-bit, and one that keeps its
    whole layer holds ``layer_tokens - spilled(layer_tokens)``. With a floor of a group or more no
    head is under one, else only as many as leave the other heads room for the rest; at most
    ``tokens // layer_tokens`` heads keep their whole layer."""
    if q is None:
        return 2 * e * d * tokens
    c = q.token_bytes(d)
    g, n = q.group, layer_tokens
    window = heads * max(q.residual, g - 1)  # every head at its largest window
    if n >= g:  # fewer, where the layer's length and the floor say how many heads can hold one
        small = 0 if least >= g else min(heads, max(0, (heads * n - tokens) // (n - g + 1)))
        window = min(window, small * (g - 1) + min(heads, tokens // n) * (n - q.spilled(n))
                     + heads * (q.residual // g) * g)
    window = min(tokens, window)
    return c * (tokens - window) + 2 * e * d * window


def _run_bytes(q, n: int, d: int) -> float:
    """One head's ``n`` quantized tokens: exactly, where the quantizer rounds per run (ZipCache's
    salient count), else its bytes a token times ``n``."""
    return q.run_bytes(n, d) if hasattr(q, "run_bytes") else q.token_bytes(d) * n


def _lowrank_layer_bytes(n: int, p: Policy, shape: KVShape, layer: int = 0) -> float:
    """One layer with low-rank keys: the basis, the keys' coefficients (quantized or not; with
    ``layers=G``, held by the first layer of each group of G), the values and the 16-bit window."""
    h, d, e, r, q = shape.num_kv_heads, shape.head_dim, shape.dtype_bytes, p.lowrank.rank, p.quant
    basis = e * h * d * r
    if q is None:
        coef = e * r * n if layer % p.lowrank.layers == 0 else 0
        return basis + coef + h * e * d * n  # the whole context as coefficients + values
    spilled = q.spilled(n)
    coef = spilled * (r * q.bits / 8 + 4 * r / q.group + r * q.outliers * 6)
    values = h * spilled * (d * q.bits / 8 + 4 * d / q.value_group(d) + d * q.outliers * 6)
    return basis + coef + values + 2 * h * e * d * (n - spilled)


def policy_nbytes(policy: Policy, num_tokens: int, shape: KVShape) -> int:
    """Bytes the policy's cache holds after reading ``num_tokens`` context tokens (batch 1)."""
    p = policy
    h, d, e = shape.num_kv_heads, shape.head_dim, shape.dtype_bytes
    total, pooled = 0.0, 0  # pooled: tokens of a global eviction, which may move between layers
    least = None  # the smallest floor a ragged head keeps (select_global's share of its budget)
    # keys before RoPE after an eviction: stored ragged (uniform heads too) with which tokens each
    # head kept (a bit a context token) and the span
    positioned = bool(p.evictions) and getattr(p.quant, "pre_rope", False)
    # the tokens a ragged eviction selects among (a head keeping them all keeps its whole layer): known
    # where it is the only eviction; after another, the bound assumes nothing about them
    cap = num_tokens if len(p.evictions) == 1 else 0
    tier = 0  # key-only tokens (``keys=``) of every layer and head
    for layer in range(shape.num_layers):
        n, ragged = num_tokens, None
        for ev in p.evictions:
            k = ev.budget(n, ev.layer_keep(layer, shape.num_layers))
            if ev is p.evictions[-1] and ev.keys and k < n:
                tier += h * (ev.keys_budget(n, layer, shape.num_layers) - k)
                total += _tier_layer_bytes(p.quant, h, d, e, num_tokens)
            if k < n or ev.heads == "global":
                ragged = ev.heads if ev.ragged else None
                n = k
        floor = head_floor(n)
        least = floor if least is None else min(least, floor)
        if p.lowrank is not None:
            total += _lowrank_layer_bytes(n, p, shape, layer)
        elif ragged == "global":
            pooled += h * n
        elif ragged == "adaptive":
            total += _ragged_bytes(h * n, h, p.quant, d, e, floor, cap)
        else:
            total += h * (2 * e * d * n if p.quant is None else
                          _run_bytes(p.quant, p.quant.spilled(n), d) + 2 * e * d * (n - p.quant.spilled(n)))
        if p.quant is not None:
            total += p.quant.fixed_bytes(h, d)  # per layer, whatever it keeps (GEAR's bases)
        if ragged or positioned:
            total += 2 * h * 4  # the int32 table of per-head lengths
        if positioned:
            total += h * math.ceil(num_tokens / 8) + 16
    if pooled:
        total += _ragged_bytes(pooled, h * shape.num_layers, p.quant, d, e, least, cap)
    if tier:  # the selection rounds heads to whole groups: a unit per head and layer more, at most
        tier += h * shape.num_layers * p.token_group
        total += tier * (e * d if p.quant is None else p.quant.tier_token_bytes(d))
    return math.ceil(total)


def _tier_layer_bytes(q, h: int, d: int, e: int, num_tokens: int) -> float:
    """A layer's key-only tier beyond its tokens' codes: the lengths table and each head's mean value;
    with klt each head's fit (at most every component) and 16-bit rest (under a group), the span and
    the positions' bits (see :class:`memfit.kv.ragged.KeyTier`)."""
    fixed = 2 * h * 4 + h * e * d
    if q is not None:
        fixed += h * (d * d + 9 * d) + h * (q.group - 1) * e * d + 16 + h * math.ceil(num_tokens / 8)
    return fixed


LADDER = (Policy(), Policy(quant=KIVI(bits=8)), Policy(quant=KIVI(bits=4)))  # tried in order: the first that fits


def _evicted(evict: str, keep: float, bits: int) -> Policy:
    return Policy((EVICTIONS[evict](keep=keep),), KIVI(bits=bits))


def plan_ladder(budget_bytes: int, num_tokens: int, shape: KVShape, evict: str = "kvzip") -> tuple[Policy, int]:
    """The fixed-ladder plan (no calibration table): no compression if it fits, then
    8- and 4-bit KIVI, then ``evict`` keeping as many tokens as fit, in 4-bit (2-bit only when even
    4-bit at ``MIN_KEEP`` does not fit). Raises ValueError when nothing fits."""
    _check_plan_args(budget_bytes, num_tokens, evict)
    for policy in LADDER:
        b = policy_nbytes(policy, num_tokens, shape)
        if b <= budget_bytes:
            return policy, b
    for bits in (4, 2):
        fits = lambda keep: policy_nbytes(_evicted(evict, keep, bits), num_tokens, shape) <= budget_bytes  # noqa: E731
        if not fits(MIN_KEEP):
            continue
        policy = _evicted(evict, _largest_keep(fits), bits)
        return policy, policy_nbytes(policy, num_tokens, shape)
    _too_small(budget_bytes, num_tokens, policy_nbytes(_evicted(evict, MIN_KEEP, 2), num_tokens, shape))


def _check_plan_args(budget_bytes: int, num_tokens: int, evict: str) -> None:
    if budget_bytes <= 0 or num_tokens <= 0:
        raise ValueError(f"budget and tokens must be positive, got {budget_bytes} bytes for {num_tokens} tokens")
    if evict not in EVICTIONS:
        raise ValueError(f"unknown eviction {evict!r}; valid: {', '.join(sorted(EVICTIONS))}")


def _too_small(budget_bytes: int, num_tokens: int, smallest: int) -> None:
    raise ValueError(f"a KV budget of {budget_bytes} bytes is too small for {num_tokens} tokens: the smallest "
                     f"planned policy needs {smallest} bytes")


def _largest_keep(fits: Callable[[float], bool]) -> float:
    """The largest keep in [MIN_KEEP, 1] with ``fits(keep)``, to 0.1% of the context (``fits(MIN_KEEP)``
    must hold)."""
    lo, hi = MIN_KEEP, 1.0
    while hi - lo > 1e-3:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return math.floor(lo * 1000) / 1000


@dataclass(frozen=True)
class Family:
    """Policies of one shape: ``template`` with ``{keep}`` where an eviction's keep is free (or none),
    and the (compression, relative accuracy) points measured for it."""

    template: str
    points: tuple[tuple[float, float], ...]

    @property
    def free(self) -> bool:
        return "{keep}" in self.template

    def policy(self, keep: float | None = None, evict: str = "kvzip") -> Policy:
        spec = self.template.format(keep=keep) if self.free else self.template
        return parse_policy(spec.replace("kvzip(", f"{evict}(") if evict != "kvzip" else spec)

    def accuracy(self, compression: float) -> float:
        """Measured relative accuracy at ``compression``: linear in log-compression between points;
        below the least compressed point, that point's. Past the most compressed one nothing was
        measured: the last segment extended, but never more than that point's accuracy scaled down in
        proportion to the extra compression (a flat last segment would promise it forever)."""
        pts = sorted(self.points)
        x = math.log(compression)
        xs = [math.log(c) for c, _ in pts]
        if x <= xs[0]:
            return pts[0][1]
        decayed = pts[-1][1] * pts[-1][0] / compression  # past the last point at most this
        if len(pts) == 1:
            return decayed
        i = next((i for i in range(1, len(pts)) if x <= xs[i]), len(pts) - 1)
        t = (x - xs[i - 1]) / (xs[i] - xs[i - 1])
        est = pts[i - 1][1] + t * (pts[i][1] - pts[i - 1][1])
        return max(0.0, min(est, decayed) if x > xs[-1] else est)

    def limit(self) -> str | None:
        """What the family becomes at keep=1 (its eviction keeps everything): the rest of the
        template, "none" without it; None for a family without a free keep."""
        if not self.free:
            return None
        rest = [t for t in self.template.split("+") if "{keep}" not in t]
        return "+".join(rest) or "none"


@dataclass(frozen=True)
class Calibration:
    """A calibration table (see the module docstring): the families and where they were measured."""

    families: tuple[Family, ...]
    source: dict = field(default_factory=dict)

    def anchored(self) -> "Calibration":
        """Each free family with the point it tends to at keep=1 added: the measured points of its
        rest (a family of its own), or an uncompressed cache's (1x, 100%) when nothing is left."""
        fixed = {f.template: f.points for f in self.families if not f.free}
        fams = []
        for f in self.families:
            lim = f.limit()
            extra = ((1.0, 1.0),) if lim == "none" else fixed.get(lim, ()) if lim else ()
            fams.append(Family(f.template, tuple(sorted(set(f.points) | set(extra)))))
        return Calibration(tuple(fams), self.source)

    @classmethod
    def from_dict(cls, d: dict) -> "Calibration":
        fams = tuple(Family(f["template"], tuple((float(c), float(r)) for c, r in f["points"])) for f in d["families"])
        if not fams or any(not f.points for f in fams):
            raise ValueError("a calibration table needs families, each with at least one measured point")
        return cls(fams, {k: v for k, v in d.items() if k != "families"})

    def to_dict(self) -> dict:
        return {**self.source, "families": [{"template": f.template, "points": [list(p) for p in f.points]}
                                            for f in self.families]}

    @property
    def length(self) -> int | None:
        """The context length (tokens) it was measured at, where it says."""
        return self.source.get("length")


CALIBRATION_FILE = Path(__file__).with_name("calibration.json")


def load_calibration(path: "Path | str | None" = None, num_tokens: int | None = None) -> Calibration | None:
    """The table at ``path`` (default: the one shipped with memfit, read once; None if there is none).
    A file may hold tables measured at several context lengths (``{"tables": [...]}``, see
    :func:`tables_dict`): the one measured nearest ``num_tokens`` (in log length) is returned, the
    first where ``num_tokens`` is None. Which policy keeps the most at a ratio depends on the length:
    at 1K tokens a keep of 0.2 leaves KVzip about 200 tokens a layer, at 4K tokens 800."""
    tables = _shipped_calibration() if path is None else read_tables(Path(path))
    if not tables:
        return None
    if num_tokens is None or len(tables) == 1:
        return tables[0]
    return min(tables, key=lambda t: abs(math.log(num_tokens / t.length)))


def check_lengths(tables: "list[Calibration] | tuple[Calibration, ...]") -> None:
    """Tables kept together must each say its own context length (a positive token count)."""
    lengths = [t.length for t in tables]
    if any(not isinstance(n, int) or n < 1 for n in lengths) or len(set(lengths)) != len(lengths):
        raise ValueError("tables kept together need each its own context length (a positive token count)")


def tables_dict(tables: "list[Calibration]") -> dict:
    """Several tables as one file holds them (ordered by length); see :func:`check_lengths`."""
    check_lengths(tables)
    return {"tables": [t.to_dict() for t in sorted(tables, key=lambda t: t.length)]}


@functools.cache
def _shipped_calibration() -> tuple[Calibration, ...] | None:
    return read_tables(CALIBRATION_FILE)  # every budgeted prefill plans: read the file once


def read_tables(path: Path) -> tuple[Calibration, ...] | None:
    """The tables a file holds: one (as ``memfit calibrate`` writes it) or several (``{"tables": [...]}``)."""
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        tables = tuple(Calibration.from_dict(t) for t in d["tables"]) if "tables" in d else (Calibration.from_dict(d),)
        if not tables:
            raise ValueError("no tables")
        if len(tables) > 1:
            check_lengths(tables)  # the same checks as when they were written
        return tables
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: not a memfit calibration table ({e})") from None


def plan(budget_bytes: int, num_tokens: int, shape: KVShape, evict: str = "kvzip",
         table: "Calibration | None | bool" = True, packed: bool = False) -> tuple[Policy, int]:
    """The policy that fits ``budget_bytes`` best, and its byte count: the family of ``table``
    (True: the shipped one measured nearest ``num_tokens``; None or no table: :func:`plan_ladder`) with
    the highest measured accuracy at the compression it reaches within the budget, less
    ``OVERSHOOT_COST`` per e-fold it compresses beyond the budget's. No compression when it fits.
    ``packed``: only families the CUDA decode kernel reads (:attr:`Policy.packed_decode`; a GPU
    model's). Raises ValueError when nothing fits."""
    table = load_calibration(num_tokens=num_tokens) if table is True else table
    if table is None or table is False:
        return plan_ladder(budget_bytes, num_tokens, shape, evict)
    _check_plan_args(budget_bytes, num_tokens, evict)
    table = table.anchored()
    uncompressed = policy_nbytes(Policy(), num_tokens, shape)
    if uncompressed <= budget_bytes:
        return Policy(), uncompressed
    full = num_tokens * shape.full_bytes_per_token
    best, smallest = None, None
    for fam in table.families:
        if packed and not fam.policy(0.5 if fam.free else None, evict).packed_decode:
            continue
        nbytes = lambda keep: policy_nbytes(fam.policy(keep, evict), num_tokens, shape)  # noqa: B023, E731
        least = nbytes(MIN_KEEP if fam.free else None)
        smallest = least if smallest is None else min(smallest, least)
        if least > budget_bytes:
            continue
        if not fam.free:
            policy = fam.policy()
        elif nbytes(1.0) <= budget_bytes:  # the rest fits alone: no eviction (nor its scoring pass)
            policy = parse_policy(fam.limit())
        else:
            policy = fam.policy(_largest_keep(lambda k: nbytes(k) <= budget_bytes), evict)  # noqa: B023
        b = policy_nbytes(policy, num_tokens, shape)
        over = max(0.0, math.log(budget_bytes / b))  # compressed beyond what was asked
        score = (fam.accuracy(full / b) - OVERSHOOT_COST * over, b)  # ties: the one that uses more of the budget
        if best is None or score > best[0]:
            best = (score, policy, b)
    if best is None and smallest is None:  # no family the kernel reads: KIVI's ladder, which it does
        return plan_ladder(budget_bytes, num_tokens, shape, evict)
    if best is None:
        _too_small(budget_bytes, num_tokens, smallest)
    return best[1], best[2]


def plan_budget(budget: "str | float", num_tokens: int, shape: KVShape, evict: str = "kvzip",
                packed: bool = False) -> tuple[Policy, dict]:
    """The planner's policy for ``budget`` (a size or a compression factor, see :func:`budget_bytes`),
    with what it based the choice on (``ctx.meta["plan"]``; ``calibration_tokens``: the context length
    of the shipped table it read, None without one); ``packed`` as in :func:`plan`."""
    limit = budget_bytes(budget, num_tokens, shape)
    table = load_calibration(num_tokens=num_tokens)  # what plan(table=True) reads, chosen once
    policy, estimate = plan(limit, num_tokens, shape, evict, table=table, packed=packed)
    return policy, {"budget": budget, "budget_bytes": limit, "policy": policy.spec, "estimate": estimate,
                    "full_nbytes": num_tokens * shape.full_bytes_per_token,
                    "calibration_tokens": table.length if table is not None else None}


SLACK_STEPS = 8  # keep fractions tried above the planner's estimate when a budget has room to spare


def spend_slack(derive: Callable[[Policy], "CompressedCache"], policy: Policy, cache: "CompressedCache",
                limit: int) -> tuple[Policy, "CompressedCache"]:
    """Raise the last eviction's keep to the largest of a few steps whose measured bytes fit
    (``derive`` compresses the same prefill with a policy). With ragged heads the planner's estimate
    is an upper bound, so a planned cache often has room to spare. Not a bisection: with ragged
    heads bytes are not monotonic in keep (each head keeps and quantizes whole key groups, so the
    heads' counts move in steps)."""
    if not policy.evictions or cache.nbytes > limit:
        return policy, cache
    ev = policy.evictions[-1]
    with_keep = lambda k: dataclasses.replace(policy, evictions=(*policy.evictions[:-1], dataclasses.replace(ev, keep=k)))  # noqa: E731
    lo, best = ev.keep, (policy, cache)
    hi = min(1.0, ev.keep * limit / max(1, cache.nbytes) * 1.5)
    top_fails = False
    # bytes may grow slower than keep (small contexts: the 16-bit windows and sinks are much of them):
    # while the top of the range fits, the room goes further
    while hi < 1.0:
        trial = derive(with_keep(hi))
        if trial.nbytes > limit:
            top_fails = True
            break
        lo, best, hi = hi, (with_keep(hi), trial), min(1.0, hi * 1.5)
    steps = range(1, SLACK_STEPS) if top_fails else range(1, SLACK_STEPS + 1)
    for keep in sorted({round(lo + (hi - lo) * i / SLACK_STEPS, 4) for i in steps}, reverse=True):
        if keep <= lo:
            break
        trial = derive(with_keep(keep))
        if trial.nbytes <= limit:
            return with_keep(keep), trial
    return best


def budget_bytes(budget: "str | int | float", num_tokens: int, shape: KVShape) -> int:
    """``"8MiB"`` (a size) or ``16`` (a compression factor versus a 16-bit cache) -> bytes."""
    if isinstance(budget, str):
        return parse_bytes(budget)
    if isinstance(budget, (int, float)) and not isinstance(budget, bool) and budget >= 1:
        return int(num_tokens * shape.full_bytes_per_token / budget)
    raise ValueError(f"budget must be a size like '8MiB' or a compression factor >= 1, got {budget!r}")
