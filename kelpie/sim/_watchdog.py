"""A real-time watchdog for one simulated run: the only way to stop a task that never yields.

Virtual time cannot stop a task that loops without reaching a trio checkpoint:
the simulator never regains control. `wall_timeout` arms SIGALRM for a number of
real seconds; when it fires, `RunTimedOut` is raised in whatever Python code is
running (the spinning task, as a rule), so the run ends as a `hang` whose
traceback names the line that never yielded. Harness code only (`kelpie sim`,
sweep workers); never armed inside production code.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

import trio

_DEFER_S = 0.005
_DEFERRALS_MAX = 400
_MACHINERY = (
    os.path.dirname(trio.__file__) + os.sep,
    os.path.dirname(os.path.abspath(__file__)) + os.sep,
)


def _in_machinery(frame: FrameType | None) -> bool:
    return frame is not None and frame.f_code.co_filename.startswith(_MACHINERY)


class RunTimedOut(BaseException):
    """The run used up its real-time allowance: some task never reached a checkpoint."""


@contextmanager
def wall_timeout(seconds: float) -> Iterator[None]:
    """Raises `RunTimedOut` in the running code after `seconds` of real time."""

    deferrals = 0

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        nonlocal deferrals
        # Raised inside trio's machinery or the simulator's instrument, the error
        # would be swallowed (trio drops a failing instrument) or break the run
        # loop; wait a moment for the spinning code itself to be running.
        if _in_machinery(frame) and deferrals < _DEFERRALS_MAX:
            deferrals += 1
            signal.setitimer(signal.ITIMER_REAL, _DEFER_S)
            return
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
