"""The injectable world: one frozen `Env` passed explicitly to everything that needs it.

An `Env` carries every source of time, randomness and faults a Kelpie module may
use, plus the sink for its application events. There is no global Env and no
"am I simulated?" question anywhere: production builds one with
`Env.production()`, the simulator builds one per simulated node, and the code in
between cannot tell them apart. Later layers add their own fields (the process
launcher) here.
"""

from __future__ import annotations

import logging
import os

import attrs
import httpx2

from kelpie.env._clock import Clock, SystemClock
from kelpie.env._events import EventSink, LoggingEventSink
from kelpie.env._faults import Faults, NoFaults
from kelpie.env._http import RealHttpTransport
from kelpie.env._network import NodeNetwork
from kelpie.env._rng import Rng

_log = logging.getLogger("kelpie.env")


@attrs.frozen
class Env:
    """Everything a module may read from the world, for one node."""

    clock: Clock
    rng: Rng
    faults: Faults
    events: EventSink
    node: str = "local"
    #: How this node reaches the other nodes of its cluster (None: it runs alone).
    network: NodeNetwork | None = None
    #: Outbound HTTP (LLM and embedding APIs, MCP over HTTP); see kelpie/env/_http.py.
    http: httpx2.AsyncBaseTransport = attrs.field(factory=RealHttpTransport)

    @classmethod
    def production(
        cls, *, seed: int | None = None, node: str = "local", network: NodeNetwork | None = None
    ) -> Env:
        """The real world: the system clock, no faults, and an Rng seeded from OS entropy.

        The seed is logged at INFO so that ids drawn in production can be traced
        back; pass `seed` to fix it. A node of a cluster passes its `network`
        (a `TcpNetwork`).
        """
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "big")
        _log.info("kelpie environment for node %s seeded with %d", node, seed)
        return cls(
            clock=SystemClock(),
            rng=Rng(seed),
            faults=NoFaults(),
            events=LoggingEventSink(),
            node=node,
            network=network,
        )

    def fork(self, label: str) -> Env:
        """The same world with an independent random stream named `label`."""
        return attrs.evolve(self, rng=self.rng.fork(label))

    def emit(self, kind: str, **fields: object) -> None:
        """Reports an application event (see kelpie.env._events)."""
        self.events.emit(kind, fields)
