"""Many simulated runs, one fresh process per seed, in parallel: sweeps and the determinism check.

This is harness code: it runs under the real clock, outside any simulation, and
starts `python -m kelpie.sim.worker` processes with `PYTHONHASHSEED=0`: sweeps
feed fork servers (one forked process per seed, without paying for a new
interpreter and its imports each time); the determinism check starts a brand-new
interpreter for each of its two runs. A run that does not finish within its
timeout is killed and reported as a hang (a task that never reaches a checkpoint
cannot be stopped from inside); one that dies without a result is reported as a
broken worker. Both still come with their reproduce command.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import BinaryIO

import attrs
import trio

from kelpie.sim._result import Failure, FailureKind, RunResult
from kelpie.sim._trace import TraceRow, first_divergence

_STDERR_TAIL_LINES = 20
_STDERR_TAIL_BYTES = 64 * 1024
#: Real seconds past a run's own watchdog before the harness kills its process.
_BACKSTOP_S = 10.0


@attrs.frozen
class Job:
    """One run to make: a scenario and a seed."""

    scenario: str
    seed: int


@attrs.frozen
class Outcome:
    """A job's result and how long its process took."""

    job: Job
    result: RunResult
    wall_s: float


def worker_env() -> dict[str, str]:
    """The environment of a worker process: ours, with PYTHONHASHSEED=0 and no DST_SEED."""
    env = dict(os.environ)
    env["PYTHONHASHSEED"] = "0"
    env.pop("DST_SEED", None)
    return env


def _broken(job: Job, kind: FailureKind, message: str, details: Sequence[str]) -> RunResult:
    return RunResult(
        scenario=job.scenario,
        seed=job.seed,
        failure=Failure(kind, message, tuple(details)),
        trace_hash="",
        trace_rows=0,
        steps=0,
        sim_time_s=0.0,
        schedule_batches=0,
        schedule_choices=0,
        schedule_deviations=0,
        faults="unknown",
    )


def _kelpie_command() -> list[str]:
    """How users start `kelpie`: the console script beside this interpreter, if installed."""
    script = Path(sys.executable).with_name("kelpie")
    return [str(script)] if script.exists() else [sys.executable, "-m", "kelpie.cli"]


async def run_worker(
    job: Job, *, timeout_s: float, trace_out: Path | None = None, as_user: bool = False
) -> Outcome:
    """Runs one job in a new interpreter: the worker, or (`as_user`) the `kelpie sim` command.

    `as_user` takes the very path of a printed reproduce command (console
    script, its sys.path and imports), with `--json` for a machine-readable result.
    """
    if as_user:
        command = [*_kelpie_command(), "sim", "--json"]
    else:
        command = [sys.executable, "-P", "-m", "kelpie.sim.worker"]
    command += ["--scenario", job.scenario, "--seed", str(job.seed), "--timeout", str(timeout_s)]
    if trace_out is not None:
        command += ["--trace-out", str(trace_out)]
    started = trio.current_time()
    with trio.move_on_after(timeout_s + _BACKSTOP_S) as scope:
        proc = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, env=worker_env()
        )
    wall_s = trio.current_time() - started
    if scope.cancelled_caught:
        return Outcome(job, _broken(job, FailureKind.HANG, _hang_message(timeout_s), ()), wall_s)
    stdout = proc.stdout.decode("utf-8", "replace").strip()
    if proc.returncode != 0 or not stdout:
        stderr = proc.stderr.decode("utf-8", "replace").rstrip().splitlines()
        return Outcome(
            job,
            _broken(
                job,
                FailureKind.WORKER,
                f"the worker process exited with status {proc.returncode}",
                stderr[-_STDERR_TAIL_LINES:],
            ),
            wall_s,
        )
    return Outcome(job, RunResult.from_json(stdout.splitlines()[-1]), wall_s)


