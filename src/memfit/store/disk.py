"""The disk tier: one safetensors file per entry (tensors + the JSON manifest in its header).

Writes go to a temporary file in the same folder, are fsynced and renamed into place, so a writer
killed at any moment leaves the old entry or the new one, never a partial one; several processes
can share the folder. LRU order is the files' modification time (touched on every read).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from memfit.store.entry import Entry

_KEY = re.compile(r"^[0-9a-f]{32}$")


def check_key(key: str) -> str:
    """Keys are 32 hex digits: nothing else may reach a file name."""
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"invalid context key {key!r}: expected 32 hex digits")
    return key


def atomic_write(path: Path, data: bytes) -> None:
    """Temp file in the same folder, fsync, rename: readers see the old file or the new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class DiskTier:
    def __init__(self, root: "str | Path", max_bytes: int | None = None):
        self.name, self.max_bytes = "file", max_bytes
        self.root = Path(root)
        (self.root / "prefix").mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{check_key(key)}.safetensors"

    def get(self, key: str) -> Entry | None:
        path = self._path(key)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        entry = Entry.from_bytes(blob, expected_key=key)  # raises CorruptEntry
        try:
            os.utime(path)
        except FileNotFoundError:
            pass
        return entry

    def put(self, entry: Entry) -> list[Entry]:
        atomic_write(self._path(entry.key), entry.to_bytes())
        return self._evict(keep=entry.key)

    def _files(self) -> list[Path]:
        return [p for p in self.root.glob("*.safetensors") if _KEY.match(p.stem)]

    def _evict(self, keep: str) -> list[Entry]:
        if self.max_bytes is None:
            return []
        out = []
        files = []
        for p in self._files():
            try:
                st = p.stat()
                files.append((st.st_mtime, st.st_size, p))
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in files)
        for _, size, p in sorted(files):
            if total <= self.max_bytes:
                break
            if p.stem == keep:
                continue
            try:
                out.append(Entry.from_bytes(p.read_bytes(), expected_key=p.stem))
            except Exception:  # noqa: BLE001 - a corrupt file is dropped, not demoted
                pass
            p.unlink(missing_ok=True)
            total -= size
        return out

    def used_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._files() if p.exists())

    def delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def contains(self, key: str) -> bool:
        return self._path(key).is_file()

    def keys(self) -> list[str]:
        return sorted(p.stem for p in self._files())

    def set_alias(self, alias: str, key: str) -> None:
        atomic_write(self.root / "prefix" / check_key(alias), check_key(key).encode())

    def get_alias(self, alias: str) -> str | None:
        try:
            key = (self.root / "prefix" / check_key(alias)).read_text().strip()
        except FileNotFoundError:
            return None
        return key if _KEY.match(key) else None
