"""The postgres backend: the conformance suite on a real server, plus what only it has.

Every test runs against the session's PostgreSQL server (tests/conftest.py)
in a table of its own. Beyond the suite: the connection pool's bound and its
recovery from connections the server ended, SSI's refusals mapped to Conflict,
keys longer than a btree entry, typed errors for bad URLs and arguments.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterator

import psycopg
import pytest
import trio

from kelpie.core import ConfigError
from kelpie.env import Rng
from kelpie.storage import (
    CommitUnknownResult,
    Conflict,
    StorageError,
    StorageUnavailable,
    Store,
    Transaction,
    transact,
)
from kelpie.storage._postgres import PostgresStore, redact
from kelpie.storage.conformance import StoreConformance, StoreFactory

NewTable = Callable[[], str]


def with_param(url: str, name: str, value: str) -> str:
    """`url` (URL form) with one more query parameter."""
    return f"{url}{'&' if '?' in url else '?'}{name}={value}"


class TestPostgresConformance(StoreConformance):
    @pytest.fixture
    def store_factory(self, postgres_url: str, postgres_new_table: NewTable) -> StoreFactory:
        async def make() -> Store:
            return await PostgresStore.open(postgres_url, pool_size=8, table=postgres_new_table())

        return make


# -- helpers -----------------------------------------------------------------------------


@pytest.fixture
def admin(postgres_url: str) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A plain autocommit connection to inspect and end the store's connections."""
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def app_name(request: pytest.FixtureRequest) -> str:
    """An application_name unique to this test, to find its store's connections."""
    return f"kelpie-test-{os.getpid()}-{request.node.name}"[:63]


def backends(admin: psycopg.Connection[tuple[object, ...]], app_name: str) -> list[int]:
    rows = admin.execute(
        "SELECT pid FROM pg_stat_activity WHERE application_name = %s", (app_name,)
    ).fetchall()
    return [int(str(row[0])) for row in rows]


def wait_for_no_backends(admin: psycopg.Connection[tuple[object, ...]], app_name: str) -> bool:
    """Whether every server connection of `app_name` is gone within 5 s (backends exit
    a moment after their client closes the socket)."""
    for _ in range(500):
        if not backends(admin, app_name):
            return True
        time.sleep(0.01)
    return False


def terminate(admin: psycopg.Connection[tuple[object, ...]], app_name: str) -> int:
    """Ends every server connection of `app_name` (as an administrator or a crash would)."""
    pids = backends(admin, app_name)
    for pid in pids:
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    return len(pids)


def run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn)


async def put(store: Store, pairs: dict[bytes, bytes]) -> None:
    async with store.transaction() as tr:
        for key, value in pairs.items():
            tr.set(key, value)
        await tr.commit()


# -- the pool ----------------------------------------------------------------------------


def test_pool_bounds_concurrent_transactions(
    postgres_url: str,
    postgres_new_table: NewTable,
    admin: psycopg.Connection[tuple[object, ...]],
    app_name: str,
) -> None:
    """Runs 12 concurrent transactions on 3 connections: the rest wait their turn."""
    url = with_param(postgres_url, "application_name", app_name)
    seen_on_server: list[int] = []

    async def main() -> None:
        store = await PostgresStore.open(url, pool_size=3, table=postgres_new_table())
        try:

            async def client(i: int) -> None:
                async def body(tr: Transaction) -> None:
                    await tr.get(b"k%d" % i)
                    await trio.sleep(0.02)  # hold the connection a while
                    seen_on_server.append(len(backends(admin, app_name)))
                    tr.set(b"k%d" % i, b"v")

                # New keys on one index page: SSI's page-level locks may refuse some.
                await transact(store, body, rng=Rng(i))

            async with trio.open_nursery() as nursery:
                for i in range(12):
                    nursery.start_soon(client, i)
            stats = store.pool_stats()
            assert stats.in_use_max == 3, stats
            assert stats.in_use == 0 and stats.open == 3, stats
            async with store.transaction() as tr:
                assert len(await tr.get_range(b"k", b"l")) == 12
        finally:
            await store.aclose()

    run(main)
    assert len(seen_on_server) >= 12 and max(seen_on_server) <= 3, seen_on_server
    assert wait_for_no_backends(admin, app_name), "aclose() left connections open"


