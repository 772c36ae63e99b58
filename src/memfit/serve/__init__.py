"""OpenAI-compatible HTTP server: ``memfit serve`` or ``create_app(lm, store, ServeConfig(...))``."""

from memfit.serve.app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
