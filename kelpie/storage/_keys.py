"""Keys: ordered bytes, built from tuples with FoundationDB's tuple layer.

`pack(("agent", agent_id, "block", label))` gives bytes whose order is the
tuple order, so every key of one prefix is one contiguous range
(`prefix_range`). The pure-Python `fdb.tuple` module does this without the
FoundationDB client library.
"""

from __future__ import annotations

import sys
from typing import Any

import fdb.tuple as _tuple

from kelpie.storage._errors import InvalidKey, InvalidRange, KeyTooLarge, ValueTooLarge
from kelpie.storage._limits import KEY_SIZE_MAX_BYTES, VALUE_SIZE_MAX_BYTES

# fdb vendors six 1.11, whose import hook for `fdb.six.moves` predates find_spec and
# makes every later legacy import lookup warn (an ImportWarning). fdb itself never
# imports through six.moves, so the hook is dropped.
sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != "_SixMetaPathImporter"]

#: The first key of the reserved system range; every user key sorts below it.
SYSTEM_KEY_BEGIN = b"\xff"


def pack(items: tuple[Any, ...]) -> bytes:
    """The key for a tuple of str, bytes, int, float, bool, None, UUID or nested tuples."""
    return bytes(_tuple.pack(items))


def unpack(key: bytes) -> tuple[Any, ...]:
    """The tuple `pack` made `key` from."""
    return tuple(_tuple.unpack(key))


def prefix_range(prefix: bytes) -> tuple[bytes, bytes]:
    """[begin, end): every key that starts with `prefix`, and nothing else."""
    return prefix, strinc(prefix)


def tuple_range(items: tuple[Any, ...]) -> tuple[bytes, bytes]:
    """[begin, end): every key packed from a tuple that extends `items` (not `items` itself)."""
    r = _tuple.range(items)
    return bytes(r.start), bytes(r.stop)


def strinc(key: bytes) -> bytes:
    """The first key after every key that starts with `key` (FDB's strinc)."""
    stripped = key.rstrip(b"\xff")
    if not stripped:
        raise InvalidKey(f"no key follows every key starting with {key!r}")
    return stripped[:-1] + bytes([stripped[-1] + 1])


def key_after(key: bytes) -> bytes:
    """The first key after `key` in byte order."""
    return key + b"\x00"


def check_key(key: object) -> bytes:
    """`key` if it may be read or written; InvalidKey or KeyTooLarge otherwise."""
    if not isinstance(key, bytes):
        raise InvalidKey(f"keys are bytes, got {type(key).__name__}; build them with pack()")
    if not key:
        raise InvalidKey("the empty key is not a valid key")
    if key >= SYSTEM_KEY_BEGIN:
        raise InvalidKey(f"key {_show(key)} lies in the reserved system range (b'\\xff'...)")
    if len(key) > KEY_SIZE_MAX_BYTES:
        raise KeyTooLarge(f"key of {len(key)} bytes is over the limit of {KEY_SIZE_MAX_BYTES}")
    return key


def check_value(key: bytes, value: object) -> bytes:
    """`value` if it may be stored under `key`; TypeError or ValueTooLarge otherwise."""
    if not isinstance(value, bytes):
        raise TypeError(f"values are bytes, got {type(value).__name__}")
    if len(value) > VALUE_SIZE_MAX_BYTES:
        raise ValueTooLarge(
            f"value of {len(value)} bytes for key {_show(key)} is over the limit of "
            f"{VALUE_SIZE_MAX_BYTES}; store larger values with write_blob()"
        )
    return value


def check_range(begin: object, end: object) -> tuple[bytes, bytes]:
    """(begin, end) if they bound a range of user keys; a typed error otherwise.

    `begin` may be b"" (the first key) and `end` may be b"\\xff" (past the last).
    """
    for name, bound in (("begin", begin), ("end", end)):
        if not isinstance(bound, bytes):
            raise InvalidKey(f"range {name} must be bytes, got {type(bound).__name__}")
        if len(bound) > KEY_SIZE_MAX_BYTES + 1:
            raise KeyTooLarge(
                f"range {name} of {len(bound)} bytes is over the limit of {KEY_SIZE_MAX_BYTES}"
            )
        if bound > SYSTEM_KEY_BEGIN:
            raise InvalidKey(
                f"range {name} {_show(bound)} lies past b'\\xff', in the reserved system range"
            )
    assert isinstance(begin, bytes)
    assert isinstance(end, bytes)
    if begin > end:
        raise InvalidRange(f"range begin {_show(begin)} is after its end {_show(end)}")
    return begin, end


def _show(key: bytes) -> str:
    return repr(key) if len(key) <= 40 else f"{key[:40]!r}... ({len(key)} bytes)"
