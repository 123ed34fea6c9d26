"""Simulated node pauses: a process that stops for a while (a GC pause, SIGSTOP, a VM stall).

Fault model (what `NodePauses` injects, and what it never does):

- Random pauses: each node's pauses start as a Poisson process of
  `rate_per_s` per virtual second and last a time drawn uniformly from
  [0, max_ms]; the next pause of a node starts after the current one ends
  (a process is paused or it is not). The schedule is drawn lazily, in time
  order, from the node's own stream (`rng.fork(node)`), starting at the node's
  first gate: adding a node, or more I/O on one node, does not move another
  node's pauses.
- Explicit pauses: `pause(node, duration_s)` pauses a node from now on, for
  scenarios that want a long, deterministic stall.
- What a pause does: a paused process does no I/O. The simulated components
  call `gate(node)` at their I/O points (the store before each read and before
  and after the commit point; the network before a node sends a request, before
  it runs a handler and before it sends the reply), and `gate` sleeps until the
  pause ends. Time does not stop for anyone else: other nodes run on, leases
  held by the paused node lapse, its peers' timeouts expire.
- Never injected: a pause of the simulator's own task (node `-`), or of code
  between I/O points (trio tasks only switch at checkpoints anyway). A pause
  ends on its own: `quiesce()` stops new random pauses (a liveness phase) but
  lets one already under way finish.

Every pause that starts is reported through `on_fault("pause", ...)` (a
`node.pause` trace row in a simulation) and counted in `NodePauses.injected`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import attrs
import trio

from kelpie.env import Rng
from kelpie.sim._nodes import OUTSIDE_NODES


@attrs.frozen
class PauseFaults:
    """The node pauses a run injects (see kelpie/sim/_pauses.py). All zero: none."""

    rate_per_s: float = 0.0
    max_ms: float = 0.0

    @classmethod
    def every(cls) -> PauseFaults:
        """Short, occasional pauses: a node stalls for up to 300 ms about every 5 s."""
        return cls(rate_per_s=0.2, max_ms=300.0)

    def describe(self) -> str:
        if self == PauseFaults():
            return "off"
        fields = attrs.asdict(self)
        return " ".join(f"{name}={value:g}" for name, value in fields.items() if value)


@attrs.define
class _NodeState:
    rng: Rng
    next_start: float  # the next random pause's start (math.inf: none)
    until: float = -math.inf  # the end of the pause under way (or the last one)


class NodePauses:
    """The pause schedule of every node of a run (see the module docstring)."""

    def __init__(
        self,
        rng: Rng,
        faults: PauseFaults = PauseFaults(),
        on_fault: Callable[[str, dict[str, object]], None] | None = None,
    ) -> None:
        self.faults = faults
        self.injected: dict[str, int] = {}
        self._rng = rng
        self._on_fault = on_fault
        self._nodes: dict[str, _NodeState] = {}
        self._quiet_at = math.inf

    def _inject(self, kind: str, **fields: object) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if self._on_fault is not None:
            self._on_fault(kind, fields)

    def _random(self) -> bool:
        return self.faults.rate_per_s > 0 and self.faults.max_ms > 0

    def _state(self, node: str, now: float) -> _NodeState:
        state = self._nodes.get(node)
        if state is None:
            rng = self._rng.fork(node)
            start = now + rng.expovariate(self.faults.rate_per_s) if self._random() else math.inf
            state = self._nodes[node] = _NodeState(rng, start)
        return state

    def _advance(self, node: str, now: float) -> _NodeState:
        """Draws `node`'s random pauses that started by `now` (and before any quiesce)."""
        state = self._state(node, now)
        while state.next_start <= now and state.next_start < self._quiet_at:
            start = state.next_start
            seconds = state.rng.uniform(0, self.faults.max_ms) / 1000
            state.until = max(state.until, start + seconds)
            self._inject("pause", node=node, at=round(start, 6), seconds=round(seconds, 6))
            state.next_start = state.until + state.rng.expovariate(self.faults.rate_per_s)
        return state

    def paused_until(self, node: str) -> float | None:
        """When `node`'s current pause ends, or None if it is not paused now."""
        if node == OUTSIDE_NODES:
            return None
        now = trio.current_time()
        until = self._advance(node, now).until
        return until if until > now else None

    async def gate(self, node: str) -> None:
        """Returns at once if `node` is running; sleeps until its pause ends if it is paused.

        Never checkpoints when the node is not paused, so a run without pauses
        schedules exactly as it would without the gate.
        """
        while (until := self.paused_until(node)) is not None:
            await trio.sleep_until(until)

    def pause(self, node: str, duration_s: float) -> None:
        """Pauses `node` from now for `duration_s` (extending a pause under way)."""
        if not duration_s >= 0:
            raise ValueError(f"a pause lasts a non-negative time, got {duration_s!r}")
        if node == OUTSIDE_NODES:
            raise ValueError("the simulator's own task (node '-') cannot be paused")
        now = trio.current_time()
        state = self._advance(node, now)
        state.until = max(state.until, now + duration_s)
        self._inject("pause", node=node, at=round(now, 6), seconds=duration_s, explicit=True)

    def quiesce(self) -> None:
        """No random pause starts from now on (pauses under way, and explicit ones, still run)."""
        now = trio.current_time()
        for node in list(self._nodes):
            self._advance(node, now)
        self._quiet_at = min(self._quiet_at, now)

    def __repr__(self) -> str:
        return f"NodePauses({self.faults.describe()})"
