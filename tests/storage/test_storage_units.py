"""Unit tests of the storage pieces that need no backend: keys, limits, retries, blobs, checkers.

Backends are tested by the conformance suite (kelpie.storage.conformance); this
module covers what it builds on: the tuple layer and key helpers, the limits
table, `RetryPolicy` and the backoff `transact` sleeps, the blob layout, the
range helpers of `_buffered`, and the suite's own history checker
(`serialization_cycle`), against a brute-force oracle.
"""

from __future__ import annotations

import itertools
import math
import struct
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import attrs
import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from kelpie.env import Rng
from kelpie.storage import (
    BLOB_SIZE_MAX_BYTES,
    KEY_SIZE_MAX_BYTES,
    TRANSACTION_DURATION_MAX_MS,
    TRANSACTION_SIZE_MAX_BYTES,
    VALUE_SIZE_MAX_BYTES,
    VERSIONS_PER_SECOND,
    BlobCorrupt,
    CommitUnknownResult,
    Conflict,
    InvalidKey,
    InvalidRange,
    KeyTooLarge,
    MemoryStore,
    Mutations,
    RetryPolicy,
    StorageUnavailable,
    Transaction,
    TransactionTooOld,
    intersects,
    key_after,
    pack,
    prefix_range,
    read_blob,
    strinc,
    transact,
    tuple_range,
    unpack,
    write_blob,
)
from kelpie.storage._blob import CHUNK_SIZE_BYTES, _unpack_tail
from kelpie.storage._buffered import _merge_into
from kelpie.storage._keys import check_key, check_range
from kelpie.storage.conformance import (
    CommittedTransaction,
    Dependency,
    describe_cycle,
    serialization_cycle,
)

# -- keys ----------------------------------------------------------------------------------

_elements = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**200), max_value=2**200),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.uuids(),
)
_tuples = st.lists(
    st.one_of(_elements, st.lists(_elements, max_size=3).map(tuple)), max_size=4
).map(tuple)


@given(_tuples)
def test_pack_round_trips(items: tuple[Any, ...]) -> None:
    """unpack(pack(t)) == t for tuples of None, bools, ints, str, bytes, UUIDs and nested tuples."""
    assert unpack(pack(items)) == items


@pytest.mark.parametrize(
    "strategy",
    [
        st.integers(min_value=-(2**100), max_value=2**100),
        st.text(max_size=6),
        st.binary(max_size=6),
        st.tuples(st.integers(-3, 3), st.text(alphabet="ab\x00", max_size=3)),
        st.lists(st.integers(0, 300), max_size=3).map(tuple),
    ],
    ids=["int", "str", "bytes", "int-str", "int-tuple"],
)
def test_pack_preserves_order(strategy: st.SearchStrategy[Any]) -> None:
    """Packed keys compare bytewise as their values compare in Python, within one type."""

    @given(strategy, strategy)
    @settings(max_examples=200)
    def check(a: Any, b: Any) -> None:
        ka, kb = pack((a,)), pack((b,))
        assert (ka < kb) == (a < b)
        assert (ka == kb) == (a == b)

    check()


def test_pack_orders_a_tuple_before_its_extensions() -> None:
    """A tuple's key is a prefix of, and sorts before, the keys of the tuples extending it."""
    parent = pack(("agent", 7))
    child = pack(("agent", 7, "block"))
    assert child.startswith(parent)
    assert parent < child < pack(("agent", 8))


@given(
    st.binary(min_size=1, max_size=4).filter(lambda k: k.rstrip(b"\xff")),
    st.binary(max_size=4),
    st.binary(max_size=5),
)
def test_strinc_is_the_first_key_after_every_extension(
    key: bytes, suffix: bytes, other: bytes
) -> None:
    """strinc(k) sorts after every key starting with k, and no later than any other key above k."""
    after = strinc(key)
    assert key + suffix < after
    if other > key and not other.startswith(key):
        assert other >= after


@pytest.mark.parametrize(
    ("key", "expected"),
    [(b"a", b"b"), (b"a\xff", b"b"), (b"a\xff\xff", b"b"), (b"\x00", b"\x01"), (b"ab", b"ac")],
)
def test_strinc_examples(key: bytes, expected: bytes) -> None:
    """strinc drops trailing 0xff bytes and increments the last remaining byte."""
    assert strinc(key) == expected


