"""Planted hang: a task that loops forever without reaching a trio checkpoint.

Virtual time cannot stop it (the simulator never regains control), so this is
the one failure only a real-time watchdog can end. `kelpie sim --scenario hang
--timeout 2` reports it as a `hang` whose traceback names the spinning line.
"""

from __future__ import annotations

import trio

from kelpie.sim import Scenario, SimContext, Workload


class HangWorkload(Workload):
    async def run(self, ctx: SimContext) -> None:
        await trio.sleep(1)
        spins = 0
        while spins >= 0:  # the planted bug: no checkpoint in this loop
            spins += 1


SCENARIOS = (
    Scenario(
        name="hang",
        summary="planted hang: a loop that never reaches a checkpoint",
        workload=HangWorkload,
        planted_bug="an endless loop without a checkpoint",
    ),
)
