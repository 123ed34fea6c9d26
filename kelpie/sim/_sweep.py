"""Many simulated runs, one fresh process per seed, in parallel: sweeps and the determinism check.

This is harness code: it runs under the real clock, outside any simulation, and
starts `python -m kelpie.sim.worker` processes with `PYTHONHASHSEED=0`. A worker
that does not finish within its timeout is killed and reported as a hang (a
task that never reaches a checkpoint cannot be stopped from inside); one that
exits without a result is reported as a broken worker. Both still come with
their reproduce command.
"""

from __future__ import annotations

import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs
import trio

from kelpie.sim._result import Failure, FailureKind, RunResult
from kelpie.sim._trace import TraceRow, first_divergence

_STDERR_TAIL_LINES = 20


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


async def run_worker(job: Job, *, timeout_s: float, trace_out: Path | None = None) -> Outcome:
    """Runs one job in a fresh worker process."""
    command = [
        sys.executable,
        "-m",
        "kelpie.sim.worker",
        "--scenario",
        job.scenario,
        "--seed",
        str(job.seed),
    ]
    if trace_out is not None:
        command += ["--trace-out", str(trace_out)]
    started = trio.current_time()
    with trio.move_on_after(timeout_s) as scope:
        proc = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False, env=worker_env()
        )
    wall_s = trio.current_time() - started
    if scope.cancelled_caught:
        return Outcome(
            job,
            _broken(
                job,
                FailureKind.HANG,
                f"the run did not finish within {timeout_s:g}s of real time "
                "(a task that never reaches a checkpoint?)",
                (),
            ),
            wall_s,
        )
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


async def run_jobs(
    jobs: Sequence[Job],
    *,
    parallel: int,
    timeout_s: float,
    budget_s: float | None = None,
    on_outcome: Callable[[Outcome], None] = lambda outcome: None,
) -> list[Outcome]:
    """Runs `jobs` in up to `parallel` worker processes; stops starting new ones after the budget.

    Outcomes come back in job order; jobs never started (budget spent) are left out.
    """
    results: dict[int, Outcome] = {}
    limiter = trio.CapacityLimiter(parallel)
    started = trio.current_time()

    async def one(index: int, job: Job) -> None:
        async with limiter:
            if budget_s is not None and trio.current_time() - started > budget_s:
                return
            outcome = await run_worker(job, timeout_s=timeout_s)
        results[index] = outcome
        on_outcome(outcome)

    async with trio.open_nursery() as nursery:
        for index, job in enumerate(jobs):
            nursery.start_soon(one, index, job)
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


async def check_determinism(job: Job, *, timeout_s: float) -> DeterminismReport:
    """Runs `job` twice in fresh processes and compares the traces row by row."""
    with tempfile.TemporaryDirectory(prefix="kelpie-det-") as tmp:
        paths = (Path(tmp) / "first.trace", Path(tmp) / "second.trace")
        outcomes = []
        for path in paths:
            outcomes.append(await run_worker(job, timeout_s=timeout_s, trace_out=path))
        first, second = (o.result for o in outcomes)
        if first.trace_hash and first.trace_hash == second.trace_hash:
            return DeterminismReport(job, first, second)
        lines = [p.read_text("utf-8").splitlines() if p.exists() else [] for p in paths]
        index = first_divergence(lines[0], lines[1])
        if index is None:
            return DeterminismReport(job, first, second)
        return DeterminismReport(
            job, first, second, index, _rows_around(lines[0], index), _rows_around(lines[1], index)
        )


async def check_determinism_many(
    jobs: Sequence[Job],
    *,
    parallel: int,
    timeout_s: float,
    on_report: Callable[[DeterminismReport], None] = lambda report: None,
) -> list[DeterminismReport]:
    """`check_determinism` for each job, `parallel` jobs at a time (two processes each, in turn)."""
    reports: dict[int, DeterminismReport] = {}
    limiter = trio.CapacityLimiter(parallel)

    async def one(index: int, job: Job) -> None:
        async with limiter:
            report = await check_determinism(job, timeout_s=timeout_s)
        reports[index] = report
        on_report(report)

    async with trio.open_nursery() as nursery:
        for index, job in enumerate(jobs):
            nursery.start_soon(one, index, job)
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
