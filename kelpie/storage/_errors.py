"""The storage layer's typed errors.

Every error says whether retrying the whole transaction may succeed
(`retryable`); `transact()` retries exactly those. The FoundationDB error code
each one corresponds to is noted, so the fdb backend maps codes one to one.
"""

from __future__ import annotations

from kelpie.core import KelpieError


class StorageError(KelpieError):
    """Base class of the storage errors."""

    #: Whether running the transaction again (from the start) may succeed.
    retryable: bool = False


class Conflict(StorageError):
    """The commit was refused because something this transaction read has changed (FDB 1020).

    Nothing was written. Retry the transaction from the start.
    """

    retryable = True


class CommitUnknownResult(StorageError):
    """The commit may or may not have been applied (FDB 1021).

    The store lost contact during the commit. A retried transaction must be
    idempotent, or check a marker it writes, because the first attempt may have
    committed (see the contract in kelpie.storage._api).
    """

    retryable = True


class TransactionTooOld(StorageError):
    """The transaction ran longer than its 5 s limit (FDB 1007); nothing was written."""

    retryable = True


class StorageUnavailable(StorageError):
    """The store could not be reached or refused service for now; nothing was written."""

    retryable = True


class CorruptionDetected(StorageError):
    """A value read back failed its checksum; it was not served.

    The stored copy is intact as far as the store knows (a torn or flipped read),
    so a retry reads it again.
    """

    retryable = True


class InvalidKey(StorageError):
    """A key is not bytes, is empty, or lies in the reserved system range (b'\\xff' and above)."""


class KeyTooLarge(StorageError):
    """A key is longer than KEY_SIZE_MAX_BYTES (FDB 2102); nothing was written."""


class ValueTooLarge(StorageError):
    """A value is longer than VALUE_SIZE_MAX_BYTES (FDB 2103); use the blob helper for more."""


class TransactionTooLarge(StorageError):
    """The transaction's writes and conflict ranges passed TRANSACTION_SIZE_MAX_BYTES (FDB 2101).

    The transaction can no longer commit; nothing was written.
    """


class InvalidRange(StorageError):
    """A range's begin is after its end, or a limit is negative (FDB 2005)."""


class TransactionClosed(StorageError):
    """The transaction was used after it committed, failed or was closed (FDB 2017)."""


class BlobCorrupt(StorageError):
    """A blob's chunks do not match its header (missing chunks, wrong length or checksum)."""


class BlobTooLarge(StorageError):
    """A blob is too large to write in one transaction."""