def test_server_ended_connections_give_typed_errors_and_the_pool_recovers(
    postgres_url: str,
    postgres_new_table: NewTable,
    admin: psycopg.Connection[tuple[object, ...]],
    app_name: str,
) -> None:
    """Gives StorageUnavailable on a read and CommitUnknownResult on a commit, then recovers."""
    url = with_param(postgres_url, "application_name", app_name)

    async def main() -> None:
        store = await PostgresStore.open(url, pool_size=2, table=postgres_new_table())
        try:
            await put(store, {b"a": b"1"})

            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                assert terminate(admin, app_name) == 1
                with pytest.raises(StorageUnavailable, match="PostgreSQL is unavailable"):
                    await tr.get(b"b")
                with pytest.raises(StorageUnavailable):  # the transaction stays failed
                    await tr.get(b"a")

            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                tr.set(b"a", b"2")
                terminate(admin, app_name)
                with pytest.raises(CommitUnknownResult, match="may or may not"):
                    await tr.commit()
            assert store.pool_stats().open == 0, "broken connections are not kept"

            # The pool opens new connections, and the value is what it was.
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                tr.set(b"a", b"3")
                await tr.commit()
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"3"
        finally:
            await store.aclose()

    run(main)


def test_a_first_read_on_a_dead_idle_connection_is_retried(
    postgres_url: str,
    postgres_new_table: NewTable,
    admin: psycopg.Connection[tuple[object, ...]],
    app_name: str,
) -> None:
    """Runs the first statement on a new connection when the idle one died meanwhile."""
    url = with_param(postgres_url, "application_name", app_name)

    async def main() -> None:
        store = await PostgresStore.open(url, pool_size=2, table=postgres_new_table())
        try:
            await put(store, {b"a": b"1"})
            assert store.pool_stats().open == 1
            assert terminate(admin, app_name) == 1  # the idle one
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                tr.set(b"a", b"2")
                await tr.commit()
            # A blind write's first statement is its commit; the dead connection fails
            # at BEGIN, before anything was sent, so it too goes through.
            terminate(admin, app_name)
            attempts: list[StorageError] = []

            async def blind(tr: Transaction) -> None:
                tr.set(b"b", b"1")

            await transact(store, blind, rng=Rng(1), on_retry=lambda e, _: attempts.append(e))
            assert attempts == []
            async with store.transaction() as tr:
                assert await tr.get_range(b"a", b"c") == [(b"a", b"2"), (b"b", b"1")]
        finally:
            await store.aclose()

    run(main)


def test_a_closed_store_refuses_new_transactions(
    postgres_url: str, postgres_new_table: NewTable
) -> None:
    """Raises StorageError from the first operation of a transaction of a closed store."""

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, table=postgres_new_table())
        await store.aclose()
        await store.aclose()  # idempotent
        async with store.transaction() as tr:
            with pytest.raises(StorageError, match="store is closed"):
                await tr.get(b"a")

    run(main)


def test_concurrent_reads_share_the_transactions_connection(
    postgres_url: str, postgres_new_table: NewTable
) -> None:
    """Answers reads from several tasks of one transaction, one at a time on one connection."""

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, table=postgres_new_table())
        try:
            await put(store, {b"k%02d" % i: b"%d" % i for i in range(20)})
            got: dict[int, bytes | None] = {}
            async with store.transaction() as tr:

                async def read(i: int) -> None:
                    got[i] = await tr.get(b"k%02d" % i)

                async with trio.open_nursery() as nursery:
                    for i in range(20):
                        nursery.start_soon(read, i)
                await tr.commit()
            assert got == {i: b"%d" % i for i in range(20)}
            assert store.pool_stats().in_use_max == 1
        finally:
            await store.aclose()

    run(main)


