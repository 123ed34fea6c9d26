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
from collections.abc import Awaitable, Callable
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
        #: Set by the runtime while `handle` runs (see `checkpoint`).
        self._checkpoint: Callable[[], Awaitable[None]] | None = None

    async def checkpoint(self) -> None:
        """Commits the invocation's work so far (state and working memory), then goes on.

        For a handler that works in steps (an agent's turn calls an LLM several
        times): each checkpoint is one fenced transaction, like the commit that
        ends an invocation, but stores no reply. If the invocation later fails,
        the state rolls back to the last checkpoint, not to before the call. A
        call that fails or is interrupted after a checkpoint has been partly
        applied: the handler must recognise its own earlier progress when the
        message is delivered again (resume, never redo). Raises what a commit
        raises (`OwnershipLost` ends the invocation: another node owns the actor).
        Only in `handle`.
        """
        if self._checkpoint is None:
            raise ContextUnavailable(
                f"actor {self.actor_id} called checkpoint outside handle (only a handler may)"
            )
        await self._checkpoint()

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
        self._buffer()
        begin, end = prefix_range(self._kv_prefix + prefix)
        return await self._range(begin, end, limit, reverse=False)

    async def kv_range(
        self, begin: bytes, end: bytes, *, limit: int = 0, reverse: bool = False
    ) -> list[KeyValue]:
        """The pairs with `begin <= key < end`, in key order (or reversed), at most `limit`.

        Keys are this actor's working-memory keys; this invocation's writes included.
        """
        self._buffer()
        if not isinstance(begin, bytes) or not isinstance(end, bytes):
            raise TypeError("kv_range takes bytes keys")
        return await self._range(
            self._kv_prefix + begin, self._kv_prefix + end, limit, reverse=reverse
        )

    async def _range(
        self, full_begin: bytes, full_end: bytes, limit: int, *, reverse: bool
    ) -> list[KeyValue]:
        writes = self._buffer()
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidRange(f"limit must be an integer >= 0 (0: no limit), got {limit!r}")
        pending = sorted(key for key in writes if full_begin <= key < full_end)
        fetch = limit + len(pending) if limit else 0

        async def read(tr: Transaction) -> list[KeyValue]:
            if full_begin >= full_end:
                return []
            return await tr.get_range(full_begin, full_end, limit=fetch, reverse=reverse)

        fetched = await transact(self._store, read, rng=self.env.rng)
        rows = dict(fetched)
        if fetch and len(fetched) >= fetch:  # the store had more: only keys up to its last one
            if reverse:
                last = min(rows)
                pending = pending[bisect.bisect_left(pending, last) :]
            else:
                last = max(rows)
                pending = pending[: bisect.bisect_right(pending, last)]
        for key in pending:
            value = writes[key]
            if value is None:
                rows.pop(key, None)
            else:
                rows[key] = value
        cut = len(self._kv_prefix)
        items = [(key[cut:], rows[key]) for key in sorted(rows, reverse=reverse)]
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
