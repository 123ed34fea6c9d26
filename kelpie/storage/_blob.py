"""Blobs: values larger than one value, chunked across keys inside one transaction.

A blob stored under `prefix` owns every key that starts with `prefix`: a header
at `prefix + pack((0,))` (magic, length, chunk count, SHA-256 of the whole) and
chunks at `prefix + pack((1, i))`, each at most VALUE_SIZE_MAX_BYTES. Writing
clears the old chunks first, and because a transaction commits all or nothing,
readers see the old blob or the new one, never a mix. `read_blob` checks the
header against the chunks and raises `BlobCorrupt` on any mismatch.
"""

from __future__ import annotations

import hashlib
import struct

from kelpie.storage._api import Transaction
from kelpie.storage._errors import BlobCorrupt, BlobTooLarge
from kelpie.storage._keys import check_key, pack, prefix_range, unpack
from kelpie.storage._limits import VALUE_SIZE_MAX_BYTES

#: The largest blob, in bytes: what fits in one transaction with room to spare.
BLOB_SIZE_MAX_BYTES = 9_000_000

#: The size of each chunk but the last, in bytes.
CHUNK_SIZE_BYTES = VALUE_SIZE_MAX_BYTES

_MAGIC = b"KBL1"
_HEADER = struct.Struct(">4sQI32s")
_HEADER_SUFFIX = pack((0,))


def _chunk_key(prefix: bytes, index: int) -> bytes:
    return prefix + pack((1, index))


def write_blob(tr: Transaction, prefix: bytes, data: bytes) -> None:
    """Replaces the blob under `prefix` with `data` when `tr` commits."""
    check_key(prefix + _HEADER_SUFFIX)
    if not isinstance(data, bytes):
        raise TypeError(f"blobs are bytes, got {type(data).__name__}")
    if len(data) > BLOB_SIZE_MAX_BYTES:
        raise BlobTooLarge(
            f"blob of {len(data)} bytes is over the limit of {BLOB_SIZE_MAX_BYTES} "
            "(one transaction holds at most 10 MB)"
        )
    count = (len(data) + CHUNK_SIZE_BYTES - 1) // CHUNK_SIZE_BYTES
    if count:
        check_key(_chunk_key(prefix, count - 1))  # the longest key, checked before any write
    digest = hashlib.sha256(data).digest()
    tr.clear_range(*prefix_range(prefix))
    tr.set(prefix + _HEADER_SUFFIX, _HEADER.pack(_MAGIC, len(data), count, digest))
    for i in range(count):
        tr.set(_chunk_key(prefix, i), data[i * CHUNK_SIZE_BYTES : (i + 1) * CHUNK_SIZE_BYTES])


async def read_blob(tr: Transaction, prefix: bytes, *, snapshot: bool = False) -> bytes | None:
    """The blob under `prefix`, or None if there is none; BlobCorrupt if it does not add up."""
    check_key(prefix + _HEADER_SUFFIX)
    rows = await tr.get_range(*prefix_range(prefix), snapshot=snapshot)
    if not rows:
        return None
    header_key, header = rows[0]
    if header_key != prefix + _HEADER_SUFFIX:
        raise BlobCorrupt(f"blob {prefix!r} has chunks but no header")
    try:
        magic, length, count, digest = _HEADER.unpack(header)
    except struct.error:
        raise BlobCorrupt(f"blob {prefix!r} has a malformed header") from None
    if magic != _MAGIC:
        raise BlobCorrupt(f"blob {prefix!r} has a header of an unknown format {magic!r}")
    chunks = rows[1:]
    if len(chunks) != count:
        raise BlobCorrupt(f"blob {prefix!r} should have {count} chunks, has {len(chunks)}")
    for i, (key, _) in enumerate(chunks):
        if key != _chunk_key(prefix, i):
            raise BlobCorrupt(
                f"blob {prefix!r}: chunk {i} is missing (found {_unpack_tail(prefix, key)})"
            )
    data = b"".join(value for _, value in chunks)
    if len(data) != length or hashlib.sha256(data).digest() != digest:
        raise BlobCorrupt(f"blob {prefix!r} does not match its header's length and checksum")
    return data


def clear_blob(tr: Transaction, prefix: bytes) -> None:
    """Removes the blob under `prefix` when `tr` commits."""
    check_key(prefix + _HEADER_SUFFIX)
    tr.clear_range(*prefix_range(prefix))


def _unpack_tail(prefix: bytes, key: bytes) -> object:
    """The tuple after `prefix` in `key`, or the raw bytes if it is not a tuple."""
    try:
        return unpack(key[len(prefix) :])
    except ValueError:
        return key[len(prefix) :]