def test_a_cancelled_read_closes_its_connection(
    postgres_url: str,
    postgres_new_table: NewTable,
    admin: psycopg.Connection[tuple[object, ...]],
) -> None:
    """Closes the connection of a read cancelled while the server works on it; the pool goes on."""
    table = postgres_new_table()

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, pool_size=2, table=table)
        try:
            await put(store, {b"a": b"1"})
            schema, name = table.split(".")
            with admin.transaction():
                admin.execute(f'LOCK TABLE "{schema}"."{name}" IN ACCESS EXCLUSIVE MODE')
                async with store.transaction() as tr:
                    with trio.move_on_after(0.3) as scope:
                        await tr.get(b"a")  # waits for the lock
                    assert scope.cancelled_caught
            assert store.pool_stats().open == 0
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
        finally:
            await store.aclose()

    run(main)


# -- serializable snapshot isolation -----------------------------------------------------


def test_write_skew_is_a_conflict(postgres_url: str, postgres_new_table: NewTable) -> None:
    """Refuses the second of two transactions that each read both keys and wrote one."""

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, table=postgres_new_table())
        try:
            await put(store, {b"on_call/alice": b"1", b"on_call/bob": b"1"})
            async with store.transaction() as t1, store.transaction() as t2:
                for tr, me in ((t1, b"alice"), (t2, b"bob")):
                    on_call = await tr.get_range(b"on_call/", b"on_call0")
                    assert len(on_call) == 2  # someone else is on call: I may leave
                    tr.set(b"on_call/" + me, b"0")
                await t1.commit()
                with pytest.raises(Conflict, match="40001"):
                    await t2.commit()
            async with store.transaction() as tr:
                assert await tr.get(b"on_call/bob") == b"1"
        finally:
            await store.aclose()

    run(main)


def test_phantom_insert_is_a_conflict(postgres_url: str, postgres_new_table: NewTable) -> None:
    """Refuses a transaction whose range read gained a key that another one committed."""

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, table=postgres_new_table())
        try:
            await put(store, {b"a": b"", b"z": b""})
            async with store.transaction() as t1, store.transaction() as t2:
                assert await t1.get_range(b"m", b"n") == []
                assert await t2.get_range(b"m", b"n") == []
                t1.set(b"m1", b"1")
                t2.set(b"m2", b"2")
                await t1.commit()
                with pytest.raises(Conflict):
                    await t2.commit()
        finally:
            await store.aclose()

    run(main)


def test_read_only_commit_ends_the_server_transaction(
    postgres_url: str, postgres_new_table: NewTable
) -> None:
    """Commits a transaction that only read, so its connection goes back idle."""

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, pool_size=1, table=postgres_new_table())
        try:
            await put(store, {b"a": b"1"})
            for _ in range(3):
                async with store.transaction() as tr:
                    assert await tr.get(b"a") == b"1"
                    await tr.commit()
                async with store.transaction() as tr:
                    assert await tr.get(b"a") == b"1"  # abandoned: rolled back
            assert store.pool_stats().open == 1
        finally:
            await store.aclose()

    run(main)


# -- keys, tables, the clock -------------------------------------------------------------


def test_keys_longer_than_a_btree_entry(postgres_url: str, postgres_new_table: NewTable) -> None:
    """Stores incompressible 10,000-byte keys, and orders keys that share 1,024+ bytes."""
    rng = Rng(7)
    prefix = bytes(rng.randrange(1, 255) for _ in range(3000))
    keys = sorted(prefix + bytes([b]) * n for b, n in ((1, 1), (2, 5000), (200, 2), (3, 7000)))
    random_key = bytes(rng.randrange(0, 255) for _ in range(10_000))

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, table=postgres_new_table())
        try:
            await put(store, {key: b"%d" % len(key) for key in [*keys, random_key]})
            async with store.transaction() as tr:
                assert await tr.get(random_key) == b"10000"
                rows = await tr.get_range(prefix, prefix + b"\xff")
                assert [k for k, _ in rows] == keys
                rows = await tr.get_range(prefix, prefix + b"\xff", reverse=True, limit=2)
                assert [k for k, _ in rows] == keys[::-1][:2]
                tr.clear_range(keys[1], keys[3])
                tr.clear(random_key)
                await tr.commit()
            async with store.transaction() as tr:
                rows = await tr.get_range(prefix, prefix + b"\xff")
                assert [k for k, _ in rows] == [keys[0], keys[3]]
                assert await tr.get(random_key) is None
        finally:
            await store.aclose()

    run(main)


