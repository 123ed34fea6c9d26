"""The simulated store: one correct copy of the data, wrapped with storage faults.

Fault model (what `SimStore` injects, and what it never does):

- One correct copy: the data live in a `MemoryStore`, the contract's reference
  model, so conflicts, snapshots and versions are exactly FoundationDB's rule.
  Every value is stored with a CRC-32 of its key and value.
- Latency: each read and each commit takes a virtual delay drawn uniformly from
  [0, latency_max_ms] (a commit's delay is split around its commit point).
- Read failures: a read raises `StorageUnavailable` (retryable) with
  probability read_error_p.
- Write failures: a commit raises `StorageUnavailable` before its commit point
  (nothing applied) with probability commit_error_p.
- Injected conflicts: a commit raises a spurious `Conflict` (nothing applied)
  with probability conflict_p.
- commit_unknown_result: with probability unknown_applied_p the commit is
  applied and the caller gets `CommitUnknownResult`; with unknown_lost_p it is
  not applied and the caller gets the same error. Callers cannot tell which.
- Unavailability windows: outages start at outage_rate_per_s (a Poisson process
  in virtual time) and last up to outage_max_ms; during one every read and
  commit raises `StorageUnavailable`.
- Clock drift: the store's clock (read versions, in microseconds) runs at a
  rate drawn once per run within clock_drift_ppm of real time, as a real
  store's clock may run against a node's monotonic clock. Leases are judged on
  it (kelpie/runtime/_membership.py), so drift shortens or stretches them.
- Corruption: with probability corruption_p a read hands back the stored bytes
  with one bit flipped; the checksum catches it and the read raises
  `CorruptionDetected` (retryable). A corrupted value is never served.
- Node pauses: with a `NodePauses` (kelpie/sim/_pauses.py), a paused node
  does no storage I/O: its reads wait out the pause, and so does its commit,
  both before the commit point and right after it (a process that committed,
  then stalled before it learnt so), while other nodes' transactions go on.
- Never injected: stale reads (strict serializability is the contract), lost or
  partial commits (a commit is applied whole or not at all), or corruption of
  the stored copy.
- Crashes: a crashed node is a cancelled task: its in-memory state vanishes,
  committed data survive, and a transaction it had not committed writes nothing.
  Cancelled during `commit()`, the commit may have been applied, as with
  commit_unknown_result.

`quiesce()` stops every fault from then on (latency remains, and an outage
under way ends on its own), for a scenario's liveness phase.

Every injected fault is a trace row (`storage.fault`) and is counted in
`SimStore.injected`. The store also records the committed history (what each
committed transaction read, at which version, and what it wrote), and
`check_history()` verifies that it is serializable in commit-version order.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import attrs
import trio

from kelpie.env import Rng
from kelpie.sim._nodes import CURRENT_NODE
from kelpie.sim._pauses import NodePauses
from kelpie.storage import (
    VERSIONS_PER_SECOND,
    BufferedTransaction,
    CommitUnknownResult,
    Conflict,
    CorruptionDetected,
    KeyRange,
    KeyValue,
    MemoryStore,
    Mutations,
    SnapshotRead,
    StorageUnavailable,
    Store,
)

_CRC = 4


@attrs.frozen
class StorageFaults:
    """The storage faults a run injects (see the module docstring). All zero: none."""

    latency_max_ms: float = 0.0
    read_error_p: float = 0.0
    commit_error_p: float = 0.0
    conflict_p: float = 0.0
    unknown_applied_p: float = 0.0
    unknown_lost_p: float = 0.0
    corruption_p: float = 0.0
    outage_rate_per_s: float = 0.0
    outage_max_ms: float = 0.0
    #: The store's clock (its read versions) runs at a rate drawn once per run, uniformly
    #: within this many parts per million of real (trio) time.
    clock_drift_ppm: float = 0.0

    @classmethod
    def every(cls) -> StorageFaults:
        """Every storage fault on, at rates a retrying workload still makes progress under."""
        return cls(
            latency_max_ms=5.0,
            read_error_p=0.02,
            commit_error_p=0.02,
            conflict_p=0.02,
            unknown_applied_p=0.02,
            unknown_lost_p=0.02,
            corruption_p=0.01,
            outage_rate_per_s=0.5,
            outage_max_ms=200.0,
            clock_drift_ppm=100_000.0,
        )

    def describe(self) -> str:
        if self == StorageFaults():
            return "off"
        fields = attrs.asdict(self)
        return " ".join(f"{name}={value:g}" for name, value in fields.items() if value)


@attrs.frozen
class RecordedTransaction:
    """A committed transaction: where it read, what it saw, and what it wrote."""

    node: str
    read_version: int
    commit_version: int | None  # None: read-only, serialized at its read version
    reads: tuple[SnapshotRead, ...]
    mutations: Mutations | None


class _DriftingMemoryStore(MemoryStore):
    """The reference model, with its clock (read versions) running at `rate` x real time."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self._rate = rate

    def _clock_version(self) -> int:
        return int(trio.current_time() * self._rate * VERSIONS_PER_SECOND)