@pytest.mark.parametrize("key", [b"", b"\xff", b"\xff\xff"])
def test_strinc_refuses_keys_with_no_successor(key: bytes) -> None:
    """strinc of b"" or of only 0xff bytes raises InvalidKey: no key follows them all."""
    with pytest.raises(InvalidKey):
        strinc(key)


@given(st.binary(max_size=5), st.binary(max_size=5))
def test_key_after_is_the_next_key(key: bytes, other: bytes) -> None:
    """key_after(k) > k, and no key lies strictly between them."""
    assert key < key_after(key)
    assert not key < other < key_after(key)


@given(st.binary(min_size=1, max_size=4), st.binary(max_size=6))
def test_prefix_range_holds_exactly_the_keys_with_the_prefix(prefix: bytes, key: bytes) -> None:
    """prefix_range(p) contains a key exactly when the key starts with p."""
    if not prefix.rstrip(b"\xff"):
        return
    begin, end = prefix_range(prefix)
    assert (begin <= key < end) == key.startswith(prefix)


def test_tuple_range_holds_the_extensions_only() -> None:
    """tuple_range(t) holds the keys of tuples extending t, but not t's own key nor neighbours."""
    begin, end = tuple_range(("agent", 7))
    inside = [pack(("agent", 7, x)) for x in (None, -1, 0, "", "z", b"\xff", (1,))]
    outside = [pack(("agent", 7)), pack(("agent", 6, "z")), pack(("agent", 8)), pack(("agent",))]
    assert all(begin <= key < end for key in inside)
    assert not any(begin <= key < end for key in outside)


@pytest.mark.parametrize(
    ("key", "error"),
    [
        (b"", InvalidKey),
        ("text", InvalidKey),
        (bytearray(b"a"), InvalidKey),
        (None, InvalidKey),
        (b"\xff", InvalidKey),
        (b"\xff\x00", InvalidKey),
        (b"k" * (KEY_SIZE_MAX_BYTES + 1), KeyTooLarge),
    ],
)
def test_check_key_refuses(key: Any, error: type[Exception]) -> None:
    """check_key raises InvalidKey for empty, non-bytes and system keys, KeyTooLarge past 10,000."""
    with pytest.raises(error):
        check_key(key)


def test_check_key_accepts_the_edges() -> None:
    """The smallest, the largest and the last user keys pass check_key."""
    for key in (b"\x00", b"\xfe\xff\xff", b"k" * KEY_SIZE_MAX_BYTES):
        assert check_key(key) is key


def test_check_range_bounds() -> None:
    """Ranges run from b"" to b"\\xff"; a bound may be one byte past the longest key."""
    assert check_range(b"", b"\xff") == (b"", b"\xff")
    longest = b"k" * KEY_SIZE_MAX_BYTES
    assert check_range(longest, key_after(longest)) == (longest, key_after(longest))
    with pytest.raises(KeyTooLarge):
        check_range(b"", key_after(key_after(longest)))
    with pytest.raises(InvalidKey):
        check_range(b"", b"\xff\x00")
    with pytest.raises(InvalidKey):
        check_range("a", b"b")
    with pytest.raises(InvalidRange):
        check_range(b"b", b"a")


# -- limits --------------------------------------------------------------------------------


def test_limits_are_foundationdbs() -> None:
    """The limits are FoundationDB's: 10 kB keys, 100 kB values, 10 MB and 5 s transactions."""
    assert KEY_SIZE_MAX_BYTES == 10_000
    assert VALUE_SIZE_MAX_BYTES == 100_000
    assert TRANSACTION_SIZE_MAX_BYTES == 10_000_000
    assert TRANSACTION_DURATION_MAX_MS == 5_000
    assert VERSIONS_PER_SECOND == 1_000_000


def test_the_largest_blob_fits_in_one_transaction() -> None:
    """A blob of BLOB_SIZE_MAX_BYTES, with its chunk keys and header, fits in 10 MB."""
    chunks = math.ceil(BLOB_SIZE_MAX_BYTES / CHUNK_SIZE_BYTES)
    overhead = (chunks + 1) * (KEY_SIZE_MAX_BYTES + 100)  # generous: the longest prefixes
    assert CHUNK_SIZE_BYTES == VALUE_SIZE_MAX_BYTES
    assert BLOB_SIZE_MAX_BYTES + overhead < TRANSACTION_SIZE_MAX_BYTES


