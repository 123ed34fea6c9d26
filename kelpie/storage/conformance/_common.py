"""What the suite's parts share: the factory types, constants and the dict model's helpers."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import ParamSpec, TypeVar

import trio
import trio.testing

from kelpie.storage._api import KeyValue, Store
from kelpie.storage._retry import RetryPolicy

T = TypeVar("T")
P = ParamSpec("P")

#: A callable that, inside a running trio loop, returns a new, empty store.
StoreFactory = Callable[[], Awaitable[Store]]

#: A callable that returns the trio clock a test runs on (None: trio's real clock).
ClockFactory = Callable[[], trio.abc.Clock | None]

#: The end of the user key space, as a range bound.
_END = b"\xff"

#: `transact` settings for the suite's retries: quick, and patient enough to converge.
_QUICK = RetryPolicy(attempts_max=60, backoff_initial_ms=1, backoff_max_ms=20)


def _expected_range(
    data: Mapping[bytes, bytes], begin: bytes, end: bytes, limit: int = 0, reverse: bool = False
) -> list[KeyValue]:
    """What `get_range(begin, end, limit=limit, reverse=reverse)` returns over `data`."""
    keys = sorted((key for key in data if begin <= key < end), reverse=reverse)
    if limit:
        keys = keys[:limit]
    return [(key, data[key]) for key in keys]


def _apply(data: dict[bytes, bytes], begin: bytes, end: bytes, value: bytes | None) -> None:
    """Applies one write to `data`: sets `begin` to `value`, or (None) clears [begin, end)."""
    if value is not None:
        data[begin] = value
        return
    for key in [key for key in data if begin <= key < end]:
        del data[key]
