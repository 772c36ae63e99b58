"""Real disk faults for the chaos run and the disk tier's tests: a small filesystem of its own (a
tmpfs mount) that can be filled up or remounted read-only. Mounting needs root."""

from __future__ import annotations

import subprocess
from pathlib import Path


def small_fs(path: Path, size: str = "16m") -> bool:
    """Mount a tmpfs of ``size`` at ``path`` (a disk that can fill up or turn read-only); False
    where this process may not mount (not root, no CAP_SYS_ADMIN)."""
    path.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return r.returncode == 0


def can_mount(scratch: Path) -> bool:
    ok = small_fs(scratch, "64k")
    if ok:
        subprocess.run(["umount", str(scratch)], check=False)
    return ok


def fill(path: Path) -> None:
    """Write a ballast file until the filesystem at ``path`` is full."""
    with open(path / ".ballast", "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 2**16)
        except OSError:  # ENOSPC: full
            pass
