"""The postgres backend: the contract on PostgreSQL, for nodes that share one store.

Layout
    One table (default `kelpie_kv`; a name or schema.name, so several stores can
    share a database) holds every pair:

        head   bytea  the key's first 1,024 bytes
        digest bytea  the key's SHA-256
        key    bytea
        value  bytea
        PRIMARY KEY (head, digest)

    A btree entry holds at most about 2,700 bytes and keys may be 10,000, so the
    index holds the key's head and digest instead of the key (the client computes
    both). Truncation keeps byte order (a <= b implies a[:n] <= b[:n]), so
    `ORDER BY head, key` is key order, served by the index with an incremental
    sort that only ever sorts keys sharing their first 1,024 bytes. `open()`
    creates the schema and table when missing, under an advisory lock so that
    stores opening at once do not race.

Isolation
    Every transaction is SERIALIZABLE (PostgreSQL's serializable snapshot
    isolation, SSI), so `precise_conflicts` is False: SSI can let through a
    commit that FoundationDB's rule would refuse (when a serial order still
    exists) and can refuse one it would allow (its predicate locks cover index
    pages, not exact ranges, so two transactions that insert new keys next to
    each other may conflict, and a blind write to a row that a concurrent
    transaction changed fails too). SQLSTATE 40001 (serialization_failure) and
    40P01 (deadlock_detected) become `Conflict` whichever statement they come
    from: a read may raise `Conflict` too, and every later operation of that
    transaction raises it again. Connections run with sequential and bitmap
    scans disabled, so reads lock index pages rather than the whole table
    (which would make every concurrent write a conflict).

Snapshot reads
    SSI tracks every read of a transaction; there is no untracked read. A read
    with `snapshot=True` adds no read-conflict range on the client, but
    PostgreSQL still takes its predicate locks, so it may take part in a
    serialization failure: a spurious, retryable `Conflict`, which the contract
    allows.

Round trips, and why no thread per call
    The backend drives libpq through psycopg's `pq` layer in non-blocking
    pipeline mode and waits for the connection's socket with trio
    (`trio.lowlevel.wait_readable`), so a statement costs one round trip and
    no thread. (A worker thread per call, `trio.to_thread.run_sync`, measured
    0.4-0.5x the throughput of a raw psycopg loop here: each hop costs about
    60 µs of CPU plus GIL hand-offs; this way the backend matches the raw
    loop.) Only opening a connection, which blocks in DNS, TCP and
    authentication, runs on a worker thread. Statements are prepared once per
    connection and take binary parameters and results.

    Each read is one round trip; the transaction's first statement carries
    BEGIN ISOLATION LEVEL SERIALIZABLE in the same message, and the snapshot is
    the one PostgreSQL takes at that first statement. Writes wait in the
    client (BufferedTransaction), and `commit()` sends them in one message: a
    DELETE per cleared range, one DELETE for the cleared keys, one multi-row
    upsert (bytea arrays), then COMMIT. A transaction that only read commits in
    one more round trip (SSI vouches for what a transaction read only once it
    commits); one that is abandoned rolls back in one round trip.

The store's clock
    `read_version()` is the server's clock at the start of the PostgreSQL
    transaction (`transaction_timestamp()`), in microseconds since the Unix
    epoch: one clock for every node that shares the server. A transaction that
    starts after another committed begins on the server after it, so its version
    is not lower, unless the server's own wall clock is stepped backwards (keep
    it disciplined by NTP slewing, as any database host should be).

Connections
    A bounded pool of at most `pool_size` connections, opened when first
    needed and kept idle afterwards. A transaction takes one at its first
    operation and holds it until it commits or closes; a transaction that finds
    every connection busy waits (trio.Semaphore, first come first served). A
    connection that broke is closed and forgotten. When a transaction's first
    statement fails because its idle connection died meanwhile (the server
    restarted, an administrator ended it), the backend runs that statement
    again on a new connection: nothing of the transaction had reached the
    server (a commit that is also the first statement sends BEGIN alone first,
    so this holds for it too). Each connection sets statement_timeout to the
    5 s transaction limit (no statement can be useful longer) and
    idle_in_transaction_session_timeout to 60 s, so a transaction that is never
    closed cannot hold its locks forever; a server that does not answer within
    BATCH_TIMEOUT_S (10 s) counts as lost.

Errors
    40001, 40P01: `Conflict`. The connection lost (or ended by the server)
    during `commit()`: `CommitUnknownResult`, since the COMMIT may have been
    applied. Lost elsewhere, a server shutting down or starting up, a statement
    timeout, or any other operational error (SQLSTATE classes 08, 53, 57, 58):
    `StorageUnavailable`. Anything else the server refuses (a dropped table,
    missing privileges) is a `StorageError` naming the SQLSTATE. At `open()`, a
    malformed URL is a `ConfigError` and a server that cannot be reached is
    `StorageUnavailable`; both name the URL with its password masked.

Cancellation
    A task cancelled while it waits for the server closes its connection (a
    statement half sent or half answered leaves it unusable); the server then
    rolls the transaction back, or, if the COMMIT had already arrived, commits
    it: the outcome of a cancelled commit is unknown, as the contract says.
    Connections are given back (rolling back an unfinished transaction) under
    a shield, bounded by BATCH_TIMEOUT_S.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import struct
from collections.abc import Sequence
from typing import Any

import attrs
import psycopg
import trio
from psycopg import pq
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from kelpie.core import ConfigError
from kelpie.storage._api import KeyValue, Store
from kelpie.storage._buffered import BufferedTransaction, KeyRange, Mutations
from kelpie.storage._errors import (
    CommitUnknownResult,
    Conflict,
    StorageError,
    StorageUnavailable,
)
from kelpie.storage._limits import TRANSACTION_DURATION_MAX_MS

#: How many leading bytes of a key the index holds (see "Layout").
HEAD_SIZE_BYTES = 1024

#: The default table name.
DEFAULT_TABLE = "kelpie_kv"

#: How long opening a connection may take, unless the URL says otherwise.
CONNECT_TIMEOUT_S = 10

#: The server ends a session that sits idle inside a transaction this long.
IDLE_IN_TRANSACTION_TIMEOUT_MS = 60_000

#: SQLSTATEs that mean "retry the transaction": serialization_failure, deadlock_detected.
_CONFLICT_STATES = frozenset({"40001", "40P01"})

#: SQLSTATE classes of a server that cannot serve now: connection exception,
#: insufficient resources, operator intervention (shutdown, query canceled), system error.
_UNAVAILABLE_CLASSES = frozenset({"08", "53", "57", "58"})

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_PORT = re.compile(r"\d+(,\d+)*")
_URL_PASSWORD = re.compile(r"(://[^:/?#@]*:)([^@/?#]*)(@)")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|[^\s&]+)", re.IGNORECASE)

_OK = frozenset({pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK})
_BYTEA_OID = 17
_INT8_OID = 20
_NO_LIMIT = (1 << 63) - 1
_BINARY = 1


# -- URLs and names ----------------------------------------------------------------------


def redact(url: str) -> str:
    """`url` with its password (URL or key=value form, or ?password=) replaced by ***."""
    url = _URL_PASSWORD.sub(r"\1***\3", url)
    return _KV_PASSWORD.sub(r"\1***", url)


def _scrub(message: str, url: str) -> str:
    """`message` with every password that appears in `url` replaced by ***."""
    secrets = [m.group(2) for m in _URL_PASSWORD.finditer(url)]
    secrets += [m.group(2).strip("'") for m in _KV_PASSWORD.finditer(url)]
    for secret in secrets:
        if secret and secret != "***":
            message = message.replace(secret, "***")
    return message


def _parse_url(url: object) -> dict[str, str]:
    """The connection parameters of `url`, or ConfigError naming what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigError(
            f"the postgres backend needs a libpq URL such as "
            f"postgresql://user@host:5432/dbname, got {url!r}"
        )
    try:
        params = {k: str(v) for k, v in conninfo_to_dict(url).items() if v is not None}
    except psycopg.ProgrammingError as exc:
        raise ConfigError(
            f"invalid PostgreSQL URL {redact(url)!r}: {_scrub(str(exc).strip(), url)}"
        ) from None
    port = params.get("port")
    if port is not None and not _PORT.fullmatch(port):
        raise ConfigError(f"invalid PostgreSQL URL {redact(url)!r}: port {port!r} is not a number")
    return params