class _ForkServer:
    """One `python -m kelpie.sim.worker --serve` process, fed one job at a time.

    It runs in its own session, so that a hung run is stopped by killing the
    whole process group (the zygote and its forked child); the next job then
    starts a new zygote.
    """

    def __init__(self, stderr: BinaryIO) -> None:
        self._proc: trio.Process | None = None
        self._buffer = b""
        self._stderr = stderr
        self._stderr_start = 0

    async def _start(self) -> trio.Process:
        self._buffer = b""
        return await trio.lowlevel.open_process(
            # -P: the working directory stays off sys.path, as for the `kelpie` command.
            [sys.executable, "-P", "-m", "kelpie.sim.worker", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=worker_env(),
            start_new_session=True,
        )

    async def _readline(self, proc: trio.Process) -> bytes | None:
        assert proc.stdout is not None
        while b"\n" not in self._buffer:
            chunk = await proc.stdout.receive_some(1 << 16)
            if not chunk:
                return None
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stderr_tail(self) -> list[str]:
        """The end of what was written to stderr since the current job started."""
        size = os.fstat(self._stderr.fileno()).st_size
        self._stderr.seek(max(self._stderr_start, size - _STDERR_TAIL_BYTES))
        lines = self._stderr.read().decode("utf-8", "replace").rstrip().splitlines()
        return lines[-_STDERR_TAIL_LINES:]

    async def stop(self, *, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        elif proc.stdin is not None:
            await proc.stdin.aclose()
        await proc.wait()
        if proc.stdout is not None:
            await proc.stdout.aclose()

    async def run(
        self, job: Job, *, timeout_s: float, tail: int = 40, trace_out: Path | None = None
    ) -> RunResult:
        if self._proc is None:
            self._proc = await self._start()
        proc = self._proc
        assert proc.stdin is not None
        # Writers share an O_APPEND description, so emptying the file between jobs is safe.
        self._stderr.truncate(0)
        self._stderr_start = 0
        request = {
            "scenario": job.scenario,
            "seed": job.seed,
            "tail": tail,
            "timeout_s": timeout_s,
            "trace_out": None if trace_out is None else str(trace_out),
        }
        await proc.stdin.send_all(json.dumps(request).encode("utf-8") + b"\n")
        # The child's own watchdog reports a hang with its traceback; this is the backstop.
        with trio.move_on_after(timeout_s + _BACKSTOP_S) as scope:
            line = await self._readline(proc)
        if scope.cancelled_caught:
            await self.stop(kill=True)
            return _broken(job, FailureKind.HANG, _hang_message(timeout_s), ())
        if line is None:
            await self.stop(kill=True)
            return _broken(
                job, FailureKind.WORKER, "the fork server exited unexpectedly", self._stderr_tail()
            )
        reply = json.loads(line)
        if reply["result"] is not None and reply["status"] == 0:
            return RunResult.from_json(reply["result"])
        details = (reply["error"] or "").rstrip().splitlines() or self._stderr_tail()
        return _broken(
            job,
            FailureKind.WORKER,
            f"the worker process failed (wait status {reply['status']})",
            details[-_STDERR_TAIL_LINES:],
        )


def _hang_message(timeout_s: float) -> str:
    return (
        f"the worker did not answer within {timeout_s + _BACKSTOP_S:g}s of real time and "
        "was killed; its own watchdog never fired (a task blocking in native code?)"
    )


async def run_jobs(
    jobs: Sequence[Job],
    *,
    parallel: int,
    timeout_s: float,
    budget_s: float | None = None,
    on_outcome: Callable[[Outcome], None] = lambda outcome: None,
) -> list[Outcome]:
    """Runs `jobs` on `parallel` fork servers; stops starting new ones after the budget.

    Each run is a fresh forked process (see kelpie/sim/worker.py). Outcomes come
    back in job order; jobs never started (budget spent) are left out.
    """
    results: dict[int, Outcome] = {}
    started = trio.current_time()
    send, receive = trio.open_memory_channel[tuple[int, Job]](len(jobs))
    for item in enumerate(jobs):
        send.send_nowait(item)
    send.close()

    async def serve(receive: trio.MemoryReceiveChannel[tuple[int, Job]]) -> None:
        with tempfile.TemporaryFile(mode="a+b") as stderr:
            await serve_with(receive, _ForkServer(stderr))

    async def serve_with(
        receive: trio.MemoryReceiveChannel[tuple[int, Job]], server: _ForkServer
    ) -> None:
        try:
            async for index, job in receive:
                # The budget stops new runs, but never before the first one.
                spent = budget_s is not None and trio.current_time() - started > budget_s
                if spent and results:
                    continue
                job_started = trio.current_time()
                result = await server.run(job, timeout_s=timeout_s)
                outcome = Outcome(job, result, trio.current_time() - job_started)
                results[index] = outcome
                on_outcome(outcome)
        finally:
            with trio.CancelScope(shield=True):
                await server.stop(kill=True)

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(serve, receive.clone())
    return [results[i] for i in sorted(results)]


@attrs.frozen
class DeterminismReport:
    """Two fresh-process runs of one job, and where their traces first differ (if they do)."""

    job: Job
    first: RunResult
    second: RunResult
    divergence: int | None = None
    rows_first: tuple[TraceRow, ...] = ()
    rows_second: tuple[TraceRow, ...] = ()

    @property
    def ok(self) -> bool:
        return (
            self.first.trace_hash == self.second.trace_hash
            and self.first.trace_hash != ""
            and self.divergence is None
        )


_CONTEXT_ROWS = 3


def _rows_around(lines: list[str], index: int) -> tuple[TraceRow, ...]:
    window = lines[max(0, index - _CONTEXT_ROWS) : index + 1]
    return tuple(TraceRow.from_line(line) for line in window)


async def check_determinism(
    job: Job, *, timeout_s: float, server: _ForkServer | None = None
) -> DeterminismReport:
    """Runs `job` twice in fresh processes and compares the traces row by row.

    The first run is forked from a fork server, as in a sweep; the second goes
    through a new `kelpie sim` process, as a printed reproduce command does. So
    the check also catches any difference between the path that finds a failure
    and the path that reproduces it (sys.path, imports, module state).
    """
    with tempfile.TemporaryDirectory(prefix="kelpie-det-") as tmp:
        paths = (Path(tmp) / "first.trace", Path(tmp) / "second.trace")
        async with _fork_server(server) as forks:
            first = await forks.run(job, timeout_s=timeout_s, trace_out=paths[0])
        second = (
            await run_worker(job, timeout_s=timeout_s, trace_out=paths[1], as_user=True)
        ).result
        if first.trace_hash and first.trace_hash == second.trace_hash:
            return DeterminismReport(job, first, second)
        lines = [p.read_text("utf-8").splitlines() if p.exists() else [] for p in paths]
        index = first_divergence(lines[0], lines[1])
        if index is None:
            return DeterminismReport(job, first, second)
        return DeterminismReport(
            job, first, second, index, _rows_around(lines[0], index), _rows_around(lines[1], index)
        )


@contextlib.asynccontextmanager
async def _fork_server(existing: _ForkServer | None) -> AsyncIterator[_ForkServer]:
    """`existing`, or a fork server of its own that is stopped afterwards."""
    if existing is not None:
        yield existing
        return
    with tempfile.TemporaryFile(mode="a+b") as stderr:
        server = _ForkServer(stderr)
        try:
            yield server
        finally:
            with trio.CancelScope(shield=True):
                await server.stop(kill=True)


async def check_determinism_many(
    jobs: Sequence[Job],
    *,
    parallel: int,
    timeout_s: float,
    on_report: Callable[[DeterminismReport], None] = lambda report: None,
) -> list[DeterminismReport]:
    """`check_determinism` for each job on `parallel` slots, each with its own fork server."""
    reports: dict[int, DeterminismReport] = {}
    send, receive = trio.open_memory_channel[tuple[int, Job]](len(jobs))
    for item in enumerate(jobs):
        send.send_nowait(item)
    send.close()

    async def slot(receive: trio.MemoryReceiveChannel[tuple[int, Job]]) -> None:
        async with _fork_server(None) as server:
            async for index, job in receive:
                report = await check_determinism(job, timeout_s=timeout_s, server=server)
                reports[index] = report
                on_report(report)

    async with trio.open_nursery() as nursery:
        for _ in range(parallel):
            nursery.start_soon(slot, receive.clone())
    return [reports[i] for i in sorted(reports)]


def default_jobs() -> int:
    """Parallel workers by default: one per core."""
    return max(1, os.cpu_count() or 1)


__all__ = [
    "DeterminismReport",
    "Job",
    "Outcome",
    "check_determinism",
    "check_determinism_many",
    "default_jobs",
    "run_jobs",
    "run_worker",
]