def test_stores_in_separate_tables_are_separate(
    postgres_url: str, postgres_new_table: NewTable
) -> None:
    """Keeps two stores on one database apart, and opening one table twice at once is fine."""
    table = postgres_new_table()

    async def main() -> None:
        stores: list[PostgresStore] = []

        async def open_into(name: str) -> None:
            stores.append(await PostgresStore.open(postgres_url, table=name))

        async with trio.open_nursery() as nursery:
            for name in (table, table, postgres_new_table()):
                nursery.start_soon(open_into, name)
        try:
            same = [s for s in stores if s.table == table]
            other = next(s for s in stores if s.table != table)
            await put(same[0], {b"k": b"1"})
            async with same[1].transaction() as tr:
                assert await tr.get(b"k") == b"1"
            async with other.transaction() as tr:
                assert await tr.get(b"k") is None
        finally:
            for store in stores:
                await store.aclose()

    run(main)


def test_read_version_is_the_servers_clock(postgres_url: str, postgres_new_table: NewTable) -> None:
    """Gives one version per transaction, in microseconds, rising from one to the next."""

    async def main() -> None:
        store = await PostgresStore.open(postgres_url, table=postgres_new_table())
        try:
            versions = []
            for _ in range(3):
                async with store.transaction() as tr:
                    first = await tr.read_version()
                    await trio.sleep(0.002)
                    assert await tr.read_version() == first
                    tr.set(b"k", b"v")
                    await tr.commit()
                versions.append(first)
            assert versions == sorted(versions) and len(set(versions)) == 3
            async with store.transaction() as tr:
                await tr.get(b"k")
                later = await tr.read_version()
            assert later - versions[-1] >= 2_000  # at least the 2 ms slept, in microseconds
            assert 1.6e15 < later < 4.1e15  # microseconds since 1970: 2020 to 2100
        finally:
            await store.aclose()

    run(main)


# -- bad arguments -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "mysql://user:s3cret@host/db",
        "postgresql://user:s3cret%zz@host/db",
        "postgresql://user:s3cret@host:notaport/db",
        "host=h password=s3cret dbname",
        "",
    ],
)
def test_a_malformed_url_is_a_config_error_without_the_password(url: str) -> None:
    """Raises ConfigError naming the URL, with its password masked."""

    async def main() -> None:
        with pytest.raises(ConfigError, match="URL") as caught:
            await PostgresStore.open(url)
        assert "s3cret" not in str(caught.value)

    run(main)


def test_an_unreachable_server_is_unavailable_without_the_password() -> None:
    """Raises StorageUnavailable naming the URL, with its password masked."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens here once the socket closes
    url = f"postgresql://kelpie:s3cret@127.0.0.1:{port}/kelpie?connect_timeout=2"

    async def main() -> None:
        with pytest.raises(StorageUnavailable, match="cannot connect") as caught:
            await PostgresStore.open(url)
        message = str(caught.value)
        assert "s3cret" not in message
        assert f"postgresql://kelpie:***@127.0.0.1:{port}/kelpie" in message

    run(main)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pool_size": 0}, "pool_size"),
        ({"pool_size": True}, "pool_size"),
        ({"table": "kelpie kv"}, "table"),
        ({"table": "a.b.c"}, "table"),
        ({"table": "1abc"}, "table"),
        ({"table": 'x"; DROP TABLE y; --'}, "table"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, object], match: str) -> None:
    """Raises ConfigError naming the argument, before connecting."""

    async def main() -> None:
        with pytest.raises(ConfigError, match=match):
            await PostgresStore.open("postgresql://nobody@127.0.0.1:1/x", **kwargs)  # type: ignore[arg-type]

    run(main)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("postgresql://u:pw@h:5432/db", "postgresql://u:***@h:5432/db"),
        ("postgresql://u@h/db?password=pw&x=1", "postgresql://u@h/db?password=***&x=1"),
        ("host=h password='p w' dbname=d", "host=h password=*** dbname=d"),
        ("postgresql://h/db", "postgresql://h/db"),
    ],
)
def test_redact_masks_passwords(url: str, shown: str) -> None:
    """Masks the password of URL and key=value connection strings."""
    assert redact(url) == shown
