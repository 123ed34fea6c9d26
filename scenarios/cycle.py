"""FoundationDB's "cycle" workload, on Kelpie's store under every storage fault.

The store holds a permutation of N keys, initially one cycle 0 -> 1 -> ... -> N-1 -> 0.
Concurrent transactions each pick a key a, read b = next(a), c = next(b),
d = next(c), and rewire a -> c -> b -> d: a swap that keeps one cycle of length N
if, and only if, transactions are serializable. The store is the simulator's
(`ctx.store`): reads and commits take virtual time, fail, conflict spuriously,
come back with commit_unknown_result, hit outages and corrupted reads.

Workers run on three simulated nodes whose wall clocks are skewed, drift and
jump; each commit is stamped with its node's wall time, and the summary counts
stamps that go backwards in commit order (the store orders by version, never by
wall time).

Invariants:
- a reader transaction that commits always sees a single cycle of length N;
- after the run, the map is a single cycle of length N;
- the store's committed history is serializable in commit order;
- the store applied at least every acknowledged swap, and at most those plus
  the swaps whose outcome was unknown (a swap applied twice is still a swap,
  so the ring survives it: that is why this workload may retry blindly).
"""

from __future__ import annotations

import trio

from kelpie.sim import (
    CheckFailed,
    ClockFaults,
    FaultConfig,
    Scenario,
    SimContext,
    SimStore,
    StorageFaults,
    Workload,
)
from kelpie.storage import (
    CommitUnknownResult,
    RetryPolicy,
    StorageError,
    Transaction,
    pack,
    transact,
    tuple_range,
    unpack,
)

RETRY = RetryPolicy(attempts_max=30, backoff_initial_ms=1, backoff_max_ms=50)


def _key(i: int) -> bytes:
    return pack(("cycle", i))


def cycle_error(values: dict[int, int]) -> str | None:
    """Why `values` is not one cycle through every key, or None when it is."""
    seen = []
    key = 0
    for _ in range(len(values)):
        seen.append(key)
        key = values.get(key, -1)
    if key != 0 or len(set(seen)) != len(values):
        return f"walk from 0 gives {seen[:12]}{'...' if len(seen) > 12 else ''} then {key}"
    return None


async def read_ring(tr: Transaction) -> dict[int, int]:
    rows = await tr.get_range(*tuple_range(("cycle",)))
    return {unpack(k)[1]: unpack(v)[0] for k, v in rows}


class CycleWorkload(Workload):
    def __init__(self, *, check_conflicts: bool = True) -> None:
        self.check_conflicts = check_conflicts

    async def setup(self, ctx: SimContext) -> None:
        rng = ctx.rng
        self.n = rng.randint(4, 12)
        self.workers = rng.randint(2, 6)
        self.txns_per_worker = rng.randint(10, 30)
        if self.check_conflicts:
            self.store = ctx.store
        else:  # a planted bug, for the tests that show this scenario catches it
            self.store = SimStore(ctx.rng.fork("broken-store"), check_conflicts=False)

        async def init(tr: Transaction) -> None:
            for i in range(self.n):
                tr.set(_key(i), pack(((i + 1) % self.n,)))

        await transact(self.store, init, rng=rng.fork("init"), policy=RetryPolicy(100))
        self.commits_before = self.store.inner.commits  # init may have applied twice
        self.acked = 0
        self.unknown = 0
        self.gave_up = 0
        self.last_stamp_ms = 0
        self.wall_backsteps = 0
        self.reads_checked = 0
        self.done = False

    async def swap(self, ctx: SimContext, wid: int) -> None:
        rng = ctx.rng.fork(f"worker:{wid}")
        node = ctx.nodes[wid % len(ctx.nodes)]
        picks: list[int] = []

        async def swap_once(tr: Transaction) -> tuple[int, int, int]:
            a = picks[-1]
            b = unpack((await tr.get(_key(a))) or b"")[0]
            c = unpack((await tr.get(_key(b))) or b"")[0]
            d = unpack((await tr.get(_key(c))) or b"")[0]
            tr.set(_key(a), pack((c,)))
            tr.set(_key(c), pack((b,)))
            tr.set(_key(b), pack((d,)))
            return b, c, d

        for _ in range(self.txns_per_worker):
            picks.append(rng.randrange(self.n))
            try:
                b, c, _d = await transact(
                    self.store, swap_once, rng=node.env.rng, policy=RETRY, on_retry=self._count
                )
            except CommitUnknownResult:
                self.unknown += 1
                continue
            except StorageError as exc:
                self.gave_up += 1
                ctx.emit("cycle.gave_up", worker=wid, error=type(exc).__name__)
                continue
            self.acked += 1
            # Commit order is the store's (versions); wall stamps from skewed,
            # jumping node clocks may disagree with it, which is the point.
            stamp_ms = node.clock.wall_ms()
            if stamp_ms < self.last_stamp_ms:
                self.wall_backsteps += 1
            self.last_stamp_ms = stamp_ms
            ctx.emit("cycle.commit", worker=wid, a=picks[-1], b=b, c=c, wall_ms=stamp_ms)

    def _count(self, error: StorageError, attempt: int) -> None:
        if isinstance(error, CommitUnknownResult):
            self.unknown += 1

    async def read_all(self, ctx: SimContext) -> None:
        """Reads the whole ring in one transaction, repeatedly, and checks each committed view."""
        while not self.done:
            try:
                async with self.store.transaction() as tr:
                    view = await read_ring(tr)
                    await tr.commit()
            except StorageError:
                await trio.sleep(0.001)
                continue
            error = cycle_error(view)
            if error:
                raise CheckFailed(f"a committed read saw a broken cycle: {error}")
            self.reads_checked += 1
            await trio.sleep(0.001)

    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as checkers:
            ctx.spawn(checkers, self.read_all, ctx, name="reader")
            async with trio.open_nursery() as workers:
                for wid in range(self.workers):
                    node = ctx.nodes[wid % len(ctx.nodes)]
                    ctx.spawn(workers, self.swap, ctx, wid, node=node, name=f"worker-{wid}")
            self.done = True

    async def check(self, ctx: SimContext) -> None:
        final = {unpack(k)[1]: unpack(v)[0] for k, v in self.store.snapshot().items()}
        error = cycle_error(final)
        if error:
            raise CheckFailed(f"the final map is not one cycle: {error}")
        error = self.store.check_history()
        if error:
            raise CheckFailed(f"the committed history is not serializable: {error}")
        applied = self.store.inner.commits - self.commits_before
        if not self.acked <= applied <= self.acked + self.unknown:
            raise CheckFailed(
                f"the store applied {applied} swaps; the workers saw {self.acked} "
                f"acknowledged and {self.unknown} with an unknown outcome"
            )
        ctx.emit(
            "cycle.summary",
            acked=self.acked,
            unknown=self.unknown,
            gave_up=self.gave_up,
            reads=self.reads_checked,
            wall_backsteps=self.wall_backsteps,
            faults=sorted(self.store.injected.items()),
        )


SCENARIOS = (
    Scenario(
        name="cycle",
        summary="FDB-style cycle: concurrent swaps on the simulated store, every storage fault",
        nodes=3,
        faults=FaultConfig(
            clock=ClockFaults(
                skew_max_ms=250, drift_max_ppm=100, jump_rate_per_s=2, jump_max_ms=50
            ),
            storage=StorageFaults.every(),
        ),
        workload=CycleWorkload,
        max_time_s=600.0,
    ),
)
