"""Scenarios: named simulation workloads with setup, run and check phases, and the faults they want.

A scenario is FoundationDB's workload shape: `setup` builds the initial state,
`run` is the concurrent part (faults are live), and `check` verifies the
invariants afterwards. Assertions anywhere (`assert`, `CheckFailed`) are the
oracle: an assertion that fails during `run` is as much a safety failure as one
in `check`. A fresh `Workload` instance is made for every run.

Scenarios whose `planted_bug` is set contain a bug on purpose, to prove that the
simulator finds it; sweeps skip them unless they are named explicitly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TextIO

import attrs

from kelpie.sim._faults import FaultConfig
from kelpie.sim._result import RunResult
from kelpie.sim._simulation import Schedule, SimConfig, SimContext, Simulation


class Workload:
    """Base class of scenario workloads; override `run`, and `setup` and `check` as needed."""

    async def setup(self, ctx: SimContext) -> None:
        """Builds the initial state. Runs before `run`, faults already live."""

    async def run(self, ctx: SimContext) -> None:
        """The concurrent part of the scenario."""
        raise NotImplementedError

    async def check(self, ctx: SimContext) -> None:
        """Verifies the invariants after `run`; raise `CheckFailed` (or assert) on a violation."""


@attrs.frozen
class Scenario:
    """A named workload and how to simulate it."""

    name: str
    summary: str
    workload: Callable[[], Workload]
    nodes: int = 1
    faults: FaultConfig = attrs.Factory(FaultConfig)
    max_time_s: float = 3600.0
    max_steps: int = 1_000_000
    #: When set, says what bug the scenario plants; sweeps skip it unless named.
    planted_bug: str | None = None

    def config(
        self, seed: int, *, schedule: Schedule = "random", trace_tail_len: int = 40
    ) -> SimConfig:
        """The simulation settings for one run of this scenario."""
        return SimConfig(
            seed=seed,
            nodes=self.nodes,
            faults=self.faults,
            max_time_s=self.max_time_s,
            max_steps=self.max_steps,
            schedule=schedule,
            trace_tail_len=trace_tail_len,
        )


async def _phases(workload: Workload, ctx: SimContext) -> None:
    for name, phase in (
        ("setup", workload.setup),
        ("run", workload.run),
        ("check", workload.check),
    ):
        ctx.phase(name)
        await phase(ctx)


def run_scenario(
    scenario: Scenario,
    seed: int,
    *,
    schedule: Schedule = "random",
    trace_sink: TextIO | None = None,
    trace_tail_len: int = 40,
    ref: str | None = None,
) -> RunResult:
    """Runs one scenario with one seed in this process.

    `ref` is how the scenario was named (`ring`, or `package.module:NAME`); the
    result, and so its reproduce command, carries it. Defaults to its name.
    """
    workload = scenario.workload()
    sim = Simulation(
        scenario.config(seed, schedule=schedule, trace_tail_len=trace_tail_len),
        trace_sink=trace_sink,
    )
    return sim.run(lambda ctx: _phases(workload, ctx), scenario=ref or scenario.name)
