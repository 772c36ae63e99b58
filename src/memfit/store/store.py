"""ContextStore: compressed contexts kept in tiers, fastest first, with LRU, promotion and demotion."""

from __future__ import annotations

import logging
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

from memfit.store.disk import DiskTier
from memfit.store.entry import CorruptEntry, Entry
from memfit.store.memory import MemoryTier
from memfit.units import parse_bytes

log = logging.getLogger(__name__)


class StoreUnavailable(RuntimeError):
    """A write or delete that no tier could carry out (a full or read-only disk, a server down): the
    operation did not happen and must not be acknowledged."""


def open_tier(url: str):
    """``mem://?max_bytes=2GiB``, ``file://DIR?max_bytes=..[&shared=1]``, ``redis://host:port/db?max_bytes=..``."""
    u = urlparse(url)
    q = {k: v[-1] for k, v in parse_qs(u.query).items()}
    unknown = set(q) - {"max_bytes", "device", "shared"}
    if unknown:
        raise ValueError(f"unknown store option(s) {sorted(unknown)} in {url!r}; valid: max_bytes, device, shared")
    if q.get("shared", "0") not in ("0", "1") or (u.scheme != "file" and "shared" in q):
        raise ValueError(f"shared=1 marks a file:// folder that several processes share; got {url!r}")
    max_bytes = parse_bytes(q.get("max_bytes"))
    if u.scheme == "mem":
        return MemoryTier(max_bytes, device=q.get("device", "cpu"))
    if u.scheme == "file":
        path = (u.netloc + u.path) if u.netloc not in ("", "localhost") else u.path
        if not path:
            raise ValueError(f"file store URL needs a folder: {url!r} (e.g. file:///tmp/ctx or file://ctx)")
        return DiskTier(Path(path), max_bytes, shared=q.get("shared") == "1")
    if u.scheme in ("redis", "rediss", "valkey"):
        from memfit.store.redis_tier import RedisTier

        return RedisTier(url.replace("valkey://", "redis://", 1).split("?")[0], max_bytes)
    raise ValueError(f"unknown store URL {url!r}: use mem://, file://DIR or redis://host:port/db")


