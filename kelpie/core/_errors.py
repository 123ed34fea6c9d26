"""The root of Kelpie's typed errors.

Errors a user can cause (bad input, a limit, a missing thing) are subclasses of
`KelpieError` with a message that says what to change. Our own bugs are
assertions, never `KelpieError`.
"""


class KelpieError(Exception):
    """Base class of every error Kelpie raises on purpose."""


class ConfigError(KelpieError):
    """A setting or argument is invalid; the message names it and the accepted values."""
