"""The sqlite backend: the embedded, durable default store (one file, WAL, synchronous=FULL).

`await SqliteStore.open(path)` opens (or creates) one SQLite file. Several
stores, in one process or in several processes on one machine, may share a
file: together they behave as one strictly serializable store.

The file
    kv(key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID: the data, and nothing
    else. SQLite orders BLOBs bytewise (memcmp, then length), which is the
    contract's key order. The file is marked with an application id and a
    format number (`PRAGMA application_id`, `user_version`); opening any other
    SQLite file, or a file of another format, is a `ConfigError`.

Snapshots
    A transaction reads from one SQLite read transaction on a pooled connection
    (`BEGIN`, then a one-row read, which fixes the WAL snapshot), held until
    the transaction ends. The snapshot is taken when the transaction is
    created, as in the memory backend, unless all `connections_max`
    connections are in use or a WAL reset is pending (see The WAL): then the
    transaction waits at its first operation and takes its snapshot there
    (still inside its lifetime, so strict serializability holds).

Conflicts: reads validated by value (`precise_conflicts` is False)
    The transaction records every read that guards its commit: what each point
    read and each range read returned from the store, trimmed to the part it
    scanned (`BufferedTransaction.snapshot_reads`). `commit()` first tries to
    upgrade its own read transaction to a write transaction by writing. SQLite
    allows that only if nothing was committed since the snapshot, so nothing
    read can have changed and the writes go straight in: the common case costs
    exactly the statements of a hand-written read-modify-write. Otherwise
    (SQLITE_BUSY_SNAPSHOT, or another connection holds the write lock) it rolls
    back, takes the write lock with `BEGIN IMMEDIATE`, and reads everything it
    read again: if any read now returns something else, `Conflict`, and nothing
    is written; if not, the transaction's reads hold at this instant, under the
    lock, so committing it here is committing it as if it had run entirely
    now, which is serializable, and strictly so (the instant lies within its
    life). This differs from FoundationDB's rule only in conflicting less: a
    write that leaves what was read unchanged (the same value written again,
    a clear that removed nothing, a change undone before the check) is no
    conflict. Each commit applies `mutations.cleared` (range deletes), then
    `mutations.sets` (upserts; None deletes), and commits: all or nothing. An
    error before SQLite's COMMIT rolls everything back; an error during COMMIT
    (an fsync that failed) leaves the outcome unknown and raises
    `CommitUnknownResult`. (An earlier design kept a resolver log of every
    commit's write ranges in the file for FoundationDB's exact rule; its extra
    page per commit cost about 15% of single-client throughput.)

The store's clock (`read_version`)
    Microseconds of the machine's wall clock, which every process sharing the
    file also reads, kept from going back within one store object: a read
    version is max(wall clock, the highest version the object handed out), a
    commit version (`committed_version`) is above every version it handed out
    before. Across store objects (processes) the versions are as monotonic as
    the wall clock: a clock stepped back makes another process's read version
    lower than an earlier commit's. Visibility and conflicts never depend on
    the clock, so no update is lost however the clock moves.

The WAL
    SQLite can restart its write-ahead log only at a moment when no read
    transaction uses it, and every Kelpie transaction holds one from start to
    commit, so under steady concurrent load the WAL would grow without bound
    (measured: 150 MB in 3 s with 16 clients). So every few commits a store
    looks at the WAL's size; past `wal_size_max_bytes` (16 MiB by default) it
    stops handing out new snapshots until its open transactions end, then
    checkpoints and truncates the WAL (`wal_checkpoint(TRUNCATE)`) and carries
    on. New transactions wait for this at most 0.1 s (an open transaction may
    belong to the very task that waits); if the reset did not happen by then,
    or a reader in another process made SQLite decline it, it is tried again
    1 s later.

Blocking and speed
    SQLite calls run inline on the trio thread, without worker threads: a read
    or a write statement takes microseconds, and a hop to a worker thread
    (~110 us) would cost more than most statements. A commit blocks the event
    loop for its fsync (about 0.1-0.2 ms on an SSD, more on slow disks), and
    about every 1,000 pages of WAL a commit also runs SQLite's passive
    checkpoint (copying pages into the database file and an fsync, a few ms).
    Lock waits never block: connections use busy_timeout=0, and when another
    process holds the write lock, the commit sleeps on trio's clock with
    jittered exponential backoff and tries again, raising `StorageUnavailable`
    after BUSY_WAIT_MAX_MS. Each async operation checkpoints once, so
    transactions of one process interleave; none yields while holding SQLite's
    write lock.

Errors
    No sqlite3 exception leaves the store. Busy, I/O, full-disk and
    out-of-memory errors raise `StorageUnavailable` (retryable); a corrupt file,
    a read-only file and anything else SQLite reports raise `SqliteError` (not
    retryable), with SQLite's message and error name. An unusable path at
    `open()` is a `ConfigError`. After a failed read a transaction refuses
    further use with the same error (its snapshot may be gone).
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import time
from collections.abc import Callable
from typing import TypeVar

import trio

from kelpie.core import ConfigError
from kelpie.storage._api import KeyValue, Store
from kelpie.storage._buffered import BufferedTransaction, KeyRange, Mutations
from kelpie.storage._errors import (
    CommitUnknownResult,
    Conflict,
    StorageError,
    StorageUnavailable,
    TransactionClosed,
)
from kelpie.storage._keys import key_after

T = TypeVar("T")

#: How long an operation waits for another process's lock before StorageUnavailable.
BUSY_WAIT_MAX_MS = 5_000

#: Connections (so transactions holding a snapshot) per store object, by default.
CONNECTIONS_MAX_DEFAULT = 16

#: Marks a Kelpie store in the SQLite header ("KLPI"), and the layout of its tables.
_APPLICATION_ID = 0x4B4C5049
_FORMAT = 2


#: Past this size, the WAL is known to have missed its resets (see "The WAL"), by default.
WAL_SIZE_MAX_BYTES_DEFAULT = 16 * 1024 * 1024
#: How long new transactions wait for a WAL reset at most; then it is tried again later.
_WAL_DRAIN_WAIT_MAX_S = 0.1
_WAL_DRAIN_RETRY_S = 1.0
#: Commits between two looks at the WAL's size.
_WAL_CHECK_COMMITS = 16


_BACKOFF_INITIAL_S = 0.000_5
_BACKOFF_MAX_S = 0.02

_SQLITE_BUSY = 5
_SQLITE_LOCKED = 6
_SQLITE_BUSY_SNAPSHOT = 517
#: Primary result codes that mean "not now": the operation may succeed if retried.
_UNAVAILABLE_CODES = frozenset(
    {
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        7,  # SQLITE_NOMEM
        9,  # SQLITE_INTERRUPT
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
        15,  # SQLITE_PROTOCOL
    }
)

_SCHEMA = (
    "CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID",
    f"PRAGMA application_id = {_APPLICATION_ID}",
    f"PRAGMA user_version = {_FORMAT}",
)
#: Per connection (connect(timeout=0) already sets busy_timeout to 0: lock waits are ours).
_CONNECTION_PRAGMAS = ("PRAGMA synchronous = FULL",)
_GET = "SELECT value FROM kv WHERE key = ?"
_RANGE = "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key LIMIT ?"
_RANGE_REVERSE = "SELECT key, value FROM kv WHERE key >= ? AND key < ? ORDER BY key DESC LIMIT ?"
_CLEAR_RANGE = "DELETE FROM kv WHERE key >= ? AND key < ?"
_PUT = "INSERT OR REPLACE INTO kv (key, value) VALUES (?, ?)"
#: A read that fixes a deferred transaction's WAL snapshot (it touches the table's root page).
_PIN = "SELECT 1 FROM kv LIMIT 1"
_DELETE = "DELETE FROM kv WHERE key = ?"


class SqliteError(StorageError):
    """SQLite reported a failure that retrying will not fix (not retryable).

    A corrupt file (SQLITE_CORRUPT, SQLITE_NOTADB), a file that became
    read-only (SQLITE_READONLY), a constraint or misuse error. The message
    carries SQLite's own message; `sqlite_errorname` its error name.
    """

    def __init__(self, message: str, sqlite_errorname: str) -> None:
        super().__init__(message)
        self.sqlite_errorname = sqlite_errorname


def _wall_us() -> int:
    return time.time_ns() // 1_000


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF


def _is_busy(exc: sqlite3.Error) -> bool:
    return _primary_code(exc) in (_SQLITE_BUSY, _SQLITE_LOCKED)


def _translate(exc: sqlite3.Error, doing: str) -> StorageError:
    """The typed error for a sqlite3 exception raised while `doing` something."""
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    message = f"SQLite failed while {doing}: {exc} ({name})"
    if _primary_code(exc) in _UNAVAILABLE_CODES:
        return StorageUnavailable(message)
    return SqliteError(message, name)


# -- the store ---------------------------------------------------------------------------


class SqliteStore(Store):
    """A store in one SQLite file (see the module docstring). Open it with `open()`."""

    backend = "sqlite"
    precise_conflicts = False  # reads are validated by value, not by write ranges

    def __init__(self, path: str, connections_max: int, wal_size_max_bytes: int) -> None:
        """Use `await SqliteStore.open(path)`; this constructor touches no file."""
        self._path = path
        self._idle: list[sqlite3.Connection] = []
        self._connections_max = connections_max
        self._slots = trio.Semaphore(connections_max)
        self._in_use = 0  # connections handed to transactions
        self._wal_path = path + "-wal"
        self._wal_size_max_bytes = wal_size_max_bytes
        self._wal_check_in = _WAL_CHECK_COMMITS  # commits until the next look at the WAL
        self._wal_drain: trio.Event | None = None  # set while new snapshots wait for a reset
        self._wal_drain_until_s = 0.0
        self._wal_drain_next_s = 0.0  # no new drain before this (trio time)
        #: WAL resets this store object carried out (for tests and benchmarks).
        self.wal_resets = 0
        self._closed = False
        self._issued = 0  # the highest read or commit version this object handed out
        self._jitter = random.Random()
        #: Commits made through this store object (for tests and benchmarks).
        self.commits = 0

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        connections_max: int = CONNECTIONS_MAX_DEFAULT,
        wal_size_max_bytes: int = WAL_SIZE_MAX_BYTES_DEFAULT,
    ) -> SqliteStore:
        """Opens the store in the file at `path`, creating the file and its tables if missing.

        At most `connections_max` transactions hold a snapshot at once (more wait);
        `wal_size_max_bytes` is the WAL size that triggers a reset (see "The WAL").
        Raises ConfigError when `path` cannot hold a store (a directory, a missing
        or unwritable directory, a file that is not a Kelpie store) or a setting is
        out of range, and StorageUnavailable when another process kept the file
        locked for BUSY_WAIT_MAX_MS while it was being set up.
        """
        if connections_max < 1:
            raise ConfigError(f"connections_max must be at least 1, got {connections_max}")
        if wal_size_max_bytes < 1:
            raise ConfigError(f"wal_size_max_bytes must be positive, got {wal_size_max_bytes}")
        name = _check_path(path)
        store = cls(name, connections_max, wal_size_max_bytes)
        try:
            # Another process creating the file, or switching it to WAL, locks it briefly.
            conn = await store._until_not_busy(store._connect, "connecting")
        except sqlite3.Error as exc:
            raise _config_error(name, exc) from exc
        try:
            await store._until_not_busy(lambda: _set_up_file(conn, name), "setting up the file")
        except sqlite3.Error as exc:
            conn.close()
            raise _config_error(name, exc) from exc
        except BaseException:
            conn.close()
            raise
        store._idle.append(conn)
        return store

    @property
    def path(self) -> str:
        """The file this store lives in."""
        return self._path

    def transaction(self) -> SqliteTransaction:
        return SqliteTransaction(self)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
        self._closed = True
        idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- connections --------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self._path, timeout=0, isolation_level=None)
        try:
            for pragma in _CONNECTION_PRAGMAS:
                conn.execute(pragma)
        except BaseException:
            conn.close()
            raise
        return conn

    def _take_now(self) -> sqlite3.Connection | None:
        """A connection if one is free right now, else None (never waits)."""
        if self._closed or self._wal_drain is not None:
            return None
        try:
            self._slots.acquire_nowait()
        except trio.WouldBlock:
            return None
        try:
            conn = self._idle.pop() if self._idle else self._connect()
        except BaseException:
            self._slots.release()
            raise
        self._in_use += 1
        return conn

    async def _take(self) -> sqlite3.Connection:
        """A connection, waiting while all connections_max are in use.

        Raises StorageUnavailable if none frees up within BUSY_WAIT_MAX_MS (transactions
        are being left open somewhere), and TransactionClosed once the store is closed.
        """
        self._check_open()
        deadline = trio.current_time() + BUSY_WAIT_MAX_MS / 1_000
        while True:
            await self._wait_for_wal_reset()
            with trio.move_on_at(deadline) as waiting:
                await self._slots.acquire()
            if waiting.cancelled_caught:
                raise StorageUnavailable(
                    f"all {self._connections_max} connections to {self._path} stayed in use "
                    f"for {BUSY_WAIT_MAX_MS} ms; close finished transactions, or open the store "
                    "with a larger connections_max"
                )
            if self._wal_drain is None:
                break
            self._slots.release()  # a WAL reset began while this waited: let it finish first
        try:
            self._check_open()
            conn = self._idle.pop() if self._idle else self._connect()
        except sqlite3.Error as exc:
            self._slots.release()
            raise _translate(exc, "opening a connection") from exc
        except BaseException:
            self._slots.release()
            raise
        self._in_use += 1
        return conn

    def _give_back(self, conn: sqlite3.Connection, healthy: bool) -> None:
        self._in_use -= 1
        if not healthy or self._closed:
            conn.close()
        else:
            if self._wal_drain is not None and self._in_use == 0:
                self._reset_wal(conn)
            self._idle.append(conn)
        self._slots.release()

    def _check_open(self) -> None:
        if self._closed:
            raise TransactionClosed(f"the store at {self._path} is closed; open it again")

    # -- versions -----------------------------------------------------------------------

    def _read_version(self) -> int:
        version = max(_wall_us(), self._issued)
        self._issued = version
        return version

    def _commit_version(self) -> int:
        version = max(_wall_us(), self._issued + 1)
        self._issued = version
        return version

    # -- keeping the WAL small ----------------------------------------------------------

    def _after_commit(self) -> None:
        self.commits += 1
        self._wal_check_in -= 1
        if self._wal_check_in > 0 or self._wal_drain is not None:
            return
        self._wal_check_in = _WAL_CHECK_COMMITS
        now = trio.current_time()
        if now < self._wal_drain_next_s:
            return
        try:
            size = os.stat(self._wal_path).st_size
        except OSError:
            return
        if size > self._wal_size_max_bytes:
            # Snapshots kept overlapping, so the WAL could not restart: stop handing out
            # new ones until the open transactions end, then reset it (in _give_back).
            self._wal_drain = trio.Event()
            self._wal_drain_until_s = now + _WAL_DRAIN_WAIT_MAX_S

    async def _wait_for_wal_reset(self) -> None:
        drain = self._wal_drain
        if drain is None:
            return
        with trio.move_on_at(self._wal_drain_until_s):
            await drain.wait()
        if self._wal_drain is drain:  # open transactions did not end in time: try later
            self._end_wal_drain(retry=True)

    def _reset_wal(self, conn: sqlite3.Connection) -> None:
        """Checkpoints the whole WAL and truncates it (no transaction of ours is open).

        Best effort: a reader in another process makes SQLite decline (busy), and the
        next drain tries again.
        """
        done = False
        with contextlib.suppress(sqlite3.Error):
            (busy, _, _) = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            done = not busy
        if done:
            self.wal_resets += 1
        self._end_wal_drain(retry=not done)

    def _end_wal_drain(self, *, retry: bool) -> None:
        drain, self._wal_drain = self._wal_drain, None
        if retry:
            self._wal_drain_next_s = trio.current_time() + _WAL_DRAIN_RETRY_S
        if drain is not None:
            drain.set()

    # -- waiting for other processes ----------------------------------------------------

    async def _until_not_busy(self, op: Callable[[], T], doing: str) -> T:
        """`op()`, retried with backoff while SQLite answers busy, for up to BUSY_WAIT_MAX_MS.

        Other sqlite3 errors propagate untranslated; the caller knows what they mean.
        """
        deadline = trio.current_time() + BUSY_WAIT_MAX_MS / 1_000
        delay = _BACKOFF_INITIAL_S
        while True:
            try:
                return op()
            except sqlite3.OperationalError as exc:
                if not _is_busy(exc):
                    raise
                if trio.current_time() >= deadline:
                    raise StorageUnavailable(
                        f"the SQLite file {self._path} stayed locked by another connection "
                        f"for {BUSY_WAIT_MAX_MS} ms while {doing}; retry later"
                    ) from exc
            await trio.sleep(delay * (0.5 + self._jitter.random()))
            delay = min(delay * 2, _BACKOFF_MAX_S)


def _check_path(path: object) -> str:
    if not isinstance(path, str | os.PathLike):
        raise ConfigError(f"the SQLite store's path must be a str or a path, got {path!r}")
    name = os.fspath(path)
    if not isinstance(name, str) or name in ("", ":memory:"):
        raise ConfigError(
            f"the SQLite store needs a file path, got {name!r}; use MemoryStore for a store "
            "that lives in memory"
        )
    if os.path.isdir(name):
        raise ConfigError(f"the SQLite store's path {name} is a directory; name a file in it")
    return name


def _config_error(path: str, exc: sqlite3.Error) -> ConfigError:
    name = getattr(exc, "sqlite_errorname", None) or type(exc).__name__
    return ConfigError(
        f"cannot use {path} as a SQLite store: {exc} ({name}); the path must name a Kelpie "
        "store file, or a new file in an existing, writable directory"
    )


def _set_up_file(conn: sqlite3.Connection, path: str) -> None:
    """Switches the file to WAL and creates the tables if it is new (raises if it is foreign).

    A file that is already a store is only read, so opening never waits for writers.
    """
    (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
    if str(mode).lower() != "wal":
        raise ConfigError(f"{path}: SQLite refused WAL mode (journal mode {mode!r})")
    if _is_new_file(conn, path):
        conn.execute("BEGIN IMMEDIATE")
        try:
            if _is_new_file(conn, path):
                for statement in _SCHEMA:
                    conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise


def _is_new_file(conn: sqlite3.Connection, path: str) -> bool:
    """Whether the file is empty; raises ConfigError if it holds something else than a store."""
    (application_id,) = conn.execute("PRAGMA application_id").fetchone()
    (file_format,) = conn.execute("PRAGMA user_version").fetchone()
    (tables,) = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    if application_id == 0 and tables == 0:
        return True
    if application_id != _APPLICATION_ID:
        raise ConfigError(f"{path} is a SQLite database, but not a Kelpie store")
    if file_format != _FORMAT:
        raise ConfigError(
            f"{path} is a Kelpie store of format {file_format}; this version reads format {_FORMAT}"
        )
    return False


# -- transactions ------------------------------------------------------------------------


class SqliteTransaction(BufferedTransaction):
    """A transaction of a SqliteStore: one SQLite read snapshot, then one write transaction."""

    _release_may_wait = False  # _release never awaits: no cancel shield needed
    _records_reads = True  # validated at commit when someone committed meanwhile

    def __init__(self, store: SqliteStore) -> None:
        super().__init__()
        self._store = store
        self._conn: sqlite3.Connection | None = None
        self._reading = False  # whether the snapshot's read transaction is open
        self._commits_seen = store.commits
        self._failed: StorageError | None = None
        #: The version this transaction committed at, once it has.
        self.committed_version: int | None = None
        try:
            self._conn = store._take_now()
            if self._conn is not None:
                self._begin(self._conn)
        except sqlite3.Error:
            pass  # taken again, with waiting and typed errors, at the first operation

    # -- the snapshot -------------------------------------------------------------------

    def _begin(self, conn: sqlite3.Connection) -> None:
        conn.execute("BEGIN")  # deferred: the read below fixes the WAL snapshot
        try:
            conn.execute(_PIN).fetchall()
        except BaseException:
            _rollback(conn)
            raise
        self._reading = True

    async def _ready(self) -> sqlite3.Connection:
        """The connection, with this transaction's read transaction open (one checkpoint)."""
        await trio.lowlevel.checkpoint()
        if self._failed is not None:
            raise self._failed
        if self._reading and self._conn is not None:
            return self._conn
        try:
            if self._conn is None:
                self._conn = await self._store._take()
            conn = self._conn
            await self._store._until_not_busy(lambda: self._begin(conn), "taking a snapshot")
        except sqlite3.Error as exc:
            self._failed = _translate(exc, "taking a snapshot")
            raise self._failed from exc
        except StorageError as exc:
            self._failed = exc
            raise
        return conn

    def _fail(self, exc: sqlite3.Error, doing: str) -> StorageError:
        self._failed = _translate(exc, doing)
        return self._failed

    async def _snapshot_get(self, key: bytes) -> bytes | None:
        conn = await self._ready()
        try:
            return _get(conn, key)
        except sqlite3.Error as exc:
            raise self._fail(exc, "reading a key") from exc

    async def _snapshot_range(
        self, begin: bytes, end: bytes, limit: int, reverse: bool
    ) -> list[KeyValue]:
        conn = await self._ready()
        try:
            return _range(conn, begin, end, limit, reverse)
        except sqlite3.Error as exc:
            raise self._fail(exc, "reading a range") from exc

    async def _snapshot_version(self) -> int:
        await self._ready()
        return self._store._read_version()

    # -- the commit ---------------------------------------------------------------------

    async def _commit_writes(self, mutations: Mutations, read_conflicts: list[KeyRange]) -> None:
        await trio.lowlevel.checkpoint()
        if self._failed is not None:
            raise self._failed
        store = self._store
        conn = self._conn
        if self._reading:
            assert conn is not None
            # A commit this store made meanwhile makes the fast path fail for sure.
            if store.commits == self._commits_seen and self._commit_fast(conn, mutations):
                return
            # Someone committed after the snapshot: validate under the write lock.
            self._reading = False
            _rollback(conn)
        if conn is None:
            conn = self._conn = await store._take()
        locked = conn
        try:
            await store._until_not_busy(
                lambda: locked.execute("BEGIN IMMEDIATE"), "waiting for the write lock"
            )
        except sqlite3.Error as exc:
            raise _translate(exc, "taking the write lock") from exc
        # From here to COMMIT nothing awaits: the write lock is never held across a yield.
        try:
            self._validate(conn)
        except sqlite3.Error as exc:
            _rollback(conn)
            raise _translate(exc, "checking conflicts") from exc
        except BaseException:
            _rollback(conn)
            raise
        self._apply(conn, mutations)

    def _commit_fast(self, conn: sqlite3.Connection, mutations: Mutations) -> bool:
        """Commits on the read snapshot if nobody committed since it; False if someone did.

        SQLite upgrades a read transaction to a write transaction only when its
        snapshot is the newest, so if the first write succeeds nothing this
        transaction read can have changed.
        """
        try:
            _write(conn, mutations)
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode == _SQLITE_BUSY_SNAPSHOT or _is_busy(exc):
                return False
            _rollback(conn)
            raise _translate(exc, "starting the commit") from exc
        except sqlite3.Error as exc:
            _rollback(conn)
            raise _translate(exc, "starting the commit") from exc
        self._apply(conn, None)
        return True

    def _validate(self, conn: sqlite3.Connection) -> None:
        """Raises Conflict if anything this transaction read reads differently now."""
        for read in self.snapshot_reads:
            now: tuple[KeyValue, ...]
            if read.limit == 0 and read.end == key_after(read.begin):
                value = _get(conn, read.begin)
                now = () if value is None else ((read.begin, value),)
            else:
                now = tuple(_range(conn, read.begin, read.end, read.limit, read.reverse))
            if now != read.rows:
                raise Conflict(
                    f"what this transaction read in {read.begin[:40]!r}..{read.end[:40]!r} "
                    "was changed by a commit made after it started; retry it"
                )

    def _apply(self, conn: sqlite3.Connection, mutations: Mutations | None) -> None:
        """Writes `mutations` (if not written yet) and commits (the write lock is held)."""
        try:
            if mutations is not None:
                _write(conn, mutations)
        except sqlite3.Error as exc:
            _rollback(conn)
            raise _translate(exc, "writing") from exc
        except BaseException:
            _rollback(conn)
            raise
        version = self._store._commit_version()
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            still_open = conn.in_transaction
            _rollback(conn)
            if still_open and _is_busy(exc):
                raise _translate(exc, "committing") from exc
            raise CommitUnknownResult(
                f"SQLite failed during COMMIT, so the writes may or may not be durable: "
                f"{exc} ({getattr(exc, 'sqlite_errorname', type(exc).__name__)})"
            ) from exc
        self.committed_version = version
        self._store._after_commit()

    async def _release(self) -> None:
        conn, self._conn = self._conn, None
        self._reading = False
        if conn is None:
            return
        healthy = True
        if conn.in_transaction:
            try:
                conn.execute("ROLLBACK")
            except sqlite3.Error:
                healthy = False
        self._store._give_back(conn, healthy)