# -- RetryPolicy and transact's backoff ------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [{"attempts_max": 0}, {"backoff_initial_ms": -1}, {"backoff_max_ms": -1}],
)
def test_retry_policy_refuses_nonsense(kwargs: dict[str, int]) -> None:
    """A policy needs at least one attempt and non-negative backoffs."""
    with pytest.raises(ValueError):
        RetryPolicy(**kwargs)


@given(
    st.integers(1, 60),
    st.integers(0, 1_000),
    st.integers(0, 5_000),
    st.integers(0, 2**32),
)
def test_backoff_is_full_jitter_under_a_doubling_ceiling(
    attempt: int, initial_ms: int, max_ms: int, seed: int
) -> None:
    """backoff_ms(n) lies in [0, min(max, initial * 2**(n-1))] and depends only on the rng."""
    policy = RetryPolicy(backoff_initial_ms=initial_ms, backoff_max_ms=max_ms)
    ceiling = min(max_ms, initial_ms * 2 ** (attempt - 1))
    drawn = policy.backoff_ms(attempt, Rng(seed))
    assert 0 <= drawn <= ceiling
    assert drawn == policy.backoff_ms(attempt, Rng(seed))


def test_backoff_varies_with_the_rng() -> None:
    """Different seeds give different backoffs (the jitter is real)."""
    policy = RetryPolicy(backoff_initial_ms=100, backoff_max_ms=100)
    assert len({policy.backoff_ms(1, Rng(seed)) for seed in range(20)}) > 10