def _parse_table(table: object) -> tuple[str | None, str]:
    """(schema or None, table) from "table" or "schema.table", or ConfigError."""
    parts = table.split(".") if isinstance(table, str) else []
    if not 1 <= len(parts) <= 2 or not all(_IDENTIFIER.fullmatch(p) for p in parts):
        raise ConfigError(
            f"table must be a name or schema.name of letters, digits and underscores "
            f"(at most 63 each, not starting with a digit), got {table!r}"
        )
    return (parts[0], parts[1]) if len(parts) == 2 else (None, parts[0])


# -- statements --------------------------------------------------------------------------


@attrs.frozen
class _Statement:
    """A statement prepared on every connection under `name`."""

    name: bytes
    sql: bytes
    param_types: tuple[int, ...]


@attrs.frozen
class _Statements:
    """The SQL of one store's table."""

    create: tuple[bytes, ...]
    get: _Statement
    range_asc: _Statement
    range_desc: _Statement
    version: _Statement
    clear_range: _Statement
    clear_keys: _Statement
    upsert: _Statement

    @property
    def prepared(self) -> tuple[_Statement, ...]:
        return (
            self.get,
            self.range_asc,
            self.range_desc,
            self.version,
            self.clear_range,
            self.clear_keys,
            self.upsert,
        )

    @classmethod
    def for_table(cls, schema: str | None, name: str) -> _Statements:
        # Both names match _IDENTIFIER, so quoting them needs no escaping.
        table = f'"{schema}"."{name}"' if schema else f'"{name}"'
        lock_key = f"kelpie.storage:{schema or ''}.{name}"
        in_range = "head >= $1 AND head <= $2 AND key >= $3 AND key < $4"
        bytea4 = (_BYTEA_OID,) * 4

        def stmt(label: str, text: str, param_types: tuple[int, ...] = ()) -> _Statement:
            return _Statement(f"kelpie_{label}".encode(), text.encode(), param_types)

        create = [f"SELECT pg_advisory_xact_lock(hashtext('{lock_key}'))"]
        if schema:
            create.append(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        create.append(
            f"CREATE TABLE IF NOT EXISTS {table} (head bytea NOT NULL, digest bytea NOT NULL,"
            " key bytea NOT NULL, value bytea NOT NULL, PRIMARY KEY (head, digest))"
        )
        return cls(
            create=tuple(s.encode() for s in create),
            get=stmt(
                "get",
                f"SELECT value FROM {table} WHERE head = $1 AND digest = $2",
                (_BYTEA_OID,) * 2,
            ),
            range_asc=stmt(
                "range_asc",
                f"SELECT key, value FROM {table} WHERE {in_range} ORDER BY head, key LIMIT $5",
                (*bytea4, _INT8_OID),
            ),
            range_desc=stmt(
                "range_desc",
                f"SELECT key, value FROM {table} WHERE {in_range} "
                "ORDER BY head DESC, key DESC LIMIT $5",
                (*bytea4, _INT8_OID),
            ),
            version=stmt(
                "version", "SELECT (extract(epoch FROM transaction_timestamp()) * 1e6)::int8"
            ),
            clear_range=stmt("clear_range", f"DELETE FROM {table} WHERE {in_range}", bytea4),
            clear_keys=stmt(
                "clear_keys",
                f"DELETE FROM {table} t USING unnest($1::bytea[], $2::bytea[]) AS g(head, digest)"
                " WHERE t.head = g.head AND t.digest = g.digest",
            ),
            upsert=stmt(
                "upsert",
                f"INSERT INTO {table} (head, digest, key, value)"
                " SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bytea[], $4::bytea[])"
                " ON CONFLICT (head, digest) DO UPDATE SET value = EXCLUDED.value",
            ),
        )


def _head(key: bytes) -> bytes:
    return key[:HEAD_SIZE_BYTES]


def _digest(key: bytes) -> bytes:
    return hashlib.sha256(key).digest()


def _range_params(begin: bytes, end: bytes) -> list[bytes]:
    return [_head(begin), _head(end), begin, end]


def _bytea_array(items: Sequence[bytes]) -> bytes:
    """`items` as a one-dimensional bytea[] in PostgreSQL's binary format."""
    parts = [struct.pack("!iiIii", 1, 0, _BYTEA_OID, len(items), 1)]
    for item in items:
        parts += [struct.pack("!i", len(item)), item]
    return b"".join(parts)


# -- one connection ----------------------------------------------------------------------

#: A command of a batch: plain SQL without parameters, or a prepared statement and its
#: binary parameters.
_Command = tuple[bytes | _Statement, Sequence[bytes]]

_BEGIN: _Command = (b"BEGIN ISOLATION LEVEL SERIALIZABLE", ())
_COMMIT: _Command = (b"COMMIT", ())
_ROLLBACK: _Command = (b"ROLLBACK", ())

#: How long a batch waits for room in the socket before reading the server's replies
#: (which it must do now and then, or a server blocked on a full socket never reads).
_FLUSH_POLL_S = 0.05

#: How long a batch may wait for the server's answer before the connection counts as lost.
#: Every statement ends within statement_timeout; this catches a server or network that
#: went silent without closing the connection (which TCP alone notices only after hours).
BATCH_TIMEOUT_S = 2 * TRANSACTION_DURATION_MAX_MS / 1000


class _ServerError(Exception):
    """A batch failed; `lost` when the connection is gone with it."""

    def __init__(self, sqlstate: str | None, message: str, *, lost: bool) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.lost = lost


def _lost(exc: psycopg.Error | str) -> _ServerError:
    return _ServerError(None, " ".join(str(exc).split()), lost=True)


class _Conn:
    """A libpq connection in pipeline mode, driven by trio (see "Round trips")."""

    def __init__(self, pgconn: pq.abc.PGconn) -> None:
        self._pg = pgconn
        self._fd = pgconn.socket
        self.closed = False

    @classmethod
    def connect(
        cls, conninfo: str, setup: Sequence[bytes], prepared: Sequence[_Statement]
    ) -> _Conn:
        """Connects, runs `setup` in one transaction, prepares `prepared` (blocking: a thread)."""
        try:
            pgconn = pq.PGconn.connect(conninfo.encode())
        except psycopg.Error as exc:
            raise _lost(exc) from None
        if pgconn.status != pq.ConnStatus.OK:
            message = pgconn.get_error_message()
            pgconn.finish()
            raise _lost(message)
        try:
            session = (
                f"SET statement_timeout = {TRANSACTION_DURATION_MAX_MS};"
                f" SET idle_in_transaction_session_timeout = {IDLE_IN_TRANSACTION_TIMEOUT_MS};"
                " SET enable_seqscan = off; SET enable_bitmapscan = off;"
                " SET client_min_messages = warning; SET standard_conforming_strings = on"
            )
            _check(pgconn, pgconn.exec_(session.encode()))
            if setup:
                _check(pgconn, pgconn.exec_(b"; ".join([b"BEGIN", *setup, b"COMMIT"])))
            for stmt in prepared:
                _check(pgconn, pgconn.prepare(stmt.name, stmt.sql, stmt.param_types))
            pgconn.nonblocking = 1
            pgconn.enter_pipeline_mode()
            return cls(pgconn)
        except psycopg.Error as exc:  # libpq returned no result: the connection broke
            pgconn.finish()
            raise _lost(exc) from None
        except BaseException:
            pgconn.finish()
            raise

    @property
    def usable(self) -> bool:
        return not self.closed and self._pg.status == pq.ConnStatus.OK

    @property
    def idle(self) -> bool:
        """Whether the connection is usable and no transaction is open on it."""
        return self.usable and self._pg.transaction_status == pq.TransactionStatus.IDLE

    def close(self) -> None:
        """Closes the connection (the server rolls back an open transaction)."""
        if not self.closed:
            self.closed = True
            trio.lowlevel.notify_closing(self._fd)
            self._pg.finish()

    async def batch(self, commands: Sequence[_Command]) -> list[pq.abc.PGresult]:
        """Sends `commands` in one message and returns the last result of each.

        One round trip. The first failed command raises _ServerError once the
        server has answered the whole batch (commands after it were skipped);
        a lost connection, or no answer within BATCH_TIMEOUT_S, raises it at once.
        Cancellation closes the connection, since a batch half sent or half
        answered leaves it unusable (the server then rolls back).
        """
        try:
            return await self._exchange(commands)
        except _ServerError as exc:
            if exc.lost:
                self.close()
            raise
        except psycopg.OperationalError as exc:
            self.close()
            raise _lost(exc) from None
        except BaseException:
            self.close()
            raise

    async def _exchange(self, commands: Sequence[_Command]) -> list[pq.abc.PGresult]:
        self._send(commands)
        with trio.move_on_after(BATCH_TIMEOUT_S):
            await self._flush()
            return await self._receive(len(commands))
        raise _lost(f"no answer from the server within {BATCH_TIMEOUT_S:.0f} s")

    def _send(self, commands: Sequence[_Command]) -> None:
        for command, params in commands:
            if isinstance(command, bytes):
                self._pg.send_query_params(command, None)
            else:
                formats = [_BINARY] * len(params)
                self._pg.send_query_prepared(command.name, params, formats, _BINARY)
        self._pg.pipeline_sync()

    async def _flush(self) -> None:
        while self._pg.flush():
            with trio.move_on_after(_FLUSH_POLL_S):
                await trio.lowlevel.wait_writable(self._fd)
            self._pg.consume_input()

    async def _receive(self, count: int) -> list[pq.abc.PGresult]:
        results: list[pq.abc.PGresult] = []
        last: pq.abc.PGresult | None = None
        error: _ServerError | None = None
        while True:
            self._pg.consume_input()  # raises OperationalError once the connection is lost
            while not self._pg.is_busy():
                result = self._pg.get_result()
                if result is None:  # the end of one command's results
                    if last is None:  # a command without a result: libpq gave up on it
                        raise _lost(self._pg.get_error_message() or "the connection broke")
                    results.append(last)
                    last = None
                    continue
                if result.status == pq.ExecStatus.PIPELINE_SYNC:
                    if error is not None:
                        raise error
                    assert len(results) == count, (len(results), count)
                    return results
                if error is None and result.status not in _OK:
                    error = _error_of(self._pg, result)
                last = result
            if self._pg.status != pq.ConnStatus.OK:
                raise _lost(self._pg.get_error_message() or "the connection broke")
            await trio.lowlevel.wait_readable(self._fd)


def _error_of(pgconn: pq.abc.PGconn, result: pq.abc.PGresult) -> _ServerError:
    if result.status == pq.ExecStatus.PIPELINE_ABORTED:
        return _ServerError(None, "skipped after an earlier error", lost=False)
    state = result.error_field(pq.DiagnosticField.SQLSTATE)
    message = result.get_error_message() or pgconn.get_error_message()
    lost = pgconn.status != pq.ConnStatus.OK
    return _ServerError(state.decode() if state else None, " ".join(message.split()), lost=lost)


def _check(pgconn: pq.abc.PGconn, result: pq.abc.PGresult) -> None:
    if result.status not in _OK:
        raise _error_of(pgconn, result)


# -- errors ------------------------------------------------------------------------------


def _storage_error(exc: _ServerError, *, committing: bool) -> StorageError:
    """The typed error for a failed batch (see "Errors" in the module docstring)."""
    state = exc.sqlstate
    if state in _CONFLICT_STATES:
        return Conflict(f"PostgreSQL refused to serialize this transaction ({state}: {exc})")
    if committing and exc.lost:
        return CommitUnknownResult(
            f"lost the connection to PostgreSQL during commit ({exc}); the commit may or "
            "may not have been applied"
        )
    if exc.lost or state is None or state[:2] in _UNAVAILABLE_CLASSES:
        where = f"{state}: " if state else ""
        return StorageUnavailable(f"PostgreSQL is unavailable ({where}{exc})")
    return StorageError(f"PostgreSQL refused the operation ({state}: {exc})")


# -- the pool ----------------------------------------------------------------------------


@attrs.frozen
class PoolStats:
    """A snapshot of a store's connection pool."""

    #: The most connections the pool opens.
    size: int
    #: Connections open now (idle and in use).
    open: int
    #: Connections held by transactions now.
    in_use: int
    #: The most connections ever held at once.
    in_use_max: int


class _Pool:
    """At most `size` connections; idle ones are kept (see "Connections")."""

    def __init__(
        self, url: str, params: dict[str, str], size: int, prepared: Sequence[_Statement]
    ) -> None:
        extra: dict[str, Any] = {}
        if "connect_timeout" not in params:
            extra["connect_timeout"] = CONNECT_TIMEOUT_S
        if "application_name" not in params:
            extra["application_name"] = "kelpie"
        self._conninfo = make_conninfo(url, **extra)
        self._url = url
        self._size = size
        self._prepared = tuple(prepared)
        self._slots = trio.Semaphore(size)
        self._idle: list[_Conn] = []
        self._in_use = 0
        self._in_use_max = 0
        self._closed = False

    @property
    def display_url(self) -> str:
        return redact(self._url)

    def stats(self) -> PoolStats:
        return PoolStats(
            size=self._size,
            open=len(self._idle) + self._in_use,
            in_use=self._in_use,
            in_use_max=self._in_use_max,
        )

    async def acquire(self, setup: Sequence[bytes] = ()) -> tuple[_Conn, bool]:
        """A connection for a transaction, and whether it was reused from the idle list.

        A new connection first runs `setup` (DDL) in one transaction.
        """
        self._check_open()
        await self._slots.acquire()
        try:
            self._check_open()
            reused = bool(self._idle)
            conn = self._idle.pop() if reused else await self._connect(setup)
        except BaseException:
            self._slots.release()
            raise
        self._in_use += 1
        self._in_use_max = max(self._in_use_max, self._in_use)
        return conn, reused

    def _check_open(self) -> None:
        if self._closed:
            raise StorageError("the store is closed; open a new one")

    async def replace(self, conn: _Conn) -> _Conn:
        """A new connection in place of `conn` (which broke), in the same slot.

        If no new connection can be opened, the slot is given back and
        StorageUnavailable raised: the caller then holds nothing.
        """
        conn.close()
        try:
            return await self._connect(())
        except BaseException:
            self._in_use -= 1
            self._slots.release()
            raise

    async def _connect(self, setup: Sequence[bytes]) -> _Conn:
        try:
            return await trio.to_thread.run_sync(
                _Conn.connect, self._conninfo, setup, self._prepared
            )
        except _ServerError as exc:
            if exc.lost:
                raise StorageUnavailable(
                    f"cannot connect to PostgreSQL at {self.display_url}: "
                    f"{_scrub(str(exc), self._url)}"
                ) from None
            # Connected, but the table or its statements were refused (privileges, a
            # dropped table): typed by SQLSTATE.
            error = _storage_error(exc, committing=False)
            raise type(error)(f"cannot use PostgreSQL at {self.display_url}: {error}") from None

    async def release(self, conn: _Conn, *, commit: bool = False) -> None:
        """Gives `conn` back, first ending its transaction (one round trip, if it has one).

        With `commit`, a COMMIT error is raised once the connection is given back;
        without, a failed ROLLBACK is not an error. A connection that broke, or is
        still inside a transaction, is closed instead of kept.
        """
        try:
            if conn.usable and not conn.idle:
                with trio.CancelScope(shield=True):
                    await _end(conn, commit=commit)
        except _ServerError:
            if commit:
                raise
        finally:
            self._in_use -= 1
            self._slots.release()
            if conn.idle and not self._closed:
                self._idle.append(conn)
            else:
                conn.close()

    async def aclose(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()
        await trio.lowlevel.checkpoint()


async def _end(conn: _Conn, *, commit: bool) -> None:
    """COMMIT (checking that it did commit) or ROLLBACK the connection's transaction."""
    if not commit:
        await conn.batch([_ROLLBACK])
        return
    status = (await conn.batch([_COMMIT]))[0].command_status
    if status != b"COMMIT":  # the server rolled back a transaction that had failed
        raise _ServerError("40001", f"COMMIT answered {status!r}", lost=False)


# -- the store ---------------------------------------------------------------------------


class PostgresStore(Store):
    """A store on a PostgreSQL table (see the module docstring). Open it with `open()`."""

    backend = "postgres"
    precise_conflicts = False

    def __init__(self, pool: _Pool, statements: _Statements, table: str) -> None:
        self._pool = pool
        self._stmts = statements
        #: The table this store keeps its pairs in.
        self.table = table

    @classmethod
    async def open(
        cls, url: str, *, pool_size: int = 16, table: str = DEFAULT_TABLE
    ) -> PostgresStore:
        """Connects to `url` (a libpq URL or key=value string), creating the table if missing.

        `table` ("name" or "schema.name") lets several stores share one database.
        Raises ConfigError for a malformed URL or argument, StorageUnavailable when
        the server cannot be reached; both name the URL without its password.
        """
        params = _parse_url(url)
        if not isinstance(pool_size, int) or isinstance(pool_size, bool) or pool_size < 1:
            raise ConfigError(f"pool_size must be an integer >= 1, got {pool_size!r}")
        schema, name = _parse_table(table)
        stmts = _Statements.for_table(schema, name)
        pool = _Pool(url, params, pool_size, stmts.prepared)
        try:
            conn, _ = await pool.acquire(setup=stmts.create)
            await pool.release(conn)
        except BaseException:
            await pool.aclose()
            raise
        return cls(pool, stmts, table)

    def transaction(self) -> PostgresTransaction:
        return PostgresTransaction(self._pool, self._stmts)

    def pool_stats(self) -> PoolStats:
        """How many connections are open and in use (for monitoring and tests)."""
        return self._pool.stats()

    async def aclose(self) -> None:
        """Closes every idle connection; those still held close when their transaction ends."""
        await self._pool.aclose()


class PostgresTransaction(BufferedTransaction):
    """A transaction of a PostgresStore: one SERIALIZABLE PostgreSQL transaction."""

    def __init__(self, pool: _Pool, statements: _Statements) -> None:
        super().__init__()
        self._pool = pool
        self._stmts = statements
        self._conn: _Conn | None = None
        self._reused = False  # whether _conn came from the idle list
        self._begun = False  # whether BEGIN has been sent
        self._failure: StorageError | None = None
        # One connection answers one batch at a time; tasks that share this transaction
        # (concurrent reads are allowed) take turns.
        self._lock = trio.Lock()

    async def _run(self, commands: list[_Command], *, committing: bool = False) -> pq.abc.PGresult:
        """Runs `commands` (after BEGIN, for the first) and returns the last one's result."""
        async with self._lock:
            return await self._run_locked(commands, committing=committing)

    async def _run_locked(self, commands: list[_Command], *, committing: bool) -> pq.abc.PGresult:
        if self._failure is not None:
            raise self._failure
        if self._conn is None:
            self._conn, self._reused = await self._pool.acquire()
        if self._begun:
            return await self._batch(commands, committing=committing)
        if committing and self._reused:
            # A commit that is also the first statement: send BEGIN alone first, so that
            # a connection that died while idle fails before any write was sent.
            await self._batch([_BEGIN], committing=False)
            return await self._batch(commands, committing=True)
        return await self._batch([_BEGIN, *commands], committing=committing)

    async def _batch(self, commands: list[_Command], *, committing: bool) -> pq.abc.PGresult:
        conn = self._conn
        assert conn is not None
        first = not self._begun
        self._begun = True
        try:
            return (await conn.batch(commands))[-1]
        except _ServerError as exc:
            if first and exc.lost and self._reused and commands[-1] is not _COMMIT:
                # The idle connection had died; nothing of this transaction reached the
                # server (no COMMIT was sent), so it starts over on a new connection.
                self._reused = False
                self._begun = False
                self._conn = None
                self._conn = await self._pool.replace(conn)
                return await self._batch(commands, committing=committing)
            self._failure = _storage_error(exc, committing=committing)
            if conn.usable and not conn.idle:
                with trio.CancelScope(shield=True), contextlib.suppress(_ServerError):
                    await conn.batch([_ROLLBACK])
            raise self._failure from None

    async def _snapshot_get(self, key: bytes) -> bytes | None:
        result = await self._run([(self._stmts.get, [_head(key), _digest(key)])])
        return result.get_value(0, 0) if result.ntuples else None

    async def _snapshot_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        stmt = self._stmts.range_desc if reverse else self._stmts.range_asc
        params = [*_range_params(begin, end), struct.pack("!q", limit or _NO_LIMIT)]
        result = await self._run([(stmt, params)])
        rows: list[KeyValue] = []
        for i in range(result.ntuples):
            key, value = result.get_value(i, 0), result.get_value(i, 1)
            assert key is not None and value is not None
            rows.append((key, value))
        return rows

    async def _snapshot_version(self) -> int:
        value = (await self._run([(self._stmts.version, [])])).get_value(0, 0)
        assert value is not None
        return int(struct.unpack("!q", value)[0])

    async def _commit_writes(self, mutations: Mutations, read_conflicts: list[KeyRange]) -> None:
        # PostgreSQL tracks what this transaction read itself (SSI's predicate locks),
        # so the client's read-conflict ranges are not sent.
        del read_conflicts
        result = await self._run(_write_commands(self._stmts, mutations), committing=True)
        if result.command_status != b"COMMIT":
            raise Conflict(f"PostgreSQL rolled the transaction back ({result.command_status!r})")

    async def _commit_read_only(self) -> None:
        """Sends COMMIT if the transaction read anything: SSI vouches for what a transaction
        read only once its COMMIT succeeds (and may raise Conflict there)."""
        if self._conn is None:
            await trio.lowlevel.checkpoint()
            return
        await self._give_back(commit=True)

    async def _release(self) -> None:
        await self._give_back(commit=False)

    async def _give_back(self, *, commit: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        with trio.CancelScope(shield=True):
            if commit and self._failure is not None:
                await self._pool.release(conn, commit=False)
                raise self._failure
            try:
                await self._pool.release(conn, commit=commit)
            except _ServerError as exc:
                self._failure = _storage_error(exc, committing=commit)
                raise self._failure from None


def _write_commands(stmts: _Statements, mutations: Mutations) -> list[_Command]:
    """The statements that apply `mutations`, then COMMIT."""
    commands: list[_Command] = [
        (stmts.clear_range, _range_params(start, end)) for start, end in mutations.cleared
    ]
    gone = [key for key, value in mutations.sets if value is None]
    if gone:
        heads = _bytea_array([_head(key) for key in gone])
        commands.append((stmts.clear_keys, [heads, _bytea_array([_digest(k) for k in gone])]))
    sets = [(key, value) for key, value in mutations.sets if value is not None]
    if sets:
        params = [
            _bytea_array([_head(key) for key, _ in sets]),
            _bytea_array([_digest(key) for key, _ in sets]),
            _bytea_array([key for key, _ in sets]),
            _bytea_array([value for _, value in sets]),
        ]
        commands.append((stmts.upsert, params))
    commands.append(_COMMIT)
    return commands
