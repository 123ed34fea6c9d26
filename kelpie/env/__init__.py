"""The injectable environment: Clock, Rng, Faults, EventSink, the node network and the frozen Env.

This package (with the real storage backends, later) is the only place in
Kelpie allowed to read the wall clock, OS entropy, threads or sockets;
tests/repo/ enforces that. `TcpNetwork` is the real node network; its
conformance suite is kelpie.env.conformance (test-only: it imports pytest).
"""

from kelpie.env._clock import Clock, SystemClock
from kelpie.env._env import Env
from kelpie.env._events import EventSink, LoggingEventSink
from kelpie.env._faults import Faults, NoFaults, check_site_name
from kelpie.env._http import RealHttpTransport
from kelpie.env._network import (
    DeliveryUnknown,
    FrameTooLarge,
    Handler,
    NetworkError,
    NodeNetwork,
    RemoteFailure,
    Unreachable,
)
from kelpie.env._rng import Rng, derive_seed
from kelpie.env._tcp import FRAME_SIZE_MAX_BYTES, TcpNetwork

__all__ = [
    "FRAME_SIZE_MAX_BYTES",
    "Clock",
    "DeliveryUnknown",
    "Env",
    "EventSink",
    "Faults",
    "FrameTooLarge",
    "Handler",
    "LoggingEventSink",
    "NetworkError",
    "NoFaults",
    "NodeNetwork",
    "RealHttpTransport",
    "RemoteFailure",
    "Rng",
    "SystemClock",
    "TcpNetwork",
    "Unreachable",
    "check_site_name",
    "derive_seed",
]
