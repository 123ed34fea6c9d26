"""The sqlite backend's speed: single-key read-modify-write transactions per second, and latency.

Prints figures; asserts nothing about speed (the machines are shared, and fsync
times vary a lot between runs and machines).

- kelpie sqlite, 1 and 16 clients: each client is a trio task that, in a loop,
  reads its own counter key, writes it back incremented and commits (a
  `SqliteStore` transaction: a snapshot read, a conflict check, one fsync);
- raw sqlite3: the same read-modify-write with the same pragmas (WAL,
  synchronous=FULL) in a plain loop (BEGIN IMMEDIATE, SELECT, INSERT, COMMIT):
  what SQLite and the disk allow, for reference.

The three are measured in interleaved slices (`--rounds` of each), so that a
busy neighbour on a shared machine slows them alike. Latency is one whole
transaction, from opening it to the end of its commit. Files live in a fresh
temporary directory (`--dir` picks where: /dev/shm takes fsync out of the
figures and leaves the CPU cost).

Usage: python bench/storage_sqlite.py [--seconds S] [--rounds R] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import statistics
import tempfile
import time

import trio

from kelpie.storage import Conflict, SqliteStore

CLIENTS = (1, 16)


class Sample:
    """Latencies and time spent, accumulated over the slices of one configuration."""

    def __init__(self, name: str, clients: int) -> None:
        self.name = name
        self.clients = clients
        self.latencies_s: list[float] = []
        self.elapsed_s = 0.0
        self.conflicts = 0

    def row(self) -> str:
        cuts = statistics.quantiles(self.latencies_s, n=100, method="inclusive")
        per_s = len(self.latencies_s) / self.elapsed_s
        return (
            f"{self.name:<14} {self.clients:>7} {per_s:>8,.0f} "
            f"{cuts[49] * 1000:>7.2f} {cuts[98] * 1000:>7.2f}"
        )


async def kelpie_slice(store: SqliteStore, sample: Sample, seconds: float) -> None:
    started = time.perf_counter()
    deadline = started + seconds

    async def client(n: int) -> None:
        key = b"bench/%d" % n
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            async with store.transaction() as tr:
                value = int(await tr.get(key) or b"0")
                tr.set(key, b"%d" % (value + 1))
                try:
                    await tr.commit()
                except Conflict:
                    sample.conflicts += 1
                    continue
            sample.latencies_s.append(time.perf_counter() - began)

    async with trio.open_nursery() as nursery:
        for n in range(sample.clients):
            nursery.start_soon(client, n)
    sample.elapsed_s += time.perf_counter() - started


def raw_open(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=0, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
    return conn


def raw_slice(conn: sqlite3.Connection, sample: Sample, seconds: float) -> None:
    key = b"bench/0"
    started = time.perf_counter()
    deadline = started + seconds
    while (began := time.perf_counter()) < deadline:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()
        value = int(row[0]) if row else 0
        conn.execute("INSERT OR REPLACE INTO kv VALUES (?, ?)", (key, b"%d" % (value + 1)))
        conn.execute("COMMIT")
        sample.latencies_s.append(time.perf_counter() - began)
    sample.elapsed_s += time.perf_counter() - started


async def measure(tmp: str, seconds: float, rounds: int) -> list[Sample]:
    kelpie = [Sample("kelpie sqlite", clients) for clients in CLIENTS]
    raw = Sample("raw sqlite3", 1)
    stores = [await SqliteStore.open(os.path.join(tmp, f"kelpie-{s.clients}.db")) for s in kelpie]
    conn = raw_open(os.path.join(tmp, "raw.db"))
    try:
        for _ in range(rounds):
            for store, sample in zip(stores, kelpie, strict=True):
                await kelpie_slice(store, sample, seconds / rounds)
            raw_slice(conn, raw, seconds / rounds)
    finally:
        conn.close()
        for store in stores:
            await store.aclose()
    return [*kelpie, raw]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=4.0, help="time per configuration")
    parser.add_argument("--rounds", type=int, default=8, help="interleaved slices of each")
    parser.add_argument("--dir", default=None, help="where to put the files (default: a temp dir)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kelpie-bench-") as tmp:
        print(
            f"sqlite backend: single-key read-modify-write transactions, {args.seconds:g} s "
            f"each in {args.rounds} slices (SQLite {sqlite3.sqlite_version}, files in {tmp})"
        )
        samples = trio.run(measure, tmp, args.seconds, args.rounds)
    header = f"{'':<14} {'clients':>7} {'tx/s':>8} {'p50 ms':>7} {'p99 ms':>7}"
    print(header)
    print("-" * len(header))
    for sample in samples:
        print(sample.row())
    one, raw = samples[0], samples[-1]
    ratio = (len(one.latencies_s) / one.elapsed_s) / (len(raw.latencies_s) / raw.elapsed_s)
    print(f"kelpie with 1 client runs at {ratio:.0%} of raw sqlite3")
    for sample in samples:
        if sample.conflicts:
            print(f"note: {sample.conflicts} conflicts with {sample.clients} clients (expected 0)")


if __name__ == "__main__":
    main()
