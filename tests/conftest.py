"""Shared fixtures: a real PostgreSQL server for the postgres backend and the cluster tests.

`postgres_url` is a libpq URL of a PostgreSQL server for the whole session:
KELPIE_POSTGRES_URL when set, otherwise a throwaway cluster that
tests/_pgserver.py creates and starts (as the `postgres` OS user when we
are root) and removes at the end. When no server can be started, the tests that
need one are skipped with the reason, except under CI=true, where that is a
failure: CI must really run them (.ci/run installs PostgreSQL).

`postgres_server` is the throwaway server itself (None when KELPIE_POSTGRES_URL
is used), for tests that need its data directory or pid.

Tests share the server, so each store uses its own table: `postgres_new_table()`
gives a fresh name in a schema of this session, dropped when the session ends.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import NoReturn

import psycopg
import pytest
from _pgserver import PgServer, PgUnavailable
from psycopg import sql

#: Where tests that share a server keep their tables; dropped at the end of the session.
TEST_SCHEMA = f"kelpie_test_{os.getpid()}"

_table_numbers = itertools.count(1)


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but no PostgreSQL server for the postgres tests: {reason}")
    pytest.skip(f"no PostgreSQL server (set KELPIE_POSTGRES_URL, or install it): {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer | None]:
    """The session's throwaway server, or None when KELPIE_POSTGRES_URL names one."""
    if os.environ.get("KELPIE_POSTGRES_URL"):
        yield None
        return
    try:
        server = PgServer.start()
    except PgUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PgServer | None) -> Iterator[str]:
    """A libpq URL of a PostgreSQL server for this session (see the module docstring)."""
    url = os.environ.get("KELPIE_POSTGRES_URL") or (postgres_server and postgres_server.url)
    assert url
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(TEST_SCHEMA))
            )
    except psycopg.OperationalError as exc:
        _unavailable(f"cannot connect to KELPIE_POSTGRES_URL: {exc}")
    try:
        yield url
    finally:
        with psycopg.connect(url, autocommit=True, connect_timeout=10) as conn:
            conn.execute(
                sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(TEST_SCHEMA))
            )


@pytest.fixture
def postgres_new_table(postgres_url: str) -> Callable[[], str]:
    """A function that returns a table name ("schema.name") nobody else in this session has."""

    def new_table() -> str:
        return f"{TEST_SCHEMA}.t{next(_table_numbers)}"

    return new_table
