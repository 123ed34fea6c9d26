"""The part of every transaction that lives in the client: buffered writes, read-your-writes,
conflict ranges, limits and the transaction's life cycle.

A backend subclasses `BufferedTransaction` and supplies four operations on its
snapshot (`_snapshot_get`, `_snapshot_range`, `_snapshot_version`), one commit
(`_commit_writes`, given the `Mutations` and the read-conflict ranges) and
`_release`. Everything else in the contract (kelpie.storage._api) is enforced
here, once, for every backend: key and value checks, the size and age limits,
snapshot reads, and merging the transaction's own writes into what it reads.
"""

from __future__ import annotations

import abc
import bisect
import enum

import attrs
import trio

from kelpie.storage._api import KeyValue, Transaction
from kelpie.storage._errors import (
    InvalidRange,
    StorageError,
    TransactionClosed,
    TransactionTooLarge,
    TransactionTooOld,
)
from kelpie.storage._keys import check_key, check_range, check_value, key_after
from kelpie.storage._limits import (
    TRANSACTION_DURATION_MAX_MS,
    TRANSACTION_SIZE_MAX_BYTES,
)

#: A half-open key range [begin, end).
KeyRange = tuple[bytes, bytes]


@attrs.frozen
class Mutations:
    """A transaction's writes, in the order a backend applies them.

    First every range in `cleared` is removed, then every pair in `sets` is
    applied (a None value removes the key). A set made after a clear_range
    survives it; a clear_range made after a set is already folded in (the set is
    gone from `sets`), so this order gives exactly what the caller asked for.
    """

    cleared: tuple[KeyRange, ...]
    sets: tuple[tuple[bytes, bytes | None], ...]

    def write_ranges(self) -> list[KeyRange]:
        """Every key range these writes touch (their write-conflict ranges)."""
        ranges = list(self.cleared)
        ranges.extend((key, key_after(key)) for key, _ in self.sets)
        return ranges


@attrs.frozen
class SnapshotRead:
    """One read a transaction made of the store (not of its own writes) that guards its commit.

    `rows` is what the store returned for [begin, end) with `limit` (0: all) in
    the given direction; a point read is [key, key + b"\\0") with at most one row.
    """

    begin: bytes
    end: bytes
    limit: int
    reverse: bool
    rows: tuple[KeyValue, ...]


def intersects(a: KeyRange, b: KeyRange) -> bool:
    """Whether two half-open ranges share a key."""
    return a[0] < b[1] and b[0] < a[1]


class _State(enum.Enum):
    OPEN = "open"
    COMMITTING = "committing"
    COMMITTED = "committed"
    FAILED = "failed"
    CLOSED = "closed"


