"""The scheduling controller: owner of every scheduling decision in a simulated run.

Whenever trio has a batch of runnable tasks, it hands the batch (sorted by spawn
order) to `SchedulingController.order_batch`, which picks the order the tasks
run in. A batch of n tasks takes n-1 choices: for each position, the index of
the next task among those still waiting, counted in spawn order. Choice 0
always means "the earliest-spawned task that is still waiting", so an all-zero
choice sequence is first-in-first-out scheduling and every non-zero choice is
one deviation from it: the measure a shrinker minimises (the simulation-power
issue).

Every choice is recorded, so a run can be replayed exactly from its recorded
choices (`ReplayChoices`) whatever produced them: a seeded stream, FIFO, or
later a shrinker or Hypothesis.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence
from typing import Protocol

import trio

from kelpie.env import Rng


class ChoiceSource(Protocol):
    """Answers scheduling choices: an index in [0, n) for n waiting tasks."""

    def choose(self, n: int) -> int:
        """The index, in spawn order, of the task to run next among `n` (n >= 2)."""
        ...


class RandomChoices:
    """Uniform choices from a seeded stream: each batch in a uniformly random order."""

    __slots__ = ("_rng",)

    def __init__(self, rng: Rng) -> None:
        self._rng = rng

    def choose(self, n: int) -> int:
        return self._rng.randrange(n)


class FifoChoices:
    """Always the earliest-spawned waiting task: no deviation from FIFO."""

    __slots__ = ()

    def choose(self, n: int) -> int:
        return 0


class ReplayChoices:
    """Replays a recorded choice sequence, then continues FIFO.

    A recorded choice that no longer fits (the run diverged from the recording)
    is clamped, and `mismatches` counts how often that happened.
    """

    __slots__ = ("_choices", "_pos", "mismatches")

    def __init__(self, choices: Sequence[int]) -> None:
        self._choices = choices
        self._pos = 0
        self.mismatches = 0

    def choose(self, n: int) -> int:
        if self._pos >= len(self._choices):
            return 0
        choice = self._choices[self._pos]
        self._pos += 1
        if not 0 <= choice < n:
            self.mismatches += 1
            return min(max(choice, 0), n - 1)
        return choice


class SchedulingController:
    """Orders each batch of runnable tasks by asking a `ChoiceSource`, and records the answers."""

    __slots__ = ("_source", "batches", "choices", "deviations")

    def __init__(self, source: ChoiceSource) -> None:
        self._source = source
        self.choices = array("I")
        self.batches = 0
        self.deviations = 0

    def order_batch(self, batch: list[trio.lowlevel.Task]) -> None:
        """Reorders `batch` (given in spawn order) in place into trio's pop order."""
        n = len(batch)
        self.batches += 1
        if n < 2:
            return
        waiting = batch[:]
        run_order = []
        for remaining in range(n, 1, -1):
            index = self._source.choose(remaining)
            assert 0 <= index < remaining, (index, remaining)
            self.choices.append(index)
            if index:
                self.deviations += 1
            run_order.append(waiting.pop(index))
        run_order.append(waiting[0])
        # trio runs a batch by popping from its end.
        run_order.reverse()
        batch[:] = run_order
