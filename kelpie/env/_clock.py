"""Time, as every Kelpie module must read it.

Two kinds of time, never mixed:

- Monotonic time comes from trio (`trio.current_time()`), so whatever clock the
  trio run was started with (the real one, or the simulator's virtual clock)
  also drives every `trio.sleep`, timeout and deadline. Use it for durations.
- Wall time (`wall_ns`) is the time of day on *this node*. It can be skewed,
  drift and jump (NTP steps on a real machine; injected faults in simulation),
  so it is fit for timestamps shown to people, never for judging a lease or a
  timeout. Leases use the store's clock (the storage issue).

Durations carry their unit in the name (`timeout_ms`, `lease_duration_ms`).
"""

from __future__ import annotations

import abc
import time

import trio


class Clock(abc.ABC):
    """A node's clock: monotonic time from the running trio loop, wall time of its own."""

    __slots__ = ()

    def monotonic_s(self) -> float:
        """Seconds on the running trio loop's clock (virtual in simulation)."""
        return trio.current_time()

    def monotonic_ms(self) -> int:
        """Whole milliseconds on the running trio loop's clock."""
        return int(trio.current_time() * 1000)

    @abc.abstractmethod
    def wall_ns(self) -> int:
        """Nanoseconds since the Unix epoch on this node's wall clock."""

    def wall_ms(self) -> int:
        """Milliseconds since the Unix epoch on this node's wall clock."""
        return self.wall_ns() // 1_000_000

    def wall_s(self) -> float:
        """Seconds since the Unix epoch on this node's wall clock."""
        return self.wall_ns() / 1e9


class SystemClock(Clock):
    """The machine's own wall clock. The only production reader of `time.time_ns`."""

    __slots__ = ()

    def wall_ns(self) -> int:
        return time.time_ns()

    def __repr__(self) -> str:
        return "SystemClock()"
