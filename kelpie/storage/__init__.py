"""The storage layer: an ordered, transactional key-value store shaped like FoundationDB.

The contract is the docstring of kelpie.storage._api (also in docs/STORAGE.md);
`kelpie.storage.conformance` is the suite every backend passes.
"""

from kelpie.storage._api import KeyValue, Store, Transaction
from kelpie.storage._blob import BLOB_SIZE_MAX_BYTES, clear_blob, read_blob, write_blob
from kelpie.storage._buffered import (
    BufferedTransaction,
    KeyRange,
    Mutations,
    SnapshotRead,
    intersects,
)
from kelpie.storage._errors import (
    BlobCorrupt,
    BlobTooLarge,
    CommitUnknownResult,
    Conflict,
    CorruptionDetected,
    InvalidKey,
    InvalidRange,
    KeyTooLarge,
    StorageError,
    StorageUnavailable,
    TransactionClosed,
    TransactionTooLarge,
    TransactionTooOld,
    ValueTooLarge,
)
from kelpie.storage._fdb import FdbStore, FdbTransaction
from kelpie.storage._keys import (
    key_after,
    pack,
    prefix_range,
    strinc,
    tuple_range,
    unpack,
)
from kelpie.storage._limits import (
    KEY_SIZE_MAX_BYTES,
    TRANSACTION_DURATION_MAX_MS,
    TRANSACTION_SIZE_MAX_BYTES,
    VALUE_SIZE_MAX_BYTES,
    VERSIONS_PER_SECOND,
)
from kelpie.storage._memory import MemoryStore, MemoryTransaction
from kelpie.storage._open import open_store
from kelpie.storage._postgres import PostgresStore, PostgresTransaction
from kelpie.storage._retry import RetryPolicy, transact
from kelpie.storage._sqlite import SqliteError, SqliteStore, SqliteTransaction

__all__ = [
    "BLOB_SIZE_MAX_BYTES",
    "KEY_SIZE_MAX_BYTES",
    "TRANSACTION_DURATION_MAX_MS",
    "TRANSACTION_SIZE_MAX_BYTES",
    "VALUE_SIZE_MAX_BYTES",
    "VERSIONS_PER_SECOND",
    "BlobCorrupt",
    "BlobTooLarge",
    "BufferedTransaction",
    "CommitUnknownResult",
    "Conflict",
    "CorruptionDetected",
    "FdbStore",
    "FdbTransaction",
    "InvalidKey",
    "InvalidRange",
    "KeyRange",
    "KeyTooLarge",
    "KeyValue",
    "MemoryStore",
    "MemoryTransaction",
    "Mutations",
    "PostgresStore",
    "PostgresTransaction",
    "RetryPolicy",
    "SnapshotRead",
    "SqliteError",
    "SqliteStore",
    "SqliteTransaction",
    "StorageError",
    "StorageUnavailable",
    "Store",
    "Transaction",
    "TransactionClosed",
    "TransactionTooLarge",
    "TransactionTooOld",
    "ValueTooLarge",
    "clear_blob",
    "intersects",
    "key_after",
    "open_store",
    "pack",
    "prefix_range",
    "read_blob",
    "strinc",
    "transact",
    "tuple_range",
    "unpack",
    "write_blob",
]
