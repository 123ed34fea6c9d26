"""FoundationDB's "cycle" workload, over an in-memory optimistic transactional map.

The map holds a permutation of N keys, initially one cycle 0 -> 1 -> ... -> N-1 -> 0.
Concurrent transactions each pick a key a, read b = next(a), c = next(b),
d = next(c), and rewire a -> c -> b -> d: a swap that keeps one cycle of length N
if, and only if, transactions are serializable. Reads and commits yield to the
scheduler (and BUGGIFY stretches them), so conflicting transactions overlap;
the optimistic map must detect every conflict at commit.

Workers run on three simulated nodes whose wall clocks are skewed, drift and
jump; each commit is stamped with its node's wall time, and the summary counts
stamps that go backwards in commit order (the store orders by version, never by
wall time).

Invariants:
- a reader transaction that commits always sees a single cycle of length N;
- after the run, the map is a single cycle of length N;
- every transaction either committed once or gave up after its retry budget.
"""

from __future__ import annotations

import trio

from kelpie.sim import CheckFailed, ClockFaults, FaultConfig, Scenario, SimContext, Workload

RETRIES_MAX = 50


class Conflict(Exception):
    """A key this transaction read changed before it committed."""


class VersionedMap:
    """A map of int to int with optimistic transactions (validate reads, then apply, atomically).

    `validate=False` skips the read validation: a broken store, used by the tests
    to show that this scenario catches a serializability bug.
    """

    def __init__(self, values: dict[int, int], *, validate: bool = True) -> None:
        self.validate = validate
        self._values = dict(values)
        self._versions = dict.fromkeys(values, 0)
        self.commits = 0

    def snapshot(self) -> dict[int, int]:
        return dict(self._values)

    def begin(self, ctx: SimContext) -> Transaction:
        return Transaction(self, ctx)


class Transaction:
    def __init__(self, store: VersionedMap, ctx: SimContext) -> None:
        self._store = store
        self._ctx = ctx
        self._reads: dict[int, int] = {}
        self._writes: dict[int, int] = {}

    async def get(self, key: int) -> int:
        await trio.lowlevel.checkpoint()
        if self._ctx.env.faults.buggify("cycle.read.delay"):
            await trio.sleep(self._ctx.rng.uniform(0, 0.01))
        if key in self._writes:
            return self._writes[key]
        self._reads.setdefault(key, self._store._versions[key])
        return self._store._values[key]

    def set(self, key: int, value: int) -> None:
        self._writes[key] = value

    async def commit(self) -> None:
        await trio.lowlevel.checkpoint()
        if self._ctx.env.faults.buggify("cycle.commit.delay"):
            await trio.sleep(self._ctx.rng.uniform(0, 0.01))
        # From here to the end there is no checkpoint: validation and apply are atomic.
        store = self._store
        stale = sorted(k for k, v in self._reads.items() if store._versions[k] != v)
        if stale and store.validate:
            raise Conflict(f"keys {stale} changed")
        for key in sorted(self._writes):
            store._values[key] = self._writes[key]
            store._versions[key] += 1
        store.commits += 1


def cycle_error(values: dict[int, int]) -> str | None:
    """Why `values` is not one cycle through every key, or None when it is."""
    seen = []
    key = 0
    for _ in range(len(values)):
        seen.append(key)
        key = values[key]
    if key != 0 or len(set(seen)) != len(values):
        return f"walk from 0 gives {seen[:12]}{'...' if len(seen) > 12 else ''} then {key}"
    return None


class CycleWorkload(Workload):
    def __init__(self, *, validate: bool = True) -> None:
        self.validate = validate

    async def setup(self, ctx: SimContext) -> None:
        rng = ctx.rng
        self.n = rng.randint(4, 12)
        self.workers = rng.randint(2, 6)
        self.txns_per_worker = rng.randint(10, 30)
        self.store = VersionedMap(
            {i: (i + 1) % self.n for i in range(self.n)}, validate=self.validate
        )
        self.gave_up = 0
        self.swaps_committed = 0
        self.last_stamp_ms = 0
        self.wall_backsteps = 0
        self.reads_checked = 0
        self.done = False

    async def swap(self, ctx: SimContext, wid: int) -> None:
        rng = ctx.rng.fork(f"worker:{wid}")
        clock = ctx.nodes[wid % len(ctx.nodes)].env.clock
        for _ in range(self.txns_per_worker):
            for attempt in range(RETRIES_MAX):
                txn = self.store.begin(ctx)
                a = rng.randrange(self.n)
                b = await txn.get(a)
                c = await txn.get(b)
                d = await txn.get(c)
                txn.set(a, c)
                txn.set(c, b)
                txn.set(b, d)
                try:
                    await txn.commit()
                except Conflict:
                    ctx.emit("cycle.conflict", worker=wid, attempt=attempt)
                    await trio.sleep(rng.uniform(0, 0.001 * (attempt + 1)))
                    continue
                self.swaps_committed += 1
                # Commit order is the store's (versions); wall stamps from skewed,
                # jumping node clocks may disagree with it, which is the point.
                stamp_ms = clock.wall_ms()
                if stamp_ms < self.last_stamp_ms:
                    self.wall_backsteps += 1
                self.last_stamp_ms = stamp_ms
                ctx.emit("cycle.commit", worker=wid, a=a, b=b, c=c, wall_ms=stamp_ms)
                break
            else:
                self.gave_up += 1

    async def read_all(self, ctx: SimContext) -> None:
        """Reads the whole map in one transaction, repeatedly, and checks each committed view."""
        while not self.done:
            txn = self.store.begin(ctx)
            view = {key: await txn.get(key) for key in range(self.n)}
            try:
                await txn.commit()
            except Conflict:
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
        error = cycle_error(self.store.snapshot())
        if error:
            raise CheckFailed(f"the final map is not one cycle: {error}")
        attempted = self.workers * self.txns_per_worker
        if self.swaps_committed + self.gave_up != attempted:
            raise CheckFailed(
                f"{attempted} swaps attempted, but {self.swaps_committed} "
                f"committed and {self.gave_up} gave up"
            )
        if self.store.commits != self.swaps_committed + self.reads_checked:
            raise CheckFailed(
                f"the map counted {self.store.commits} commits, the workers "
                f"{self.swaps_committed + self.reads_checked}"
            )
        ctx.emit(
            "cycle.summary",
            commits=self.store.commits,
            gave_up=self.gave_up,
            reads=self.reads_checked,
            wall_backsteps=self.wall_backsteps,
        )


SCENARIOS = (
    Scenario(
        name="cycle",
        summary="FDB-style cycle: concurrent swap transactions on an optimistic in-memory map",
        nodes=3,
        faults=FaultConfig(
            clock=ClockFaults(skew_max_ms=250, drift_max_ppm=100, jump_rate_per_s=2, jump_max_ms=50)
        ),
        workload=CycleWorkload,
        max_time_s=600.0,
    ),
)
