"""The Hypothesis state machine of the suite, driving a store in a trio guest run."""

from __future__ import annotations

import bisect
import enum
import functools
import itertools
import queue
from collections.abc import Awaitable, Callable, Iterable
from typing import Concatenate, TypeVar

import attrs
import outcome
import trio
import trio.testing
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    rule,
)

from kelpie.storage._api import Transaction
from kelpie.storage._buffered import KeyRange, intersects
from kelpie.storage._errors import (
    Conflict,
    TransactionTooOld,
)
from kelpie.storage._keys import key_after, pack
from kelpie.storage._limits import (
    TRANSACTION_DURATION_MAX_MS,
)
from kelpie.storage.conformance._common import (
    _END,
    ClockFactory,
    P,
    StoreFactory,
    T,
    _apply,
    _expected_range,
)
from kelpie.storage.conformance._history import (
    CommittedTransaction,
    describe_cycle,
    serialization_cycle,
)

_StoreMachineT = TypeVar("_StoreMachineT", bound="_StoreMachine")


class _GuestLoop:
    """A trio run that outlives one call, driven from synchronous code (Hypothesis's rules).

    The run is a trio guest run hosted by the calling thread: `run(afn)` schedules
    `afn()` in it and then executes trio's callbacks right here until `afn` is
    done, so the store and its open transactions live in one run across rules.
    The suite starts no thread of its own (tests/repo keeps threads out of
    kelpie/); trio's guest mode waits for I/O on a helper thread of its own, which
    is how backends that use worker threads or sockets still work.
    """

    def __init__(self, clock: trio.abc.Clock | None = None) -> None:
        self._callbacks: queue.SimpleQueue[Callable[[], object]] = queue.SimpleQueue()
        self._outcome: outcome.Outcome[None] | None = None
        self._nursery: trio.Nursery | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        trio.lowlevel.start_guest_run(
            self._main,
            run_sync_soon_threadsafe=self._callbacks.put,
            done_callback=self._done,
            clock=clock,
        )
        self._pump_until(lambda: self._nursery is not None)

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await trio.sleep_forever()

    def _done(self, result: outcome.Outcome[None]) -> None:
        self._outcome = result

    def _pump_until(self, ready: Callable[[], bool]) -> None:
        while not ready():
            if self._outcome is not None:
                self._outcome.unwrap()
                raise RuntimeError("the trio run ended while a call was pending")
            self._callbacks.get()()

    def run(self, afn: Callable[[], Awaitable[T]]) -> T:
        """Runs `afn()` in the trio run and returns its result (or raises its exception)."""
        assert self._token is not None
        assert self._nursery is not None
        box: list[outcome.Outcome[T]] = []

        async def call() -> None:
            box.append(await outcome.acapture(afn))

        self._token.run_sync_soon(self._nursery.start_soon, call)
        self._pump_until(lambda: bool(box))
        return box[0].unwrap()

    def close(self) -> None:
        """Ends the trio run (nothing may be pending)."""
        if self._outcome is None:
            assert self._token is not None
            assert self._nursery is not None
            self._token.run_sync_soon(self._nursery.cancel_scope.cancel)
            self._pump_until(lambda: self._outcome is not None)
        assert self._outcome is not None
        self._outcome.unwrap()


#: The state machine's keys: few, tuple-packed, some extending others, so writes collide.
_SM_KEYS: tuple[bytes, ...] = tuple(sorted(pack(("sm", *t)) for t in ((0,), (0, "a"), (1,), (2,))))

#: Range bounds: the keys, the first key after some of them, and the ends of the key space.
_SM_POINTS: tuple[bytes, ...] = tuple(
    sorted({b"", _END, *_SM_KEYS, key_after(_SM_KEYS[0]), key_after(_SM_KEYS[2])})
)

_ordered_pairs = st.tuples(st.sampled_from(_SM_POINTS), st.sampled_from(_SM_POINTS)).map(
    lambda pair: (min(pair), max(pair))
)


#: How many transactions the state machine keeps open at once.
_SM_SLOTS = 3

_slots = st.integers(0, _SM_SLOTS - 1)


class _Dead(enum.Enum):
    """What a call returns when the backend ended the transaction (see `_StoreMachine._call`)."""

    DEAD = "dead"