class BufferedTransaction(Transaction):
    """A transaction whose writes wait in memory until commit (see the module docstring)."""

    #: Whether to keep `snapshot_reads` (for backends that validate reads at commit).
    _records_reads = False

    #: Whether `_release` may wait (it then runs shielded from cancellation, so that a
    #: cancelled transaction still gives its connection back). False skips the shield.
    _release_may_wait = True

    def __init__(self) -> None:
        self._started_s = trio.current_time()
        self._sets: dict[bytes, bytes | None] = {}
        self._set_keys: list[bytes] = []  # the keys of _sets, sorted
        self._cleared: list[KeyRange] = []  # sorted, disjoint, not touching
        self._read_conflicts: list[KeyRange] = []
        self._size_bytes = 0
        self._state = _State.OPEN
        self._poison: StorageError | None = None
        self._released = False
        self._version: int | None = None
        #: Every read of the store that guards this transaction's commit, when recorded
        #: (`_records_reads`): exactly the part each read depends on, its conflict range.
        self.snapshot_reads: list[SnapshotRead] = []

    # -- what a backend supplies ------------------------------------------------------

    @abc.abstractmethod
    async def _snapshot_get(self, key: bytes) -> bytes | None:
        """The value of `key` in this transaction's snapshot."""

    @abc.abstractmethod
    async def _snapshot_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        """The snapshot's pairs in [begin, end), in order, at most `limit` (0: all)."""

    @abc.abstractmethod
    async def _snapshot_version(self) -> int:
        """The snapshot's read version (see `Transaction.read_version`)."""

    @abc.abstractmethod
    async def _commit_writes(self, mutations: Mutations, read_conflicts: list[KeyRange]) -> None:
        """Checks conflicts and applies `mutations` atomically, or raises a StorageError."""

    async def _commit_read_only(self) -> None:
        """Commits a transaction that wrote nothing: nothing to do, unless the backend's
        own isolation vouches for reads only at commit (PostgreSQL's SSI)."""
        await trio.lowlevel.checkpoint()

    @abc.abstractmethod
    async def _release(self) -> None:
        """Gives back what the transaction holds (a connection, a snapshot). Called once."""

    # -- the contract -----------------------------------------------------------------

    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        self._check_usable()
        check_key(key)
        self._check_age()
        if key in self._sets:
            return self._sets[key]
        if self._in_cleared(key):
            return None
        value = await self._snapshot_get(key)
        if not snapshot:
            end = key_after(key)
            self._add_read_conflict(key, end)
            if self._records_reads:
                rows = () if value is None else ((key, value),)
                self.snapshot_reads.append(SnapshotRead(key, end, 0, False, rows))
        return value

    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        *,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:
        self._check_usable()
        begin, end = check_range(begin, end)
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidRange(f"limit must be an integer >= 0 (0: no limit), got {limit!r}")
        self._check_age()
        if begin == end:
            return []
        recording = self._records_reads and not snapshot
        first = len(self.snapshot_reads)
        try:
            rows = await self._merged_range(begin, end, limit, reverse, recording)
        except BaseException:
            del self.snapshot_reads[first:]  # a failed read guards nothing
            raise
        if not snapshot:
            if limit and len(rows) == limit:
                last = rows[-1][0]
                scanned = (last, end) if reverse else (begin, key_after(last))
            else:
                scanned = (begin, end)
            self._add_read_conflict(*scanned)
            if recording and scanned != (begin, end):
                self._trim_reads(first, *scanned)
        return rows

    def set(self, key: bytes, value: bytes) -> None:
        self._check_usable()
        check_key(key)
        check_value(key, value)
        self._grow(len(key) + len(value))
        self._put(key, value)

    def clear(self, key: bytes) -> None:
        self._check_usable()
        check_key(key)
        self._grow(len(key))
        self._put(key, None)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check_usable()
        begin, end = check_range(begin, end)
        if begin == end:
            return
        self._grow(len(begin) + len(end))
        lo = bisect.bisect_left(self._set_keys, begin)
        hi = bisect.bisect_left(self._set_keys, end)
        for key in self._set_keys[lo:hi]:
            del self._sets[key]
        del self._set_keys[lo:hi]
        self._cleared = _merge_into(self._cleared, (begin, end))

    async def read_version(self) -> int:
        self._check_usable()
        self._check_age()
        if self._version is None:
            self._version = await self._snapshot_version()
        return self._version

    async def commit(self) -> None:
        self._check_usable()
        self._check_age()
        self._state = _State.COMMITTING
        try:
            if self._sets or self._cleared:
                mutations = Mutations(
                    cleared=tuple(self._cleared),
                    sets=tuple((key, self._sets[key]) for key in self._set_keys),
                )
                await self._commit_writes(mutations, self._read_conflicts)
            else:
                await self._commit_read_only()
        except BaseException:
            self._state = _State.FAILED
            raise
        finally:
            await self._release_once()
        self._state = _State.COMMITTED

    async def aclose(self) -> None:
        if self._state in (_State.OPEN, _State.COMMITTING):
            self._state = _State.CLOSED
        await self._release_once()

    # -- helpers ----------------------------------------------------------------------

    @property
    def mutation_count(self) -> int:
        """How many keys and ranges this transaction would write now."""
        return len(self._sets) + len(self._cleared)

    @property
    def read_conflicts(self) -> list[KeyRange]:
        """The read-conflict ranges added so far (a copy)."""
        return list(self._read_conflicts)

    async def _release_once(self) -> None:
        if self._released:
            return
        self._released = True
        if not self._release_may_wait:
            await self._release()
            return
        with trio.CancelScope(shield=True):
            await self._release()

    def _check_usable(self) -> None:
        if self._state is not _State.OPEN:
            raise TransactionClosed(f"this transaction is {self._state.value}; start a new one")
        if self._poison is not None:
            raise self._poison

    def _check_age(self) -> None:
        age_ms = (trio.current_time() - self._started_s) * 1000
        if age_ms > TRANSACTION_DURATION_MAX_MS:
            self._poison = TransactionTooOld(
                f"transaction is {age_ms:.0f} ms old, over the limit of "
                f"{TRANSACTION_DURATION_MAX_MS} ms; retry it from the start"
            )
            raise self._poison

    def _grow(self, size_bytes: int) -> None:
        self._size_bytes += size_bytes
        if self._size_bytes > TRANSACTION_SIZE_MAX_BYTES:
            self._poison = TransactionTooLarge(
                f"transaction writes and reads {self._size_bytes} bytes, over the limit of "
                f"{TRANSACTION_SIZE_MAX_BYTES}; split it into smaller transactions"
            )
            raise self._poison

    def _put(self, key: bytes, value: bytes | None) -> None:
        if key not in self._sets:
            bisect.insort(self._set_keys, key)
        self._sets[key] = value

    def _add_read_conflict(self, begin: bytes, end: bytes) -> None:
        self._grow(len(begin) + len(end))
        self._read_conflicts.append((begin, end))

    def _in_cleared(self, key: bytes) -> bool:
        i = bisect.bisect_right(self._cleared, (key, b"\xff\xff"))
        return i > 0 and self._cleared[i - 1][0] <= key < self._cleared[i - 1][1]

    def _pieces(self, begin: bytes, end: bytes) -> list[tuple[bytes, bytes, bool]]:
        """[begin, end) in ascending pieces, each wholly cleared by this transaction or not."""
        pieces: list[tuple[bytes, bytes, bool]] = []
        cursor = begin
        for c_begin, c_end in self._cleared:
            if c_end <= cursor:
                continue
            if c_begin >= end:
                break
            if c_begin > cursor:
                pieces.append((cursor, c_begin, False))
            cursor_end = min(c_end, end)
            pieces.append((max(c_begin, cursor), cursor_end, True))
            cursor = cursor_end
        if cursor < end:
            pieces.append((cursor, end, False))
        return pieces

    def _local(self, begin: bytes, end: bytes) -> list[tuple[bytes, bytes | None]]:
        lo = bisect.bisect_left(self._set_keys, begin)
        hi = bisect.bisect_left(self._set_keys, end)
        return [(key, self._sets[key]) for key in self._set_keys[lo:hi]]

    def _trim_reads(self, first: int, low: bytes, high: bytes) -> None:
        """Cuts the reads recorded since `first` down to [low, high), the part scanned.

        A limited read fetches a row more for each of its own writes in the range
        than it returns, but depends only on what it scanned; every stored row in
        that part was fetched, so the trimmed records are exact.
        """
        self.snapshot_reads[first:] = [
            SnapshotRead(
                max(r.begin, low),
                min(r.end, high),
                0,
                r.reverse,
                tuple(kv for kv in r.rows if low <= kv[0] < high),
            )
            for r in self.snapshot_reads[first:]
            if max(r.begin, low) < min(r.end, high)
        ]

    async def _merged_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool, recording: bool = False
    ) -> list[KeyValue]:
        pieces = self._pieces(begin, end)
        if reverse:
            pieces.reverse()
        out: list[KeyValue] = []
        for p_begin, p_end, cleared in pieces:
            local = self._local(p_begin, p_end)
            if reverse:
                local.reverse()
            if cleared:
                rows = [(key, value) for key, value in local if value is not None]
            else:
                # Each local key can hide at most one stored row, so fetching that many
                # more than we still need is always enough.
                fetch = limit - len(out) + len(local) if limit else 0
                stored = await self._snapshot_range(p_begin, p_end, fetch, reverse)
                if recording:
                    self.snapshot_reads.append(
                        SnapshotRead(p_begin, p_end, fetch, reverse, tuple(stored))
                    )
                if fetch and len(stored) >= fetch:
                    # The store had more: only local keys up to the last stored one count.
                    frontier = stored[-1][0]
                    local = [
                        kv for kv in local if (kv[0] >= frontier if reverse else kv[0] <= frontier)
                    ]
                rows = _overlay(stored, local, reverse)
            out.extend(rows)
            if limit and len(out) >= limit:
                return out[:limit]
        return out


def _overlay(
    stored: list[KeyValue], local: list[tuple[bytes, bytes | None]], reverse: bool
) -> list[KeyValue]:
    if not local:
        return stored
    merged: dict[bytes, bytes | None] = dict(stored)
    merged.update(local)
    return [
        (key, value)
        for key in sorted(merged, reverse=reverse)
        if (value := merged[key]) is not None
    ]


def _merge_into(ranges: list[KeyRange], new: KeyRange) -> list[KeyRange]:
    """`ranges` (sorted, disjoint) with `new` added, overlapping and touching ranges joined."""
    begin, end = new
    out: list[KeyRange] = []
    for r_begin, r_end in ranges:
        if r_end < begin or r_begin > end:
            out.append((r_begin, r_end))
        else:
            begin, end = min(begin, r_begin), max(end, r_end)
    out.append((begin, end))
    out.sort()
    return out
