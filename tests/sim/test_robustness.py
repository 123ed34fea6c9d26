"""The simulator under awkward workloads: wake-ups it must not miss, runs it must stop,
and a process it must leave clean afterwards."""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kelpie.env import Rng
from kelpie.sim import (
    FailureKind,
    RunResult,
    Sanitizer,
    SimConfig,
    SimContext,
    Simulation,
    _sanitizer,
    _trio_hooks,
)

HERE = __file__


def run(workload: Any, **config: Any) -> RunResult:
    return Simulation(SimConfig(seed=config.pop("seed", 1), **config)).run(workload)


def assert_process_clean(real_time: Any) -> None:
    assert _sanitizer._HookState.active is None
    assert time.time is real_time


def test_unfinished_async_generators_close_in_creation_order() -> None:
    """Generators alive at the end of the workload close in the order they started, every run."""
    holders: list[list[Any]] = []

    async def workload(ctx: SimContext) -> None:
        async def gen(index: int) -> Any:
            try:
                yield index
                await trio.sleep(1)
            finally:
                ctx.emit("agen.closed", index=index)

        held = []
        for index in range(8):
            agen = gen(index)
            await agen.__anext__()
            held.append(agen)
        holders.append(held)

    hashes = set()
    for shift in range(5):
        holders.append([object() for _ in range(shift * 37 + 1)])  # move the allocator
        result = run(workload)
        assert result.ok, result.failure
        closed = [row.detail for row in result.trace_tail if row.kind == "agen.closed"]
        assert closed == [f"index={i}" for i in range(8)]
        hashes.add(result.trace_hash)
    assert len(hashes) == 1


# trio warns (ResourceWarning) about the generator abandoned on purpose here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_wake_up_through_run_sync_soon_is_not_a_deadlock() -> None:
    """An abandoned async generator's `finally` (run via run_sync_soon) wakes its waiter."""

    async def workload(ctx: SimContext) -> None:
        woken = trio.Event()

        async def gen() -> Any:
            try:
                yield 1
            finally:
                woken.set()

        agen = gen()
        await agen.__anext__()
        del agen  # trio closes it from a run_sync_soon callback
        await woken.wait()
        ctx.emit("woke")

    result = run(workload)
    assert result.ok, result.failure
    assert result.sim_time_s == 0
    assert any(row.kind == "woke" for row in result.trace_tail)


def test_wait_all_tasks_blocked_runs_before_time_jumps() -> None:
    """trio.testing.wait_all_tasks_blocked wakes first, at t=0, as with trio's MockClock."""

    async def workload(ctx: SimContext) -> None:
        async def sleeper() -> None:
            await trio.sleep(5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sleeper)
            await trio.testing.wait_all_tasks_blocked()
            ctx.emit("idle", t=trio.current_time())

    result = run(workload)
    assert result.ok, result.failure
    assert [r.detail for r in result.trace_tail if r.kind == "idle"] == ["t=0.0"]
    assert result.sim_time_s == 5


def test_shielded_lock_deadlock_is_aborted_cleanly() -> None:
    """Shielded waiters on a lock are aborted through trio's protocol; the next run is fine."""
    real_time = time.time

    async def workload(ctx: SimContext) -> None:
        lock = trio.Lock()

        async def holder() -> None:
            with trio.CancelScope(shield=True):
                async with lock:
                    await trio.sleep_forever()

        async def waiter() -> None:
            await trio.sleep(1)
            with trio.CancelScope(shield=True):
                async with lock:
                    ctx.emit("never")

        async with trio.open_nursery() as nursery:
            nursery.start_soon(holder)
            nursery.start_soon(waiter)

    first = run(workload)
    assert first.failure is not None and first.failure.kind is FailureKind.DEADLOCK
    assert not any("while stopping" in line for line in first.failure.details)
    assert_process_clean(real_time)
    assert run(workload).trace_hash == first.trace_hash
    assert trio.run(trio.sleep, 0) is None  # plain trio still works in this process


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_task_that_swallows_every_abort_is_still_stopped() -> None:
    """A loop that catches BaseException ends at a bounded step count, leaving no patches."""
    real_time = time.time

    async def swallow(ctx: SimContext) -> None:
        while True:
            with contextlib.suppress(BaseException):
                await trio.lowlevel.checkpoint()

    result = run(swallow, max_steps=1_000)
    assert result.failure is not None and result.failure.kind is FailureKind.STEP_LIMIT
    assert result.steps < 1_000 + 3 * 10_000
    assert_process_clean(real_time)


def test_a_failed_sanitizer_start_leaves_nothing_patched(monkeypatch: pytest.MonkeyPatch) -> None:
    """If patching fails half-way, everything already patched is put back."""
    real_time = time.time
    monkeypatch.setattr(_trio_hooks, "thread_starters", lambda: [(os, "no_such_function")])
    sanitizer = Sanitizer(rng=Rng(1), wall_ns=lambda: 0, monotonic_s=lambda: 0.0)
    with pytest.raises(AttributeError), sanitizer:
        pass
    assert_process_clean(real_time)


def test_calls_through_frozen_modules_are_attributed_to_the_caller() -> None:
    """os.popen (frozen in CPython) is reported at the workload's line, not '<frozen os>'."""
    line = 0

    async def workload(ctx: SimContext) -> None:
        nonlocal line
        line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
        os.popen("true")

    result = run(workload)
    [finding] = [f for f in result.findings if f.api == "subprocess"]
    assert finding.site == f"{HERE}:{line} in workload"


