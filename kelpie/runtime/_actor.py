"""What an actor is: the `Actor` base class, and the `ActorContext` it works through.

An actor keeps two kinds of durable data, both committed in the one transaction
that ends each invocation: its *state* (whatever `dump_state()` returns, as
bytes; any size, stored through the blob helper) and its *working memory*
(keys and values under the actor's own prefix, read and written through the
context). Writes wait in the context until the invocation ends, and reads see
them; reads of anything else come from the store. No transaction stays open
while the actor works, so an invocation may take longer than a transaction may
live (an LLM call does). If an invocation fails, times out, or its commit
fails, the runtime restores the state from the last committed bytes with
`load_state()`, and none of its working-memory writes are kept.
"""

from __future__ import annotations

import abc
import bisect
from typing import Any

from kelpie.env import Env
from kelpie.runtime._errors import ContextUnavailable
from kelpie.runtime._ids import ActorId
from kelpie.storage import (
    VALUE_SIZE_MAX_BYTES,
    InvalidRange,
    KeyValue,
    Store,
    Transaction,
    ValueTooLarge,
    prefix_range,
    transact,
)


class ActorContext:
    """What an actor sees of the runtime while it activates, handles a message or deactivates."""

    def __init__(self, actor_id: ActorId, env: Env, store: Store, epoch: int = 0) -> None:
        self.actor_id = actor_id
        self.env = env
        #: The epoch of the node incarnation this activation runs on (see docs/ACTORS.md).
        self.epoch = epoch
        self._store = store
        self._writes: dict[bytes, bytes | None] | None = None  # None: not in an invocation
        self._kv_prefix = actor_id.key("kv")

    def _buffer(self) -> dict[bytes, bytes | None]:
        if self._writes is None:
            raise ContextUnavailable(
                f"actor {self.actor_id} used its working memory outside activate, handle or "
                "deactivate"
            )
        return self._writes

    def _key(self, key: bytes) -> bytes:
        if not isinstance(key, bytes) or not key:
            raise TypeError(f"working-memory keys are non-empty bytes, got {key!r}")
        return self._kv_prefix + key

    async def kv_get(self, key: bytes) -> bytes | None:
        """The value of `key` in this actor's working memory (this invocation's writes included)."""
        writes = self._buffer()
        full = self._key(key)
        if full in writes:
            return writes[full]

        async def read(tr: Transaction) -> bytes | None:
            return await tr.get(full)

        return await transact(self._store, read, rng=self.env.rng)

    def kv_set(self, key: bytes, value: bytes) -> None:
        """Sets `key` when this invocation commits."""
        writes = self._buffer()
        if not isinstance(value, bytes):
            raise TypeError(f"working-memory values are bytes, got {type(value).__name__}")
        if len(value) > VALUE_SIZE_MAX_BYTES:
            raise ValueTooLarge(
                f"working-memory value of {len(value)} bytes is over the limit of "
                f"{VALUE_SIZE_MAX_BYTES}; keep large data in the actor's state"
            )
        writes[self._key(key)] = value

    def kv_delete(self, key: bytes) -> None:
        """Removes `key` when this invocation commits."""
        self._buffer()[self._key(key)] = None

    async def kv_items(self, prefix: bytes = b"", *, limit: int = 0) -> list[KeyValue]:
        """The (key, value) pairs whose key starts with `prefix`, in key order (at most `limit`)."""
        writes = self._buffer()
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidRange(f"limit must be an integer >= 0 (0: no limit), got {limit!r}")
        begin, end = prefix_range(self._kv_prefix + prefix)
        pending = sorted(key for key in writes if begin <= key < end)
        fetch = limit + len(pending) if limit else 0

        async def read(tr: Transaction) -> list[KeyValue]:
            return await tr.get_range(begin, end, limit=fetch)

        rows = dict(await transact(self._store, read, rng=self.env.rng))
        if fetch and len(rows) >= fetch:  # the store had more: only keys up to its last count
            last = max(rows)
            pending = pending[: bisect.bisect_right(pending, last)]
        for key in pending:
            value = writes[key]
            if value is None:
                rows.pop(key, None)
            else:
                rows[key] = value
        cut = len(self._kv_prefix)
        items = [(key[cut:], rows[key]) for key in sorted(rows)]
        return items[:limit] if limit else items


class Actor(abc.ABC):
    """A virtual actor. The runtime calls one method at a time, never two at once.

    Subclasses implement `handle`; the rest have defaults. `dump_state` and
    `load_state` carry the actor's durable state (None: no state yet).
    """

    async def activate(self, ctx: ActorContext) -> None:  # noqa: B027 - optional hook
        """Called once, after the state is loaded, before the first message."""

    @abc.abstractmethod
    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        """Handles one message and returns the reply; raise to fail (nothing is committed)."""

    async def deactivate(self, ctx: ActorContext) -> None:  # noqa: B027 - optional hook
        """Called once when the actor is deactivated (idle, evicted or shut down)."""

    def dump_state(self) -> bytes | None:
        """The actor's durable state as bytes (None: nothing to keep)."""
        return None

    def load_state(self, data: bytes | None) -> None:  # noqa: B027 - optional hook
        """Restores the state `dump_state` gave (None: a new actor, or no state)."""
