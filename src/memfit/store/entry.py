"""What a stored context is: tensors + a JSON manifest, one safetensors blob with a checksum."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
import xxhash
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

FORMAT_VERSION = 1
CHUNK_TOKENS = 256  # prefix-reuse granularity


class CorruptEntry(RuntimeError):
    """A stored entry that fails to parse or whose checksum does not match: it is never used."""


class EntryMismatch(ValueError):
    """A stored entry made for another model, tokenizer, policy or format version."""


def manifest_from_header(read) -> dict | None:
    """An entry's manifest from the safetensors header alone (``read(start, length) -> bytes``), for
    listing and accounting without reading the tensors (nor checking them: never to serve from);
    None if the bytes are not an entry's."""
    try:
        n = int.from_bytes(read(0, 8), "little")
        return json.loads(json.loads(read(8, n))["__metadata__"]["memfit"])
    except Exception:  # noqa: BLE001 - unreadable: the caller treats it as absent
        return None


@dataclass(frozen=True)
class KeySpace:
    """Everything besides the tokens that a stored KV cache depends on."""

    fingerprint: str  # model config + weights
    tokenizer: str
    policy: str  # canonical spec
    format: int = FORMAT_VERSION
    tenant: str = ""  # who stored it (memfit serve --api-keys): each tenant's keys are its own

    def base(self) -> bytes:
        parts = [self.fingerprint, self.tokenizer, self.policy, self.format] + ([self.tenant] if self.tenant else [])
        return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).digest()

    def chain(self, token_ids: list[int]) -> list[tuple[int, str]]:
        """(tokens covered, hash) at every chunk boundary and at the end: each hash covers all before it."""
        h, out = self.base(), []
        for start in range(0, len(token_ids), CHUNK_TOKENS):
            piece = token_ids[start : start + CHUNK_TOKENS]
            h = hashlib.blake2b(h + torch.tensor(piece, dtype=torch.int64).numpy().tobytes(), digest_size=16).digest()
            out.append((start + len(piece), h.hex()))
        return out

    def key(self, token_ids: list[int]) -> str:
        return self.chain(token_ids)[-1][1]


def _checksum(tensors: dict[str, torch.Tensor], manifest: dict) -> str:
    """Over the manifest (minus the checksum itself) and every tensor's name, dtype, shape and bytes."""
    h = xxhash.xxh3_128()
    h.update(json.dumps({k: v for k, v in manifest.items() if k != "checksum"}, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Entry:
    key: str
    tensors: dict[str, torch.Tensor]  # on CPU
    manifest: dict

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def to_bytes(self) -> bytes:
        manifest = dict(self.manifest, key=self.key, nbytes=self.nbytes)
        manifest["checksum"] = _checksum(self.tensors, manifest)
        return st_save(self.tensors, metadata={"memfit": json.dumps(manifest)})

    @classmethod
    def from_bytes(cls, blob: bytes, expected_key: str | None = None) -> "Entry":
        try:
            tensors = st_load(blob)
            header_len = int.from_bytes(blob[:8], "little")
            manifest = json.loads(json.loads(blob[8 : 8 + header_len])["__metadata__"]["memfit"])
        except Exception as e:  # noqa: BLE001 - any parse failure means the bytes are not an entry
            raise CorruptEntry(f"unreadable entry ({type(e).__name__}: {e})") from None
        if manifest.get("checksum") != _checksum(tensors, manifest):
            raise CorruptEntry(f"checksum mismatch for entry {manifest.get('key')}")
        if expected_key is not None and manifest.get("key") != expected_key:
            raise CorruptEntry(f"entry holds key {manifest.get('key')}, expected {expected_key}")
        return cls(manifest["key"], tensors, manifest)

    def check(self, space: KeySpace) -> None:
        m = self.manifest
        for field, want in (("format", space.format), ("fingerprint", space.fingerprint),
                            ("tokenizer", space.tokenizer), ("policy", space.policy)):
            if m.get(field) != want:
                raise EntryMismatch(f"stored context {self.key} was made with {field}={m.get(field)!r}, "
                                    f"not {want!r}: refusing to use it")
