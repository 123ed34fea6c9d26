"""The sqlite backend: the conformance suite, durability, sharing one file, and its errors."""

from __future__ import annotations

import itertools
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
import trio
import trio.testing
from _sqlite_child import counter_key

import kelpie.storage._sqlite as sqlite_backend
from kelpie.core import ConfigError
from kelpie.storage import (
    Conflict,
    StorageUnavailable,
    Store,
    TransactionClosed,
)
from kelpie.storage._sqlite import SqliteError, SqliteStore
from kelpie.storage.conformance import StoreConformance, StoreFactory

CHILD = Path(__file__).with_name("_sqlite_child.py")


class TestSqliteConformance(StoreConformance):
    @pytest.fixture
    def store_factory(self, tmp_path: Path) -> StoreFactory:
        names = itertools.count()

        async def make() -> Store:
            return await SqliteStore.open(tmp_path / f"store-{next(names)}.db")

        return make


def run_with_stores(
    path: Path, count: int, test: Callable[..., Awaitable[None]], **open_args: int
) -> None:
    """Runs `test(*stores)` with `count` stores open on the file at `path`, then closes them."""

    async def main() -> None:
        stores = [await SqliteStore.open(path, **open_args) for _ in range(count)]
        try:
            await test(*stores)
        finally:
            for store in stores:
                await store.aclose()

    trio.run(main)


async def put(store: Store, key: bytes, value: bytes) -> None:
    async with store.transaction() as tr:
        tr.set(key, value)
        await tr.commit()


async def get(store: Store, key: bytes) -> bytes | None:
    async with store.transaction() as tr:
        return await tr.get(key)


# -- durability and ordering -------------------------------------------------------------


def test_commits_survive_close_and_reopen(tmp_path: Path) -> None:
    """Finds every committed write, and no abandoned one, after the store is closed and reopened."""
    path = tmp_path / "kelpie.db"

    async def write(store: SqliteStore) -> None:
        for i in range(20):
            await put(store, b"k%02d" % i, b"v%d" % i)
        async with store.transaction() as tr:
            tr.clear_range(b"k05", b"k10")
            tr.set(b"k07", b"again")
            await tr.commit()
        async with store.transaction() as tr:
            tr.set(b"abandoned", b"x")  # never committed

    async def read(store: SqliteStore) -> None:
        async with store.transaction() as tr:
            rows = dict(await tr.get_range(b"", b"\xff"))
        expected = {b"k%02d" % i: b"v%d" % i for i in range(20) if not 5 <= i < 10}
        expected[b"k07"] = b"again"
        assert rows == expected

    run_with_stores(path, 1, write)
    run_with_stores(path, 1, read)


