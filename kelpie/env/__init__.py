"""The injectable environment: Clock, Rng, Faults, EventSink and the frozen Env.

This package (with the real storage backends, later) is the only place in
Kelpie allowed to read the wall clock, OS entropy, threads or sockets;
tests/repo/ enforces that.
"""

from kelpie.env._clock import Clock, SystemClock
from kelpie.env._env import Env
from kelpie.env._events import EventSink, LoggingEventSink
from kelpie.env._faults import Faults, NoFaults, check_site_name
from kelpie.env._rng import Rng, derive_seed

__all__ = [
    "Clock",
    "Env",
    "EventSink",
    "Faults",
    "LoggingEventSink",
    "NoFaults",
    "Rng",
    "SystemClock",
    "check_site_name",
    "derive_seed",
]
