"""What a simulated run reports: its outcome, its trace hash and everything needed to reproduce it.

A `RunResult` travels as JSON from a sweep's worker process to the sweep, so it
is made of plain values only.
"""

from __future__ import annotations

import enum
import json
from typing import Any

import attrs

from kelpie.sim._faults import SiteRecord
from kelpie.sim._sanitizer import Finding
from kelpie.sim._trace import TraceRow


class FailureKind(enum.Enum):
    """Why a run failed. Safety (check) and limits are told apart on purpose."""

    CHECK = "check"  # an assertion or a scenario check failed: a safety violation
    CRASH = "crash"  # the workload raised an unexpected exception
    DEADLOCK = "deadlock"  # nothing could run and no timeout was pending
    TIME_LIMIT = "time_limit"  # simulated time ran past the run's maximum
    STEP_LIMIT = "step_limit"  # the run took more scheduling steps than its maximum
    SANITIZER = "sanitizer"  # the workload touched the real world (socket, thread, ...)
    HANG = "hang"  # real time ran out: a task never reached a checkpoint
    WORKER = "worker"  # the worker process died without a result: sweeps only


@attrs.frozen
class Failure:
    """The first failure of a run: its kind, a one-line message and supporting lines."""

    kind: FailureKind
    message: str
    details: tuple[str, ...] = ()


@attrs.frozen
class RunResult:
    """The outcome of one simulated run of one scenario with one seed."""

    scenario: str
    seed: int
    failure: Failure | None
    trace_hash: str
    trace_rows: int
    steps: int
    sim_time_s: float
    schedule_batches: int
    schedule_choices: int
    schedule_deviations: int
    faults: str
    #: "random", "fifo" or "replay": how scheduling choices were made.
    schedule: str = "random"
    trace_tail: tuple[TraceRow, ...] = ()
    findings: tuple[Finding, ...] = ()
    buggify: tuple[SiteRecord, ...] = ()

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_json(self) -> str:
        """One line of JSON (see `from_json`)."""
        return json.dumps(attrs.asdict(self, value_serializer=_serialize), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunResult:
        data = json.loads(text)
        failure = data.pop("failure")
        return cls(
            failure=None
            if failure is None
            else Failure(
                FailureKind(failure["kind"]), failure["message"], tuple(failure["details"])
            ),
            trace_tail=tuple(TraceRow(**row) for row in data.pop("trace_tail")),
            findings=tuple(Finding(**f) for f in data.pop("findings")),
            buggify=tuple(SiteRecord(**s) for s in data.pop("buggify")),
            **data,
        )


def _serialize(inst: Any, field: Any, value: Any) -> Any:
    if isinstance(value, enum.Enum):
        return value.value
    return value
