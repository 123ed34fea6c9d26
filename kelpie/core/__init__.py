"""Errors and value types shared by every layer. Depends on nothing else in Kelpie."""

from kelpie.core._errors import ConfigError, KelpieError

__all__ = ["ConfigError", "KelpieError"]
