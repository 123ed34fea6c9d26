"""Simulated faults: seeded BUGGIFY and per-node wall-clock skew, drift and jumps."""

from __future__ import annotations

import itertools

import trio

from kelpie.env import Rng
from kelpie.sim import (
    ClockFaults,
    FaultConfig,
    NodeWallClock,
    SimConfig,
    SimContext,
    SimFaults,
    Simulation,
    VirtualClock,
)
from kelpie.sim._clock import SIM_EPOCH_NS


def sites_fired(seed: int) -> list[tuple[str, bool, int]]:
    faults = SimFaults(Rng(seed), FaultConfig())
    for _ in range(200):
        for site in ("a.one", "b.two", "c.three", "d.four"):
            faults.buggify(site)
    return [(s.site, s.enabled, s.fired) for s in faults.report()]


def test_buggify_is_a_function_of_seed_and_site() -> None:
    """The same seed enables and fires the same sites, whatever else is evaluated first."""
    assert sites_fired(3) == sites_fired(3)
    reordered = SimFaults(Rng(3), FaultConfig())
    for _ in range(200):
        for site in ("d.four", "c.three", "b.two", "a.one", "e.extra"):
            reordered.buggify(site)
    by_site = {s.site: (s.enabled, s.fired) for s in reordered.report()}
    for site, enabled, fired in sites_fired(3):
        assert by_site[site] == (enabled, fired)


def test_buggify_enables_a_quarter_of_sites_and_fires_a_quarter_of_calls() -> None:
    """About 25% of sites are enabled per run; an enabled site fires about 25% of the time."""
    faults = SimFaults(Rng(11), FaultConfig())
    for index in range(2000):
        faults.buggify(f"site.s{index}")
    enabled = [s for s in faults.report() if s.enabled]
    assert 400 <= len(enabled) <= 600
    hot = SimFaults(Rng(12), FaultConfig(buggify_enable_p=1.0))
    fired = sum(hot.buggify("one.site") for _ in range(4000))
    assert 800 <= fired <= 1200


def test_buggify_off_never_fires_but_still_counts_reaches() -> None:
    """With buggify off no site fires, and the report still lists every site reached."""
    faults = SimFaults(Rng(1), FaultConfig(buggify=False))
    assert not any(faults.buggify("x.y") for _ in range(100))
    [record] = faults.report()
    assert (record.site, record.enabled, record.reached, record.fired) == ("x.y", False, 100, 0)


def test_buggify_firings_enter_the_trace() -> None:
    """Each firing is a trace row naming its site, and the result lists every site reached."""

    async def workload(ctx: SimContext) -> None:
        for _ in range(50):
            if ctx.env.faults.buggify("test.always"):
                await trio.sleep(1)

    config = FaultConfig(buggify_enable_p=1.0, buggify_fire_p=0.5)
    result = Simulation(SimConfig(seed=2, faults=config)).run(workload)
    [site] = result.buggify
    assert site.reached == 50 and 10 < site.fired < 40
    assert result.sim_time_s == site.fired
    assert any(r.kind == "buggify" and r.detail == "site='test.always'" for r in result.trace_tail)


def make_clock(**faults: int | float) -> tuple[VirtualClock, NodeWallClock, list[int]]:
    vclock = VirtualClock(limit_s=1e9, on_deadlock=lambda: None, on_limit=lambda d: None)
    jumps: list[int] = []
    clock = NodeWallClock(
        name="n1", vclock=vclock, rng=Rng(4), on_jump=lambda n, d: jumps.append(d), **faults
    )  # type: ignore[arg-type]
    return vclock, clock, jumps


def advance(vclock: VirtualClock, seconds: float) -> None:
    vclock.advance_to(vclock.current_time() + seconds)


def test_wall_clock_skew_and_drift_change_what_code_reads() -> None:
    """A skewed, drifting node clock reads epoch + skew + elapsed * (1 + drift)."""
    vclock, clock, _ = make_clock(skew_ns=250_000_000, drift_ppm=1000)
    vclock.armed = True
    assert clock.wall_ns() == SIM_EPOCH_NS + 250_000_000
    advance(vclock, 100)
    assert clock.wall_ns() == SIM_EPOCH_NS + 250_000_000 + 100_100_000_000


def test_wall_clock_jumps_back_and_forth_on_a_seeded_schedule() -> None:
    """With jumps on, the wall clock steps by seeded amounts, sometimes backwards."""
    vclock, clock, jumps = make_clock(jump_rate_per_s=1.0, jump_max_ms=500)
    vclock.armed = True
    readings = []
    for _ in range(200):
        advance(vclock, 0.25)
        readings.append(clock.wall_ns())
    assert len(jumps) > 20
    assert any(d < 0 for d in jumps) and any(d > 0 for d in jumps)
    assert any(b < a for a, b in itertools.pairwise(readings))
    assert all(abs(d) <= 500_000_000 for d in jumps)
    # The schedule depends on the seed only, not on how often the clock was read.
    vclock2, clock2, jumps2 = make_clock(jump_rate_per_s=1.0, jump_max_ms=500)
    vclock2.armed = True
    advance(vclock2, 50)
    assert clock2.wall_ns() == readings[-1]
    assert jumps2 == jumps


def test_nodes_disagree_on_wall_time_under_clock_faults() -> None:
    """In a simulation with clock faults, nodes read different wall times at one instant."""
    seen: dict[str, int] = {}

    async def workload(ctx: SimContext) -> None:
        await trio.sleep(30)
        for node in ctx.nodes:
            seen[node.name] = node.env.clock.wall_ns()

    faults = FaultConfig(clock=ClockFaults(skew_max_ms=1000, drift_max_ppm=200))
    result = Simulation(SimConfig(seed=8, nodes=3, faults=faults)).run(workload)
    assert result.ok, result.failure
    assert len(set(seen.values())) == 3
    assert all(abs(v - (SIM_EPOCH_NS + 30 * 10**9)) < 2 * 10**9 for v in seen.values())


def test_clock_jumps_enter_the_trace() -> None:
    """Each jump of a node's wall clock is a trace row with its size."""

    async def workload(ctx: SimContext) -> None:
        for _ in range(20):
            await trio.sleep(1)
            ctx.env.clock.wall_ns()

    faults = FaultConfig(clock=ClockFaults(jump_rate_per_s=0.5, jump_max_ms=100))
    result = Simulation(SimConfig(seed=8, faults=faults)).run(workload)
    rows = [r for r in result.trace_tail if r.kind == "clock.jump"]
    assert rows and all(r.node == "n1" and r.detail.startswith("delta_ms=") for r in rows)
    assert "clock(skew<=0ms drift<=0ppm jumps=0.5/s of <=100ms)" in result.faults
