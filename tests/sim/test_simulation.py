"""The Simulation: determinism, virtual time, limits, deadlocks and failure classification."""

from __future__ import annotations

import contextlib

import trio

from kelpie.sim import (
    CheckFailed,
    FailureKind,
    RunResult,
    SimConfig,
    SimContext,
    Simulation,
)


async def interleaving(ctx: SimContext) -> None:
    """Eight tasks taking turns through checkpoints: only the schedule varies between seeds."""

    async def worker(index: int) -> None:
        for step in range(4):
            ctx.emit("work", index=index, step=step)
            await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:
        for index in range(8):
            ctx.spawn(nursery, worker, index, name=f"worker-{index}")


def run(workload: object, **config: object) -> RunResult:
    seed = config.pop("seed", 1)
    return Simulation(SimConfig(seed=seed, **config)).run(workload)  # type: ignore[arg-type]


def test_same_seed_gives_the_same_trace() -> None:
    """Two runs of one seed in one process hash identically."""
    assert run(interleaving, seed=5).trace_hash == run(interleaving, seed=5).trace_hash


def test_a_run_is_unaffected_by_earlier_runs() -> None:
    """State from a previous run (any seed) does not leak into the next one."""
    first = run(interleaving, seed=11)
    for seed in range(3):
        run(interleaving, seed=seed)
    assert run(interleaving, seed=11).trace_hash == first.trace_hash


def test_different_seeds_give_different_interleavings() -> None:
    """Over 50 seeds, a workload whose only variation is scheduling shows (nearly) 50 traces."""
    hashes = {run(interleaving, seed=seed).trace_hash for seed in range(50)}
    assert len(hashes) >= 48


def test_fifo_schedule_never_deviates() -> None:
    """Under FIFO scheduling every choice is 0, and tasks run in spawn order."""
    result = run(interleaving, schedule="fifo")
    assert result.ok
    assert result.schedule_choices > 0
    assert result.schedule_deviations == 0
    work = [row.detail for row in result.trace_tail if row.kind == "work"]
    assert work[-8:] == [f"index={i} step=3" for i in range(8)]


def test_recorded_choices_replay_the_same_run() -> None:
    """Replaying a run's recorded scheduling choices reproduces its trace exactly."""
    sim = Simulation(SimConfig(seed=21))
    recorded = sim.run(interleaving)
    assert recorded.schedule_deviations > 0
    replayed = Simulation(SimConfig(seed=21, schedule=sim.choices)).run(interleaving)
    assert replayed.trace_hash == recorded.trace_hash


def test_time_is_virtual_and_concurrent_sleeps_do_not_add_up() -> None:
    """Sleeping an hour takes no real time; two concurrent 10 s sleeps end at t=10 s."""

    async def sleepers(ctx: SimContext) -> None:
        await trio.sleep(3600)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 10)
            nursery.start_soon(trio.sleep, 10)
        assert trio.current_time() == 3610
        assert ctx.env.clock.monotonic_s() == 3610

    result = run(sleepers, max_time_s=7200)
    assert result.ok, result.failure
    assert result.sim_time_s == 3610


def test_time_limit_stops_the_run() -> None:
    """A deadline past max_time_s stops the run with a time-limit failure, in virtual time."""

    async def too_long(ctx: SimContext) -> None:
        await trio.sleep(100)

    result = run(too_long, max_time_s=10)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.TIME_LIMIT
    assert "max_time_s=10" in result.failure.message
    assert result.sim_time_s <= 10


def test_step_limit_stops_a_busy_loop() -> None:
    """A task that checkpoints forever is stopped at max_steps with a step-limit failure."""

    async def spin(ctx: SimContext) -> None:
        while True:
            await trio.lowlevel.checkpoint()

    result = run(spin, max_steps=5_000)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.STEP_LIMIT
    assert result.steps <= 5_100


def test_step_limit_aborts_a_task_that_ignores_cancellation() -> None:
    """A task that swallows its cancellation is aborted shortly after the step limit."""

    async def stubborn(ctx: SimContext) -> None:
        while True:
            with contextlib.suppress(trio.Cancelled):
                await trio.lowlevel.checkpoint()

    result = run(stubborn, max_steps=2_000)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.STEP_LIMIT
    assert result.steps < 20_000


def test_deadlock_is_reported_with_the_blocked_tasks() -> None:
    """Nothing runnable and no deadline: a deadlock naming each waiting task and its wait."""

    async def stuck(ctx: SimContext) -> None:
        never = trio.Event()

        async def waiter() -> None:
            await never.wait()

        async with trio.open_nursery() as nursery:
            ctx.spawn(nursery, waiter, name="waiter")
            await trio.sleep(2)

    result = run(stuck)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.DEADLOCK
    assert "t=2s" in result.failure.message
    assert result.sim_time_s == 2
    [line] = [d for d in result.failure.details if "waiter" in d]
    assert "Event.wait" in line and "test_simulation.py" in line and "in waiter" in line


def test_deadlock_with_a_shielded_waiter_is_still_stopped() -> None:
    """A deadlocked task that shields itself from cancellation is aborted, not waited for."""

    async def shielded(ctx: SimContext) -> None:
        with trio.CancelScope(shield=True):
            await trio.Event().wait()

    result = run(shielded)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.DEADLOCK


def test_assertion_is_a_check_failure_and_other_errors_are_crashes() -> None:
    """AssertionError and CheckFailed are safety failures; anything else is a crash."""

    async def fails_check(ctx: SimContext) -> None:
        raise CheckFailed("invariant broken")

    async def asserts(ctx: SimContext) -> None:
        assert 1 + 1 == 3, "arithmetic"

    async def crashes(ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 1)
            raise KeyError("missing")

    for workload, kind, text in (
        (fails_check, FailureKind.CHECK, "CheckFailed: invariant broken"),
        (asserts, FailureKind.CHECK, "AssertionError: arithmetic"),
        (crashes, FailureKind.CRASH, "KeyError: 'missing'"),
    ):
        result = run(workload)
        assert result.failure is not None
        assert result.failure.kind is kind
        assert result.failure.message.startswith(text)
        assert any("test_simulation.py" in line for line in result.failure.details)


def test_events_buggify_and_phases_enter_the_trace() -> None:
    """Application events carry their node and task; the result round-trips through JSON."""

    async def emits(ctx: SimContext) -> None:
        async def on_node() -> None:
            ctx.nodes[1].env.emit("hello", n=1)

        async with trio.open_nursery() as nursery:
            ctx.spawn(nursery, on_node, node=ctx.nodes[1], name="greeter")

    result = run(emits, nodes=2)
    [row] = [r for r in result.trace_tail if r.kind == "hello"]
    assert (row.node, row.task.split()[-1], row.detail) == ("n2", "greeter", "n=1")
    assert RunResult.from_json(result.to_json()) == result


def test_node_envs_are_distinct() -> None:
    """Each node has its own name, clock and random stream; faults are shared."""

    async def inspect(ctx: SimContext) -> None:
        first, second = (node.env for node in ctx.nodes)
        assert (first.node, second.node) == ("n1", "n2")
        assert first.rng.seed != second.rng.seed
        assert first.clock is not second.clock
        assert first.faults is second.faults
        assert ctx.node("n2").env is second

    result = run(inspect, nodes=2)
    assert result.ok, result.failure
