"""kelpie.env.Env and its production parts: SystemClock, NoFaults, LoggingEventSink."""

from __future__ import annotations

import logging
import time

import attrs
import pytest
import trio
import trio.testing

from kelpie.env import Env, LoggingEventSink, NoFaults, Rng, SystemClock, check_site_name


def test_production_seeds_from_entropy_and_logs_the_seed(caplog: pytest.LogCaptureFixture) -> None:
    """Env.production draws a fresh seed each time and logs it at INFO."""
    with caplog.at_level(logging.INFO, logger="kelpie.env"):
        first = Env.production()
        second = Env.production()
    assert first.rng.seed != second.rng.seed
    logged = " ".join(record.getMessage() for record in caplog.records)
    assert str(first.rng.seed) in logged and str(second.rng.seed) in logged


def test_production_accepts_a_fixed_seed() -> None:
    """A given seed is used as is, and production never injects faults."""
    env = Env.production(seed=1234, node="n7")
    assert env.rng.seed == 1234
    assert env.node == "n7"
    assert isinstance(env.clock, SystemClock)
    assert not any(env.faults.buggify("actor.commit.delay") for _ in range(1000))


def test_env_is_frozen() -> None:
    """An Env cannot be changed in place; variants are made with evolve or fork."""
    env = Env.production(seed=1)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        env.node = "other"  # type: ignore[misc]
    forked = env.fork("agents")
    assert forked.rng.seed != env.rng.seed and forked.clock is env.clock


def test_system_clock_reads_the_machine_wall_clock() -> None:
    """SystemClock's wall time is the machine's time of day."""
    before = time.time_ns()
    wall = SystemClock().wall_ns()
    after = time.time_ns()
    assert before <= wall <= after
    assert abs(SystemClock().wall_s() - time.time()) < 5


def test_clock_monotonic_time_comes_from_trio() -> None:
    """monotonic_s follows the running trio clock, so a mock clock makes it virtual."""
    clock = trio.testing.MockClock(autojump_threshold=0)

    async def main() -> tuple[float, int]:
        await trio.sleep(12.5)
        return SystemClock().monotonic_s(), SystemClock().monotonic_ms()

    seconds, millis = trio.run(main, clock=clock)
    assert seconds == pytest.approx(clock.current_time())
    assert millis == int(clock.current_time() * 1000)


def test_no_faults_never_fires() -> None:
    """NoFaults answers False for every site."""
    faults = NoFaults()
    assert not any(faults.buggify(f"x.site_{i}") for i in range(100))


@pytest.mark.parametrize("name", ["actor.commit.delay", "storage.get", "a.b_c.d9"])
def test_accepts_dotted_site_names(name: str) -> None:
    """Well-formed site names pass."""
    assert check_site_name(name) == name


@pytest.mark.parametrize("name", ["", "nodots", "Upper.case", "a..b", "a.b-c", ".a"])
def test_rejects_malformed_site_names(name: str) -> None:
    """Malformed site names raise ValueError naming the accepted shape."""
    with pytest.raises(ValueError, match="dotted lower-case"):
        check_site_name(name)


def test_emit_goes_to_the_sink(caplog: pytest.LogCaptureFixture) -> None:
    """env.emit hands the event to the sink; the logging sink writes it at DEBUG."""
    env = Env(clock=SystemClock(), rng=Rng(1), faults=NoFaults(), events=LoggingEventSink())
    with caplog.at_level(logging.DEBUG, logger="kelpie.events"):
        env.emit("storage.commit", version=12, key="a")
    assert caplog.records[-1].getMessage() == "storage.commit key='a' version=12"