class ContextStore:
    """Tiers, fastest first. ``put`` writes to the first tier; what overflows a tier moves to the
    next one (only the last tier's overflow is dropped); ``get`` promotes a hit to the faster tiers.
    A corrupt entry is reported, dropped and counted, never returned.

    With a *shared* tier (Redis, or ``file://DIR?shared=1``), the first one holds the authoritative
    copy that every process sharing it sees: ``put`` writes there (and on to its overflow tiers), and
    the private tiers in front of it are caches: they get a copy, a full or read-only cache tier is
    logged and skipped, and a copy read from one is served only while the shared tier still holds
    the key (another process may have deleted it, or the shared tier lost it)."""

    def __init__(self, tiers: list):
        if not tiers:
            raise ValueError("a store needs at least one tier")
        self.tiers = tiers
        self.counts: Counter = Counter()
        self.authority = next((i for i, t in enumerate(tiers) if getattr(t, "shared", False)), None)

    def _is_cache(self, index: int) -> bool:
        return self.authority is not None and index < self.authority

    def _put_from(self, index: int, entry: Entry, why: list[str] | None = None) -> bool:
        """Put ``entry`` into tier ``index``, its overflow into the next ones; whether it was stored
        (``why``: gets what each tier that did not take it said)."""
        pending = [entry]
        for tier in self.tiers[index:]:
            nxt = []
            for e in pending:
                try:
                    back = tier.put(e)
                    if why is not None and any(b is entry for b in back):
                        why.append(f"{tier.name}: unavailable")
                    nxt.extend(back)
                except OSError as err:  # a full or read-only disk: hand it on rather than lose it
                    self._io_error(tier, "write", e.key, err)
                    if why is not None and e is entry:
                        why.append(f"{tier.name}: {err}")
                    nxt.append(e)
            pending = nxt
            if not pending:
                return True
        for e in pending:
            if e is not entry:
                log.info("store: %s dropped from the last tier (capacity)", e.key)
                self.counts["dropped"] += 1
        return all(e is not entry for e in pending)

    def _io_error(self, tier, what: str, key: str, err: OSError) -> None:
        self.counts[f"{what}_errors"] += 1
        log.warning("store: %s of %s failed in the %s tier: %s", what, key, tier.name, err)

    def _drop(self, index: int, key: str) -> None:
        """Delete ``key`` from tier ``index``; a disk that cannot (read-only) is logged: what is left
        there is never served (a corrupt entry fails its checksum again, a stale copy its check)."""
        try:
            self.tiers[index].delete(key)
        except OSError as err:
            self._io_error(self.tiers[index], "delete", key, err)

    def _cache_copy(self, tier, entry: Entry, aliases: list[str] = ()) -> None:
        """A copy in a cache tier: what it evicts is dropped (the shared tier holds it), an I/O error skipped."""
        try:
            tier.put(entry)
            for a in aliases:
                tier.set_alias(a, entry.key)
        except OSError as err:
            self._io_error(tier, "write", entry.key, err)

    def _shared_down(self) -> bool:
        return self.authority is not None and not getattr(self.tiers[self.authority], "available", True)

    def put_entry(self, entry: Entry, aliases: list[str] = ()) -> None:
        """Store ``entry``; raises :class:`StoreUnavailable` when no tier could take it. While the
        shared tier is down, the private tiers in front of it hold the only copy: this process goes
        on with it, other processes do not see it, and it is dropped as stale once the shared tier
        is back (``memfit serve`` refuses to create contexts meanwhile: 503)."""
        start, why = self.authority or 0, []
        if not self._put_from(start, entry, why) and not (self._shared_down() and self._put_from(0, entry, why)):
            raise StoreUnavailable(f"context {entry.key} could not be stored: no tier took it ({'; '.join(why)})")
        for tier in self.tiers[start:]:
            for a in aliases:
                try:
                    tier.set_alias(a, entry.key)
                except OSError as err:  # an alias only speeds up prefix reuse
                    self._io_error(tier, "write", a, err)
        for tier in self.tiers[:start]:
            self._cache_copy(tier, entry, aliases)

    def _confirmed(self, index: int, key: str) -> bool:
        """Whether a copy found in cache tier ``index`` may be served: the shared tier still holds
        ``key``. A copy it no longer holds is dropped. While it cannot be reached the copy is served
        (this process goes on; ``memfit serve`` answers 503 meanwhile instead)."""
        if self._shared_down():
            return True
        if any(t.contains(key) for t in self.tiers[self.authority:]):
            return True
        self.counts["stale"] += 1
        self._drop(index, key)
        return False

    def get_entry(self, key: str) -> Entry | None:
        for i, tier in enumerate(self.tiers):
            try:
                entry = tier.get(key)
            except CorruptEntry as e:
                warnings.warn(f"store: dropping corrupt entry {key} from the {tier.name} tier: {e}", RuntimeWarning,
                              stacklevel=2)
                self.counts["corrupt"] += 1
                self._drop(i, key)
                continue
            except OSError as err:  # an unreadable disk: the next tier may hold it
                self._io_error(tier, "read", key, err)
                continue
            if entry is None or (self._is_cache(i) and not self._confirmed(i, key)):
                continue
            self.counts["hits"] += 1
            self.counts[f"hits_{tier.name}"] += 1
            if self.authority is None:
                if i > 0:
                    self._put_from(0, entry)  # promote: a copy in every faster tier
            else:
                if i > self.authority:
                    self._put_from(self.authority, entry)
                for cache in self.tiers[:min(i, self.authority)]:
                    self._cache_copy(cache, entry)
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
        """Whether ``key`` is stored (with a shared tier: there or behind it, not only in a cache)."""
        return any(t.contains(key) for t in self.tiers[self.authority or 0:])

    def delete(self, key: str) -> bool:
        """Delete ``key`` from every tier; raises :class:`StoreUnavailable` when a tier that could
        serve it again cannot delete it (a stale copy left in a cache tier is never served)."""
        found = False
        for i, tier in enumerate(self.tiers):
            try:
                found = tier.delete(key) or found
            except OSError as err:
                self._io_error(tier, "delete", key, err)
                if not self._is_cache(i):
                    raise StoreUnavailable(f"context {key} could not be deleted from the {tier.name} tier: {err}") \
                        from err
        return found

    def keys(self) -> list[str]:
        return sorted({k for t in self.tiers for k in t.keys()})

    def manifest(self, key: str) -> dict | None:
        """``key``'s manifest where it is stored (with a shared tier: there or behind it), from the
        header only; None if it is not stored."""
        for tier in self.tiers[self.authority or 0:]:
            m = tier.manifest(key)
            if m is not None:
                return m
        return None

    def manifests(self) -> Iterator[tuple[str, dict]]:
        """(key, manifest) of every stored entry (with a shared tier: those it and the tiers behind
        it hold, not cache copies), read from headers only: for listing and accounting."""
        seen = set()
        for tier in self.tiers[self.authority or 0:]:
            for key in tier.keys():
                if key in seen:
                    continue
                m = tier.manifest(key)
                if m is not None:
                    seen.add(key)
                    yield key, m

    def stats(self) -> dict:
        return {**{k: self.counts[k] for k in ("hits", "misses", "corrupt", "dropped", "stale", "read_errors",
                                                 "write_errors", "delete_errors")},
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
