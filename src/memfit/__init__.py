"""memfit: long-context LLM inference that fits in the memory you have."""

from memfit.api import LM, Context, load_model
from memfit.kv import KIVI, CompressedCache, Policy, PolicyError, parse_policy

__version__ = "0.1.0"
__all__ = ["LM", "KIVI", "CompressedCache", "Context", "Policy", "PolicyError", "load_model", "parse_policy"]
