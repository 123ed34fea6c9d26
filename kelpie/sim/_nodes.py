"""Simulated nodes: each with its own Env, wall clock and random stream.

A node is where a task "runs" in a simulated cluster. Tasks started with
`SimNode.start_soon` (or `SimContext.spawn`) carry their node in a context
variable, inherited by every task they start, so the trace can name the node of
each step and the sanitizer can answer `time.time()` with that node's clock.
"""

from __future__ import annotations

import contextvars
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from kelpie.env import Env
from kelpie.sim._clock import NodeWallClock

#: The node name of tasks outside every simulated node (the simulator's own task).
OUTSIDE_NODES = "-"

CURRENT_NODE: contextvars.ContextVar[str] = contextvars.ContextVar(
    "kelpie_sim_node", default=OUTSIDE_NODES
)


@attrs.frozen
class SimNode:
    """One simulated machine: its name, its Env and its (faulty) wall clock."""

    name: str
    env: Env
    clock: NodeWallClock

    def start_soon(
        self,
        nursery: trio.Nursery,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        name: str | None = None,
    ) -> None:
        """Starts `fn(*args)` in `nursery` as a task of this node."""
        token = CURRENT_NODE.set(self.name)
        try:
            nursery.start_soon(fn, *args, name=name)
        finally:
            CURRENT_NODE.reset(token)
