"""Compression policies: plain config dataclasses, and a spec-string parser.

A spec is a ``+``-separated chain applied left to right: evictions first, then at most one
quantizer, e.g. ``"snapkv(keep=0.25)+kivi(bits=2,group=32,residual=128)"``, and optionally a
``decode(max_tokens=...)`` budget for the tokens generation adds; ``"none"`` stores the cache as it is.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from memfit.kv.decode import DecodeBudget
from memfit.kv.evict import H2O, TOVA, Eviction, Knorm, KVzip, PyramidKV, SnapKV, StreamingLLM
from memfit.kv.gear import GEAR
from memfit.kv.klt import KLT
from memfit.kv.lowrank import LowRank
from memfit.kv.million import Million
from memfit.kv.oscar import Oscar
from memfit.kv.qjl import QJL
from memfit.kv.quant import KIVI, LayerBits
from memfit.kv.rotate import Hadamard
from memfit.kv.xquant import XQuant
from memfit.kv.zipcache import ZipCache

EVICTIONS: dict[str, type[Eviction]] = {"snapkv": SnapKV, "streaming": StreamingLLM, "kvzip": KVzip, "h2o": H2O,
                                        "tova": TOVA, "knorm": Knorm, "pyramidkv": PyramidKV}
QUANTIZERS: dict[str, type] = {"kivi": KIVI, "kvtuner": LayerBits, "gear": GEAR, "qjl": QJL,
                               "hadamard": Hadamard, "million": Million, "zipcache": ZipCache, "klt": KLT,
                               "xquant": XQuant, "oscar": Oscar}
METHODS: dict[str, type] = {**EVICTIONS, "lowrank": LowRank, **QUANTIZERS, "decode": DecodeBudget}


def not_packed(quant) -> str | None:
    """Why the CUDA decode kernel cannot read what this quantizer stores (None when it can: 2/4-bit
    KIVI codes, with or without sparse outliers, or rotated codes; no salient tokens). The one list both
    ``Policy.packed_decode`` (a spec, before any layer is filled) and ``CompressedLayer.not_packed``
    (a filled layer, which also checks its tensors) read."""
    if not isinstance(quant, (KIVI, Hadamard)):
        return "no KIVI quantizer"
    if getattr(quant, "salient", 0):
        return "tokens at two widths (salient)"
    if quant.bits not in (2, 4) or quant.vbits not in (2, 4):
        return "codes of other than 2 or 4 bits"
    return None


class PolicyError(ValueError):
    """A policy spec that cannot be parsed or names an unknown method or argument."""


@dataclass(frozen=True)
class Policy:
    evictions: tuple[Eviction, ...] = ()
    quant: KIVI | LayerBits | GEAR | QJL | Hadamard | Million | ZipCache | KLT | None = None
    decode: DecodeBudget | None = None
    lowrank: LowRank | None = None

    @property
    def is_none(self) -> bool:
        return not self.evictions and self.quant is None and self.decode is None and self.lowrank is None

    @property
    def packed_decode(self) -> bool:
        """Whether the CUDA decode kernel reads what this policy stores (else every decode step
        dequantizes it first; ``CompressedLayer.not_packed`` says why for a filled layer): 16-bit, or 2/4-bit
        KIVI (with or without sparse outliers) or rotated codes, without salient tokens or low-rank keys."""
        return self.lowrank is None and (self.quant is None or not_packed(self.quant) is None)

    def queries_needed(self) -> int:
        own = self.quant.window if isinstance(self.quant, LayerBits) else 0  # queries its sensitivity reads
        if isinstance(self.quant, ZipCache):
            own = self.quant.recent  # the recent half of its probe
        if isinstance(self.quant, KLT):
            own = self.quant.queries  # they weight its fit
        return max([own, *(e.queries_needed() for e in self.evictions)])

    def probe(self) -> float:
        """The fraction of the prefill's other queries the quantizer's saliency reads (ZipCache)."""
        return self.quant.probe if isinstance(self.quant, ZipCache) else 0.0

    @property
    def prefix_reusable(self) -> bool:
        """Whether a stored context's first tokens are what a prefill of those tokens alone would give,
        so that it can be cut and extended: not after eviction, low rank or a quantizer's salient
        tokens (ZipCache, the rotated quantizer's ``salient``), which are functions of the whole context."""
        return (not self.evictions and self.lowrank is None and not isinstance(self.quant, ZipCache)
                and not getattr(self.quant, "salient", 0))

    def observes(self) -> set[str]:
        """What the prefill must record for this policy's evictions and quantizer (see ``Observation``)."""
        own = getattr(self.quant, "observes", None)  # the rotated quantizer's salient tokens: KVzip's scores
        return {e.observes for e in self.evictions if e.observes} | ({own} if own else set())

    @property
    def token_group(self) -> int:
        """Tokens the quantizer codes together (its key group; 1 without one): a ragged eviction
        rounds each head's count to whole groups, which quantize without a 16-bit remainder."""
        return getattr(self.quant, "group", 1) if self.quant is not None else 1

    @property
    def kvzip_chunk(self) -> int:
        """The repeat pass's chunk for KVzip's scores: its evictions' smallest, else KVzip's default."""
        return min((e.chunk for e in self.evictions if isinstance(e, KVzip)), default=KVzip.chunk)

    @property
    def methods(self) -> tuple:
        """Every method of the policy in the order a spec spells them."""
        return (*self.evictions, *(m for m in (self.lowrank, self.quant, self.decode) if m))

    @property
    def spec(self) -> str:
        """Canonical spec: every argument spelled out, so equal policies have equal specs."""
        return "+".join(_format(m) for m in self.methods) if not self.is_none else "none"

    @property
    def short_spec(self) -> str:
        """The spec with each method's first argument and the others that differ from their defaults:
        for labels (it parses back to the same policy; the canonical :attr:`spec` is what keys and
        records use)."""
        return "+".join(_format(m, defaults=False) for m in self.methods) if not self.is_none else "none"

    def __str__(self) -> str:
        return self.spec


def _name_of(method: object) -> str:
    return next(n for n, cls in METHODS.items() if type(method) is cls)


def _format(method: object, defaults: bool = True) -> str:
    """``name(arg=value,...)``: every argument (``defaults``), else the first and those not at their
    default; arguments marked ``if-set`` are spelled only when set either way."""
    fields = dataclasses.fields(method)
    args = ",".join(f"{f.name}={getattr(method, f.name)}" for f in fields
                    if getattr(method, f.name) != f.default
                    or (f.metadata.get("spec") != "if-set" and (defaults or f is fields[0])))
    return f"{_name_of(method)}({args})"


def _parse_value(text: str, method: str, name: str, kind: str = "") -> object:
    t = text.strip()
    if t.lower() == "none":
        return None
    if kind == "bool":
        if t.lower() not in ("true", "false", "1", "0"):
            raise PolicyError(f"{method}: argument {name}={t!r} must be true or false")
        return t.lower() in ("true", "1")
    if kind == "str":
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", t):
            raise PolicyError(f"{method}: argument {name}={t!r} must be a plain word")
        return t
    try:
        return int(t)
    except ValueError:
        pass
    try:
        return float(t)
    except ValueError:
        raise PolicyError(f"{method}: argument {name}={t!r} is not a number") from None


_TERM = re.compile(r"^\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:\((.*)\))?\s*$")


def _build(name: str, argtext: str | None) -> object:
    cls = METHODS.get(name.lower())
    if cls is None:
        raise PolicyError(f"unknown method {name!r}; valid methods: none, {', '.join(sorted(METHODS))}")
    valid = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, object] = {}
    for part in filter(str.strip, (argtext or "").split(",")):
        if "=" not in part:
            raise PolicyError(f"{name}: expected name=value, got {part.strip()!r}; valid arguments: {', '.join(valid)}")
        key, val = (s.strip() for s in part.split("=", 1))
        if key not in valid:
            raise PolicyError(f"{name}: unknown argument {key!r}; valid arguments: {', '.join(valid)}")
        value = _parse_value(val, name, key, str(valid[key].type))
        if isinstance(value, float) and "float" not in str(valid[key].type):
            raise PolicyError(f"{name}: argument {key} must be an integer, got {val}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        msg = str(e)
        raise PolicyError(msg if msg.startswith(name.lower()) else f"{name.lower()}: {msg}") from None


def parse_policy(spec: "str | Policy | None") -> Policy:
    """Parse a spec string (see module docstring) into a :class:`Policy`."""
    if isinstance(spec, Policy):
        return spec
    if spec is None or not str(spec).strip() or str(spec).strip().lower() == "none":
        return Policy()
    evictions: list[Eviction] = []
    quant = decode = lowrank = None
    for term in str(spec).split("+"):
        m = _TERM.match(term)
        if not m:
            raise PolicyError(f"cannot parse {term.strip()!r} in policy {spec!r}; expected name or name(arg=value,...)")
        if m.group(1).lower() == "none":
            raise PolicyError(f"'none' cannot be combined with other methods in {spec!r}")
        method = _build(m.group(1), m.group(2))
        if isinstance(method, DecodeBudget):
            if decode is not None:
                raise PolicyError(f"in {spec!r}: only one decode budget per policy")
            decode = method
        elif isinstance(method, LowRank):
            if lowrank is not None or quant is not None:
                raise PolicyError(f"in {spec!r}: one lowrank term, before the quantizer (its coefficients are what is quantized)")
            if any(e.ragged for e in evictions):
                raise PolicyError(f"in {spec!r}: lowrank needs heads=uniform evictions (one basis for the layer's heads)")
            lowrank = method
            if method.layers > 1 and evictions:
                raise PolicyError(f"in {spec!r}: lowrank with layers > 1 shares token coefficients across layers, "
                                  "which needs every layer to keep the same tokens: no eviction before it")
        elif isinstance(method, Eviction):
            if quant is not None or lowrank is not None:
                raise PolicyError(f"in {spec!r}: evictions must come before lowrank and quantization (evict, then compress)")
            if evictions and evictions[-1].ragged:
                raise PolicyError(f"in {spec!r}: an eviction with heads={evictions[-1].heads} must be the last eviction")
            evictions.append(method)
        else:
            if quant is not None:
                raise PolicyError(f"in {spec!r}: only one quantizer per policy")
            if lowrank is not None and not isinstance(method, KIVI):
                raise PolicyError(f"in {spec!r}: lowrank's key coefficients are quantized with kivi only")
            if lowrank is not None and lowrank.layers > 1:
                raise PolicyError(f"in {spec!r}: lowrank with layers > 1 keeps its shared coefficients unquantized")
            quant = method
    if evictions and evictions[-1].keys and quant is not None and not hasattr(quant, "tier_coder"):
        raise PolicyError(f"in {spec!r}: keys= (a key-only tier) is coded by klt (at its tier_bits) or kept in "
                          f"16-bit without a quantizer, not by {_name_of(quant)}")
    if evictions and evictions[-1].keys and decode:  # not built: the budget's scores read the layer's own tokens only
        raise PolicyError(f"in {spec!r}: keys= (a key-only tier) is not combined with a decode budget")
    if isinstance(quant, XQuant) and evictions:
        raise PolicyError(f"in {spec!r}: xquant caches each token's layer input, which all its KV heads share: it "
                          "cannot follow an eviction, which keeps different tokens in different heads")
    if isinstance(quant, Oscar) and any(e.ragged for e in evictions):
        raise PolicyError(f"in {spec!r}: oscar rotates each KV head by a matrix of its own, so the heads cannot be "
                          "stored back to back: evict with heads=uniform (e.g. kvzip(keep=0.5,heads=uniform)+oscar)")
    if getattr(quant, "pre_rope", False) and (lowrank or decode or (evictions and not hasattr(quant, "quantize_heads"))):
        # the cache puts RoPE back at each stored token's position: it knows them while it holds every
        # token in order, or, after an eviction, where the quantizer codes each head apart (klt) and
        # the ragged storage records which tokens each head kept
        raise PolicyError(f"in {spec!r}: pre_rope keys cannot follow lowrank or a decode budget, nor an eviction "
                          "unless the quantizer is klt")
    return Policy(tuple(evictions), quant, decode, lowrank)


def describe_methods() -> dict[str, str]:
    """Method name -> its arguments with defaults, for `memfit info`."""
    return {
        name: ", ".join(f"{f.name}={f.default}" for f in dataclasses.fields(cls))
        for name, cls in sorted(METHODS.items())
    }
