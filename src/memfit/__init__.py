"""memfit: long-context LLM inference that fits in the memory you have."""

from memfit.api import LM, Context, load_context, load_model
from memfit.kv import KIVI, CompressedCache, Policy, PolicyError, parse_policy
from memfit.store import ContextStore, open_store

__version__ = "0.1.0"
__all__ = ["LM", "KIVI", "CompressedCache", "Context", "ContextStore", "Policy", "PolicyError", "load_context",
           "load_model", "open_store", "parse_policy"]
