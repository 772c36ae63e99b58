"""ContextStore: compressed contexts kept in tiers, fastest first, with LRU, promotion and demotion."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from memfit.store.disk import DiskTier
from memfit.store.entry import CorruptEntry, Entry
from memfit.store.memory import MemoryTier
from memfit.units import parse_bytes

log = logging.getLogger(__name__)

def open_tier(url: str):
    """``mem://?max_bytes=2GiB``, ``file://DIR?max_bytes=..``, ``redis://host:port/db?max_bytes=..``."""
    u = urlparse(url)
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    unknown = set(q) - {"max_bytes", "device"}
    if unknown:
        raise ValueError(f"unknown store option(s) {sorted(unknown)} in {url!r}; valid: max_bytes, device")
    max_bytes = parse_bytes(q.get("max_bytes"))
    if u.scheme == "mem":
        return MemoryTier(max_bytes, device=q.get("device", "cpu"))
    if u.scheme == "file":
        path = (u.netloc + u.path) if u.netloc not in ("", "localhost") else u.path
        if not path:
            raise ValueError(f"file store URL needs a folder: {url!r} (e.g. file:///tmp/ctx or file://ctx)")
        return DiskTier(Path(path), max_bytes)
    if u.scheme in ("redis", "rediss", "valkey"):
        from memfit.store.redis_tier import RedisTier

        return RedisTier(url.replace("valkey://", "redis://", 1).split("?")[0], max_bytes)
    raise ValueError(f"unknown store URL {url!r}: use mem://, file://DIR or redis://host:port/db")


class ContextStore:
    """Tiers, fastest first. ``put`` writes to the first tier; what overflows a tier moves to the
    next one (only the last tier's overflow is dropped); ``get`` promotes a hit to the faster tiers.
    A corrupt entry is reported, dropped and counted, never returned."""

    def __init__(self, tiers: list):
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = tiers
        self.counts: Counter = Counter()

    def _put_from(self, index: int, entry: Entry) -> None:
        pending = [entry]
        for tier in self.tiers[index:]:
            nxt = []
            for e in pending:
                nxt.extend(tier.put(e))
            pending = nxt
            if not pending:
                return
        for e in pending:
            log.info("store: %s dropped from the last tier (capacity)", e.key)
            self.counts["dropped"] += 1

    def put_entry(self, entry: Entry, aliases: list[str] = ()) -> None:
        self._put_from(0, entry)
        for tier in self.tiers:
            for a in aliases:
                tier.set_alias(a, entry.key)

    def get_entry(self, key: str) -> Entry | None:
        for i, tier in enumerate(self.tiers):
            try:
                entry = tier.get(key)
            except CorruptEntry as e:
                warnings.warn(f"store: dropping corrupt entry {key} from the {tier.name} tier: {e}", RuntimeWarning,
                              stacklevel=2)
                self.counts["corrupt"] += 1
                tier.delete(key)
                continue
            if entry is not None:
                self.counts["hits"] += 1
                self.counts[f"hits_{tier.name}"] += 1
                if i > 0:
                    self._put_from(0, entry)  # promote: a copy in every faster tier
                return entry
        self.counts["misses"] += 1
        return None

    def resolve_alias(self, alias: str) -> str | None:
        for tier in self.tiers:
            key = tier.get_alias(alias)
            if key is not None:
                return key
        return None

    def unavailable(self) -> list[str]:
        """Names of the tiers that cannot be reached now (a Redis server down): a miss then does not
        prove an entry is gone, and a delete would not reach every copy."""
        return [t.name for t in self.tiers if not getattr(t, "available", True)]

    def lost_since(self) -> float | None:
        """When a tier first noticed that it lost its stored data (a Redis server restarted empty), or None."""
        times = [t.lost_since for t in self.tiers if getattr(t, "lost_since", None) is not None]
        return min(times) if times else None

    def contains(self, key: str) -> bool:
        return any(t.contains(key) for t in self.tiers)

    def delete(self, key: str) -> bool:
        return any([t.delete(key) for t in self.tiers])

    def keys(self) -> list[str]:
        return sorted({k for t in self.tiers for k in t.keys()})

    def stats(self) -> dict:
        return {"hits": self.counts["hits"], "misses": self.counts["misses"], "corrupt": self.counts["corrupt"],
                "dropped": self.counts["dropped"],
                "tiers": [{"tier": t.name, "bytes": t.used_bytes(), "entries": len(t.keys()),
                           "hits": self.counts[f"hits_{t.name}"], "max_bytes": t.max_bytes} for t in self.tiers]}

    # -- contexts (need the model to rebuild; see memfit.api) ---------------------------------------
    def put(self, ctx) -> str:
        """Store a prefilled context (``lm.prefill(..., store=...)`` calls this); returns its key."""
        entry, aliases = ctx.to_entry()
        self.put_entry(entry, aliases)
        return entry.key

    def get(self, key: str, lm=None):
        """The stored entry for ``key`` (None if absent); with ``lm``, rebuilt into a ready Context
        for that model (refused with EntryMismatch if it was made for another one)."""
        entry = self.get_entry(key)
        if entry is None or lm is None:
            return entry
        return lm.context_from_entry(entry)


def open_store(spec: "str | list[str] | ContextStore") -> ContextStore:
    """``memfit.open_store("file://DIR")`` or a list of tier URLs, fastest first."""
    if isinstance(spec, ContextStore):
        return spec
    urls = [spec] if isinstance(spec, str) else list(spec)
    return ContextStore([open_tier(u) for u in urls])
