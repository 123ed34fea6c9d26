"""The FoundationDB backend: the contract on a real FoundationDB cluster (API version 730).

FoundationDB is where the contract comes from, so this backend is thin: its
client already buffers writes, merges them into reads, tracks read- and
write-conflict ranges, resolves conflicts with exactly the rule of the contract
(`precise_conflicts`), and limits keys, values, transaction size and age. What
Kelpie adds here: its own key, value and range checks (so bad input gets the
same typed errors as on every backend, before anything reaches the cluster),
the mapping of FoundationDB's error codes to Kelpie's errors, and a bridge from
FDB futures to trio. Every key is stored under an optional `prefix`, so several
Kelpie deployments, or a test run, can share one cluster.

Futures are awaited without a thread: `on_ready` fires on FDB's network thread
and wakes the trio task through its trio token. Range reads page through
`get_range(...).to_list()`, which waits inside the FDB client, so they run on a
worker thread. The store's clock (`read_version`) is FoundationDB's read
version, which advances about 1,000,000 per second.

The client library (libfdb_c) and a cluster (fdbserver) do not come from PyPI;
install FoundationDB's client package and point `cluster_file` (or
KELPIE_FDB_CLUSTER_FILE for the tests) at a cluster.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any

import fdb
import trio

from kelpie.core import ConfigError
from kelpie.storage._api import KeyValue, Store, Transaction
from kelpie.storage._errors import (
    CommitUnknownResult,
    Conflict,
    InvalidRange,
    KeyTooLarge,
    StorageError,
    StorageUnavailable,
    TransactionClosed,
    TransactionTooLarge,
    TransactionTooOld,
    ValueTooLarge,
)
from kelpie.storage._keys import check_key, check_range, check_value

#: The FoundationDB API version this backend is written against (7.3).
API_VERSION = 730

#: FoundationDB error code -> Kelpie error (the codes are in FDB's error reference).
_ERRORS: dict[int, type[StorageError]] = {
    1007: TransactionTooOld,  # transaction_too_old
    1020: Conflict,  # not_committed
    1021: CommitUnknownResult,  # commit_unknown_result
    1031: TransactionTooOld,  # transaction_timed_out
    2101: TransactionTooLarge,  # transaction_too_large
    2102: KeyTooLarge,  # key_too_large
    2103: ValueTooLarge,  # value_too_large
    2005: InvalidRange,  # inverted_range
    2017: TransactionClosed,  # used_during_commit
}

_api_lock = threading.Lock()


def _select_api() -> None:
    with _api_lock:
        if fdb.is_api_version_selected():
            if fdb.get_api_version() != API_VERSION:
                raise ConfigError(
                    f"this process selected FoundationDB API {fdb.get_api_version()}; "
                    f"Kelpie needs {API_VERSION}"
                )
            return
        try:
            fdb.api_version(API_VERSION)
        except Exception as exc:  # the bindings raise a bare Exception without libfdb_c
            raise ConfigError(
                f"cannot load the FoundationDB client library (libfdb_c) for API "
                f"{API_VERSION}: {exc}. Install FoundationDB's client package."
            ) from exc


#: Errors that, raised by a commit, leave its outcome unknown (FDB's automatic idempotency
#: documentation: transaction_timed_out and cluster_version_changed).
_UNKNOWN_WHEN_COMMITTING = frozenset({1031, 1039})


def _translate(exc: Exception, *, committing: bool = False) -> StorageError:
    """The Kelpie error for an FDB error (retryable ones not listed become StorageUnavailable)."""
    code = getattr(exc, "code", None)
    if committing and code in _UNKNOWN_WHEN_COMMITTING:
        return CommitUnknownResult(f"FoundationDB error {code} during commit: {exc}")
    if isinstance(code, int):
        kind = _ERRORS.get(code)
        if kind is not None:
            return kind(f"FoundationDB error {code}: {exc}")
        if fdb.predicates.is_maybe_committed(exc):
            return CommitUnknownResult(f"FoundationDB error {code} (may have committed): {exc}")
        if fdb.predicates.is_retryable(exc):
            return StorageUnavailable(f"FoundationDB error {code} (retryable): {exc}")
        return StorageError(f"FoundationDB error {code}: {exc}")
    return StorageUnavailable(f"FoundationDB client failed: {exc}")


async def _wait(future: Any, *, committing: bool = False) -> Any:
    """The value of an FDB future, awaited in trio without blocking the thread."""
    if not future.is_ready():
        token = trio.lowlevel.current_trio_token()
        ready = trio.Event()

        def on_ready(_: Any) -> None:
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(ready.set)

        future.on_ready(on_ready)
        try:
            await ready.wait()
        except BaseException:
            future.cancel()
            raise
    try:
        return future.wait()
    except fdb.FDBError as exc:
        raise _translate(exc, committing=committing) from exc


class FdbStore(Store):
    """A FoundationDB database, or the keys of it under `prefix` (see the module docstring)."""

    backend = "fdb"
    precise_conflicts = True

    def __init__(self, database: Any, prefix: bytes) -> None:
        self._db = database
        self.prefix = prefix

    @classmethod
    async def open(cls, cluster_file: str | None = None, *, prefix: bytes = b"") -> FdbStore:
        """Connects to the cluster named by `cluster_file` (None: FDB's default cluster file)."""
        _select_api()
        if prefix:
            check_key(prefix)
        try:
            database = await trio.to_thread.run_sync(fdb.open, cluster_file)
        except fdb.FDBError as exc:
            raise ConfigError(f"cannot open FoundationDB cluster {cluster_file!r}: {exc}") from exc
        return cls(database, prefix)

    def transaction(self) -> FdbTransaction:
        return FdbTransaction(self._db.create_transaction(), self.prefix)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


class FdbTransaction(Transaction):
    """One FoundationDB transaction, with Kelpie's checks and errors."""

    def __init__(self, tr: Any, prefix: bytes) -> None:
        self._tr = tr
        self._prefix = prefix
        self._done = False

    def _check(self) -> None:
        if self._done:
            raise TransactionClosed("this transaction committed or was closed; start a new one")

    def _bounds(self, begin: bytes, end: bytes) -> tuple[bytes, bytes]:
        begin, end = check_range(begin, end)
        return self._prefix + begin, self._prefix + end

    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        self._check()
        check_key(key)
        source = self._tr.snapshot if snapshot else self._tr
        value = await _wait(source.get(self._prefix + key))
        return None if not value.present() else bytes(value)

    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        *,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:
        self._check()
        if not isinstance(limit, int) or isinstance(limit, bool) or limit < 0:
            raise InvalidRange(f"limit must be an integer >= 0 (0: no limit), got {limit!r}")
        low, high = self._bounds(begin, end)
        source = self._tr.snapshot if snapshot else self._tr

        def read() -> list[Any]:
            return list(
                source.get_range(
                    low, high, limit, reverse, streaming_mode=fdb.StreamingMode.want_all
                ).to_list()
            )

        try:
            rows = await trio.to_thread.run_sync(read)
        except fdb.FDBError as exc:
            raise _translate(exc) from exc
        cut = len(self._prefix)
        return [(bytes(kv.key)[cut:], bytes(kv.value)) for kv in rows]

    def set(self, key: bytes, value: bytes) -> None:
        self._check()
        check_key(key)
        check_value(key, value)
        self._tr.set(self._prefix + key, value)

    def clear(self, key: bytes) -> None:
        self._check()
        check_key(key)
        self._tr.clear(self._prefix + key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._check()
        low, high = self._bounds(begin, end)
        if low < high:
            self._tr.clear_range(low, high)

    async def read_version(self) -> int:
        self._check()
        return int(await _wait(self._tr.get_read_version()))

    async def commit(self) -> None:
        self._check()
        self._done = True
        await _wait(self._tr.commit(), committing=True)

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            self._tr.cancel()
        await trio.lowlevel.checkpoint()