def _run_virtual(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_transact_sleeps_the_backoffs_drawn_from_its_rng() -> None:
    """Between attempts transact sleeps exactly policy.backoff_ms(n, rng), in trio's time."""
    policy = RetryPolicy(attempts_max=5, backoff_initial_ms=40, backoff_max_ms=100)
    failures = [Conflict("first"), StorageUnavailable("second"), Conflict("third")]

    async def main() -> None:
        store = MemoryStore()
        attempts: list[float] = []

        async def fn(tr: Transaction) -> str:
            attempts.append(trio.current_time())
            tr.set(b"k", b"%d" % len(attempts))
            if failures:
                raise failures.pop(0)
            return "done"

        assert await transact(store, fn, rng=Rng(99), policy=policy) == "done"
        expected_rng = Rng(99)
        expected = [policy.backoff_ms(n, expected_rng) / 1000 for n in (1, 2, 3)]
        gaps = [b - a for a, b in itertools.pairwise(attempts)]
        assert gaps == pytest.approx(expected)
        assert store.snapshot() == {b"k": b"4"}

    _run_virtual(main)


def test_transact_gives_up_with_a_note() -> None:
    """After attempts_max retryable failures transact raises the last one, noting the count."""
    policy = RetryPolicy(attempts_max=4, backoff_initial_ms=1)

    async def main() -> None:
        calls = 0

        async def fn(tr: Transaction) -> None:
            nonlocal calls
            calls += 1
            raise StorageUnavailable(f"attempt {calls}")

        with pytest.raises(StorageUnavailable, match="attempt 4") as info:
            await transact(MemoryStore(), fn, rng=Rng(1), policy=policy)
        assert calls == 4
        assert "gave up after 4 attempts" in info.value.__notes__

    _run_virtual(main)


def test_transact_uses_a_fresh_transaction_per_attempt() -> None:
    """Writes of a failed attempt do not leak into the next one."""

    async def main() -> None:
        store = MemoryStore()
        seen: list[bytes | None] = []

        async def fn(tr: Transaction) -> None:
            seen.append(await tr.get(b"scratch"))
            tr.set(b"scratch", b"attempt")
            if len(seen) == 1:
                raise Conflict("retry me")

        await transact(store, fn, rng=Rng(1), policy=RetryPolicy(backoff_initial_ms=0))
        assert seen == [None, None]

    _run_virtual(main)


# -- blob layout -----------------------------------------------------------------------------


def test_blob_layout_is_a_header_then_numbered_chunks() -> None:
    """A blob is a header at prefix+pack((0,)) and chunks at prefix+pack((1, i))."""
    prefix = pack(("doc",))
    data = bytes(range(256)) * 1_000  # 256,000 bytes: three chunks

    async def main() -> None:
        store = MemoryStore()
        async with store.transaction() as tr:
            write_blob(tr, prefix, data)
            await tr.commit()
        rows = sorted(store.snapshot().items())
        assert [key for key, _ in rows] == [prefix + pack((0,))] + [
            prefix + pack((1, i)) for i in range(3)
        ]
        magic, length, count, _ = struct.unpack(">4sQI32s", rows[0][1])
        assert (magic, length, count) == (b"KBL1", len(data), 3)
        assert [len(value) for _, value in rows[1:]] == [100_000, 100_000, 56_000]

    _run_virtual(main)


def test_blob_helpers_check_their_arguments() -> None:
    """write_blob refuses non-bytes data; a prefix too long for its header key is KeyTooLarge."""

    async def main() -> None:
        async with MemoryStore().transaction() as tr:
            bad: Any = "text"
            with pytest.raises(TypeError):
                write_blob(tr, b"p", bad)
            with pytest.raises(KeyTooLarge):
                write_blob(tr, b"p" * KEY_SIZE_MAX_BYTES, b"")
            with pytest.raises(InvalidKey):
                await read_blob(tr, b"")

    _run_virtual(main)


def test_blob_corruption_messages_name_the_problem() -> None:
    """BlobCorrupt says what is wrong: a foreign header format, or a chunk that is missing."""
    prefix = pack(("doc",))

    async def main() -> None:
        store = MemoryStore()
        async with store.transaction() as tr:
            write_blob(tr, prefix, b"x" * 250_000)
            await tr.commit()
        async with store.transaction() as tr:
            tr.clear(prefix + pack((1, 1)))
            tr.set(prefix + pack((1, 7)), b"stray")
            await tr.commit()
        async with store.transaction() as tr:
            with pytest.raises(BlobCorrupt, match=r"chunk 1 is missing \(found \(1, 2\)\)"):
                await read_blob(tr, prefix)
        async with store.transaction() as tr:
            tr.set(prefix + pack((0,)), struct.pack(">4sQI32s", b"ZZZZ", 1, 1, bytes(32)))
            await tr.commit()
        async with store.transaction() as tr:
            with pytest.raises(BlobCorrupt, match="unknown format"):
                await read_blob(tr, prefix)

    _run_virtual(main)


def test_unpack_tail_shows_tuples_or_raw_bytes() -> None:
    """_unpack_tail shows what follows the prefix as a tuple when it is one, else as bytes."""
    assert _unpack_tail(b"p", b"p" + pack((1, 2))) == (1, 2)
    assert _unpack_tail(b"p", b"p\xff\xfe") == b"\xff\xfe"


# -- the range helpers of _buffered -------------------------------------------------------------

_small_keys = st.binary(min_size=0, max_size=2)
_ranges = st.tuples(_small_keys, _small_keys).map(lambda r: (min(r), max(r)))


def _covered(ranges: Sequence[tuple[bytes, bytes]], universe: Sequence[bytes]) -> list[bytes]:
    return [key for key in universe if any(b <= key < e for b, e in ranges)]


_UNIVERSE = sorted(
    {bytes(p) for n in range(3) for p in itertools.product(b"\x00\x01\xff", repeat=n)}
)


@given(_ranges, _ranges)
def test_intersects_means_a_shared_key(a: tuple[bytes, bytes], b: tuple[bytes, bytes]) -> None:
    """intersects(a, b) is true exactly when some key lies in both half-open ranges."""
    shared = set(_covered([a], _UNIVERSE)) & set(_covered([b], _UNIVERSE))
    if shared:
        assert intersects(a, b)
    if not intersects(a, b):
        assert not shared
    assert intersects(a, b) == intersects(b, a)
    assert intersects(a, b) == (a[0] < b[1] and b[0] < a[1])


@given(st.lists(_ranges, max_size=6))
def test_merge_into_keeps_ranges_sorted_disjoint_and_covering(
    ranges: list[tuple[bytes, bytes]],
) -> None:
    """_merge_into builds sorted, disjoint, non-touching ranges covering the same keys."""
    merged: list[tuple[bytes, bytes]] = []
    for r in ranges:
        if r[0] < r[1]:  # clear_range never merges an empty range
            merged = _merge_into(merged, r)
    assert merged == sorted(merged)
    for (_, end), (begin, _) in itertools.pairwise(merged):
        assert end < begin
    assert all(b < e for b, e in merged)
    assert _covered(merged, _UNIVERSE) == _covered(ranges, _UNIVERSE)


def test_mutations_write_ranges() -> None:
    """Mutations' write ranges are its cleared ranges and one single-key range per set."""
    mutations = Mutations(cleared=((b"a", b"c"),), sets=((b"d", b"1"), (b"e", None)))
    assert mutations.write_ranges() == [(b"a", b"c"), (b"d", b"d\x00"), (b"e", b"e\x00")]


# -- serialization_cycle -------------------------------------------------------------------------


def _txn(
    name: str, reads: dict[bytes, int] | None = None, writes: str = ""
) -> CommittedTransaction:
    return CommittedTransaction(name, reads or {}, frozenset(k.encode() for k in writes))


def test_an_empty_or_serial_history_has_no_cycle() -> None:
    """A history whose transactions read what the previous ones wrote is serializable."""
    assert serialization_cycle([]) is None
    history = [
        _txn("t1", {b"x": 0}, writes="x"),
        _txn("t2", {b"x": 1}, writes="xy"),
        _txn("t3", {b"x": 2, b"y": 1}),
    ]
    assert serialization_cycle(history) is None


def test_a_lost_update_is_a_cycle() -> None:
    """Two transactions that read version 0 of x and both wrote x form an rw/ww cycle."""
    history = [_txn("t1", {b"x": 0}, writes="x"), _txn("t2", {b"x": 0}, writes="x")]
    cycle = serialization_cycle(history)
    assert cycle is not None
    assert sorted((e.kind, e.source, e.target) for e in cycle) == [
        ("rw", "t2", "t1"),
        ("ww", "t1", "t2"),
    ]
    assert describe_cycle(cycle) in (
        "t1 -ww b'x'-> t2 -rw b'x'-> t1",
        "t2 -rw b'x'-> t1 -ww b'x'-> t2",
    )


def test_write_skew_is_a_cycle_of_anti_dependencies() -> None:
    """Each reads x and y at version 0 and writes one of them: a cycle of two rw edges."""
    history = [
        _txn("t1", {b"x": 0, b"y": 0}, writes="x"),
        _txn("t2", {b"x": 0, b"y": 0}, writes="y"),
    ]
    cycle = serialization_cycle(history)
    assert cycle is not None
    assert {(e.kind, e.key) for e in cycle} == {("rw", b"x"), ("rw", b"y")}


def test_a_read_only_transaction_can_close_a_cycle() -> None:
    """Fekete's read-only anomaly: a reader that sees a deposit but not an earlier withdrawal.

    t1 reads x and y and withdraws from y; t2 deposits into x and commits first;
    the reader sees t2's deposit but not t1's withdrawal. Without the reader the
    history is serializable (t1 before t2); with it there is no serial order.
    """
    t2 = _txn("t2", {b"x": 0}, writes="x")
    t1 = _txn("t1", {b"x": 0, b"y": 0}, writes="y")
    assert serialization_cycle([t2, t1]) is None
    cycle = serialization_cycle([t2, _txn("reader", {b"x": 1, b"y": 0}), t1])
    assert cycle is not None
    assert sorted(e.kind for e in cycle) == ["rw", "rw", "wr"]
    assert describe_cycle(cycle).count("->") == 3
    # Disjoint writers need no order between them: seeing t2's write but not t1's is fine.
    disjoint = [_txn("t1", writes="x"), _txn("t2", writes="y")]
    assert serialization_cycle([*disjoint, _txn("reader", {b"x": 0, b"y": 1})]) is None


def test_serialization_cycle_refuses_malformed_histories() -> None:
    """Duplicate names, and reads of versions that nobody wrote, raise ValueError."""
    with pytest.raises(ValueError, match="unique"):
        serialization_cycle([_txn("t"), _txn("t")])
    with pytest.raises(ValueError, match="version 2"):
        serialization_cycle([_txn("t1", writes="x"), _txn("t2", {b"x": 2})])


def _serial_order_exists(history: Sequence[CommittedTransaction]) -> bool:
    """Brute force: some order of the transactions explains every version order and read."""
    writers: dict[bytes, list[str]] = {}
    for t in history:
        for key in sorted(t.writes):
            writers.setdefault(key, []).append(t.name)
    for order in itertools.permutations([t.name for t in history]):
        at = {name: i for i, name in enumerate(order)}
        ok = all(at[a] < at[b] for ws in writers.values() for a, b in itertools.pairwise(ws))
        for t in history:
            for key, version in t.reads.items():
                ws = writers.get(key, [])
                if version > 0 and ws[version - 1] != t.name:
                    ok = ok and at[ws[version - 1]] < at[t.name]
                if version < len(ws) and ws[version] != t.name:
                    ok = ok and at[t.name] < at[ws[version]]
        if ok:
            return True
    return False


@st.composite
def _histories(draw: st.DrawFn) -> list[CommittedTransaction]:
    keys = [b"a", b"b", b"c"]
    size = draw(st.integers(1, 5))
    writes = [draw(st.frozensets(st.sampled_from(keys), max_size=2)) for _ in range(size)]
    counts = {key: sum(key in w for w in writes) for key in keys}
    history = []
    for i, written in enumerate(writes):
        read_keys = draw(st.lists(st.sampled_from(keys), max_size=3, unique=True))
        reads = {key: draw(st.integers(0, counts[key])) for key in read_keys}
        history.append(CommittedTransaction(f"t{i}", reads, written))
    return history


@given(_histories())
@settings(max_examples=200)
def test_serialization_cycle_agrees_with_brute_force(history: list[CommittedTransaction]) -> None:
    """A cycle is found exactly when no serial order exists, and it is a real cycle."""
    cycle = serialization_cycle(history)
    assert (cycle is None) == _serial_order_exists(history)
    if cycle is None:
        return
    by_name = {t.name: t for t in history}
    assert all(a.target == b.source for a, b in itertools.pairwise([*cycle, cycle[0]]))
    assert len({e.source for e in cycle}) == len(cycle)
    writers = {
        key: [t.name for t in history if key in t.writes] for t in history for key in t.writes
    }
    for edge in cycle:
        ws = writers.get(edge.key, [])
        source, target = by_name[edge.source], by_name[edge.target]
        if edge.kind == "ww":
            assert ws.index(edge.target) == ws.index(edge.source) + 1
        elif edge.kind == "wr":
            assert ws[target.reads[edge.key] - 1] == edge.source
        else:
            assert ws[source.reads[edge.key]] == edge.target


def test_dependencies_are_plain_values() -> None:
    """Dependency and CommittedTransaction are frozen attrs values."""
    edge = Dependency("t1", "t2", "rw", b"x")
    assert attrs.evolve(edge, kind="ww") == Dependency("t1", "t2", "ww", b"x")
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        edge.kind = "wr"  # type: ignore[misc]


def test_a_blob_whose_chunk_keys_would_be_too_long_buffers_nothing() -> None:
    """The header key fits but the chunk keys do not: KeyTooLarge before any write."""

    async def main() -> None:
        store = MemoryStore()
        prefix = b"p" * 9_998
        async with store.transaction() as tr:
            write_blob(tr, prefix, b"")  # header only: fits
            await tr.commit()
        async with store.transaction() as tr:
            with pytest.raises(KeyTooLarge):
                write_blob(tr, prefix, b"x" * 10)
            assert tr.mutation_count == 0
            await tr.commit()
        async with store.transaction() as tr:
            assert await read_blob(tr, prefix) == b""

    trio.run(main)


def test_fdb_errors_that_leave_a_commit_unknown_are_commit_unknown_result() -> None:
    """transaction_timed_out (1031) and cluster_version_changed (1039) during a commit may have
    committed (FoundationDB's documentation); elsewhere a timeout wrote nothing."""
    pytest.importorskip("fdb")
    from kelpie.storage import _fdb

    class FakeFdbError(Exception):  # the real one needs libfdb_c to render its message
        def __init__(self, code: int) -> None:
            super().__init__(f"error {code}")
            self.code = code

    assert isinstance(_fdb._translate(FakeFdbError(1031), committing=True), CommitUnknownResult)
    assert isinstance(_fdb._translate(FakeFdbError(1039), committing=True), CommitUnknownResult)
    assert isinstance(_fdb._translate(FakeFdbError(1031)), TransactionTooOld)
    assert isinstance(_fdb._translate(FakeFdbError(1021)), CommitUnknownResult)
