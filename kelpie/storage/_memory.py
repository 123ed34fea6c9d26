"""The memory backend: the reference model of the contract, and the base of the simulated store.

A multi-version map: every key keeps its recent history of (version, value)
pairs, a transaction reads the versions at or below its read version, and a
commit is checked against the write ranges of every transaction that committed
after that read version (FoundationDB's resolver, in one process). Nothing is
durable; history older than the 5 s transaction window is pruned.

The store's clock is trio's (`trio.current_time()`, virtual in simulation):
versions advance by VERSIONS_PER_SECOND and every commit takes a version above
every read version handed out before it, so a transaction that starts after a
commit always sees it (strict serializability).
"""

from __future__ import annotations

import bisect
from collections import deque

import trio

from kelpie.storage._api import KeyValue, Store
from kelpie.storage._buffered import BufferedTransaction, KeyRange, Mutations, intersects
from kelpie.storage._errors import Conflict, TransactionTooOld
from kelpie.storage._limits import TRANSACTION_DURATION_MAX_MS, VERSIONS_PER_SECOND

#: History is kept this long past the transaction limit, in versions.
_WINDOW_VERSIONS = (TRANSACTION_DURATION_MAX_MS + 1_000) * VERSIONS_PER_SECOND // 1_000

_History = list[tuple[int, bytes | None]]


class MemoryStore(Store):
    """An in-process multi-version store (see the module docstring)."""

    backend = "memory"
    precise_conflicts = True

    def __init__(self) -> None:
        self._history: dict[bytes, _History] = {}
        self._keys: list[bytes] = []  # every key with history, sorted
        self._version = 0  # the last commit version
        self._issued = 0  # the highest read version handed out
        self._log: deque[tuple[int, list[KeyRange]]] = deque()  # commits: version, writes
        self._touched: deque[tuple[int, bytes]] = deque()  # (version, key), for pruning
        self._oldest = 0  # history and log below this version may be pruned away
        self.commits = 0

    def transaction(self) -> MemoryTransaction:
        return MemoryTransaction(self)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    # -- versions ---------------------------------------------------------------------

    def _clock_version(self) -> int:
        return int(trio.current_time() * VERSIONS_PER_SECOND)

    def new_read_version(self) -> int:
        """A read version that sees every commit made so far."""
        version = max(self._version, self._clock_version())
        self._issued = max(self._issued, version)
        return version

    @property
    def version(self) -> int:
        """The version of the last commit."""
        return self._version

    # -- reads at a version -----------------------------------------------------------

    def _check_version(self, version: int) -> None:
        if version < self._oldest:
            raise TransactionTooOld(
                f"version {version} is older than the history this store keeps "
                f"(from {self._oldest}); retry the transaction"
            )

    def read(self, key: bytes, version: int) -> bytes | None:
        """The value of `key` as of `version`; TransactionTooOld once that is pruned."""
        self._check_version(version)
        history = self._history.get(key)
        if history is None:
            return None
        i = bisect.bisect_right(history, version, key=lambda entry: entry[0])
        return history[i - 1][1] if i else None

    def read_range(
        self, begin: bytes, end: bytes, version: int, limit: int, reverse: bool
    ) -> list[KeyValue]:
        """The pairs in [begin, end) as of `version`, in order, at most `limit` (0: all)."""
        self._check_version(version)
        lo = bisect.bisect_left(self._keys, begin)
        hi = bisect.bisect_left(self._keys, end)
        indices = range(hi - 1, lo - 1, -1) if reverse else range(lo, hi)
        out: list[KeyValue] = []
        for i in indices:
            key = self._keys[i]
            value = self.read(key, version)
            if value is not None:
                out.append((key, value))
                if limit and len(out) == limit:
                    break
        return out

    def snapshot(self) -> dict[bytes, bytes]:
        """Every current pair (for checkers and tests)."""
        return dict(self.read_range(b"", b"\xff", self._version, 0, False))

    # -- commits ----------------------------------------------------------------------

    def conflicting(self, read_version: int, read_conflicts: list[KeyRange]) -> list[KeyRange]:
        """The read ranges that a commit after `read_version` wrote into."""
        self._check_version(read_version)
        hit: list[KeyRange] = []
        for version, writes in reversed(self._log):
            if version <= read_version:
                break
            hit.extend(r for r in read_conflicts if any(intersects(r, w) for w in writes))
        return hit

    def apply(self, mutations: Mutations) -> int:
        """Applies `mutations` at a new version (no conflict check) and returns the version."""
        version = max(self._version + 1, self._issued + 1, self._clock_version())
        for begin, end in mutations.cleared:
            lo = bisect.bisect_left(self._keys, begin)
            hi = bisect.bisect_left(self._keys, end)
            for key in self._keys[lo:hi]:
                if self._history[key][-1][1] is not None:
                    self._write(key, None, version)
        for key, value in mutations.sets:
            self._write(key, value, version)
        self._version = version
        self._log.append((version, mutations.write_ranges()))
        self.commits += 1
        self._prune()
        return version

    def _write(self, key: bytes, value: bytes | None, version: int) -> None:
        history = self._history.get(key)
        if history is None:
            if value is None:
                return
            self._history[key] = [(version, value)]
            bisect.insort(self._keys, key)
        else:
            history.append((version, value))
        self._touched.append((version, key))

    def _prune(self) -> None:
        horizon = self._version - _WINDOW_VERSIONS
        self._oldest = max(self._oldest, horizon)
        while self._log and self._log[0][0] < horizon:
            self._log.popleft()
        while self._touched and self._touched[0][0] < horizon:
            _, key = self._touched.popleft()
            history = self._history.get(key)
            if history is None:
                continue
            # Keep the newest entry at or below the horizon and everything after it.
            i = bisect.bisect_right(history, horizon, key=lambda entry: entry[0])
            if i > 1:
                del history[: i - 1]
            if len(history) == 1 and history[0][1] is None and history[0][0] <= horizon:
                del self._history[key]
                del self._keys[bisect.bisect_left(self._keys, key)]


class MemoryTransaction(BufferedTransaction):
    """A transaction of a MemoryStore."""

    def __init__(self, store: MemoryStore) -> None:
        super().__init__()
        self._store = store
        self._read_at = store.new_read_version()
        #: The version this transaction committed at, once it has.
        self.committed_version: int | None = None

    async def _snapshot_get(self, key: bytes) -> bytes | None:
        await trio.lowlevel.checkpoint()
        return self._store.read(key, self._read_at)

    async def _snapshot_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        await trio.lowlevel.checkpoint()
        return self._store.read_range(begin, end, self._read_at, limit, reverse)

    async def _snapshot_version(self) -> int:
        await trio.lowlevel.checkpoint()
        return self._read_at

    async def _commit_writes(self, mutations: Mutations, read_conflicts: list[KeyRange]) -> None:
        await trio.lowlevel.checkpoint()
        # From here on there is no checkpoint: the check and the apply are one atomic step.
        stale = self._store.conflicting(self._read_at, read_conflicts)
        if stale:
            raise Conflict(
                f"{len(stale)} range(s) this transaction read changed since it started, "
                f"first {stale[0][0][:40]!r}..{stale[0][1][:40]!r}; retry it"
            )
        self.committed_version = self._store.apply(mutations)

    async def _release(self) -> None:
        pass