def test_read_version_tracks_the_wall_clock_and_passes_commits(tmp_path: Path) -> None:
    """Hands out microseconds of wall time, above the read version of every earlier writer."""

    async def body(a: SqliteStore, b: SqliteStore) -> None:
        async with a.transaction() as tr:
            first = await tr.read_version()
            tr.set(b"k", b"v")
            await tr.commit()
        assert abs(first - time.time_ns() // 1_000) < 60_000_000
        async with b.transaction() as tr:
            second = await tr.read_version()
            assert second > first
            assert await tr.read_version() == second

    run_with_stores(tmp_path / "kelpie.db", 2, body)


class SteppedClock:
    """The backend's wall clock, shifted by `offset_us` (a clock that jumps or steps back)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.offset_us = 0
        real = sqlite_backend._wall_us
        monkeypatch.setattr(sqlite_backend, "_wall_us", lambda: real() + self.offset_us)


@pytest.mark.parametrize("step_s", [3_600, -3_600])
def test_a_wall_clock_jump_loses_no_update(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step_s: int
) -> None:
    """Conflicts never depend on the clock: a jump forward or back an hour loses no update,
    and one store object's versions never go back."""
    clock = SteppedClock(monkeypatch)

    async def body(a: SqliteStore, b: SqliteStore) -> None:
        await put(a, b"k", b"0")
        async with a.transaction() as tr:
            before = await tr.read_version()
            assert await tr.get(b"k") == b"0"
            clock.offset_us = step_s * 1_000_000
            await put(b, b"k", b"1")
            tr.set(b"k", b"2")
            with pytest.raises(Conflict):
                await tr.commit()
        async with a.transaction() as tr:
            assert await tr.read_version() >= before
            assert await tr.get(b"k") == b"1"

    run_with_stores(tmp_path / "kelpie.db", 2, body)


# -- two store objects on one file -------------------------------------------------------


def test_two_stores_on_one_file_see_each_others_commits(tmp_path: Path) -> None:
    """Shows a commit made through one store to the other, but not to its older snapshots."""

    async def body(a: SqliteStore, b: SqliteStore) -> None:
        async with b.transaction() as before:
            await put(a, b"k", b"1")
            assert await before.get(b"k") is None  # its snapshot predates the commit
        assert await get(b, b"k") == b"1"

    run_with_stores(tmp_path / "kelpie.db", 2, body)


def test_disjoint_transactions_on_two_stores_both_commit(tmp_path: Path) -> None:
    """Commits two overlapping transactions of different stores that touch different keys."""

    async def body(a: SqliteStore, b: SqliteStore) -> None:
        await put(a, b"x", b"0")
        await put(a, b"y", b"0")
        async with a.transaction() as t1, b.transaction() as t2:
            assert await t1.get(b"x") == b"0"
            assert await t2.get(b"y") == b"0"
            assert await t2.get_range(b"z", b"zz") == []
            t1.set(b"x", b"1")
            t2.set(b"y", b"1")
            await t1.commit()
            await t2.commit()  # its snapshot is stale, but nothing it read changed
        assert (await get(b, b"x"), await get(a, b"y")) == (b"1", b"1")

    run_with_stores(tmp_path / "kelpie.db", 2, body)


def test_overlapping_transactions_on_two_stores_conflict(tmp_path: Path) -> None:
    """Refuses the second commit when the first wrote a key it read, and writes none of it."""

    async def body(a: SqliteStore, b: SqliteStore) -> None:
        await put(a, b"n", b"0")
        async with a.transaction() as t1, b.transaction() as t2:
            assert await t1.get(b"n") == await t2.get(b"n") == b"0"
            t1.set(b"n", b"1")
            t2.set(b"n", b"2")
            t2.set(b"other", b"2")
            await t1.commit()
            with pytest.raises(Conflict):
                await t2.commit()
        assert await get(b, b"n") == b"1"
        assert await get(b, b"other") is None

    run_with_stores(tmp_path / "kelpie.db", 2, body)


def test_range_reads_conflict_with_inserts_and_clears_only_inside_them(tmp_path: Path) -> None:
    """Conflicts when a range read would now read differently: a phantom insert, a clear
    that removes a key in it; not on writes outside it, nor on a clear that removes nothing."""

    async def scan_then_write(
        a: SqliteStore, b: SqliteStore, write: Callable[[Store], Awaitable[None]]
    ) -> None:
        async with a.transaction() as tr:
            await tr.get_range(b"m", b"n")
            await write(b)
            tr.set(b"result", b"1")
            await tr.commit()

    async def clear(store: Store, begin: bytes, end: bytes) -> None:
        async with store.transaction() as tr:
            tr.clear_range(begin, end)
            await tr.commit()

    async def body(a: SqliteStore, b: SqliteStore) -> None:
        await put(a, b"m1", b"x")
        await scan_then_write(a, b, lambda s: put(s, b"n", b"outside"))
        await scan_then_write(a, b, lambda s: clear(s, b"a", b"m"))
        with pytest.raises(Conflict):
            await scan_then_write(a, b, lambda s: put(s, b"m5", b"phantom"))
        await scan_then_write(a, b, lambda s: clear(s, b"l", b"m0"))  # removes nothing
        with pytest.raises(Conflict):
            await scan_then_write(a, b, lambda s: clear(s, b"m1", b"m2"))

    run_with_stores(tmp_path / "kelpie.db", 2, body)


def test_snapshot_reads_on_another_store_do_not_conflict(tmp_path: Path) -> None:
    """Commits a transaction whose only read of a changed key was a snapshot read."""

    async def body(a: SqliteStore, b: SqliteStore) -> None:
        await put(a, b"k", b"0")
        async with a.transaction() as tr:
            assert await tr.get(b"k", snapshot=True) == b"0"
            assert await tr.get_range(b"k", b"l", snapshot=True) == [(b"k", b"0")]
            await put(b, b"k", b"1")
            tr.set(b"seen", b"0")
            await tr.commit()
        assert await get(b, b"seen") == b"0"

    run_with_stores(tmp_path / "kelpie.db", 2, body)


# -- the connection pool and the store's life cycle --------------------------------------


def test_a_transaction_waits_for_a_free_connection(tmp_path: Path) -> None:
    """Makes a transaction beyond connections_max wait, then read a snapshot taken when it ran."""

    async def body(store: SqliteStore) -> None:
        await put(store, b"k", b"old")
        t1, t2, t3 = store.transaction(), store.transaction(), store.transaction()
        got: list[bytes | None] = []

        async def third() -> None:
            got.append(await t3.get(b"k"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(third)
            await trio.sleep(0.05)
            assert got == []  # both connections are held by t1 and t2
            t1.set(b"k", b"new")
            await t1.commit()  # gives its connection to t3
        assert got == [b"new"]
        await t2.aclose()
        await t3.aclose()

    run_with_stores(tmp_path / "kelpie.db", 1, body, connections_max=2)


def test_a_closed_store_refuses_transactions(tmp_path: Path) -> None:
    """Raises TransactionClosed from a transaction of a store that was closed."""

    async def main() -> None:
        store = await SqliteStore.open(tmp_path / "kelpie.db")
        await store.aclose()
        async with store.transaction() as tr:
            with pytest.raises(TransactionClosed, match="closed"):
                await tr.get(b"k")

    trio.run(main)


def test_waiting_too_long_for_a_connection_is_unavailable(tmp_path: Path) -> None:
    """Raises StorageUnavailable, not a hang, when every connection stays in use for 5 s."""

    async def main() -> None:
        store = await SqliteStore.open(tmp_path / "kelpie.db", connections_max=1)
        async with store, store.transaction() as held, store.transaction() as starved:
            await held.get(b"k")
            with pytest.raises(StorageUnavailable, match="connections"):
                await starved.get(b"k")

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


@pytest.mark.timeout(120)
def test_overlapping_transactions_do_not_grow_the_wal_without_bound(tmp_path: Path) -> None:
    """Resets the WAL although 16 clients always hold snapshots (SQLite alone never could)."""
    path = tmp_path / "kelpie.db"
    wal = Path(f"{path}-wal")
    per_client = 40
    sizes: list[int] = []

    async def client(store: SqliteStore, n: int) -> None:
        for i in range(per_client):
            async with store.transaction() as tr:
                tr.set(b"client/%d" % n, b"%d" % (int(await tr.get(b"client/%d" % n) or 0) + 1))
                tr.set(b"bulk/%d/%d" % (n, i), bytes(2_000))
                await tr.commit()
            sizes.append(wal.stat().st_size)

    async def body(store: SqliteStore) -> None:
        async with trio.open_nursery() as nursery:
            for n in range(16):
                nursery.start_soon(client, store, n)
        assert store.wal_resets >= 1
        async with store.transaction() as tr:
            for n in range(16):
                assert await tr.get(b"client/%d" % n) == b"%d" % per_client

    run_with_stores(path, 1, body, wal_size_max_bytes=64 * 1024)
    # 640 commits of ~3 pages each: an unreset WAL would pass 7 MB.
    assert max(sizes) < 2_000_000, f"the WAL grew to {max(sizes):,} bytes"


def test_open_transactions_delay_a_wal_reset_but_never_block(tmp_path: Path) -> None:
    """Lets new transactions wait at most 0.1 s for a WAL reset that open ones hold up."""

    async def main() -> None:
        store = await SqliteStore.open(tmp_path / "kelpie.db", wal_size_max_bytes=1)
        async with store:
            async with store.transaction() as outer:
                await outer.get(b"k")
                for i in range(16):
                    await put(store, b"k%d" % i, b"v")  # the 16th starts a reset: outer holds it
                started = trio.current_time()
                assert await get(store, b"k1") == b"v"
                assert 0.1 <= trio.current_time() - started < 0.2
                assert store.wal_resets == 0
            await trio.sleep(1.5)  # past the retry delay
            for i in range(16):
                await put(store, b"k%d" % i, b"w")
            assert store.wal_resets == 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_corrupt_file_raises_a_typed_error(tmp_path: Path) -> None:
    """Raises SqliteError (not retryable), never a sqlite3 exception, for a damaged file."""
    path = tmp_path / "kelpie.db"

    async def fill(store: SqliteStore) -> None:
        async with store.transaction() as tr:
            for i in range(200):
                tr.set(b"k%03d" % i, bytes(1_000))
            await tr.commit()

    run_with_stores(path, 1, fill)  # closing the last connection checkpoints the WAL away
    with path.open("r+b") as f:  # keep the header and the first pages (the tables' roots)
        f.seek(5 * 4096)
        f.write(b"\xa5" * (20 * 4096))

    async def read(store: SqliteStore) -> None:
        async with store.transaction() as tr:
            with pytest.raises(SqliteError, match="malformed") as caught:
                await tr.get_range(b"", b"\xff")
            assert not caught.value.retryable
            with pytest.raises(SqliteError):  # the transaction stays failed
                await tr.get(b"k000")

    run_with_stores(path, 1, read)


# -- paths that cannot hold a store ------------------------------------------------------


def _make_foreign_database(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("CREATE TABLE users (name TEXT)")
        conn.commit()
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("name", "prepare", "message"),
    [
        ("missing-dir/kelpie.db", None, "unable to open"),
        ("a-directory", lambda p: p.mkdir(), "is a directory"),
        ("garbage.db", lambda p: p.write_bytes(b"not sqlite at all " * 300), "not a database"),
        ("foreign.db", _make_foreign_database, "not a Kelpie store"),
        (":memory:", None, "needs a file path"),
    ],
)
def test_an_unusable_path_is_a_config_error(
    tmp_path: Path, name: str, prepare: Callable[[Path], object] | None, message: str
) -> None:
    """Raises ConfigError naming the problem for a path that cannot hold a store."""
    path = Path(name) if name == ":memory:" else tmp_path / name
    if prepare is not None:
        prepare(path)

    async def main() -> None:
        with pytest.raises(ConfigError, match=message):
            await SqliteStore.open(path)

    trio.run(main)


# -- several processes -------------------------------------------------------------------


def _child(*args: object) -> subprocess.Popen[str]:
    """A child process running _sqlite_child.py with `args`, its stdout piped."""
    return subprocess.Popen(
        [sys.executable, str(CHILD), *map(str, args)], text=True, stdout=subprocess.PIPE
    )


@pytest.mark.timeout(120)
def test_processes_incrementing_shared_counters_lose_no_update(tmp_path: Path) -> None:
    """Counts every increment exactly when three processes contend on the same counters."""
    path = tmp_path / "kelpie.db"
    n = 200
    # The children create the file together, so opening is exercised concurrently too.
    children = [_child("increment", path, child, n, 1000 + child) for child in range(3)]
    outputs = []
    for proc in children:
        with proc:
            out, _ = proc.communicate(timeout=100)
            outputs.append((proc.returncode, out.strip()))
    assert outputs == [(0, "done")] * 3

    async def check(store: SqliteStore) -> None:
        assert await get(store, counter_key("a")) == str(3 * n).encode()
        assert await get(store, counter_key("b")) == str(3 * n).encode()
        for child in range(3):
            assert await get(store, counter_key(f"child-{child}")) == str(n).encode()

    run_with_stores(path, 1, check)


async def _open_and_close(path: Path) -> None:
    store = await SqliteStore.open(path)
    await store.aclose()


@pytest.mark.timeout(60)
def test_a_writer_in_another_process_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """Keeps trio's loop ticking while another process holds the write lock, then commits."""
    path = tmp_path / "kelpie.db"
    hold_ms = 300

    async def main() -> tuple[float, float]:
        ticks: list[float] = []

        async def ticker(cancel: trio.CancelScope) -> None:
            with cancel:
                while True:
                    ticks.append(trio.current_time())
                    await trio.sleep(0.005)

        async with await SqliteStore.open(path) as store:
            with _child("hold-lock", path, hold_ms) as proc:
                assert proc.stdout is not None
                assert proc.stdout.readline().strip() == "locked"  # blocks before the ticks
                async with trio.open_nursery() as nursery:
                    cancel = trio.CancelScope()
                    nursery.start_soon(ticker, cancel)
                    started = trio.current_time()
                    await put(store, b"k", b"v")  # waits for the other process's lock
                    waited_s = trio.current_time() - started
                    cancel.cancel()
                proc.communicate(timeout=10)
            assert proc.returncode == 0
            assert await get(store, b"k") == b"v"
        return waited_s, max(b - a for a, b in itertools.pairwise(ticks))

    waited_s, longest_gap_s = trio.run(main)
    assert waited_s > 0.1, "the commit should have waited for the other process's lock"
    assert longest_gap_s < 0.1, f"the event loop stalled for {longest_gap_s * 1000:.0f} ms"
