"""A deliberate deadlock: two tasks take two locks in opposite orders.

Each task takes its first lock, sleeps long enough for the other to take its
own first lock, then waits for the other's lock forever. No timeout is pending,
so the simulator must report a deadlock, naming both tasks and the lock each
waits on, in virtual time and without hanging.
"""

from __future__ import annotations

import trio

from kelpie.sim import Scenario, SimContext, Workload


class DeadlockWorkload(Workload):
    async def setup(self, ctx: SimContext) -> None:
        self.left = trio.Lock()
        self.right = trio.Lock()

    async def take(self, ctx: SimContext, first: trio.Lock, second: trio.Lock) -> None:
        async with first:
            await trio.sleep(1)
            async with second:
                ctx.emit("deadlock.both_locks")

    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            ctx.spawn(nursery, self.take, ctx, self.left, self.right, name="left-then-right")
            ctx.spawn(nursery, self.take, ctx, self.right, self.left, name="right-then-left")


SCENARIOS = (
    Scenario(
        name="deadlock",
        summary="planted deadlock: two tasks take two locks in opposite orders",
        workload=DeadlockWorkload,
        planted_bug="lock-order inversion between left-then-right and right-then-left",
    ),
)
