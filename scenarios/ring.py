"""A bounded producer/consumer ring with timeouts and cancellation.

Producers put numbered items into a bounded FIFO ring, each put under a timeout
(a timed-out put is retried; a put that returned is acknowledged). Consumers
take items under timeouts too, and a chaos task cancels consumers mid-wait and
starts replacements. Once the producers finish, the ring must drain.

Invariants (checked on every seed):
- the ring never holds more than its capacity;
- every acknowledged item is consumed exactly once, and nothing else is;
- each producer's items are consumed in the order they were put (FIFO);
- after the producers finish, the ring drains within the drain bound (liveness).
"""

from __future__ import annotations

from collections import Counter

import trio

from kelpie.sim import CheckFailed, Scenario, SimContext, Workload

DRAIN_BOUND_S = 30.0


class Ring:
    """A bounded FIFO ring buffer shared by trio tasks.

    `put` waits while the ring is full, `get` while it is empty. Both are
    cancellation-safe: a cancelled `put` has not inserted its item, a cancelled
    `get` has not removed one. Waiters are woken with `notify_all`, so a woken
    waiter that is cancelled before it runs cannot swallow the wake-up of
    another (the lost-wakeup bug of `notify()` under cancellation).
    """

    def __init__(self, capacity: int) -> None:
        assert capacity >= 1
        self.capacity = capacity
        self._slots: list[object] = [None] * capacity
        self._head = 0
        self._size = 0
        lock = trio.Lock()
        self._not_empty = trio.Condition(lock)
        self._not_full = trio.Condition(lock)

    def __len__(self) -> int:
        return self._size

    async def put(self, item: object) -> None:
        async with self._not_full:
            while self._size == self.capacity:
                await self._not_full.wait()
            self._slots[(self._head + self._size) % self.capacity] = item
            self._size += 1
            assert self._size <= self.capacity, "ring overfilled"
            self._not_empty.notify_all()

    async def get(self) -> object:
        async with self._not_empty:
            while self._size == 0:
                await self._not_empty.wait()
            item = self._slots[self._head]
            self._slots[self._head] = None
            self._head = (self._head + 1) % self.capacity
            self._size -= 1
            self._not_full.notify_all()
            return item


class RingWorkload(Workload):
    async def setup(self, ctx: SimContext) -> None:
        rng = ctx.rng
        self.ring = Ring(rng.randint(1, 4))
        self.producers = rng.randint(2, 3)
        self.items_per_producer = rng.randint(15, 40)
        self.consumers = rng.randint(2, 3)
        self.acked: list[tuple[int, int]] = []
        self.consumed: list[tuple[int, int]] = []
        self.cancel_scopes: dict[int, trio.CancelScope] = {}
        self.producers_done = trio.Event()

    async def produce(self, ctx: SimContext, pid: int) -> None:
        rng = ctx.rng.fork(f"producer:{pid}")
        for seq in range(self.items_per_producer):
            await trio.sleep(rng.uniform(0, 0.02))
            while True:
                if ctx.env.faults.buggify("ring.producer.stall"):
                    await trio.sleep(0.2)
                with trio.move_on_after(rng.uniform(0.005, 0.05)) as scope:
                    await self.ring.put((pid, seq))
                if not scope.cancelled_caught:
                    self.acked.append((pid, seq))
                    ctx.emit("ring.put", pid=pid, seq=seq, size=len(self.ring))
                    break
                ctx.emit("ring.put_timeout", pid=pid, seq=seq)

    async def consume(self, ctx: SimContext, cid: int) -> None:
        rng = ctx.rng.fork(f"consumer:{cid}")
        with trio.CancelScope() as scope:
            self.cancel_scopes[cid] = scope
            while True:
                with trio.move_on_after(rng.uniform(0.005, 0.05)):
                    item = await self.ring.get()
                    assert isinstance(item, tuple)
                    self.consumed.append(item)
                    ctx.emit("ring.get", cid=cid, item=item)
                if ctx.env.faults.buggify("ring.consumer.slow"):
                    await trio.sleep(0.1)
        del self.cancel_scopes[cid]

    async def chaos(self, ctx: SimContext, nursery: trio.Nursery) -> None:
        """Cancels consumers at random moments and starts replacements."""
        rng = ctx.rng.fork("chaos")
        next_cid = self.consumers
        while not self.producers_done.is_set():
            await trio.sleep(rng.uniform(0.01, 0.1))
            if self.cancel_scopes and rng.chance(0.5):
                victim = rng.choice(sorted(self.cancel_scopes))
                self.cancel_scopes[victim].cancel()
                ctx.emit("ring.cancel_consumer", cid=victim)
                ctx.spawn(nursery, self.consume, ctx, next_cid, name=f"consumer-{next_cid}")
                next_cid += 1

    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as consumers:
            for cid in range(self.consumers):
                ctx.spawn(consumers, self.consume, ctx, cid, name=f"consumer-{cid}")
            ctx.spawn(consumers, self.chaos, ctx, consumers, name="chaos")
            async with trio.open_nursery() as producers:
                for pid in range(self.producers):
                    ctx.spawn(producers, self.produce, ctx, pid, name=f"producer-{pid}")
            self.producers_done.set()
            ctx.emit("ring.producers_done", acked=len(self.acked))
            with trio.move_on_after(DRAIN_BOUND_S):
                while len(self.consumed) < len(self.acked):
                    await trio.sleep(0.01)
            consumers.cancel_scope.cancel()

    async def check(self, ctx: SimContext) -> None:
        counts = Counter(self.consumed)
        duplicates = sorted(item for item, n in counts.items() if n > 1)
        if duplicates:
            raise CheckFailed(f"items consumed more than once: {duplicates[:5]}")
        missing = sorted(set(self.acked) - set(counts))
        if missing:
            raise CheckFailed(
                f"{len(missing)} acknowledged items never consumed "
                f"within {DRAIN_BOUND_S:g}s: {missing[:5]}"
            )
        unexpected = sorted(set(counts) - set(self.acked))
        if unexpected:
            raise CheckFailed(f"consumed items nobody acknowledged: {unexpected[:5]}")
        last: dict[int, int] = {}
        for pid, seq in self.consumed:
            if seq <= last.get(pid, -1):
                raise CheckFailed(f"producer {pid}: item {seq} consumed after item {last[pid]}")
            last[pid] = seq


SCENARIOS = (
    Scenario(
        name="ring",
        summary="bounded producer/consumer ring with timeouts and cancelled consumers",
        workload=RingWorkload,
        max_time_s=600.0,
    ),
)
