"""Every touch of trio's private names, in one place (DESIGN.md §4).

Trio shuffles each batch of runnable tasks with a private module-level
`random.Random` (`trio._core._run._r`). With the private flag
`_ALLOW_DETERMINISTIC_SCHEDULING` set, it first sorts the batch by spawn order
(instead of leaving it in an order that depends on memory addresses), then calls
`_r.shuffle(batch)` and runs the batch by popping from its end. Replacing `_r`
with an object whose `shuffle` asks our scheduling controller hands every
scheduling decision to the simulator.

trio is pinned to an exact version in pyproject.toml because of this module;
tests/sim/test_trio_canary.py fails loudly if an upgrade moves any of it.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import outcome
import trio
import trio._core._run as _trio_run
import trio._threads as _trio_threads
import trio.lowlevel
import trio.testing

TRIO_VERSION_TESTED = "0.35.0"

#: Receives the batch of runnable tasks, sorted by spawn order, and must leave it
#: in the order trio should *pop* it (the last element runs first).
BatchOrderer = Callable[[list[trio.lowlevel.Task]], None]


class _SchedulerRandom(random.Random):
    """Stands in for `trio._core._run._r`; hands each batch to the simulator.

    Trio calls `shuffle` (deterministic mode), `uniform` (a SystemClock's offset)
    and, outside deterministic mode, `random`. The latter must never be reached
    while we are installed, so it fails loudly.
    """

    def __init__(self, orderer: BatchOrderer) -> None:
        super().__init__(0)
        self._orderer = orderer

    def shuffle(self, x: Any) -> None:
        self._orderer(x)

    def uniform(self, a: float, b: float) -> float:
        # trio's SystemClock draws its random offset here when a run has no
        # clock of its own; any fixed value will do.
        return a

    def random(self) -> float:
        raise AssertionError(
            "trio asked for a non-deterministic scheduling draw: "
            "_ALLOW_DETERMINISTIC_SCHEDULING is not in effect (see kelpie/sim/_trio_hooks.py)"
        )


@contextmanager
def deterministic_scheduling(orderer: BatchOrderer) -> Iterator[None]:
    """Within the block, every trio.run schedules by `orderer`. Restores trio afterwards.

    Must wrap each `trio.run` separately: trio's generator state otherwise carries
    over between runs.
    """
    saved_flag = _trio_run._ALLOW_DETERMINISTIC_SCHEDULING
    saved_r = _trio_run._r
    _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = True  # type: ignore[misc]
    _trio_run._r = _SchedulerRandom(orderer)
    try:
        yield
    finally:
        _trio_run._r = saved_r
        _trio_run._ALLOW_DETERMINISTIC_SCHEDULING = saved_flag  # type: ignore[misc]


def thread_starters() -> list[tuple[object, str]]:
    """(module, attribute) pairs through which trio starts worker threads.

    `trio.to_thread` reuses cached threads, so trapping `threading` alone would
    miss it; the sanitizer patches these as well.
    """
    return [(_trio_threads, "start_thread_soon"), (trio.lowlevel, "start_thread_soon")]


def check_hooks() -> list[str]:
    """Problems that would break the hooks under the installed trio; empty when all is well."""
    problems = []
    if trio.__version__ != TRIO_VERSION_TESTED:
        problems.append(
            f"trio {trio.__version__} is installed; hooks were verified on {TRIO_VERSION_TESTED}"
        )
    if not hasattr(_trio_run, "_ALLOW_DETERMINISTIC_SCHEDULING"):
        problems.append("trio._core._run._ALLOW_DETERMINISTIC_SCHEDULING is gone")
    if not isinstance(getattr(_trio_run, "_r", None), random.Random):
        problems.append("trio._core._run._r is no longer a random.Random")
    if not hasattr(_trio_threads, "start_thread_soon"):
        problems.append("trio._threads.start_thread_soon is gone")
    if not callable(getattr(trio.testing.MockClock, "_autojump", None)):
        problems.append("trio.testing.MockClock._autojump is gone")
    if not hasattr(_trio_run, "GLOBAL_RUN_CONTEXT"):
        problems.append("trio._core._run.GLOBAL_RUN_CONTEXT is gone")
    task_fields = {field.name for field in attrs.fields(trio.lowlevel.Task)}
    for name in ("_abort_func", "_next_send", "coro"):
        if name not in task_fields:
            problems.append(f"trio.lowlevel.Task.{name} is gone")
    if not callable(getattr(trio.lowlevel.Task, "_attempt_abort", None)):
        problems.append("trio.lowlevel.Task._attempt_abort is gone")
    return problems


def idle_jump_clock(
    current_time: Callable[[], float], on_idle: Callable[[float], None]
) -> trio.testing.MockClock:
    """A trio clock that reads `current_time` and calls `on_idle(deadline)` when the run is idle.

    trio's run loop consults a MockClock with `autojump_threshold=0` through
    `_autojump` exactly when no task is runnable, no I/O event (including a
    `run_sync_soon` wake-up) arrived in a zero-timeout poll, and no task waits in
    `wait_all_tasks_blocked`: the only moment a simulated clock may move. MockClock
    cannot be subclassed (trio marks it final), so this instance's `_autojump`,
    `current_time` and `deadline_to_sleep_time` are replaced: time is whatever
    `current_time` says (never derived from the real clock), and each idle moment
    hands the earliest pending deadline (`math.inf` when there is none) to
    `on_idle`, which moves time or reports the run stuck.
    """
    clock = trio.testing.MockClock(rate=0.0, autojump_threshold=0.0)

    def deadline_to_sleep_time(deadline: float) -> float:
        # Never sleep for real: with autojump_threshold=0 the run loop turns any
        # positive answer into a zero-timeout poll followed by `_autojump`.
        return 0.0 if deadline <= current_time() else 86400.0

    def autojump() -> None:
        on_idle(_trio_run.GLOBAL_RUN_CONTEXT.runner.deadlines.next_deadline())

    clock.current_time = current_time  # type: ignore[method-assign]
    clock.deadline_to_sleep_time = deadline_to_sleep_time  # type: ignore[method-assign]
    clock._autojump = autojump  # type: ignore[method-assign]
    return clock


def abort_blocked_task(task: trio.lowlevel.Task, exc: BaseException) -> bool:
    """Interrupts a blocked task with `exc`, through trio's own abort protocol.

    The task's blocking primitive runs its abort function (so a Lock or channel
    forgets the waiter, exactly as on cancellation), but unlike cancellation a
    shield does not stop it. Returns False when the task is not blocked.
    """
    if task._abort_func is None:
        return False

    def raise_exc() -> None:
        raise exc

    task._attempt_abort(raise_exc)
    return True


def throw_at_next_step(task: trio.lowlevel.Task, exc: BaseException) -> None:
    """Makes `task`, which is about to take a step, raise `exc` at its checkpoint instead.

    Used only to abort a run whose tasks ignore cancellation (the step limit's
    last resort); it must be called from `Instrument.before_task_step`.
    """
    task._next_send = outcome.Error(exc)


#: Tasks of trio runs that died. Kept referenced for the life of the process:
#: closing them (or letting the collector do it) would run their cleanup code
#: outside any trio run, where it raises, or loops forever in code that swallows
#: every exception. A dead run's tasks are few, and such runs are rare.
_GRAVEYARD: list[object] = []


def discard_tasks(tasks: list[trio.lowlevel.Task]) -> None:
    """Parks the tasks left behind by a trio run that died, so they are never finalized."""
    _GRAVEYARD.append(tasks)
