"""The determinism sanitizer: stray time and entropy are virtualized, real I/O is blocked.

Each test names the exact line it expects the report to point at.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import random
import secrets
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import trio

from kelpie.env import Rng
from kelpie.sim import FailureKind, RunResult, Sanitizer, SimConfig, SimContext, Simulation

HERE = __file__


def here() -> int:
    """The line number of the caller's next line."""
    frame = inspect.currentframe()
    assert frame is not None and frame.f_back is not None
    return frame.f_back.f_lineno + 1


def run(workload: object, **config: object) -> RunResult:
    return Simulation(SimConfig(seed=3, **config)).run(workload)  # type: ignore[arg-type]


def test_time_time_is_virtual_and_reported_with_its_line() -> None:
    """time.time() inside a simulation reads the node's virtual wall clock, and is reported."""
    seen: list[float] = []
    line = 0

    async def reads_time(ctx: SimContext) -> None:
        nonlocal line
        await trio.sleep(5)
        line = here()
        seen.append(time.time())
        seen.append(ctx.env.clock.wall_s())

    result = run(reads_time)
    assert result.ok, result.failure
    assert seen[0] == seen[1]  # the same virtual wall clock env.clock gives
    [finding] = [f for f in result.findings if f.api == "time.time"]
    assert finding.action == "virtualized"
    assert finding.site == f"{HERE}:{line} in reads_time"
    assert abs(time.time() - seen[0]) > 1  # restored afterwards: real time again


def test_opening_a_socket_fails_the_run_naming_the_line() -> None:
    """socket.socket() inside a simulation raises at its call site and fails the run."""
    line = 0

    async def opens_socket(ctx: SimContext) -> None:
        nonlocal line
        line = here()
        socket.socket(socket.AF_INET, socket.SOCK_STREAM)

    result = run(opens_socket)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.SANITIZER
    assert f"{HERE}:{line} in opens_socket" in result.failure.message
    [finding] = [f for f in result.findings if f.api == "socket"]
    assert finding.action == "blocked"
    assert finding.site == f"{HERE}:{line} in opens_socket"
    assert "socket.py:" in finding.via and finding.via.endswith(" in __init__")


def test_starting_a_thread_fails_the_run_naming_the_line() -> None:
    """threading.Thread.start() inside a simulation is blocked and reported at its line."""
    line = 0

    async def starts_thread(ctx: SimContext) -> None:
        nonlocal line
        worker = threading.Thread(target=lambda: None)
        line = here()
        worker.start()

    result = run(starts_thread)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.SANITIZER
    [finding] = [f for f in result.findings if f.api == "thread"]
    assert finding.site == f"{HERE}:{line} in starts_thread"


def test_trio_to_thread_is_blocked() -> None:
    """trio.to_thread reuses cached threads, and is blocked all the same."""

    async def to_thread(ctx: SimContext) -> None:
        await trio.to_thread.run_sync(lambda: None)

    # Warm trio's thread cache outside any simulation first.
    trio.run(trio.to_thread.run_sync, lambda: None)
    result = run(to_thread)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.SANITIZER
    assert any(f.api == "thread" for f in result.findings)


def test_a_caught_violation_still_fails_the_run() -> None:
    """Catching the sanitizer's exception does not hide the violation."""

    async def hides_it(ctx: SimContext) -> None:
        with contextlib.suppress(BaseException):
            subprocess.run(["true"], check=False)

    result = run(hides_it)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.SANITIZER
    assert any(f.api == "subprocess" for f in result.findings)


def test_blocking_sleep_is_blocked() -> None:
    """time.sleep would stall real time; inside a simulation it is refused."""

    async def sleeps(ctx: SimContext) -> None:
        time.sleep(0.01)

    result = run(sleeps)
    assert result.failure is not None and result.failure.kind is FailureKind.SANITIZER
    assert any(f.api == "time.sleep" for f in result.findings)


def test_file_opens_outside_allowed_paths_are_blocked(tmp_path: Path) -> None:
    """Reading or writing outside the allowed paths fails; inside them it works."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret")

    async def reads_secret(ctx: SimContext) -> None:
        secret.read_text()

    async def writes_allowed(ctx: SimContext) -> None:
        (allowed / "out.txt").write_text("ok")
        assert (allowed / "out.txt").read_text() == "ok"

    blocked = run(reads_secret, allowed_paths=(str(allowed),))
    assert blocked.failure is not None and blocked.failure.kind is FailureKind.SANITIZER
    [finding] = [f for f in blocked.findings if f.api == "open"]
    assert finding.detail == f"read {secret.resolve()}"
    ok = run(writes_allowed, allowed_paths=(str(allowed),))
    assert ok.ok, ok.failure


def test_entropy_is_seeded_inside_a_simulation() -> None:
    """uuid4, os.urandom, secrets and the global random repeat exactly for the same seed."""

    async def draws(ctx: SimContext) -> None:
        ctx.emit(
            "entropy",
            uuid=str(uuid.uuid4()),
            urandom=os.urandom(4).hex(),
            token=secrets.token_hex(4),
            below=secrets.randbelow(1000),
            rand=random.random(),
            system=random.SystemRandom().random(),
        )

    first, second = run(draws), run(draws)
    assert first.ok, first.failure
    [a] = [r.detail for r in first.trace_tail if r.kind == "entropy"]
    [b] = [r.detail for r in second.trace_tail if r.kind == "entropy"]
    assert a == b
    apis = {f.api for f in first.findings}
    assert {"uuid.uuid4", "os.urandom", "secrets", "random", "random.SystemRandom"} <= apis
    assert all(f.action == "virtualized" for f in first.findings)
    assert uuid.uuid4() != uuid.uuid4()  # real entropy again outside


def test_only_one_sanitizer_at_a_time() -> None:
    """A second sanitizer in the same process is refused rather than half-patched."""

    def make() -> Sanitizer:
        return Sanitizer(rng=Rng(1), wall_ns=lambda: 0, monotonic_s=lambda: 0.0)

    real_time = time.time
    with make():
        with pytest.raises(RuntimeError, match="already active"):
            make().__enter__()
        assert time.time() == 0.0
    assert time.time is real_time


@pytest.mark.parametrize("api", ["monotonic", "perf_counter"])
def test_monotonic_reads_are_virtual(api: str) -> None:
    """time.monotonic and time.perf_counter read virtual time inside a simulation."""
    seen: list[float] = []

    async def reads(ctx: SimContext) -> None:
        await trio.sleep(42)
        seen.append(getattr(time, api)())

    result = run(reads)
    assert result.ok, result.failure
    assert seen == [42.0]
