"""The event trace of a simulated run, and its hash.

Every scheduling step, task spawn and exit, application event, fault firing and
phase change becomes one row:

    seq  time_s  node  task  kind  detail

- seq: the row's position in the trace, from 0;
- time_s: virtual seconds since the run began;
- node: the simulated node the task belongs to ("-" for the simulator's own);
- task: "#<id> <name>", ids numbered in spawn order within the run;
- kind: step, spawn, exit, phase, buggify, clock.jump, or an application event
  kind such as ring.put;
- detail: the event's fields, rendered deterministically.

The run's hash is BLAKE2b over every row's canonical text, so two runs agree on
the hash exactly when they agree on every row. Only the last `tail_len` rows are
kept in memory (trio's own system tasks are hashed but left out of the tail, so
the tail shows the workload); `sink`, when given, receives the full text for the determinism
check, which reports the first row at which two runs diverge.
"""

from __future__ import annotations

import hashlib
from collections import deque
from typing import TextIO

import attrs


@attrs.frozen
class TraceRow:
    """One row of a trace (see the module docstring for the columns)."""

    seq: int
    time_s: float
    node: str
    task: str
    kind: str
    detail: str

    def line(self) -> str:
        """The canonical text of this row, as hashed and written to trace files."""
        return f"{self.seq}\t{self.time_s!r}\t{self.node}\t{self.task}\t{self.kind}\t{self.detail}"

    @classmethod
    def from_line(cls, line: str) -> TraceRow:
        """Parses the canonical text written by `line`."""
        seq, time_s, node, task, kind, detail = line.rstrip("\n").split("\t", 5)
        return cls(int(seq), float(time_s), node, task, kind, detail)


def _clean(text: str) -> str:
    return text.replace("\t", " ").replace("\n", " ")


class Trace:
    """Accumulates rows: hashes all of them, keeps the tail, optionally writes them out."""

    __slots__ = ("_hash", "_sink", "_tail", "rows")

    def __init__(self, *, tail_len: int = 40, sink: TextIO | None = None) -> None:
        self._hash = hashlib.blake2b(digest_size=16, person=b"kelpie-trace")
        self._tail: deque[tuple[int, float, str, str, str, str]] = deque(maxlen=tail_len)
        self._sink = sink
        self.rows = 0

    def add(
        self,
        time_s: float,
        node: str,
        task: str,
        kind: str,
        detail: str = "",
        *,
        in_tail: bool = True,
    ) -> None:
        """Appends one row; `in_tail=False` hashes (and writes) it but keeps it out of the tail."""
        seq = self.rows
        self.rows = seq + 1
        if "\t" in detail or "\n" in detail:
            detail = _clean(detail)
        line = f"{seq}\t{time_s!r}\t{node}\t{task}\t{kind}\t{detail}\n"
        self._hash.update(line.encode("utf-8"))
        if in_tail:
            self._tail.append((seq, time_s, node, task, kind, detail))
        if self._sink is not None:
            self._sink.write(line)

    def hexdigest(self) -> str:
        """The hash of every row so far."""
        return self._hash.hexdigest()

    def tail(self) -> list[TraceRow]:
        """The last rows, oldest first."""
        return [TraceRow(*row) for row in self._tail]


def render_fields(fields: dict[str, object] | None = None, **more: object) -> str:
    """Renders event fields as `k=v` pairs in key order, with deterministic reprs."""
    items = dict(fields or {}, **more)
    return " ".join(f"{key}={items[key]!r}" for key in sorted(items))


def first_divergence(lines_a: list[str], lines_b: list[str]) -> int | None:
    """The index of the first row at which two traces differ, or None when they are equal."""
    for index, (a, b) in enumerate(zip(lines_a, lines_b, strict=False)):
        if a != b:
            return index
    if len(lines_a) != len(lines_b):
        return min(len(lines_a), len(lines_b))
    return None