class SimStore(Store):
    """The simulator's store (see the module docstring)."""

    backend = "sim"
    precise_conflicts = True

    def __init__(
        self,
        rng: Rng,
        faults: StorageFaults = StorageFaults(),
        *,
        on_fault: Callable[[str, dict[str, object]], None] | None = None,
        check_conflicts: bool = True,
        pauses: NodePauses | None = None,
    ) -> None:
        """`check_conflicts=False` plants a bug (no conflict detection) for tests of checkers.

        With `pauses`, each node's reads and commits wait out its pauses (the node
        is the transaction's task's `CURRENT_NODE`).
        """
        drift = rng.fork("clock").uniform(-1, 1) * faults.clock_drift_ppm / 1e6
        #: How fast the store's clock runs against real time (1: exactly).
        self.clock_rate = 1.0 + drift
        self.inner = _DriftingMemoryStore(self.clock_rate)
        self.faults = faults
        self.check_conflicts = check_conflicts
        self.history: list[RecordedTransaction] = []
        self.injected: dict[str, int] = {}
        self._rng = rng
        self._on_fault = on_fault
        self._pauses = pauses
        self._outage_until = -1.0
        self._next_outage: float | None = None
        self._quiet = False

    def transaction(self) -> SimTransaction:
        return SimTransaction(self)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()

    def snapshot(self) -> dict[bytes, bytes]:
        """Every current pair, checksums removed (for checkers)."""
        items = self.inner.snapshot().items()
        return {key: self._unseal(key, sealed, faulty=False) for key, sealed in items}

    # -- faults -----------------------------------------------------------------------

    def _inject(self, kind: str, **fields: object) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if self._on_fault is not None:
            self._on_fault(kind, fields)

    async def _delay(self, share: float = 1.0) -> None:
        if self.faults.latency_max_ms:
            await trio.sleep(self._rng.uniform(0, self.faults.latency_max_ms) * share / 1000)
        else:
            await trio.lowlevel.checkpoint()

    def quiesce(self) -> None:
        """From now on no storage fault is injected (a liveness phase); latency remains.

        An outage under way still ends on its own.
        """
        if self.faults.outage_rate_per_s:
            self._check_outage(refuse=False)
        self._quiet = True

    def _check_outage(self, *, refuse: bool = True) -> None:
        rate = self.faults.outage_rate_per_s
        if not rate:
            return
        now = trio.current_time()
        if self._next_outage is None:
            self._next_outage = now + self._rng.expovariate(rate)
        while now >= self._next_outage and not self._quiet:
            duration_s = self._rng.uniform(0, self.faults.outage_max_ms) / 1000
            self._outage_until = self._next_outage + duration_s
            self._inject("outage", seconds=round(duration_s, 6))
            self._next_outage = self._outage_until + self._rng.expovariate(rate)
        if refuse and now < self._outage_until:
            self._inject("outage_refusal")
            raise StorageUnavailable("simulated outage: the store is unreachable")

    async def _gate(self) -> None:
        """Waits while the current node is paused (no checkpoint when it is not)."""
        if self._pauses is not None:
            await self._pauses.gate(CURRENT_NODE.get())

    async def _before_read(self) -> None:
        await self._gate()
        await self._delay()
        self._check_outage()
        if not self._quiet and self._rng.chance(self.faults.read_error_p):
            self._inject("read_error")
            raise StorageUnavailable("simulated read failure")

    def _commit_fault(self) -> str | None:
        if self._quiet:
            return None
        f = self.faults
        draw = self._rng.random()
        for kind, p in (
            ("commit_error", f.commit_error_p),
            ("conflict", f.conflict_p),
            ("unknown_applied", f.unknown_applied_p),
            ("unknown_lost", f.unknown_lost_p),
        ):
            if draw < p:
                return kind
            draw -= p
        return None

    # -- checksums --------------------------------------------------------------------

    @staticmethod
    def _seal(key: bytes, value: bytes) -> bytes:
        return value + zlib.crc32(value, zlib.crc32(key)).to_bytes(_CRC, "big")

    def _unseal(self, key: bytes, sealed: bytes, *, faulty: bool = True) -> bytes:
        corruption_p = 0.0 if self._quiet else self.faults.corruption_p
        if faulty and corruption_p and self._rng.chance(corruption_p):
            bit = self._rng.randrange(len(sealed) * 8)
            flipped = bytearray(sealed)
            flipped[bit // 8] ^= 1 << (bit % 8)
            sealed = bytes(flipped)
            self._inject("corruption", bit=bit)
        value, crc = sealed[:-_CRC], sealed[-_CRC:]
        if zlib.crc32(value, zlib.crc32(key)).to_bytes(_CRC, "big") != crc:
            raise CorruptionDetected(f"checksum mismatch reading {key[:40]!r}; not served")
        return value

    # -- history ----------------------------------------------------------------------

    def check_history(self) -> str | None:
        """Why the committed history is not serializable in version order, or None if it is.

        Replays every committed transaction in commit-version order (a read-only
        one at its read version) against a model map, and checks that each read
        it made sees exactly what the model holds at that point, and that the
        final model equals the store.
        """
        model = MemoryStore()
        order = sorted(
            self.history,
            key=lambda t: (t.commit_version, 0) if t.commit_version else (t.read_version, 1),
        )
        for position, txn in enumerate(order):
            for read in txn.reads:
                expected = tuple(
                    model.read_range(read.begin, read.end, model.version, read.limit, read.reverse)
                )
                if expected != read.rows:
                    at = txn.commit_version or txn.read_version
                    return (
                        f"transaction #{position} (node {txn.node}, version {at}) read "
                        f"{_show_rows(read.rows)} in {read.begin!r}..{read.end!r}, but in "
                        f"commit order that range held {_show_rows(expected)}"
                    )
            if txn.mutations is not None:
                model.apply(txn.mutations)
        final = model.snapshot()
        actual = self.snapshot()
        if final != actual:
            differing = sorted(k for k in set(final) | set(actual) if final.get(k) != actual.get(k))
            return f"replaying the history does not give the store: keys {differing[:5]} differ"
        return None


def _show_rows(rows: tuple[KeyValue, ...]) -> str:
    shown = ", ".join(f"{k!r}={v!r}" for k, v in rows[:4])
    return f"[{shown}{', ...' if len(rows) > 4 else ''}]"


class SimTransaction(BufferedTransaction):
    """A transaction of a SimStore: the memory model's, with faults and a recorded history."""

    _records_reads = True

    def __init__(self, store: SimStore) -> None:
        super().__init__()
        self._sim = store
        self._node = CURRENT_NODE.get()
        self._read_at = store.inner.new_read_version()

    async def commit(self) -> None:
        read_only = self.mutation_count == 0
        await super().commit()
        if read_only:
            self._sim.history.append(
                RecordedTransaction(
                    self._node, self._read_at, None, tuple(self.snapshot_reads), None
                )
            )

    async def _snapshot_get(self, key: bytes) -> bytes | None:
        await self._sim._before_read()
        sealed = self._sim.inner.read(key, self._read_at)
        return None if sealed is None else self._sim._unseal(key, sealed)

    async def _snapshot_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        await self._sim._before_read()
        sealed = self._sim.inner.read_range(begin, end, self._read_at, limit, reverse)
        return [(key, self._sim._unseal(key, value)) for key, value in sealed]

    async def _snapshot_version(self) -> int:
        await self._sim._before_read()
        return self._read_at

    async def _commit_writes(self, mutations: Mutations, read_conflicts: list[KeyRange]) -> None:
        sim = self._sim
        await sim._gate()  # a paused node does not send its commit
        await sim._delay(0.5)
        sim._check_outage()
        fault = sim._commit_fault()
        if fault == "commit_error":
            sim._inject(fault)
            raise StorageUnavailable("simulated write failure: the commit was not applied")
        if fault == "conflict":
            sim._inject(fault)
            raise Conflict("simulated conflict: the commit was not applied")
        if fault == "unknown_lost":
            sim._inject(fault)
            raise CommitUnknownResult("simulated: the commit's outcome is unknown")
        # The commit point: the check and the apply are one atomic step (no checkpoint).
        if sim.check_conflicts:
            stale = sim.inner.conflicting(self._read_at, read_conflicts)
            if stale:
                raise Conflict(f"{len(stale)} range(s) read changed, first {stale[0]!r}")
        sealed = Mutations(
            cleared=mutations.cleared,
            sets=tuple(
                (key, None if value is None else sim._seal(key, value))
                for key, value in mutations.sets
            ),
        )
        version = sim.inner.apply(sealed)
        sim.history.append(
            RecordedTransaction(
                self._node, self._read_at, version, tuple(self.snapshot_reads), mutations
            )
        )
        await sim._gate()  # committed, then stalled before the reply
        if fault == "unknown_applied":
            sim._inject(fault)
            raise CommitUnknownResult("simulated: the commit's outcome is unknown")
        await sim._delay(0.5)

    async def _release(self) -> None:
        pass