def test_file_system_changes_outside_allowed_paths_are_blocked(tmp_path: Path) -> None:
    """Removing or creating files outside the allowed paths fails the run and changes nothing."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    allowed = tmp_path / "scratch"
    allowed.mkdir()

    async def removes(ctx: SimContext) -> None:
        os.remove(victim)

    async def works_in_scratch(ctx: SimContext) -> None:
        (allowed / "sub").mkdir()
        (allowed / "sub" / "f").write_text("x")
        os.remove(allowed / "sub" / "f")
        assert os.listdir(allowed) == ["sub"]

    blocked = run(removes, allowed_paths=(str(allowed),))
    assert blocked.failure is not None and blocked.failure.kind is FailureKind.SANITIZER
    assert victim.read_text() == "keep me"
    ok = run(works_in_scratch, allowed_paths=(str(allowed),))
    assert ok.ok, ok.failure


def test_lazy_imports_work_inside_a_simulation(tmp_path: Path) -> None:
    """A module first imported during a run loads (and caches its bytecode) normally."""
    (tmp_path / "kelpie_lazy_probe.py").write_text("VALUE = 42\n")
    sys.path.insert(0, str(tmp_path))
    try:

        async def workload(ctx: SimContext) -> None:
            import kelpie_lazy_probe  # type: ignore[import-not-found]

            assert kelpie_lazy_probe.VALUE == 42

        result = run(workload)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("kelpie_lazy_probe", None)
    assert result.ok, result.failure
    assert not [f for f in result.findings if f.action == "blocked"]


def test_calendar_time_and_unseeded_randoms_are_virtual() -> None:
    """localtime/strftime/clock_gettime/process_time and Random() repeat exactly per seed."""

    async def workload(ctx: SimContext) -> None:
        await trio.sleep(3)
        ctx.emit(
            "now",
            local=time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
            ctime=time.ctime(),
            real=time.clock_gettime(time.CLOCK_REALTIME),
            mono=time.clock_gettime(time.CLOCK_MONOTONIC),
            cpu=time.process_time(),
            rnd=random.Random().random(),
        )

    first, second = run(workload), run(workload)
    [a] = [r.detail for r in first.trace_tail if r.kind == "now"]
    [b] = [r.detail for r in second.trace_tail if r.kind == "now"]
    assert a == b
    assert "local='2026-01-01 00:00:03'" in a and "mono=3.0" in a
    apis = {f.api for f in first.findings}
    assert {"time.gmtime", "time.clock_gettime", "time.process_time", "random.Random()"} <= apis


def test_process_state_and_sqlite_files_are_guarded(tmp_path: Path) -> None:
    """chdir, environment changes, signals and SQLite files outside allowed paths are blocked."""
    target = tmp_path / "real.db"

    async def chdir(ctx: SimContext) -> None:
        os.chdir(tmp_path)

    async def setenv(ctx: SimContext) -> None:
        os.environ["KELPIE_SIM_PROBE"] = "1"

    async def kill(ctx: SimContext) -> None:
        os.kill(os.getpid(), 0)

    async def sqlite(ctx: SimContext) -> None:
        import sqlite3

        sqlite3.connect(target).close()

    cwd = os.getcwd()
    for workload in (chdir, setenv, kill, sqlite):
        result = run(workload)
        assert result.failure is not None, workload.__name__
        assert result.failure.kind is FailureKind.SANITIZER, workload.__name__
    assert os.getcwd() == cwd
    assert "KELPIE_SIM_PROBE" not in os.environ
    assert not target.exists()


def test_only_bytecode_may_be_written_in_pycache(tmp_path: Path) -> None:
    """`__pycache__` is writable for .pyc files only, not as a hiding place for state."""
    cache = tmp_path / "__pycache__"
    cache.mkdir()

    async def writes_state(ctx: SimContext) -> None:
        (cache / "state.txt").write_text("leaked")

    result = run(writes_state)
    assert result.failure is not None and result.failure.kind is FailureKind.SANITIZER
    assert not (cache / "state.txt").exists()


def test_simulated_nodes_live_in_utc_and_uuid1_is_version_1() -> None:
    """localtime equals gmtime inside a run, and uuid1 gives seeded version-1 UUIDs."""
    import uuid

    seen: list[Any] = []

    async def workload(ctx: SimContext) -> None:
        seen.extend([time.localtime(), time.gmtime(), uuid.uuid1(), uuid.uuid1(node=7)])

    run(workload)
    local, utc, first, second = seen
    assert local == utc
    assert first.version == 1 and second.version == 1 and second.node == 7
    seen.clear()
    run(workload)
    assert seen[2] == first


def test_other_threads_of_the_host_are_left_alone() -> None:
    """A host thread running beside a simulation still gets the real clock and may sleep."""
    import threading

    readings: list[float] = []
    started = threading.Event()
    stop = threading.Event()

    def host_thread() -> None:
        started.set()
        while not stop.is_set():
            readings.append(time.time())
            time.sleep(0.001)

    thread = threading.Thread(target=host_thread)
    thread.start()
    started.wait()

    async def workload(ctx: SimContext) -> None:
        for _ in range(200):
            await trio.lowlevel.checkpoint()
            time.time()  # the simulation's own thread: virtual

    try:
        result = run(workload)
    finally:
        stop.set()
        thread.join()
    assert result.ok, result.failure
    assert readings and all(abs(r - time.time()) < 60 for r in readings)
