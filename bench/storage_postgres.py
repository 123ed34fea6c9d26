"""PostgreSQL backend throughput: single-key read-modify-write transactions against a raw driver.

Prints figures; asserts nothing about speed (the machines are shared and noisy).

Starts a throwaway PostgreSQL server (tests/_pgserver.py: fsync on, on
127.0.0.1) unless KELPIE_POSTGRES_URL names one, then measures, in one run:

- kelpie: `PostgresStore` (pool of 16), with 1 and with 16 concurrent trio tasks;
  each task increments its own counter key: get, set, commit (one transaction,
  two round trips: BEGIN with the read, then the upsert with COMMIT);
- raw: psycopg with no Kelpie in between, 1 and 16 threads, one connection each,
  SERIALIZABLE: SELECT, UPDATE, COMMIT of an integer counter per thread.

Each row gives committed transactions per second and the latency of a committed
transaction (p50, p99); a serialization failure is retried and counted (each
client has its own key, so failures come only from SSI's page-level locks).
The last lines give kelpie's throughput as a fraction of raw's, at 1 and at 16 clients.
The tables it makes (bench_kv, bench_raw) are dropped at the end.

Usage: python bench/storage_postgres.py [--seconds S]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import attrs
import psycopg
import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from _pgserver import PgServer

from kelpie.storage import Conflict
from kelpie.storage._postgres import PostgresStore

POOL_SIZE = 16


@attrs.frozen
class Result:
    name: str
    clients: int
    committed: int
    conflicts: int
    elapsed_s: float
    latencies_s: list[float]

    @property
    def per_s(self) -> float:
        return self.committed / self.elapsed_s

    def percentile_ms(self, q: int) -> float:
        cuts = statistics.quantiles(self.latencies_s, n=100, method="inclusive")
        return cuts[q - 1] * 1000


# -- kelpie ------------------------------------------------------------------------------


async def _kelpie(url: str, clients: int, seconds: float) -> Result:
    store = await PostgresStore.open(url, pool_size=POOL_SIZE, table="bench_kv")
    try:
        async with store.transaction() as tr:
            tr.clear_range(b"c", b"d")
            for i in range(clients):
                tr.set(b"c%03d" % i, b"0")
            await tr.commit()
        latencies: list[float] = []
        conflicts = 0
        stop_at = time.perf_counter() + seconds

        async def client(i: int) -> None:
            nonlocal conflicts
            key = b"c%03d" % i
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                while True:
                    try:
                        async with store.transaction() as tr:
                            value = await tr.get(key)
                            assert value is not None
                            tr.set(key, b"%d" % (int(value) + 1))
                            await tr.commit()
                        break
                    except Conflict:
                        conflicts += 1
                latencies.append(time.perf_counter() - started)

        started = time.perf_counter()
        async with trio.open_nursery() as nursery:
            for i in range(clients):
                nursery.start_soon(client, i)
        elapsed = time.perf_counter() - started
        async with store.transaction() as tr:
            total = sum(int(v) for _, v in await tr.get_range(b"c", b"d"))
        assert total == len(latencies), (total, len(latencies))
    finally:
        await store.aclose()
    return Result("kelpie", clients, len(latencies), conflicts, elapsed, latencies)


# -- raw psycopg -------------------------------------------------------------------------


def _raw(url: str, clients: int, seconds: float) -> Result:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP TABLE IF EXISTS bench_raw")
        conn.execute("CREATE TABLE bench_raw (id int PRIMARY KEY, n bigint NOT NULL)")
        conn.execute("INSERT INTO bench_raw SELECT i, 0 FROM generate_series(0, %s) i", (clients,))
    latencies: list[float] = []
    conflicts = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    stop_at = [0.0]

    def client(i: int) -> None:
        mine: list[float] = []
        failed = 0
        with psycopg.connect(url) as conn:
            conn.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
            barrier.wait()
            while time.perf_counter() < stop_at[0]:
                started = time.perf_counter()
                while True:
                    try:
                        row = conn.execute("SELECT n FROM bench_raw WHERE id = %s", (i,)).fetchone()
                        assert row is not None
                        conn.execute("UPDATE bench_raw SET n = %s WHERE id = %s", (row[0] + 1, i))
                        conn.commit()
                        break
                    except psycopg.errors.SerializationFailure:
                        conn.rollback()
                        failed += 1
                mine.append(time.perf_counter() - started)
        with lock:
            latencies.extend(mine)
            conflicts[0] += failed

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    stop_at[0] = time.perf_counter() + seconds
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    with psycopg.connect(url, autocommit=True) as conn:
        row = conn.execute("SELECT sum(n) FROM bench_raw").fetchone()
        assert row is not None and row[0] == len(latencies), (row, len(latencies))
    return Result("raw psycopg", clients, len(latencies), conflicts[0], elapsed, latencies)


# -- the report --------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args()
    server = None
    url = os.environ.get("KELPIE_POSTGRES_URL")
    if not url:
        server = PgServer.start()
        url = server.url
    try:
        print(
            f"postgres read-modify-write transactions ({args.seconds:g} s each, "
            f"{'a throwaway server, fsync on' if server else 'KELPIE_POSTGRES_URL'}, "
            f"each client its own counter key; kelpie pool of {POOL_SIZE})"
        )
        header = (
            f"{'client':<12} {'clients':>7} {'txn/s':>8} {'p50 ms':>7} {'p99 ms':>7} "
            f"{'conflicts':>9}"
        )
        print(header)
        print("-" * len(header))
        results: dict[tuple[str, int], Result] = {}
        for clients in (1, 16):
            for result in (
                trio.run(_kelpie, url, clients, args.seconds),
                _raw(url, clients, args.seconds),
            ):
                results[result.name, clients] = result
                print(
                    f"{result.name:<12} {clients:>7} {result.per_s:>8,.0f} "
                    f"{result.percentile_ms(50):>7.2f} {result.percentile_ms(99):>7.2f} "
                    f"{result.conflicts:>9}"
                )
        for clients in (1, 16):
            ratio = results["kelpie", clients].per_s / results["raw psycopg", clients].per_s
            print(f"kelpie / raw throughput at {clients} client(s): {ratio:.2f}")
    finally:
        if server is not None:
            server.stop()
        else:
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("DROP TABLE IF EXISTS bench_kv, bench_raw")


if __name__ == "__main__":
    main()
