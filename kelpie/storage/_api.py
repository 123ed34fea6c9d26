"""The storage contract: an ordered, transactional key-value store shaped like FoundationDB.

Every piece of agent and actor state lives in one `Store`. Backends (memory,
sqlite, postgres, fdb, and the simulator's twin) implement this contract, and
the conformance suite in `kelpie.storage.conformance` checks it.

Keys and values
    Keys are non-empty bytes below b"\\xff" (the reserved system range), at most
    KEY_SIZE_MAX_BYTES (10,000) long, ordered bytewise. Build them from tuples
    with `pack()` so that every key of one prefix is one contiguous range.
    Values are bytes of at most VALUE_SIZE_MAX_BYTES (100,000); larger values go
    through the blob helper (`write_blob`/`read_blob`), which chunks them across
    keys inside one transaction.

Transactions
    All access goes through interactive transactions, opened with
    `store.transaction()` and used as async context managers (leaving the block
    without `commit()` abandons the transaction; nothing it set is written):

        async with store.transaction() as tr:
            value = await tr.get(key)
            tr.set(key, new_value)
            await tr.commit()

    Reads see one consistent snapshot of the store, taken when the
    transaction starts (memory, sqlite and the simulated store) or, at the
    latest, at its first read or `read_version()` (postgres, fdb), plus the
    transaction's own earlier writes (read-your-writes). Writes (`set`,
    `clear`, `clear_range`) are buffered and applied atomically by `commit()`:
    all or nothing, never partly.

Isolation: strict serializability by optimistic concurrency
    Every committed transaction appears to take effect at one instant between
    its start and its commit. Each read adds a read-conflict range: the key for
    `get`, and for `get_range` the part of the range it actually scanned (all of
    it, or up to the last key returned when a limit cut it short), so a key
    inserted into a range that was read (a phantom) counts as a change.
    `commit()` raises `Conflict` (retryable, nothing written) when committing
    could break serializability. Backends with `precise_conflicts` (memory,
    fdb, the simulated store) raise it exactly when a key or range this
    transaction read was written by a transaction that committed after this one
    started, FoundationDB's rule. SQLite validates reads by value at commit: it
    raises it only when something read would now read differently, which is
    never more often than the rule. PostgreSQL's serializable snapshot
    isolation is different in both directions: it may let such a commit
    through when a serial order still exists, and may refuse one the rule
    would allow. Every history any backend accepts is serializable. A
    conflict may always be reported spuriously: callers retry, they never
    assume a commit must succeed.

Snapshot reads
    `get(key, snapshot=True)` and `get_range(..., snapshot=True)` read the same
    snapshot but add no read-conflict range: a later change to what they read
    does not make this transaction conflict. Use them for data whose staleness is
    harmless (statistics, hints), never to guard a write.

commit_unknown_result
    `commit()` may raise `CommitUnknownResult`: the store lost contact while
    committing and the writes may or may not have been applied. It is retryable,
    and `transact()` retries it, so a transaction run through `transact()` must
    be idempotent: either its writes give the same result when applied twice
    (setting a key to a value), or it writes a marker key (a transfer's id, a
    message's id) and, on each attempt, first reads the marker and returns early
    if it is already there. A blind increment is not idempotent and may apply
    twice.

Retries
    `transact(store, fn, rng=env.rng)` runs `fn(tr)` in a fresh transaction,
    commits it, and on a retryable error backs off (bounded, jittered exponential
    backoff drawn from the caller's rng and slept on trio's clock, so it runs in
    virtual time in simulation) and runs `fn` again, up to a bounded number of
    attempts, then raises the last error.

Limits (typed errors; nothing is written)
    key over 10,000 bytes: `KeyTooLarge`; empty, non-bytes or system key:
    `InvalidKey`; value over 100,000 bytes: `ValueTooLarge` (raised by `set`,
    which buffers nothing); a transaction whose keys, values, cleared ranges and
    read-conflict ranges pass 10 MB: `TransactionTooLarge` (the transaction can
    no longer commit); a transaction older than 5 s: `TransactionTooOld`
    (retryable) from its next read or its commit; a range whose begin is after
    its end, or a negative limit: `InvalidRange`; use after commit or close:
    `TransactionClosed`.

The store's clock
    `await tr.read_version()` is a version from the store's own clock, counted in
    microseconds (VERSIONS_PER_SECOND): the same for every call within one
    transaction, and never below the read version of a transaction that
    committed before this one started. It is the clock leases are judged by: a
    lease holds "until version V", and a node asks the store, never its local
    clock, whether V has passed. Each backend states where its clock comes from.

Cancellation
    A transaction whose task is cancelled before `commit()` is reached writes
    nothing. If cancellation arrives during `commit()`, the outcome is the same
    as for `CommitUnknownResult`: the commit may have been applied.
"""

from __future__ import annotations

import abc
from types import TracebackType
from typing import Self

#: A key-value pair returned by a range read.
KeyValue = tuple[bytes, bytes]


class _Closable(abc.ABC):
    """An async context manager that calls `aclose()` on the way out."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Releases what the object holds."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


class Transaction(_Closable):
    """One interactive transaction (see the module docstring for the contract)."""

    @abc.abstractmethod
    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        """The value of `key`, or None if it has none."""

    @abc.abstractmethod
    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        *,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:
        """The pairs with begin <= key < end, in key order (descending if `reverse`).

        `limit` > 0 returns at most that many (the first ones in the chosen
        order); 0 means no limit.
        """

    @abc.abstractmethod
    def set(self, key: bytes, value: bytes) -> None:
        """Sets `key` to `value` when the transaction commits."""

    @abc.abstractmethod
    def clear(self, key: bytes) -> None:
        """Removes `key` when the transaction commits (no error if it has no value)."""

    @abc.abstractmethod
    def clear_range(self, begin: bytes, end: bytes) -> None:
        """Removes every key with begin <= key < end when the transaction commits."""

    @abc.abstractmethod
    async def commit(self) -> None:
        """Applies every write atomically, or raises (see the contract)."""

    @abc.abstractmethod
    async def read_version(self) -> int:
        """The store's clock for this transaction, in microseconds (see the contract)."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Abandons the transaction unless it committed, and releases what it holds."""


class Store(_Closable):
    """A transactional key-value store (see the module docstring for the contract)."""

    #: The backend's name: memory, sqlite, postgres, fdb, sim.
    backend: str = ""

    #: Whether `Conflict` follows FoundationDB's rule exactly (see the contract).
    precise_conflicts: bool = True

    @abc.abstractmethod
    def transaction(self) -> Transaction:
        """A new transaction; use it as an async context manager."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Releases the store's connections and files. Open transactions must be closed first."""
