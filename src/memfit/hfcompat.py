"""What differs between the transformers 5.x releases memfit supports, kept in one place.

transformers renamed the cache argument of ``forward`` and ``generate`` (and the output field that
returns it) from ``past_key_values`` to ``cache``; the old name warns, then goes away. memfit passes
whichever name the loaded model's ``forward`` declares, so it runs on both sides of the rename
without warnings.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.lru_cache(maxsize=None)
def cache_arg_name(model_class: type) -> str:
    """``"cache"`` where ``model_class.forward`` takes it, else the older ``"past_key_values"``."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def with_cache(model: Any, cache: Any) -> dict[str, Any]:
    """Keyword arguments that hand ``cache`` to ``model(...)`` or ``model.generate(...)``."""
    return {cache_arg_name(type(model)): cache}


def output_cache(output: Any) -> Any:
    """The cache a forward pass returned (``output.cache``, or ``output.past_key_values`` before the rename)."""
    return output["cache"] if "cache" in output else output["past_key_values"]
