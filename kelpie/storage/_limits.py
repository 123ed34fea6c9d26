"""FoundationDB's limits, enforced by every backend with typed errors."""

from __future__ import annotations

#: The longest key, in bytes.
KEY_SIZE_MAX_BYTES = 10_000

#: The longest value, in bytes (larger values go through the blob helper).
VALUE_SIZE_MAX_BYTES = 100_000

#: The most a transaction may write: keys and values set, range bounds cleared,
#: and the bounds of the ranges it read (its conflict ranges), in bytes.
TRANSACTION_SIZE_MAX_BYTES = 10_000_000

#: The longest a transaction may live, from its start to its commit, in milliseconds.
TRANSACTION_DURATION_MAX_MS = 5_000

#: Versions advance by about this many per second of the store's clock.
VERSIONS_PER_SECOND = 1_000_000
