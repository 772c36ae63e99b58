"""The disk tier: one safetensors file per entry (tensors + the JSON manifest in its header).

Writes go to a temporary file in the same folder, are fsynced and renamed into place, so a writer
killed at any moment leaves the old entry or the new one, never a partial one; several processes
can share the folder (``shared=True`` says they do: see :class:`~memfit.store.ContextStore`). LRU
order is the files' modification time (touched on every read, where the disk allows).

A process killed mid-write leaves a temporary file behind; :meth:`DiskTier.recover` (run by
``memfit serve`` at start) removes those and drops entries that fail their checksum.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
from pathlib import Path

from memfit.store.entry import Entry, manifest_from_header

log = logging.getLogger(__name__)
_KEY = re.compile(r"^[0-9a-f]{32}$")
_TEMP = ".tmp-*.part"
# Fault injection for `memfit bench chaos` (slow disk reads): while the file this variable names
# exists, every read of a disk tier first sleeps for the seconds written in it.
READ_DELAY_ENV = "MEMFIT_FAULT_READ_DELAY_FILE"


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


def _injected_delay() -> None:
    path = os.environ.get(READ_DELAY_ENV)
    if path:
        try:
            time.sleep(float(Path(path).read_text() or 0))
        except (FileNotFoundError, ValueError):
            pass


class DiskTier:
    def __init__(self, root: "str | Path", max_bytes: int | None = None, shared: bool = False):
        self.name, self.max_bytes, self.shared = "file", max_bytes, shared
        self.root = Path(root)
        (self.root / "prefix").mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / f"{check_key(key)}.safetensors"

    def recover(self, partial_age: float = 60.0, repair: bool = True) -> dict:
        """Read the tier back after a restart: remove temporary files a killed writer left (older
        than ``partial_age`` seconds, so that a live writer sharing the folder keeps its own) and
        drop entries that fail their checksum. Returns the counts; ``repair=False`` only counts."""
        partial = corrupt = 0
        now = time.time()
        for p in self.root.glob(_TEMP):
            try:
                if now - p.stat().st_mtime >= partial_age:
                    partial += 1
                    if repair:
                        p.unlink()
            except OSError:  # gone already, or a read-only disk: it is never read as an entry
                pass
        files = self._files()
        for p in files:
            try:
                Entry.from_bytes(p.read_bytes(), expected_key=p.stem)
            except FileNotFoundError:
                continue
            except Exception as e:  # noqa: BLE001 - any unreadable entry is dropped, not served
                corrupt += 1
                if repair:
                    log.warning("disk tier %s: dropping %s: %s", self.root, p.name, e)
                    try:
                        p.unlink()
                    except OSError:
                        pass
        return {"entries": len(files) - corrupt if repair else len(files), "corrupt": corrupt, "partial": partial}

    def get(self, key: str) -> Entry | None:
        path = self._path(key)
        _injected_delay()
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        entry = Entry.from_bytes(blob, expected_key=key)  # raises CorruptEntry
        try:
            os.utime(path)
        except OSError:  # gone, or a read-only disk: only the LRU order is stale
            pass
        return entry

    def manifest(self, key: str) -> dict | None:
        try:
            with open(self._path(key), "rb") as f:
                return manifest_from_header(lambda start, n: (f.seek(start), f.read(n))[1])
        except FileNotFoundError:
            return None

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
        total = 0
        for p in self._files():
            try:
                total += p.stat().st_size
            except FileNotFoundError:  # deleted meanwhile (another process)
                pass
        return total

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