def _get(conn: sqlite3.Connection, key: bytes) -> bytes | None:
    row = conn.execute(_GET, (key,)).fetchone()
    if row is None:
        return None
    value: bytes = row[0]
    return value


def _range(
    conn: sqlite3.Connection, begin: bytes, end: bytes, limit: int, reverse: bool
) -> list[KeyValue]:
    rows: list[KeyValue] = conn.execute(
        _RANGE_REVERSE if reverse else _RANGE, (begin, end, limit or -1)
    ).fetchall()
    return rows


def _write(conn: sqlite3.Connection, mutations: Mutations) -> None:
    """Applies the cleared ranges, then the sets (a None value deletes its key)."""
    if mutations.cleared:
        conn.executemany(_CLEAR_RANGE, mutations.cleared)
    sets = mutations.sets
    if len(sets) == 1:  # the common case, without executemany's overhead
        key, value = sets[0]
        if value is None:
            conn.execute(_DELETE, (key,))
        else:
            conn.execute(_PUT, (key, value))
    elif sets:
        puts = [(key, value) for key, value in sets if value is not None]
        if puts:
            conn.executemany(_PUT, puts)
        if len(puts) < len(sets):
            conn.executemany(_DELETE, [(key,) for key, value in sets if value is None])


def _rollback(conn: sqlite3.Connection) -> None:
    """Rolls back the open transaction, if any; a failure here leaves it to _release."""
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
