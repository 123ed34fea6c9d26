"""The toy scenarios exercise the simulator itself: each passes, fails or deadlocks as designed."""

from __future__ import annotations

import pytest

import scenarios
from kelpie.sim import FailureKind, Scenario, run_scenario
from scenarios.cycle import CycleWorkload


def test_registry_lists_every_scenario() -> None:
    """The registry finds every module's scenarios; sweeps skip the planted ones."""
    assert set(scenarios.all_scenarios()) == {
        "actors",
        "bank",
        "cluster",
        "cluster_unfenced",
        "conversations",
        "conversations_unresumed",
        "cycle",
        "deadlock",
        "hang",
        "leak",
        "race",
        "race_fixed",
        "ring",
    }
    assert scenarios.default_names() == [
        "actors",
        "bank",
        "cluster",
        "conversations",
        "cycle",
        "race_fixed",
        "ring",
    ]
    with pytest.raises(KeyError, match="known: actors, bank, cluster"):
        scenarios.get("nope")


@pytest.mark.parametrize("name", ["actors", "bank", "cycle", "race_fixed", "ring"])
def test_default_scenarios_pass(name: str) -> None:
    """Each scenario without a planted bug passes 40 seeds in-process."""
    scenario = scenarios.get(name)
    failures = [r for r in (run_scenario(scenario, s) for s in range(40)) if not r.ok]
    assert not failures, failures[0].failure


@pytest.mark.parametrize("name", ["actors", "bank", "cycle", "race_fixed", "ring", "race"])
def test_seeds_give_distinct_interleavings(name: str) -> None:
    """Over 50 seeds, each scenario produces (almost) 50 distinct traces."""
    scenario = scenarios.get(name)
    hashes = {run_scenario(scenario, seed).trace_hash for seed in range(50)}
    assert len(hashes) >= 45


def test_cluster_passes_and_its_runs_differ() -> None:
    """The cluster scenario (its 1,000-seed sweep is in the slow tier) passes 12 seeds in-process,
    each with its own interleaving."""
    cluster = scenarios.get("cluster")
    results = [run_scenario(cluster, seed) for seed in range(12)]
    failures = [r for r in results if not r.ok]
    assert not failures, failures[0].failure
    assert len({r.trace_hash for r in results}) == 12


def test_conversations_pass_and_their_runs_differ() -> None:
    """Agents under LLM, storage and crash faults (1,000 seeds in the slow tier): 6 seeds pass
    in-process, each with its own interleaving."""
    conversations = scenarios.get("conversations")
    results = [run_scenario(conversations, seed) for seed in range(6)]
    failures = [r for r in results if not r.ok]
    assert not failures, failures[0].failure
    assert len({r.trace_hash for r in results}) == 6


def test_conversations_catch_an_agent_that_restarts_interrupted_turns() -> None:
    """With resumption off, some seed below 10 stores an acknowledged message twice, and
    rerunning that seed repeats it exactly."""
    planted = scenarios.get("conversations_unresumed")
    for seed in range(10):
        result = run_scenario(planted, seed)
        if not result.ok:
            break
    else:
        raise AssertionError("no seed below 10 caught the planted bug")
    assert result.failure is not None and "in recall" in result.failure.message
    again = run_scenario(planted, seed)
    assert again.trace_hash == result.trace_hash


def test_unfenced_cluster_is_caught_and_reproduces() -> None:
    """With the commit fence off, some seed below 30 shows a stale activation committing (or
    its consequence, a lost increment), and rerunning that seed repeats it exactly."""
    unfenced = scenarios.get("cluster_unfenced")
    found = next(r for r in (run_scenario(unfenced, s) for s in range(30)) if not r.ok)
    assert found.failure is not None and found.failure.kind is FailureKind.CHECK
    assert "single activation violated" in found.failure.message or (
        "increments were acknowledged" in found.failure.message
    )
    again = run_scenario(unfenced, found.seed)
    assert (again.trace_hash, again.failure) == (found.trace_hash, found.failure)


def test_planted_race_is_found_within_200_seeds_and_reproduces() -> None:
    """Some seed below 200 exposes the race, and rerunning that seed repeats it exactly."""
    race = scenarios.get("race")
    found = next(r for r in (run_scenario(race, s) for s in range(200)) if not r.ok)
    assert found.failure is not None and found.failure.kind is FailureKind.CHECK
    assert "acknowledged appends missing" in found.failure.message
    again = run_scenario(race, found.seed)
    assert (again.trace_hash, again.failure) == (found.trace_hash, found.failure)


def test_race_needs_a_particular_interleaving() -> None:
    """The race is exposed by only some seeds, and never under FIFO scheduling of them."""
    race = scenarios.get("race")
    results = [run_scenario(race, s) for s in range(200)]
    failing = [r.seed for r in results if not r.ok]
    assert 0 < len(failing) < 100
    assert all(run_scenario(race, s, schedule="fifo").ok for s in failing[:10])


def test_fixed_race_passes_1000_seeds() -> None:
    """The corrected journal keeps every acknowledged append, on 1,000 seeds."""
    fixed = scenarios.get("race_fixed")
    failing = [s for s in range(1000) if not run_scenario(fixed, s).ok]
    assert failing == []


def test_deadlock_scenario_is_reported_as_a_deadlock() -> None:
    """The lock-order inversion is reported as a deadlock at t=1 s, naming both tasks."""
    result = run_scenario(scenarios.get("deadlock"), 0)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.DEADLOCK
    assert result.sim_time_s == 1.0
    details = "\n".join(result.failure.details)
    for task in ("left-then-right", "right-then-left"):
        assert f"{task} (node n1) waits in trio _LockImpl.acquire" in details
    assert "scenarios/deadlock.py" in details


def test_cycle_catches_a_store_without_conflict_detection() -> None:
    """The cycle check fails on most seeds when the map skips read validation."""
    broken = Scenario(
        name="cycle_broken", summary="", workload=lambda: CycleWorkload(check_conflicts=False)
    )
    results = [run_scenario(broken, s) for s in range(20)]
    failed = [r for r in results if not r.ok]
    assert len(failed) >= 10
    assert all(r.failure is not None and r.failure.kind is FailureKind.CHECK for r in failed)
    assert any("cycle" in r.failure.message for r in failed if r.failure is not None)


def test_ring_reaches_its_fault_sites() -> None:
    """Across seeds, the ring's BUGGIFY sites are reached, enabled and fired."""
    ring = scenarios.get("ring")
    fired: set[str] = set()
    for seed in range(20):
        fired |= {s.site for s in run_scenario(ring, seed).buggify if s.fired}
    assert fired == {"ring.consumer.slow", "ring.producer.stall"}


def test_actors_catches_a_runtime_that_keeps_failed_increments() -> None:
    """An actor that ignores the runtime's rollbacks fails the actors check on some seeds."""
    from scenarios.actors import ActorsWorkload, ForgetfulCounter

    broken = Scenario(
        name="actors_forgetful",
        summary="",
        faults=scenarios.get("actors").faults,
        workload=lambda: ActorsWorkload(actor=ForgetfulCounter),
    )
    failures = [r.failure for r in (run_scenario(broken, s) for s in range(40)) if not r.ok]
    assert len(failures) >= 2
    assert all(f is not None and "failed outright" in f.message for f in failures)
