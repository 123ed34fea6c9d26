"""Simulated time: one virtual trio clock per run, and one skewable wall clock per node.

`VirtualClock` is the trio clock of a simulated run. Time stands still while
any task can run, or any wake-up (I/O readiness, `run_sync_soon`) is pending;
when the run is truly idle, the clock jumps straight to the earliest pending
deadline (never adding up concurrent sleeps). Two situations stop the jump:

- no deadline is pending and nothing can run: a deadlock, reported through
  `on_deadlock` (only while `armed`, i.e. while the workload runs);
- the earliest deadline lies beyond `limit_s`: the run's time budget is spent,
  reported through `on_limit`.

`NodeWallClock` is the wall clock a simulated node reads through `env.clock`:
`epoch + skew + elapsed * (1 + drift) + jumps`, where skew, drift and a schedule
of forward and backward jumps are drawn from the seed (ClockFaults), so clock
faults really change what code reads. Monotonic time is trio's, shared by all
nodes: only the wall clock is faulty, as on real machines where NTP steps
`CLOCK_REALTIME` and leaves `CLOCK_MONOTONIC` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from kelpie.env import Clock, Rng
from kelpie.sim._trio_hooks import idle_jump_clock

#: 2026-01-01T00:00:00Z: every simulated node's wall clock starts near here.
SIM_EPOCH_NS = 1_767_225_600 * 1_000_000_000
_UNARMED_IDLE_MAX = 100


class VirtualClock:
    """The run's trio clock: jumps to the next deadline, reports deadlocks and overruns.

    trio asks it to move only when the run is idle (see `IdleJumpClock`). While
    `armed` (the workload is running), an idle run with no pending deadline is a
    deadlock (`on_deadlock`), and one whose next deadline lies past `limit_s` has
    spent its time budget (`on_limit`); otherwise time jumps exactly to the
    deadline. `poison(exc)` makes every later read of the time raise `exc`: the
    last-resort stop for a run whose tasks ignore every other way of stopping.
    """

    def __init__(
        self,
        *,
        limit_s: float,
        on_deadlock: Callable[[], None],
        on_limit: Callable[[float], None],
        on_stuck_unarmed: Callable[[], None] = lambda: None,
    ) -> None:
        self._now = 0.0
        self._limit_s = limit_s
        self._on_deadlock = on_deadlock
        self._on_limit = on_limit
        self._on_stuck_unarmed = on_stuck_unarmed
        #: Consecutive idle moments outside the workload with nothing to wait for.
        self.unarmed_idle = 0
        self._poison: BaseException | None = None
        self.armed = False
        #: What to pass to `trio.run(clock=...)`.
        self.trio_clock = idle_jump_clock(self.current_time, self.on_idle)

    def advance_to(self, deadline: float) -> None:
        """Moves time exactly to `deadline` (never rounding through a difference)."""
        assert deadline >= self._now, (deadline, self._now)
        self._now = deadline

    def current_time(self) -> float:
        if self._poison is not None:
            raise self._poison
        return self._now

    @property
    def now_s(self) -> float:
        """The current virtual time, for the simulator's own bookkeeping (never poisoned)."""
        return self._now

    def poison(self, exc: BaseException) -> None:
        """From now on, reading the time raises `exc` (which ends the trio run)."""
        self._poison = exc

    def on_idle(self, deadline: float) -> None:
        if not self.armed:
            # trio's own start-up and tear-down: move on. Idle again and again with
            # nothing pending means something outside the workload (a system task)
            # is stuck; trio would otherwise poll forever.
            if not math.isinf(deadline):
                self.advance_to(deadline)
            else:
                self.unarmed_idle += 1
                if self.unarmed_idle > _UNARMED_IDLE_MAX:
                    self._on_stuck_unarmed()
        elif math.isinf(deadline):
            self._on_deadlock()
        elif deadline > self._limit_s:
            self._on_limit(deadline)
        else:
            self.advance_to(deadline)

    def __repr__(self) -> str:
        return f"VirtualClock(now={self._now!r})"


class NodeWallClock(Clock):
    """One simulated node's wall clock, with seeded skew, drift and jumps.

    Jumps arrive as a Poisson process of `jump_rate_per_s` per virtual second,
    each of a size drawn uniformly from [-jump_max_ms, +jump_max_ms]. They are
    drawn lazily, in time order, from the node's own random stream, so the
    schedule depends only on the seed, not on when the clock is read.
    """

    __slots__ = (
        "_drift",
        "_jump_max_ns",
        "_jump_rate_per_s",
        "_jumped_ns",
        "_next_jump_s",
        "_on_jump",
        "_rng",
        "_skew_ns",
        "_vclock",
        "name",
    )

    def __init__(
        self,
        *,
        name: str,
        vclock: VirtualClock,
        rng: Rng,
        skew_ns: int = 0,
        drift_ppm: float = 0.0,
        jump_rate_per_s: float = 0.0,
        jump_max_ms: int = 0,
        on_jump: Callable[[str, int], None] | None = None,
    ) -> None:
        self.name = name
        self._vclock = vclock
        self._rng = rng
        self._skew_ns = skew_ns
        self._drift = drift_ppm * 1e-6
        self._jump_rate_per_s = jump_rate_per_s
        self._jump_max_ns = jump_max_ms * 1_000_000
        self._jumped_ns = 0
        self._on_jump = on_jump
        self._next_jump_s = self._draw_next_jump(0.0)

    def _draw_next_jump(self, after_s: float) -> float:
        if self._jump_rate_per_s <= 0 or self._jump_max_ns <= 0:
            return math.inf
        return after_s + self._rng.expovariate(self._jump_rate_per_s)

    def _apply_due_jumps(self, now_s: float) -> None:
        while self._next_jump_s <= now_s:
            delta_ns = self._rng.randint(-self._jump_max_ns, self._jump_max_ns)
            self.jump_ns(delta_ns)
            self._next_jump_s = self._draw_next_jump(self._next_jump_s)

    def jump_ns(self, delta_ns: int) -> None:
        """Steps this node's wall clock by `delta_ns` (negative steps go back in time)."""
        self._jumped_ns += delta_ns
        if self._on_jump is not None:
            self._on_jump(self.name, delta_ns)

    def wall_ns(self) -> int:
        now_s = self._vclock.current_time()
        self._apply_due_jumps(now_s)
        elapsed_ns = round(now_s * 1e9 * (1.0 + self._drift))
        return SIM_EPOCH_NS + self._skew_ns + elapsed_ns + self._jumped_ns

    def __repr__(self) -> str:
        return (
            f"NodeWallClock({self.name}, skew_ns={self._skew_ns}, "
            f"drift_ppm={self._drift * 1e6:g}, jumped_ns={self._jumped_ns})"
        )
