"""Kill -9 under load: the sqlite backend keeps every acknowledged commit, and never half of one.

Each round starts a child process (tests/storage/_sqlite_child.py, mode `load`)
whose concurrent trio tasks commit transactions on one file. Every transaction
increments a shared counter, writes a log entry keyed by (round, task, seq) and
sets its task's progress to seq + 1, and the child prints an ack line only after
`commit()` returned. After a seeded random number of acks the parent SIGKILLs
the child, reopens the file, and checks:

- every acknowledged transaction is present;
- every transaction is all there or not at all: the counter equals the number
  of log entries, and each task's progress equals the number of its entries,
  which run 0..progress-1 without a gap;
- at most one unacknowledged transaction per task is present (the one in flight
  when the kill arrived);
- SQLite's own integrity check passes.

Rounds accumulate in one file, so later rounds also recover from earlier kills.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import trio
from _sqlite_child import counter_key, progress_key

from kelpie.storage import SqliteStore, tuple_range, unpack

CHILD = Path(__file__).with_name("_sqlite_child.py")
TASKS = 4

Ack = tuple[int, int, int]  # (round, task, seq)


def run_and_kill(path: Path, round_: int, acks_before_kill: int, stderr_path: Path) -> set[Ack]:
    """Runs the load in a child, SIGKILLs it after `acks_before_kill` acks, returns every ack."""
    acks: set[Ack] = set()
    with (
        stderr_path.open("w") as stderr,
        subprocess.Popen(
            [sys.executable, str(CHILD), "load", str(path), str(round_), str(TASKS), "7"],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        ) as proc,
    ):
        assert proc.stdout is not None
        # Read on to the end after the kill, through the same buffered reader (communicate()
        # would skip what it has buffered): every line the child wrote is an acknowledgement,
        # except a torn last line.
        killed = False
        for line in proc.stdout:
            if line.endswith("\n"):
                acks.add(_parse_ack(line))
            if len(acks) >= acks_before_kill and not killed:
                os.kill(proc.pid, signal.SIGKILL)
                killed = True
        proc.wait(timeout=30)
    if proc.returncode != -signal.SIGKILL:
        pytest.fail(
            f"the load child exited with {proc.returncode} before it was killed "
            f"({len(acks)} acks):\n{stderr_path.read_text()}"
        )
    return acks


def _parse_ack(line: str) -> Ack:
    word, round_, task, seq = line.split()
    assert word == "ack", line
    return int(round_), int(task), int(seq)


async def check_file(path: Path, acked: set[Ack]) -> int:
    """Checks the invariants in the module docstring; returns how many transactions are present."""
    async with await SqliteStore.open(path) as store, store.transaction() as tr:
        begin, end = tuple_range(("log",))
        present = {unpack(key)[1:] for key, _ in await tr.get_range(begin, end)}
        total = int(await tr.get(counter_key("total")) or b"0")
        per_task = Counter((round_, task) for round_, task, _ in present)
        for (round_, task), count in sorted(per_task.items()):
            progress = int(await tr.get(progress_key(round_, task)) or b"0")
            assert progress == count, f"task {round_}/{task}: progress {progress}, {count} entries"
            seqs = sorted(seq for r, t, seq in present if (r, t) == (round_, task))
            assert seqs == list(range(count)), f"task {round_}/{task} has gaps: {seqs}"
    missing = acked - present
    assert not missing, f"acknowledged commits lost: {sorted(missing)[:10]}"
    assert total == len(present), f"counter {total} but {len(present)} log entries"
    unacked = Counter((round_, task) for round_, task, _ in present - acked)
    assert all(n <= 1 for n in unacked.values()), f"unacknowledged commits present: {unacked}"
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()
    return len(present)


def crash_rounds(tmp_path: Path, rounds: int, seed: int) -> None:
    """Runs `rounds` kill -9 rounds on one file (see the module docstring)."""
    rng = random.Random(seed)
    path = tmp_path / "crash.db"
    acked: set[Ack] = set()
    present = 0
    for round_ in range(rounds):
        acks = run_and_kill(path, round_, rng.randrange(20, 400), tmp_path / "child.err")
        acked |= acks
        try:
            now_present = trio.run(check_file, path, acked)
        except AssertionError as exc:
            exc.add_note(f"round {round_} of crash_rounds(seed={seed})")
            raise
        assert now_present >= present + len(acks)
        present = now_present


@pytest.mark.timeout(300)
def test_kill_9_keeps_every_acknowledged_commit_and_no_partial_one(tmp_path: Path) -> None:
    """Survives three SIGKILLs under load with every acked commit whole and nothing torn."""
    crash_rounds(tmp_path, rounds=3, seed=1)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_kill_9_twenty_times_in_a_row(tmp_path: Path) -> None:
    """Survives twenty SIGKILLs in a row on one file (the sqlite backend's acceptance test)."""
    crash_rounds(tmp_path, rounds=20, seed=20)
