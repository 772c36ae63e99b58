"""The memory tier: entries kept as tensors (on CPU or GPU), LRU within a byte capacity."""

from __future__ import annotations

import threading
from collections import OrderedDict

from memfit.store.entry import Entry


class MemoryTier:
    def __init__(self, max_bytes: int | None = None, device: str = "cpu"):
        self.name, self.max_bytes, self.device = "mem", max_bytes, device
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._aliases: dict[str, str] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def manifest(self, key: str) -> dict | None:
        entry = self._entries.get(key)
        return None if entry is None else dict(entry.manifest, nbytes=entry.nbytes)

    def put(self, entry: Entry) -> list[Entry]:
        """Store; return the least recently used entries pushed out to stay within capacity."""
        entry = Entry(entry.key, {n: t.to(self.device) for n, t in entry.tensors.items()}, entry.manifest)
        with self._lock:
            self._entries[entry.key] = entry
            self._entries.move_to_end(entry.key)
            out = []
            while self.max_bytes is not None and self._used() > self.max_bytes and len(self._entries) > 1:
                _, old = self._entries.popitem(last=False)
                out.append(old)
            return out

    def _used(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def used_bytes(self) -> int:
        with self._lock:
            return self._used()

    def delete(self, key: str) -> bool:
        with self._lock:
            return self._entries.pop(key, None) is not None

    def contains(self, key: str) -> bool:
        return key in self._entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def set_alias(self, alias: str, key: str) -> None:
        self._aliases[alias] = key

    def get_alias(self, alias: str) -> str | None:
        return self._aliases.get(alias)
