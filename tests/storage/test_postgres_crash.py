"""kill -9 against the postgres backend: acknowledged commits survive, nothing is half applied.

A child process (_pg_crash_child.py) commits transactions from several trio
tasks; each transaction increments a counter and writes a log entry keyed by a
unique id, and the child prints "ack <id>" only after `commit()` returned. The
parent SIGKILLs it after a seeded random number of acks and checks, through a
new store, that every acknowledged id is logged and that each counter equals
the number of log entries for it (a transaction applied by half would break
that). The second test SIGKILLs the PostgreSQL server itself (postmaster and
backends at once) under the same load, restarts it (WAL recovery), lets the
child go on, then kills the child and checks the same. Every failure message
names the seed.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import trio
from _pg_crash_child import SLOTS, counter_key, log_key
from _pgserver import PgServer, PgUnavailable

from kelpie.env import Rng
from kelpie.storage import prefix_range
from kelpie.storage._postgres import PostgresStore

CHILD = Path(__file__).with_name("_pg_crash_child.py")

#: Concurrent trio tasks in the child.
TASKS = 6

#: How long to wait for one more ack before calling the child stuck.
ACK_TIMEOUT_S = 60.0

NewTable = Callable[[], str]


class Child:
    """The workload process, with its acks read on a thread (so reads can time out)."""

    def __init__(self, url: str, table: str, seed: int) -> None:
        # Closed by kill(): it lives as long as the child, not a `with` block.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, str(CHILD), url, table, str(seed), str(TASKS)],
            stdout=subprocess.PIPE,
            stderr=self._stderr,
        )
        self.acked: list[str] = []
        self._lines: queue.Queue[bytes] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(line)
        self._lines.put(b"")  # end of output

    def wait_for_acks(self, count: int) -> None:
        """Blocks until `count` more acks arrived (fails if the child dies first)."""
        target = len(self.acked) + count
        while len(self.acked) < target:
            try:
                line = self._lines.get(timeout=ACK_TIMEOUT_S)
            except queue.Empty:
                pytest.fail(f"no ack for {ACK_TIMEOUT_S:.0f} s; child stderr:\n{self.stderr()}")
            if not line:
                pytest.fail(f"the child exited early ({self.process.wait()}):\n{self.stderr()}")
            self._take(line)

    def kill(self) -> None:
        """SIGKILLs the child, then collects the acks it printed before dying."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        self._reader.join()
        while (line := self._lines.get_nowait()) != b"":
            self._take(line)
        assert self.process.stdout is not None
        self.process.stdout.close()
        self._stderr.close()

    def _take(self, line: bytes) -> None:
        word, _, txn_id = line.decode().strip().partition(" ")
        assert word == "ack", line
        self.acked.append(txn_id)

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-3000:]


def check_store(url: str, table: str, acked: list[str], seed: int) -> int:
    """Asserts every acked id is logged and every counter matches its log; returns the count."""

    async def read() -> tuple[dict[int, int], dict[str, int]]:
        store = await PostgresStore.open(url, table=table)
        try:
            async with store.transaction() as tr:
                counters = {s: int(await tr.get(counter_key(s)) or b"0") for s in range(SLOTS)}
                rows = await tr.get_range(*prefix_range(log_key("")))
        finally:
            await store.aclose()
        start = len(log_key(""))
        return counters, {key[start:].decode(): int(value) for key, value in rows}

    counters, logged = trio.run(read)
    where = f"seed {seed}, table {table}"
    missing = sorted(set(acked) - set(logged))
    assert not missing, f"{len(missing)} acknowledged commits lost ({where}): {missing[:10]}"
    for slot in range(SLOTS):
        entries = sum(1 for s in logged.values() if s == slot)
        assert counters[slot] == entries, (
            f"counter {slot} is {counters[slot]} but {entries} log entries name it: a "
            f"transaction was applied by half ({where})"
        )
    return len(logged)


def kill_client_once(url: str, table: str, seed: int) -> None:
    rng = Rng(seed)
    child = Child(url, table, seed)
    try:
        child.wait_for_acks(rng.randrange(20, 400))
    finally:
        child.kill()
    logged = check_store(url, table, child.acked, seed)
    assert logged >= len(child.acked) > 0


def kill_server_once(server: PgServer, table: str, seed: int) -> None:
    rng = Rng(seed)
    child = Child(server.url, table, seed)
    try:
        child.wait_for_acks(rng.randrange(20, 300))
        server.kill()
        time.sleep(rng.uniform(0, 0.2))  # the child meets a dead server for a while
        server.restart()
        child.wait_for_acks(rng.randrange(10, 100))  # and recovers once it is back
    finally:
        child.kill()
    check_store(server.url, table, child.acked, seed)


@pytest.fixture
def own_server(postgres_server: PgServer | None) -> Iterator[PgServer]:
    """A throwaway server of this test's own, since the test kills it."""
    if postgres_server is None:
        pytest.skip("KELPIE_POSTGRES_URL is set: the server-kill test needs a server it owns")
    try:
        server = PgServer.start()
    except PgUnavailable as exc:
        pytest.fail(f"the session's server started, but a second one cannot: {exc}")
    try:
        yield server
    finally:
        server.stop()


def _seed_base() -> int:
    return int(os.environ.get("KELPIE_CRASH_SEED", "1000"))


def test_killed_client_loses_no_acknowledged_commit(
    postgres_url: str, postgres_new_table: NewTable
) -> None:
    """Keeps every acknowledged commit, whole, across 3 kill -9s of the client."""
    for seed in range(_seed_base(), _seed_base() + 3):
        kill_client_once(postgres_url, postgres_new_table(), seed)


def test_killed_server_loses_no_acknowledged_commit(own_server: PgServer) -> None:
    """Keeps every acknowledged commit, whole, across a kill -9 and restart of the server."""
    kill_server_once(own_server, "crash", _seed_base())


@pytest.mark.slow
def test_killed_client_20_times_in_a_row(postgres_url: str, postgres_new_table: NewTable) -> None:
    """Keeps every acknowledged commit, whole, across 20 kill -9s of the client in a row."""
    for seed in range(_seed_base(), _seed_base() + 20):
        kill_client_once(postgres_url, postgres_new_table(), seed)


@pytest.mark.slow
def test_killed_server_20_times_in_a_row(own_server: PgServer) -> None:
    """Keeps every acknowledged commit, whole, across 20 kill -9s of the server in a row."""
    for seed in range(_seed_base(), _seed_base() + 20):
        kill_server_once(own_server, f"crash_{seed}", seed)
