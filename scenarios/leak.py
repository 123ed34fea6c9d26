"""Planted nondeterminism: a workload that reads the real clock behind the sanitizer's back.

`from time import perf_counter` binds the real function before any simulation
starts, so the sanitizer's patch of `time.perf_counter` never sees this call:
the documented gap of kelpie/sim/_sanitizer.py, which tests/repo/ closes for
Kelpie's own code. The real time then decides how long a task sleeps, so two
runs of the same seed diverge. `kelpie sim --check-determinism --scenario leak`
shows what that looks like: the first divergent trace row of both runs.
"""

from __future__ import annotations

from time import perf_counter as _real_clock

import trio

from kelpie.sim import Scenario, SimContext, Workload


class LeakWorkload(Workload):
    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            for index in range(3):
                ctx.spawn(nursery, self.tick, ctx, index, name=f"ticker-{index}")

    async def tick(self, ctx: SimContext, index: int) -> None:
        for _ in range(5):
            microseconds = int(_real_clock() * 1e6) % 1000
            await trio.sleep(microseconds / 1e6)
            ctx.emit("leak.tick", index=index)


SCENARIOS = (
    Scenario(
        name="leak",
        summary="planted nondeterminism: reads the real clock through a pre-bound name",
        workload=LeakWorkload,
        planted_bug="time.perf_counter bound at import escapes the sanitizer",
    ),
)
