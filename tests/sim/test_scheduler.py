"""The scheduling controller: every choice recorded, replayable, and open to Hypothesis.

The last test is the point of the design: because every scheduling decision is
a recorded integer choice, Hypothesis can search and shrink schedules of real
trio code, finding the planted race with a minimal number of deviations from
first-in-first-out.
"""

from __future__ import annotations

from typing import Any

from hypothesis import find, given, settings
from hypothesis import strategies as st

import scenarios
from kelpie.env import Rng
from kelpie.sim import (
    FifoChoices,
    RandomChoices,
    ReplayChoices,
    SchedulingController,
    run_scenario,
)


def order(controller: SchedulingController, batch: list[Any]) -> list[Any]:
    """The run order the controller picks for `batch` (trio pops from the end)."""
    working = list(batch)
    controller.order_batch(working)
    return list(reversed(working))


@given(st.integers(1, 12), st.lists(st.integers(0, 20), max_size=40))
def test_any_choices_give_a_permutation(size: int, choices: list[int]) -> None:
    """Whatever the choices, each batch runs every task exactly once."""
    batch = list(range(size))
    ran = order(SchedulingController(ReplayChoices(choices)), batch)
    assert sorted(ran) == batch


@given(st.lists(st.integers(1, 9), min_size=1, max_size=20), st.integers(0, 2**32))
def test_recorded_choices_replay_every_batch(sizes: list[int], seed: int) -> None:
    """Replaying the recorded choices reproduces the run order of every batch."""
    recorder = SchedulingController(RandomChoices(Rng(seed)))
    orders = [order(recorder, list(range(n))) for n in sizes]
    replayer = SchedulingController(ReplayChoices(list(recorder.choices)))
    assert [order(replayer, list(range(n))) for n in sizes] == orders
    assert replayer.deviations == recorder.deviations


def test_fifo_runs_in_spawn_order_and_counts_no_deviation() -> None:
    """FIFO runs each batch in spawn order; only batches of two or more take choices."""
    controller = SchedulingController(FifoChoices())
    assert order(controller, ["a", "b", "c"]) == ["a", "b", "c"]
    assert order(controller, ["x"]) == ["x"]
    assert list(controller.choices) == [0, 0]
    assert (controller.batches, controller.deviations) == (2, 0)


def test_replay_clamps_choices_that_no_longer_fit() -> None:
    """A recorded choice out of range (a diverged replay) is clamped and counted."""
    source = ReplayChoices([5, 0])
    assert source.choose(2) == 1
    assert source.choose(3) == 0
    assert source.choose(3) == 0  # exhausted: FIFO from here on
    assert source.mismatches == 1


def test_hypothesis_finds_and_shrinks_the_planted_race() -> None:
    """Searching schedules as choice sequences finds the race, then shrinks its schedule."""
    race = scenarios.get("race")
    seed = next(s for s in range(200) if not run_scenario(race, s).ok)
    assert run_scenario(race, seed, schedule="fifo").ok  # the timing alone is not enough

    def fails(choices: list[int]) -> bool:
        return not run_scenario(race, seed, schedule=tuple(choices)).ok

    minimal = find(
        st.lists(st.integers(0, 7), max_size=60),
        fails,
        settings=settings(max_examples=3000, database=None, deadline=None),
    )
    assert fails(minimal)
    deviations = sum(1 for choice in minimal if choice)
    assert 1 <= deviations <= 3, minimal
