"""Context store: compress a context once, keep it in tiers (memory, disk, Redis/Valkey)."""

from memfit.store.entry import CHUNK_TOKENS, FORMAT_VERSION, CorruptEntry, Entry, EntryMismatch, KeySpace
from memfit.store.store import ContextStore, StoreUnavailable, open_store, open_tier, parse_bytes

__all__ = ["CHUNK_TOKENS", "FORMAT_VERSION", "ContextStore", "CorruptEntry", "Entry", "EntryMismatch", "KeySpace",
           "StoreUnavailable", "open_store", "open_tier", "parse_bytes"]
