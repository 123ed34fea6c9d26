"""A real-time watchdog for one simulated run: the only way to stop a task that never yields.

Virtual time cannot stop a task that loops without reaching a trio checkpoint:
the simulator never regains control. `wall_timeout` arms SIGALRM for a number of
real seconds; when it fires, `RunTimedOut` is raised in whatever Python code is
running (the spinning task, as a rule), so the run ends as a `hang` whose
traceback names the line that never yielded. Harness code only (`kelpie sim`,
sweep workers); never armed inside production code.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType


class RunTimedOut(BaseException):
    """The run used up its real-time allowance: some task never reached a checkpoint."""


@contextmanager
def wall_timeout(seconds: float) -> Iterator[None]:
    """Raises `RunTimedOut` in the running code after `seconds` of real time."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise RunTimedOut(
            f"the run did not finish within {seconds:g}s of real time: "
            "a task never reached a checkpoint"
        )

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
