"""A planted race that only some interleavings expose, and its fix.

A journal accepts appends until it is closed; `close` returns the sealed
contents. Writers wake at random milliseconds and append; a closer wakes at a
random millisecond and closes. The contract: an append that returned True (was
acknowledged) is in the sealed contents.

`race` plants the bug: `append` checks `closed`, then yields (a flush) before
writing the entry, so the check can go stale. It loses an acknowledged entry
only when a writer wakes at the closer's exact millisecond, runs its check
before the closer sets `closed`, and then runs its write after the closer takes
the snapshot: two scheduling decisions in two consecutive batches, a few
percent of seeds. `race_fixed` writes the entry in the same step as the check
and flushes afterwards, which is correct under every interleaving.
"""

from __future__ import annotations

import trio

from kelpie.sim import CheckFailed, Scenario, SimContext, Workload

WRITERS = 4
APPENDS_PER_WRITER = 5
WRITE_WINDOW_MS = 50
CLOSE_WINDOW_MS = (20, 60)


class Journal:
    """Append-until-closed log. `racy=True` reproduces the planted check-then-act bug."""

    def __init__(self, *, racy: bool) -> None:
        self.racy = racy
        self.closed = False
        self.entries: list[tuple[int, int]] = []

    async def _flush(self) -> None:
        await trio.lowlevel.checkpoint()

    async def append(self, entry: tuple[int, int]) -> bool:
        if self.closed:
            return False
        if self.racy:
            await self._flush()  # the planted bug: `closed` may change during this wait
            self.entries.append(entry)
        else:
            self.entries.append(entry)
            await self._flush()
        return True

    async def close(self) -> list[tuple[int, int]]:
        self.closed = True
        await self._flush()
        return list(self.entries)


class RaceWorkload(Workload):
    def __init__(self, *, racy: bool) -> None:
        self.racy = racy

    async def setup(self, ctx: SimContext) -> None:
        self.journal = Journal(racy=self.racy)
        self.acked: list[tuple[int, int]] = []
        self.sealed: list[tuple[int, int]] | None = None

    async def writer(self, ctx: SimContext, wid: int) -> None:
        rng = ctx.rng.fork(f"writer:{wid}")
        wake_ms = sorted(rng.randrange(WRITE_WINDOW_MS) for _ in range(APPENDS_PER_WRITER))
        for seq, at_ms in enumerate(wake_ms):
            await trio.sleep_until(at_ms / 1000)
            if await self.journal.append((wid, seq)):
                self.acked.append((wid, seq))
                ctx.emit("journal.acked", wid=wid, seq=seq)

    async def closer(self, ctx: SimContext) -> None:
        at_ms = ctx.rng.fork("closer").randrange(*CLOSE_WINDOW_MS)
        await trio.sleep_until(at_ms / 1000)
        self.sealed = await self.journal.close()
        ctx.emit("journal.sealed", entries=len(self.sealed))

    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            for wid in range(WRITERS):
                ctx.spawn(nursery, self.writer, ctx, wid, name=f"writer-{wid}")
            ctx.spawn(nursery, self.closer, ctx, name="closer")

    async def check(self, ctx: SimContext) -> None:
        assert self.sealed is not None
        lost = sorted(set(self.acked) - set(self.sealed))
        if lost:
            raise CheckFailed(f"acknowledged appends missing from the sealed journal: {lost}")


SCENARIOS = (
    Scenario(
        name="race",
        summary="planted check-then-act race: an acknowledged append can miss the sealed journal",
        workload=lambda: RaceWorkload(racy=True),
        planted_bug="Journal.append yields between checking `closed` and writing the entry",
    ),
    Scenario(
        name="race_fixed",
        summary="the race scenario with the check and the write in one step",
        workload=lambda: RaceWorkload(racy=False),
    ),
)