#: One write of a transaction: set `begin` to the value, or (None) clear [begin, end).
_Write = tuple[bytes, bytes, bytes | None]


def _write_to(tr: Transaction, write: _Write) -> None:
    begin, end, value = write
    if value is not None:
        tr.set(begin, value)
    elif end == key_after(begin):
        tr.clear(begin)
    else:
        tr.clear_range(begin, end)


@attrs.define(eq=False)
class _ModelTransaction:
    """The model of one transaction: its snapshot, its writes and what it read."""

    name: str
    slot: int | None  # where the state machine keeps it (None: a one-shot transaction)
    tr: Transaction
    start: int  # the number of commits in the history when it began
    started_s: float  # trio's clock, read just before the transaction was created
    snapshot: dict[bytes, bytes]
    view: dict[bytes, bytes]  # the snapshot with its own writes applied: what it reads
    writes: list[_Write] = attrs.field(factory=list)
    read_conflicts: list[KeyRange] = attrs.field(factory=list)
    reads: dict[bytes, int] = attrs.field(factory=dict)  # key -> version seen (see the history)

    def wrote(self, key: bytes) -> bool:
        """Whether its own writes cover `key` (a read of it is answered locally)."""
        return any(begin <= key < end for begin, end, _ in self.writes)


def _step(
    method: Callable[Concatenate[_StoreMachineT, P], None],
) -> Callable[Concatenate[_StoreMachineT, P], None]:
    """Marks a rule of `_StoreMachine`, so that teardown knows whether a step failed.

    Hypothesis calls teardown() after a failing step too; it then only cleans up,
    so that its own checks cannot hide the step's failure.
    """

    @functools.wraps(method)
    def step(self: _StoreMachineT, /, *args: P.args, **kwargs: P.kwargs) -> None:
        self.steps_running += 1  # rules call rules: a depth, not a flag
        method(self, *args, **kwargs)
        self.steps_running -= 1

    return step


