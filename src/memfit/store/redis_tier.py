"""The Redis/Valkey tier (redis-py, a real server): one key per entry, written in one transaction.

If the server is down or times out, the tier says so once (a warning) and answers as empty until
it is reachable again, so a store goes on with its other tiers.

A Redis server restarted without its data (no persistence, a failover to an empty replica) would
otherwise look like a run of misses. The tier keeps an *epoch* key. The first tier to connect sets
it, and every tier remembers the epoch it saw. On a miss, an epoch that vanished or changed means
the data was lost; ``lost_since`` then records when this tier first noticed, so that the server can
report the loss instead of answering as if the context never existed.
"""

from __future__ import annotations

import logging
import time
import uuid
import warnings

from memfit.store.disk import check_key
from memfit.store.entry import Entry, manifest_from_header

log = logging.getLogger(__name__)


class RedisTier:
    def __init__(self, url: str, max_bytes: int | None = None, prefix: str = "memfit:", timeout: float = 2.0,
                 retry_after: float = 5.0):
        import redis

        self.name, self.max_bytes, self.url = "redis", max_bytes, url
        self.shared = True  # every process that connects sees the same entries
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        self._errors = (redis.ConnectionError, redis.TimeoutError, OSError)
        self.p, self.retry_after = prefix, retry_after
        self._down_since: float | None = None
        self._warned = False
        self._epoch: bytes | None = None  # the data's epoch this tier saw (see the module docstring)
        self.lost_since: float | None = None  # wall time a loss of the server's data was first seen

    # -- availability ------------------------------------------------------------------------------
    def _call(self, fn, default):
        if self._down_since is not None and time.monotonic() - self._down_since < self.retry_after:
            return default
        try:
            out = fn()
        except self._errors as e:
            self._down_since = time.monotonic()
            if not self._warned:
                warnings.warn(f"Redis tier {self.url} unavailable ({type(e).__name__}: {e}); going on without it",
                              RuntimeWarning, stacklevel=3)
                self._warned = True
            return default
        if self._down_since is not None:
            log.info("Redis tier %s is back", self.url)
        self._down_since = None
        self._warned = False
        return out

    @property
    def available(self) -> bool:
        up = self._call(lambda: self.client.ping(), False)
        if up and self._epoch is None:
            self._check_epoch()
        return up

    # -- entries -------------------------------------------------------------------------------------
    def _k(self, key: str) -> str:
        return f"{self.p}ctx:{check_key(key)}"

    def _check_epoch(self) -> None:
        """Adopt the server's epoch, or notice that it changed (the server lost its data). A loss is
        also written to the server (``lost_since``), so that a tier that connects later (a replica
        restarted after the loss) reports it too."""
        new = uuid.uuid4().hex.encode()
        now = self._call(lambda: self.client.set(f"{self.p}epoch", new, nx=True, get=True), None)
        now = new if now is None and self._down_since is None else now  # set just now: it was missing
        if now is None:
            return  # unreachable: nothing learnt
        if self._epoch is None and self.lost_since is None:  # first contact: a loss others noticed
            seen = self._call(lambda: self.client.get(f"{self.p}lost_since"), None)
            self.lost_since = float(seen) if seen else None
        elif self._epoch is not None and now != self._epoch and self.lost_since is None:
            self.lost_since = time.time()
            self._call(lambda: self.client.set(f"{self.p}lost_since", repr(self.lost_since), nx=True), None)
            log.warning("Redis tier %s lost its data (its epoch changed): contexts stored there are gone", self.url)
        self._epoch = now

    def get(self, key: str) -> Entry | None:
        blob = self._call(lambda: self.client.get(self._k(key)), None)
        if blob is None:
            self._check_epoch()
            return None
        if self._epoch is None:
            self._check_epoch()
        entry = Entry.from_bytes(blob, expected_key=key)  # raises CorruptEntry
        self._call(lambda: self.client.zadd(f"{self.p}lru", {key: time.time()}), None)
        return entry

    def manifest(self, key: str) -> dict | None:
        k = self._k(key)
        return manifest_from_header(lambda start, n: self._call(lambda: self.client.getrange(k, start, start + n - 1), b""))

    def put(self, entry: Entry) -> list[Entry]:
        blob = entry.to_bytes()

        def write():
            pipe = self.client.pipeline(transaction=True)  # MULTI/EXEC: all or nothing
            pipe.set(self._k(entry.key), blob)
            pipe.zadd(f"{self.p}lru", {entry.key: time.time()})
            pipe.hset(f"{self.p}sizes", entry.key, len(blob))
            pipe.execute()
            return True

        if not self._call(write, False):
            return [entry]  # not stored here: hand it on rather than lose it
        if self._epoch is None:
            self._check_epoch()
        return self._evict(keep=entry.key)

    def _evict(self, keep: str) -> list[Entry]:
        if self.max_bytes is None:
            return []
        out = []
        while self.used_bytes() > self.max_bytes:
            oldest = self._call(lambda: self.client.zrange(f"{self.p}lru", 0, 0), [])
            if not oldest or oldest[0].decode() == keep:
                break
            key = oldest[0].decode()
            blob = self._call(lambda: self.client.get(self._k(key)), None)
            if blob is not None:
                try:
                    out.append(Entry.from_bytes(blob, expected_key=key))
                except Exception:  # noqa: BLE001 - corrupt: dropped, not demoted
                    pass
            self.delete(key)
        return out

    def used_bytes(self) -> int:
        sizes = self._call(lambda: self.client.hvals(f"{self.p}sizes"), [])
        return sum(int(s) for s in sizes)

    def delete(self, key: str) -> bool:
        def rm():
            pipe = self.client.pipeline(transaction=True)
            pipe.delete(self._k(key))
            pipe.zrem(f"{self.p}lru", key)
            pipe.hdel(f"{self.p}sizes", key)
            return bool(pipe.execute()[0])

        return self._call(rm, False)

    def contains(self, key: str) -> bool:
        return bool(self._call(lambda: self.client.exists(self._k(key)), 0))

    def keys(self) -> list[str]:
        return sorted(k.decode() for k in self._call(lambda: self.client.zrange(f"{self.p}lru", 0, -1), []))

    def set_alias(self, alias: str, key: str) -> None:
        self._call(lambda: self.client.set(f"{self.p}prefix:{check_key(alias)}", check_key(key)), None)

    def get_alias(self, alias: str) -> str | None:
        v = self._call(lambda: self.client.get(f"{self.p}prefix:{check_key(alias)}"), None)
        return v.decode() if v else None