class _StoreMachine(RuleBasedStateMachine):
    """Concurrent transactions on a real store, checked against a dict model.

    Up to three transactions are open at once, each in a slot: an operation on
    an empty slot begins a transaction there (its snapshot is fixed with
    `read_version()` right away), and ending it (commit or abandon) empties the
    slot; `write_now` commits a one-write transaction in between, and teardown
    commits the transactions still open, in slot order. The model
    keeps the committed state and, per open transaction, its snapshot plus its
    own writes, and checks:

    - every read (get, get_range with any bounds, limit, direction, snapshot
      flag) equals the model exactly;
    - after every commit, abandon and one-shot write, a new transaction reads
      exactly the model's committed state (checked in the same call into the
      trio run, so each step costs one round trip);
    - on a backend with `precise_conflicts`, each commit succeeds or conflicts
      exactly as FoundationDB's rule says: the read-conflict ranges of its
      reads (a point read of a key it did not write; the scanned part of a
      non-snapshot range read) against the writes of the transactions
      committed since it began, and never when it wrote nothing;
    - on every backend, the committed history is serializable
      (`serialization_cycle`, in teardown). Reads with snapshot=True are left
      out of it: they are not guarded.

    On a backend that is not precise the model follows whatever the backend
    decides. Such a backend may also serialize a transaction before a
    concurrent one that inserted a key the first one cleared without reading
    it (its clear does not see the insert): the model accepts a cleared key
    that keeps its value when the transaction's snapshot did not have it, and
    records that order in the history.
    """

    factory: StoreFactory
    clock: ClockFactory

    def __init__(self) -> None:
        super().__init__()
        self._loop = _GuestLoop(type(self).clock())
        try:
            self.store = self._loop.run(type(self).factory)
        except BaseException:
            self._loop.close()
            raise
        self.precise = self.store.precise_conflicts
        self.committed: dict[bytes, bytes] = {}
        self.slots: list[_ModelTransaction | None] = [None] * _SM_SLOTS
        self.history: list[CommittedTransaction] = []
        self.write_log: list[list[KeyRange]] = []  # per history entry, its write ranges
        self.installs: dict[bytes, list[int]] = {key: [] for key in _SM_KEYS}
        #: The value each install left (None: the key was cleared), parallel to installs.
        self.install_values: dict[bytes, list[bytes | None]] = {key: [] for key in _SM_KEYS}
        self._names = itertools.count()
        self._values = itertools.count()
        self.steps_running = 0  # more than 0 in teardown: a step raised (see _step)

    # -- plumbing ----------------------------------------------------------------------

    async def _contents(self) -> dict[bytes, bytes]:
        async with self.store.transaction() as tr:
            return dict(await tr.get_range(b"", _END, snapshot=True))

    def _too_old(self, tx: _ModelTransaction) -> bool:
        async def now() -> float:
            return trio.current_time()

        return self._loop.run(now) - tx.started_s > TRANSACTION_DURATION_MAX_MS / 1000

    def _call(self, tx: _ModelTransaction, afn: Callable[[], Awaitable[T]]) -> T | _Dead:
        """Runs one operation of `tx`, or ends `tx` if the backend legitimately refused it.

        A transaction past its 5 s may get TransactionTooOld; on a backend that is
        not precise, any operation may get a Conflict. Both end the transaction.
        """
        try:
            return self._loop.run(afn)
        except TransactionTooOld:
            if not self._too_old(tx):
                raise
        except Conflict:
            if self.precise:
                raise
        self._end(tx, commit=False)
        return _Dead.DEAD

    def _in(self, slot: int) -> _ModelTransaction:
        """The transaction open in `slot`, begun now if there is none."""
        return self.slots[slot] or self._begin(slot)

    def _new(
        self, slot: int | None, tr: Transaction, started_s: float, writes: Iterable[_Write] = ()
    ) -> _ModelTransaction:
        tx = _ModelTransaction(
            name=f"t{next(self._names)}",
            slot=slot,
            tr=tr,
            start=len(self.history),
            started_s=started_s,
            snapshot=dict(self.committed),
            view=dict(self.committed),
        )
        for write in writes:
            tx.writes.append(write)
            _apply(tx.view, *write)
        return tx

    def _begin(self, slot: int | None) -> _ModelTransaction:
        async def start() -> tuple[Transaction, float]:
            started_s = trio.current_time()
            tr = self.store.transaction()
            await tr.read_version()
            return tr, started_s

        tx = self._new(slot, *self._loop.run(start))
        if slot is not None:
            self.slots[slot] = tx
        return tx

    def _current_if_same(self, key: bytes, seen: int) -> int:
        """The current version of `key` if it holds the value version `seen` held, else `seen`."""
        values = self.install_values[key]
        current = len(values)
        if (values[current - 1] if current else None) == (values[seen - 1] if seen else None):
            return current
        return seen

    def _version(self, key: bytes, tx: _ModelTransaction) -> int:
        """The version of `key` that `tx`'s snapshot holds (see CommittedTransaction)."""
        return bisect.bisect_left(self.installs[key], tx.start)

    def _write(self, tx: _ModelTransaction, write: _Write) -> None:
        async def call() -> None:
            _write_to(tx.tr, write)
            await trio.lowlevel.checkpoint()

        if write[0] == write[1] or self._call(tx, call) is _Dead.DEAD:
            return
        tx.writes.append(write)
        _apply(tx.view, *write)

    def _end(self, tx: _ModelTransaction, *, commit: bool) -> None:
        """Commits or abandons `tx`, then checks the store against the model."""
        if tx.slot is not None:
            self.slots[tx.slot] = None

        async def end() -> tuple[outcome.Outcome[None] | None, dict[bytes, bytes]]:
            result = await outcome.acapture(tx.tr.commit) if commit else None
            await tx.tr.aclose()
            return result, await self._contents()

        self._settle(tx, *self._loop.run(end))

    def _settle(
        self, tx: _ModelTransaction, result: outcome.Outcome[None] | None, state: dict[bytes, bytes]
    ) -> None:
        """Follows the outcome of `tx`'s commit (None: it was abandoned) in the model."""
        since = list(itertools.chain.from_iterable(self.write_log[tx.start :]))
        stale = [r for r in tx.read_conflicts if any(intersects(r, w) for w in since)]
        expect_conflict = bool(tx.writes and stale)
        committed = False
        if result is not None:
            try:
                result.unwrap()
                committed = True
            except Conflict:
                assert expect_conflict or not self.precise, (
                    f"{tx.name} got a Conflict, but FDB's rule says it commits: it read "
                    f"{tx.read_conflicts}, and the commits since it began wrote {since}"
                )
            except TransactionTooOld:
                if not self._too_old(tx):
                    raise
        if committed:
            assert not (expect_conflict and self.precise), (
                f"{tx.name} committed, but FDB's rule says it conflicts: of what it read, "
                f"{stale} was written since it began"
            )
            self._record(tx, state)
        assert state == self.committed, (
            f"after {tx.name} ended, the store holds {state!r}, the model {self.committed!r}"
        )

    def _record(self, tx: _ModelTransaction, state: dict[bytes, bytes]) -> None:
        """Adds committed `tx` (after which the store holds `state`) to the model and history."""
        old = self.committed
        expected = dict(old)
        for write in tx.writes:
            _apply(expected, *write)
        overtaken: dict[bytes, int] = {}  # blind clears serialized before a concurrent insert
        new = expected
        if tx.writes and not self.precise:
            new = state
            for key in _SM_KEYS:
                if new.get(key) == expected.get(key):
                    continue
                cleared_blindly = (
                    expected.get(key) is None and key not in tx.snapshot and key in old
                )
                assert cleared_blindly and new.get(key) == old.get(key), (
                    f"after {tx.name} committed, {key!r} is {new.get(key)!r}: expected "
                    f"{expected.get(key)!r}"
                )
                overtaken[key] = self._version(key, tx)
        position = len(self.history)
        installed = [
            key
            for key in _SM_KEYS
            if tx.wrote(key) and key not in overtaken and (key in new or key in old)
        ]
        reads = dict(tx.reads)
        if not self.precise:
            # A backend that is not precise may validate reads by value at commit
            # (sqlite does): a read whose value is still the current one when the
            # transaction commits is a read of the current version.
            reads = {key: self._current_if_same(key, seen) for key, seen in reads.items()}
        for key in installed:
            self.installs[key].append(position)
            self.install_values[key].append(new.get(key))
        self.history.append(
            CommittedTransaction(tx.name, reads={**overtaken, **reads}, writes=frozenset(installed))
        )
        self.write_log.append([(begin, end) for begin, end, _ in tx.writes])
        self.committed = new

    # -- rules -------------------------------------------------------------------------

    @initialize(present=st.lists(st.booleans(), min_size=len(_SM_KEYS), max_size=len(_SM_KEYS)))
    @_step
    def populate(self, present: list[bool]) -> None:
        """Commits a first value for some keys, so that reads have rows to skip and limit."""
        tx = self._begin(None)
        for key, here in zip(_SM_KEYS, present, strict=True):
            if here:
                self._write(tx, (key, key_after(key), b"initial"))
        self._end(tx, commit=True)

    @rule(slot=_slots, key=st.sampled_from(_SM_KEYS), snapshot=st.booleans())
    @_step
    def get(self, slot: int, key: bytes, snapshot: bool) -> None:
        tx = self._in(slot)
        got = self._call(tx, lambda: tx.tr.get(key, snapshot=snapshot))
        if got is _Dead.DEAD:
            return
        want = tx.view.get(key)
        assert got == want, f"{tx.name}.get({key!r}) returned {got!r}, expected {want!r}"
        if not snapshot and not tx.wrote(key):
            tx.read_conflicts.append((key, key_after(key)))
            tx.reads.setdefault(key, self._version(key, tx))

    @rule(
        slot=_slots,
        bounds=_ordered_pairs,
        limit=st.sampled_from((0, 1, 1, 2, 3)),
        reverse=st.booleans(),
        snapshot=st.booleans(),
    )
    @_step
    def get_range(
        self, slot: int, bounds: tuple[bytes, bytes], limit: int, reverse: bool, snapshot: bool
    ) -> None:
        tx = self._in(slot)
        begin, end = bounds
        got = self._call(
            tx,
            lambda: tx.tr.get_range(begin, end, limit=limit, reverse=reverse, snapshot=snapshot),
        )
        if got is _Dead.DEAD:
            return
        want = _expected_range(tx.view, begin, end, limit, reverse)
        assert got == want, (
            f"{tx.name}.get_range({begin!r}, {end!r}, limit={limit}, reverse={reverse}) "
            f"returned {got!r}, expected {want!r}"
        )
        if snapshot or begin == end:
            return
        if limit and len(got) == limit:
            last = got[-1][0]
            begin, end = (last, end) if reverse else (begin, key_after(last))
        tx.read_conflicts.append((begin, end))
        for key in _SM_KEYS:
            if begin <= key < end and not tx.wrote(key):
                tx.reads.setdefault(key, self._version(key, tx))

    @rule(
        slot=_slots,
        key=st.sampled_from(_SM_KEYS),
        kind=st.sampled_from(("set", "set empty", "clear")),
    )
    @_step
    def write(self, slot: int, key: bytes, kind: str) -> None:
        """Sets `key` to a new value (or to b""), or clears it."""
        tx = self._in(slot)
        value = {"set": f"{tx.name}.{next(self._values)}".encode(), "set empty": b""}.get(kind)
        self._write(tx, (key, key_after(key), value))

    @rule(slot=_slots, bounds=_ordered_pairs)
    @_step
    def clear_range(self, slot: int, bounds: tuple[bytes, bytes]) -> None:
        self._write(self._in(slot), (*bounds, None))

    @rule(slot=_slots, key=st.sampled_from(_SM_KEYS))
    @_step
    def read_modify_write(self, slot: int, key: bytes) -> None:
        """Reads a key (guarded) and sets it to a new value: the most common transaction."""
        self.get(slot, key, snapshot=False)
        self.write(slot, key, "set")

    @rule(slot=_slots, reverse=st.booleans())
    @_step
    def pop(self, slot: int, reverse: bool) -> None:
        """Reads the first (or last) row, with limit=1, and clears it: a queue's pop.

        Only the part up to that row is read, so a concurrent push past it does
        not conflict.
        """
        self.get_range(slot, (b"", _END), limit=1, reverse=reverse, snapshot=False)
        tx = self.slots[slot]
        if tx is not None and (head := _expected_range(tx.view, b"", _END, 1, reverse)):
            self.write(slot, head[0][0], "clear")

    @rule(slot=_slots)
    @_step
    def commit(self, slot: int) -> None:
        tx = self.slots[slot]
        if tx is not None:
            self._end(tx, commit=True)

    @rule(slot=_slots)
    @_step
    def abandon(self, slot: int) -> None:
        """Leaves the transaction in `slot` without committing it."""
        tx = self.slots[slot]
        if tx is not None:
            self._end(tx, commit=False)

    @rule(key=st.sampled_from(_SM_KEYS), clear=st.booleans())
    @_step
    def write_now(self, key: bytes, clear: bool) -> None:
        """Commits a one-write transaction (it read nothing, so it never conflicts)."""
        write = (key, key_after(key), None if clear else b"now.%d" % next(self._values))

        async def one_shot() -> tuple[
            Transaction, float, outcome.Outcome[None], dict[bytes, bytes]
        ]:
            started_s = trio.current_time()
            async with self.store.transaction() as tr:
                await tr.read_version()
                _write_to(tr, write)
                result = await outcome.acapture(tr.commit)
            return tr, started_s, result, await self._contents()

        tr, started_s, result, state = self._loop.run(one_shot)
        self._settle(self._new(None, tr, started_s, [write]), result, state)

    def teardown(self) -> None:
        """Commits the transactions still open, checks the history, closes the store."""
        failed = self.steps_running > 0
        try:
            for tx in self.slots:
                if tx is not None and not failed:
                    self._end(tx, commit=True)
                elif tx is not None:
                    self._loop.run(tx.tr.aclose)
            if failed:
                return
            cycle = serialization_cycle(self.history)
            assert cycle is None, (
                f"the committed history is not serializable: {describe_cycle(cycle)}"
            )
        finally:
            try:
                self._loop.run(self.store.aclose)
            finally:
                self._loop.close()


def store_state_machine(
    factory: StoreFactory, *, clock: ClockFactory = lambda: None
) -> type[RuleBasedStateMachine]:
    """The state machine (see `_StoreMachine`) on stores from `factory`, for Hypothesis to run.

    Each example gets a new store, in a trio run on the clock `clock()` returns:

        run_state_machine_as_test(store_state_machine(factory), settings=...)
    """

    class StoreStateMachine(_StoreMachine):
        pass

    StoreStateMachine.factory = factory
    StoreStateMachine.clock = clock
    return StoreStateMachine
