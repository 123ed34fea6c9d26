"""The conformance tests: `StoreConformance` and its helpers."""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, settings
from hypothesis.stateful import (
    run_state_machine_as_test,
)

from kelpie.env import Rng
from kelpie.storage._api import KeyValue, Store, Transaction
from kelpie.storage._blob import (
    BLOB_SIZE_MAX_BYTES,
    CHUNK_SIZE_BYTES,
    clear_blob,
    read_blob,
    write_blob,
)
from kelpie.storage._errors import (
    BlobCorrupt,
    BlobTooLarge,
    CommitUnknownResult,
    Conflict,
    InvalidKey,
    InvalidRange,
    KeyTooLarge,
    StorageError,
    TransactionClosed,
    TransactionTooLarge,
    TransactionTooOld,
    ValueTooLarge,
)
from kelpie.storage._keys import key_after, pack, prefix_range, tuple_range, unpack
from kelpie.storage._limits import (
    KEY_SIZE_MAX_BYTES,
    TRANSACTION_DURATION_MAX_MS,
    TRANSACTION_SIZE_MAX_BYTES,
    VALUE_SIZE_MAX_BYTES,
    VERSIONS_PER_SECOND,
)
from kelpie.storage._retry import RetryPolicy, transact
from kelpie.storage.conformance._common import _END, _QUICK, StoreFactory, _apply, _expected_range
from kelpie.storage.conformance._machine import store_state_machine


def run_with_store(
    factory: StoreFactory,
    test: Callable[[Store], Awaitable[Any]],
    *,
    clock: trio.abc.Clock | None = None,
) -> None:
    """Runs `test(store)` on a new store in a fresh trio loop, then closes the store.

    `clock` is the loop's clock (trio's real clock when None): a
    `trio.testing.MockClock` lets a test age a transaction with `clock.jump()`.
    """

    async def main() -> None:
        store = await factory()
        try:
            await test(store)
        finally:
            await store.aclose()

    trio.run(main, clock=clock)


# -- small helpers -------------------------------------------------------------------------


async def _put(store: Store, items: Mapping[bytes, bytes]) -> None:
    """Commits `items` in one transaction."""
    async with store.transaction() as tr:
        for key, value in items.items():
            tr.set(key, value)
        await tr.commit()


async def _rows(store: Store, begin: bytes = b"", end: bytes = _END) -> list[KeyValue]:
    """Every committed pair in [begin, end), in order, read by a fresh transaction."""
    async with store.transaction() as tr:
        return await tr.get_range(begin, end, snapshot=True)


async def _contents(store: Store, begin: bytes = b"", end: bytes = _END) -> dict[bytes, bytes]:
    return dict(await _rows(store, begin, end))


async def _replace(store: Store, items: Mapping[bytes, bytes]) -> None:
    """Makes `items` the store's whole contents, in one transaction."""
    async with store.transaction() as tr:
        tr.clear_range(b"", _END)
        for key, value in items.items():
            tr.set(key, value)
        await tr.commit()


async def _try_commit(tr: Transaction) -> bool:
    """Whether `tr` committed (False: it got a Conflict and wrote nothing)."""
    try:
        await tr.commit()
    except Conflict:
        return False
    return True


async def _check_ranges(
    tr: Transaction,
    data: Mapping[bytes, bytes],
    points: Sequence[bytes],
    *,
    limits: Iterable[int] | None = None,
    snapshot: bool = False,
) -> None:
    """Compares the range reads between every two of `points` with `data`.

    Each range is read forwards and in reverse with each of `limits` (by default
    every limit from 0 to one past the number of pairs in the range).
    """
    points = sorted(set(points))
    for i, begin in enumerate(points):
        for end in points[i:]:
            size = len(_expected_range(data, begin, end))
            for limit in range(size + 2) if limits is None else limits:
                for reverse in (False, True):
                    got = await tr.get_range(
                        begin, end, limit=limit, reverse=reverse, snapshot=snapshot
                    )
                    want = _expected_range(data, begin, end, limit, reverse)
                    assert got == want, (
                        f"get_range({begin!r}, {end!r}, limit={limit}, reverse={reverse})"
                        f" returned {got!r}, expected {want!r}"
                    )


def _noise(size: int, seed: bytes) -> bytes:
    """`size` incompressible bytes, the same for the same seed."""
    return hashlib.shake_256(seed).digest(size)


def _user_key(size: int, seed: bytes) -> bytes:
    """An incompressible user key of `size` bytes (it starts with b"k", below the system range)."""
    return b"k" + _noise(size - 1, seed)


class _UnknownResultStore(Store):
    """A store that wraps another and makes chosen commits raise CommitUnknownResult.

    Commit attempts are numbered from 1 across all of its transactions. For each
    number in `unknown_at`, the commit is applied first when `applied` is true
    (the store committed, then the reply was lost) or abandoned when it is false
    (the request was lost), and either way the caller gets CommitUnknownResult.
    """

    def __init__(self, inner: Store, *, unknown_at: Iterable[int], applied: bool) -> None:
        self.inner = inner
        self.backend = f"unknown-result({inner.backend})"
        self.precise_conflicts = inner.precise_conflicts
        self.unknown_at = frozenset(unknown_at)
        self.applied = applied
        self.commit_attempts = 0
        self.injected = 0

    def transaction(self) -> Transaction:
        return _UnknownResultTransaction(self, self.inner.transaction())

    async def aclose(self) -> None:
        # The inner store belongs to the test, which closes it.
        await trio.lowlevel.checkpoint()


class _UnknownResultTransaction(Transaction):
    def __init__(self, store: _UnknownResultStore, inner: Transaction) -> None:
        self._store = store
        self._inner = inner

    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        return await self._inner.get(key, snapshot=snapshot)

    async def get_range(
        self,
        begin: bytes,
        end: bytes,
        *,
        limit: int = 0,
        reverse: bool = False,
        snapshot: bool = False,
    ) -> list[KeyValue]:
        return await self._inner.get_range(
            begin, end, limit=limit, reverse=reverse, snapshot=snapshot
        )

    def set(self, key: bytes, value: bytes) -> None:
        self._inner.set(key, value)

    def clear(self, key: bytes) -> None:
        self._inner.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._inner.clear_range(begin, end)

    async def commit(self) -> None:
        store = self._store
        store.commit_attempts += 1
        if store.commit_attempts not in store.unknown_at:
            await self._inner.commit()
            return
        if store.applied:
            await self._inner.commit()
        else:
            await self._inner.aclose()
        store.injected += 1
        raise CommitUnknownResult(
            f"injected by the conformance suite at commit {store.commit_attempts} "
            f"({'applied' if store.applied else 'not applied'})"
        )

    async def read_version(self) -> int:
        return await self._inner.read_version()

    async def aclose(self) -> None:
        await self._inner.aclose()


# -- the suite -----------------------------------------------------------------------------


class StoreConformance:
    """The suite (see the module docstring); every test gets a fresh store."""

    #: Hypothesis settings for `test_state_machine` (a slow backend may lower max_examples).
    state_machine_settings = settings(
        max_examples=50,
        stateful_step_count=30,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        report_multiple_bugs=False,
    )

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        raise NotImplementedError("a subclass provides the store_factory fixture")

    def trio_clock(self) -> trio.abc.Clock | None:
        """The clock each test's trio loop runs on; None (the default) is trio's real clock."""
        return None

    def _run(self, factory: StoreFactory, body: Callable[[Store], Awaitable[None]]) -> None:
        run_with_store(factory, body, clock=self.trio_clock())

    def _mock_clock(self) -> trio.testing.MockClock:
        """A clock a test may jump: the subclass's, if it is a MockClock, else a real-rate one."""
        clock = self.trio_clock()
        if isinstance(clock, trio.testing.MockClock):
            return clock
        return trio.testing.MockClock(rate=1.0)

    @staticmethod
    def _require_precise(store: Store) -> None:
        if not store.precise_conflicts:
            pytest.skip(f"{store.backend or type(store).__name__} does not follow FDB's rule")

    # -- ordering ----------------------------------------------------------------------

    def test_keys_sort_bytewise(self, store_factory: StoreFactory) -> None:
        """Orders keys as unsigned bytes, a key before its extensions, in both directions."""
        keys = [
            b"\x00",
            b"\x00\x00",
            b"\x01",
            b"\x7f",
            b"\x80",
            b"a",
            b"a\x00",
            b"a\x00\x00",
            b"a\xff",
            b"ab",
            b"b",
            b"\xfe",
            b"\xfe\xff\xff",
        ]

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                for i, key in enumerate(reversed(keys)):
                    tr.set(key, b"%d" % i)
                await tr.commit()
            async with store.transaction() as tr:
                forward = [key for key, _ in await tr.get_range(b"", _END)]
                backward = [key for key, _ in await tr.get_range(b"", _END, reverse=True)]
            assert forward == sorted(keys)
            assert backward == sorted(keys, reverse=True)

        self._run(store_factory, body)

    def test_packed_keys_sort_in_tuple_order(self, store_factory: StoreFactory) -> None:
        """Orders keys packed from tuples in the tuples' order, each prefix one contiguous range."""
        groups: dict[str, list[Any]] = {
            "int": [-(2**70), -(2**40), -300, -256, -255, -1, 0, 1, 255, 256, 2**40, 2**70],
            "str": ["", "a", "a\x00", "a\x00b", "ab", "b", "z", "\xe9", "\u4e2d", "\U0001f600"],
            "bytes": [b"", b"\x00", b"\x00\x00", b"\x00\x01", b"\x01", b"a", b"\xff", b"\xff\x00"],
            "float": [float("-inf"), -1.5, -1e-300, 0.0, 1e-300, 2.5, float("inf")],
            "tuple": [("a",), ("a", 1), ("a", 1, "x"), ("a", 2), ("a", 10), ("b",)],
        }

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                for group, items in groups.items():
                    for item in reversed(items):
                        tr.set(pack(("order", group, item)), b"")
                tr.set(pack(("order",)), b"the prefix itself")
                tr.set(pack(("orders",)), b"a neighbour")
                await tr.commit()
            async with store.transaction() as tr:
                for group, items in groups.items():
                    rows = await tr.get_range(*tuple_range(("order", group)))
                    assert [unpack(key)[2] for key, _ in rows] == sorted(items), group
                everything = await tr.get_range(*tuple_range(("order",)))
                assert len(everything) == sum(len(items) for items in groups.values())
                begin, end = prefix_range(pack(("order",)))
                assert len(await tr.get_range(begin, end)) == len(everything) + 1

        self._run(store_factory, body)

    # -- point reads and writes ----------------------------------------------------------

    def test_set_then_get(self, store_factory: StoreFactory) -> None:
        """Reads back a committed value, and None for a key never set."""

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                tr.set(b"a", b"1")
                await tr.commit()
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                assert await tr.get(b"b") is None
                assert await tr.get(b"a\x00") is None
                assert await tr.get(b"\x00") is None

        self._run(store_factory, body)

    def test_set_overwrites_and_clear_removes(self, store_factory: StoreFactory) -> None:
        """Keeps the last value set; clear removes a key, and clearing a missing key is harmless."""

        async def body(store: Store) -> None:
            await _put(store, {b"a": b"1", b"b": b"2"})
            await _put(store, {b"a": b"3"})
            assert await _contents(store) == {b"a": b"3", b"b": b"2"}
            async with store.transaction() as tr:
                tr.clear(b"a")
                tr.clear(b"never-set")
                await tr.commit()
            assert await _contents(store) == {b"b": b"2"}
            async with store.transaction() as tr:
                tr.set(b"c", b"1")
                tr.set(b"c", b"2")
                tr.clear(b"b")
                tr.set(b"b", b"again")
                await tr.commit()
            assert await _contents(store) == {b"b": b"again", b"c": b"2"}

        self._run(store_factory, body)

    def test_values_are_arbitrary_bytes(self, store_factory: StoreFactory) -> None:
        """Stores the empty value (distinct from no value) and every byte value unchanged."""
        values = {
            b"empty": b"",
            b"zero": b"\x00",
            b"zeros": b"\x00" * 100,
            b"all": bytes(range(256)),
            b"ff": b"\xff" * 10,
            b"utf8": "h\xe9llo \u4e2d".encode(),
        }

        async def body(store: Store) -> None:
            await _put(store, values)
            async with store.transaction() as tr:
                for key, value in values.items():
                    got = await tr.get(key)
                    assert got == value, key
                    assert type(got) is bytes, type(got)
                assert await tr.get(b"missing") is None
            assert await _contents(store) == values

        self._run(store_factory, body)

    # -- range reads and clears ---------------------------------------------------------

    def test_get_range_is_half_open_and_ordered(self, store_factory: StoreFactory) -> None:
        """Returns the pairs with begin <= key < end, in order; an empty range returns []."""
        data = {b"a": b"1", b"b": b"2", b"bb": b"3", b"c": b"4", b"d": b"5"}

        async def body(store: Store) -> None:
            await _put(store, data)
            async with store.transaction() as tr:
                assert await tr.get_range(b"b", b"d") == [(b"b", b"2"), (b"bb", b"3"), (b"c", b"4")]
                assert await tr.get_range(b"b", b"b") == []
                assert await tr.get_range(b"b", b"b\x00") == [(b"b", b"2")]
                assert await tr.get_range(b"e", b"z") == []
                assert await tr.get_range(b"", b"a") == []
                assert await tr.get_range(b"", _END) == sorted(data.items())
                assert await tr.get_range(b"d", b"d", limit=3, reverse=True) == []
                await _check_ranges(tr, data, [b"", b"a", b"b", b"bb", b"c", b"cz", _END])

        self._run(store_factory, body)

    def test_get_range_limit_and_reverse(self, store_factory: StoreFactory) -> None:
        """Returns the first `limit` pairs in the chosen direction; 0 or a large limit, all."""
        data = {b"k%d" % i: b"v%d" % i for i in range(6)}

        async def body(store: Store) -> None:
            await _put(store, data)
            async with store.transaction() as tr:
                assert await tr.get_range(b"k", b"l", limit=2) == [(b"k0", b"v0"), (b"k1", b"v1")]
                assert await tr.get_range(b"k", b"l", limit=2, reverse=True) == [
                    (b"k5", b"v5"),
                    (b"k4", b"v4"),
                ]
                assert len(await tr.get_range(b"k", b"l", limit=0)) == 6
                assert len(await tr.get_range(b"k", b"l", limit=100)) == 6
                assert await tr.get_range(b"k2", b"k4", limit=1, reverse=True) == [(b"k3", b"v3")]
                await _check_ranges(tr, data, [b"", b"k0", b"k2", b"k3", b"k5", _END])

        self._run(store_factory, body)

    def test_clear_range_removes_exactly_the_half_open_range(
        self, store_factory: StoreFactory
    ) -> None:
        """Removes begin <= key < end and nothing else; an empty range clears nothing."""
        data = {key: key for key in (b"a", b"b", b"b\x00", b"bz", b"c", b"c\x00", b"d")}

        async def body(store: Store) -> None:
            await _put(store, data)
            async with store.transaction() as tr:
                tr.clear_range(b"b", b"c")
                tr.clear_range(b"d", b"d")
                await tr.commit()
            assert await _contents(store) == {key: key for key in (b"a", b"c", b"c\x00", b"d")}
            async with store.transaction() as tr:
                tr.clear_range(b"", _END)
                await tr.commit()
            assert await _contents(store) == {}

        self._run(store_factory, body)

    def test_range_reads_skip_cleared_keys(self, store_factory: StoreFactory) -> None:
        """Does not return keys cleared by earlier commits, with or without a limit."""
        data = {b"k%d" % i: b"v%d" % i for i in range(10)}

        async def body(store: Store) -> None:
            await _put(store, data)
            async with store.transaction() as tr:
                tr.clear_range(b"k1", b"k5")
                for i in (5, 6, 7, 8):
                    tr.clear(b"k%d" % i)
                await tr.commit()
            left = {b"k0": b"v0", b"k9": b"v9"}
            async with store.transaction() as tr:
                assert await tr.get_range(b"k", b"l", limit=2) == [(b"k0", b"v0"), (b"k9", b"v9")]
                assert await tr.get_range(b"k1", b"l", limit=1) == [(b"k9", b"v9")]
                assert await tr.get_range(b"k", b"k9", limit=1, reverse=True) == [(b"k0", b"v0")]
                assert await tr.get(b"k4") is None
                await _check_ranges(tr, left, [b"k", b"k0", b"k1", b"k5", b"k9", b"l"])
            await _put(store, {b"k3": b"back"})
            assert await _rows(store, b"k1", b"k9") == [(b"k3", b"back")]

        self._run(store_factory, body)

    # -- read-your-writes ----------------------------------------------------------------

    def test_reads_see_own_writes(self, store_factory: StoreFactory) -> None:
        """Point reads see the transaction's own sets and clears before it commits."""

        async def body(store: Store) -> None:
            await _put(store, {b"a": b"stored", b"b": b"stored", b"c1": b"stored"})
            async with store.transaction() as tr:
                tr.set(b"a", b"mine")
                tr.clear(b"b")
                tr.set(b"new", b"")
                tr.clear_range(b"c", b"d")
                assert await tr.get(b"a") == b"mine"
                assert await tr.get(b"b") is None
                assert await tr.get(b"new") == b""
                assert await tr.get(b"c1") is None
                tr.set(b"c2", b"after the clear")
                assert await tr.get(b"c2") == b"after the clear"
                tr.clear_range(b"a", b"b")
                assert await tr.get(b"a") is None
                tr.set(b"a", b"again")
                assert await tr.get(b"a") == b"again"
                await tr.commit()
            assert await _contents(store) == {
                b"a": b"again",
                b"c2": b"after the clear",
                b"new": b"",
            }

        self._run(store_factory, body)

    def test_range_reads_merge_own_writes(self, store_factory: StoreFactory) -> None:
        """Range reads merge own sets and clears into stored data, with any limit, both ways."""
        stored = {key: b"stored-" + key for key in (b"a", b"b", b"c", b"d", b"e", b"f", b"g")}
        writes: list[tuple[bytes, bytes, bytes | None]] = [
            (b"b", b"b\x00", b"own-b"),  # overwrite
            (b"bb", b"bb\x00", b"own-bb"),  # insert
            (b"c", b"c\x00", None),  # point clear
            (b"d", b"e\x00", None),  # clear_range over d and e
            (b"dd", b"dd\x00", b"own-dd"),  # set inside the cleared range
            (b"f", b"g", None),  # clear_range, then set the same key again
            (b"f", b"f\x00", b"own-f"),
            (b"h", b"h\x00", b""),  # an empty value past every stored key
            (b"0", b"0\x00", b"own-0"),  # before every stored key
        ]
        points = [b"", b"a", b"b", b"c", b"d", b"dd", b"f", b"g", _END]

        async def body(store: Store) -> None:
            await _put(store, stored)
            model = dict(stored)
            async with store.transaction() as tr:
                for begin, end, value in writes:
                    if value is not None:
                        tr.set(begin, value)
                    elif end == key_after(begin):
                        tr.clear(begin)
                    else:
                        tr.clear_range(begin, end)
                    _apply(model, begin, end, value)
                await _check_ranges(tr, model, points)
                await _check_ranges(tr, model, [b"", b"c", b"e", _END], snapshot=True)
                await tr.commit()
            assert await _contents(store) == model

        self._run(store_factory, body)

    def test_range_reads_with_a_limit_look_past_own_clears(
        self, store_factory: StoreFactory
    ) -> None:
        """A limit counts rows left after own clears and sets, not the stored rows they hide."""
        stored = {b"k%d" % i: b"v%d" % i for i in range(10)}

        async def body(store: Store) -> None:
            await _put(store, stored)
            async with store.transaction() as tr:
                for i in range(8):
                    tr.clear(b"k%d" % i)
                assert await tr.get_range(b"k", b"l", limit=1) == [(b"k8", b"v8")]
                assert await tr.get_range(b"k", b"l", limit=2, reverse=True) == [
                    (b"k9", b"v9"),
                    (b"k8", b"v8"),
                ]
                tr.clear(b"k9")
                assert await tr.get_range(b"k", b"l", limit=1, reverse=True) == [(b"k8", b"v8")]
                assert await tr.get_range(b"k", b"l", limit=5) == [(b"k8", b"v8")]
                tr.set(b"k3", b"own")
                tr.set(b"k85", b"own")
                assert await tr.get_range(b"k", b"l", limit=2) == [
                    (b"k3", b"own"),
                    (b"k8", b"v8"),
                ]
                assert await tr.get_range(b"k", b"l", limit=2, reverse=True) == [
                    (b"k85", b"own"),
                    (b"k8", b"v8"),
                ]
            async with store.transaction() as tr:
                tr.set(b"k05", b"own")
                tr.set(b"k15", b"own")
                tr.clear_range(b"k2", b"k7")
                tr.set(b"k45", b"own")
                model = {**stored, b"k05": b"own", b"k15": b"own"}
                for i in range(2, 7):
                    del model[b"k%d" % i]
                model[b"k45"] = b"own"
                await _check_ranges(tr, model, [b"k", b"k1", b"k2", b"k45", b"k5", b"k8", b"l"])

        self._run(store_factory, body)

    def test_range_reads_match_a_model_over_random_writes(
        self, store_factory: StoreFactory
    ) -> None:
        """Range reads equal a dict model after random mixes of stored data and own writes."""
        rng = Rng(20240607)

        async def body(store: Store) -> None:
            for scenario in range(8):
                whole = prefix_range(pack(("ryw", scenario)))
                keys = [pack(("ryw", scenario, i)) for i in range(8)]
                keys.append(key_after(keys[3]))
                stored = {key: b"s%d" % i for i, key in enumerate(keys) if rng.chance(0.6)}
                await _put(store, stored)
                model = dict(stored)
                bounds = [*keys, *whole]
                points = sorted({*rng.sample(bounds, 4), *whole})
                async with store.transaction() as tr:
                    for step in range(8):
                        key = rng.choice(keys)
                        begin, end = sorted(rng.sample(bounds, 2))
                        kind = rng.choice(("set", "set", "clear", "clear_range"))
                        if kind == "set":
                            tr.set(key, b"w%d" % step)
                            _apply(model, key, key_after(key), b"w%d" % step)
                        elif kind == "clear":
                            tr.clear(key)
                            _apply(model, key, key_after(key), None)
                        else:
                            tr.clear_range(begin, end)
                            _apply(model, begin, end, None)
                        if step % 4 == 3:
                            await _check_ranges(tr, model, points, limits=(0, 1, 2, 3))
                    await tr.commit()
                assert await _contents(store, *whole) == model

        self._run(store_factory, body)

    # -- atomic commit ---------------------------------------------------------------------

    def test_commit_is_all_or_nothing(self, store_factory: StoreFactory) -> None:
        """A commit's writes appear together; a refused commit writes none of them."""
        many = {b"m%03d" % i: b"x" * 100 for i in range(50)}

        async def body(store: Store) -> None:
            await _put(store, {b"n": b"0"})
            async with store.transaction() as before:
                assert await before.get(b"m000") is None
                await _put(store, many)
                assert await before.get_range(b"m", b"n") == []
            assert await _contents(store, b"m", b"n") == many
            async with store.transaction() as t1, store.transaction() as t2:
                assert await t1.get(b"n") == await t2.get(b"n") == b"0"
                for i in range(50):
                    t1.set(b"loser%03d" % i, b"x")
                t1.clear_range(b"m", b"n")
                t1.set(b"n", b"t1")
                t2.set(b"n", b"t2")
                assert await _try_commit(t2)
                assert not await _try_commit(t1)
            assert await _contents(store, b"loser", b"losers") == {}
            assert await _contents(store, b"m", b"n") == many
            assert await _contents(store, b"n", b"n\x00") == {b"n": b"t2"}

        self._run(store_factory, body)

    def test_leaving_without_commit_writes_nothing(self, store_factory: StoreFactory) -> None:
        """A transaction left without commit(), by exception or by aclose(), writes nothing."""

        async def body(store: Store) -> None:
            await _put(store, {b"keep": b"1"})
            async with store.transaction() as tr:
                tr.set(b"a", b"1")
                tr.clear(b"keep")
            with pytest.raises(ValueError, match="on purpose"):
                async with store.transaction() as tr:
                    tr.set(b"b", b"1")
                    tr.clear_range(b"", _END)
                    raise ValueError("on purpose")
            tr = store.transaction()
            tr.set(b"c", b"1")
            await tr.aclose()
            with pytest.raises(TransactionClosed):
                await tr.commit()
            assert await _contents(store) == {b"keep": b"1"}

        self._run(store_factory, body)

    def test_a_cancelled_transaction_writes_nothing(self, store_factory: StoreFactory) -> None:
        """A transaction whose task is cancelled before commit() writes nothing."""

        async def body(store: Store) -> None:
            with trio.CancelScope() as scope:
                async with store.transaction() as tr:
                    tr.set(b"a", b"1")
                    assert await tr.get(b"a") == b"1"
                    scope.cancel()
                    await trio.lowlevel.checkpoint()
                    await tr.commit()  # pragma: no cover (cancelled before)
            assert scope.cancelled_caught
            assert await _contents(store) == {}
            await _put(store, {b"b": b"1"})
            assert await _contents(store) == {b"b": b"1"}

        self._run(store_factory, body)

    # -- isolation -----------------------------------------------------------------------

    def test_a_transaction_keeps_its_snapshot(self, store_factory: StoreFactory) -> None:
        """Reads keep seeing the snapshot after another transaction commits over it."""

        async def body(store: Store) -> None:
            await _put(store, {b"a": b"1", b"c": b"1"})
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                async with store.transaction() as other:
                    other.set(b"a", b"2")
                    other.set(b"b", b"2")
                    other.clear(b"c")
                    await other.commit()
                assert await tr.get(b"a") == b"1"
                assert await tr.get(b"b") is None
                assert await tr.get(b"c") == b"1"
                assert await tr.get_range(b"", _END) == [(b"a", b"1"), (b"c", b"1")]
                assert await tr.get(b"a", snapshot=True) == b"1"
            async with store.transaction() as later:
                assert await later.get_range(b"", _END) == [(b"a", b"2"), (b"b", b"2")]

        self._run(store_factory, body)

    def test_lost_update_is_refused(self, store_factory: StoreFactory) -> None:
        """Of two read-modify-writes of one key from one snapshot, at most one commits."""

        async def body(store: Store) -> None:
            await _put(store, {b"n": b"0"})
            async with store.transaction() as t1, store.transaction() as t2:
                v1 = await t1.get(b"n")
                v2 = await t2.get(b"n")
                assert v1 == v2 == b"0"
                t1.set(b"n", b"1")
                t2.set(b"n", b"1")
                committed = [await _try_commit(t1), await _try_commit(t2)]
            assert committed != [True, True]
            if store.precise_conflicts:
                assert committed == [True, False]
            expected = b"1" if any(committed) else b"0"
            assert await _contents(store) == {b"n": expected}

        self._run(store_factory, body)

    def test_write_skew_is_refused(self, store_factory: StoreFactory) -> None:
        """Two that each read both keys and write a different one do not both commit."""

        async def body(store: Store) -> None:
            await _put(store, {b"x": b"on", b"y": b"on"})
            async with store.transaction() as t1, store.transaction() as t2:
                for tr in (t1, t2):
                    assert await tr.get(b"x") == await tr.get(b"y") == b"on"
                t1.set(b"x", b"off")  # each leaves only if the other stays on
                t2.set(b"y", b"off")
                committed = [await _try_commit(t1), await _try_commit(t2)]
            assert committed != [True, True]
            if store.precise_conflicts:
                assert committed == [True, False]
            assert list((await _contents(store)).values()).count(b"off") == sum(committed)

        self._run(store_factory, body)

    def test_phantom_write_skew_is_refused(self, store_factory: StoreFactory) -> None:
        """Two transactions that both find a range empty and insert into it do not both commit."""

        async def body(store: Store) -> None:
            await _put(store, {b"slot": b"", b"slou": b""})  # neighbours outside the range
            async with store.transaction() as t1, store.transaction() as t2:
                for tr in (t1, t2):
                    assert await tr.get_range(b"slot/", b"slot0") == []
                t1.set(b"slot/1", b"t1")
                t2.set(b"slot/2", b"t2")
                committed = [await _try_commit(t1), await _try_commit(t2)]
            assert committed != [True, True]
            if store.precise_conflicts:
                assert committed == [True, False]
            assert len(await _rows(store, b"slot/", b"slot0")) == sum(committed)

        self._run(store_factory, body)

    def test_read_only_transactions_always_commit(self, store_factory: StoreFactory) -> None:
        """A transaction that writes nothing commits, however much of what it read has changed."""

        async def body(store: Store) -> None:
            await _put(store, {b"a": b"1", b"r1": b"1"})
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                assert await tr.get_range(b"r", b"s") == [(b"r1", b"1")]
                await _put(store, {b"a": b"2", b"r2": b"2"})
                assert await tr.get(b"a") == b"1"
                tr.clear_range(b"z", b"z")  # an empty range: still no write
                await tr.commit()
            async with store.transaction() as tr:
                await tr.commit()

        self._run(store_factory, body)

    # -- FoundationDB's conflict rule (precise backends) --------------------------------------

    def test_a_stale_point_read_conflicts(self, store_factory: StoreFactory) -> None:
        """A key read, then changed, cleared or created by a later commit, conflicts its reader.

        (Every test of FoundationDB's rule is skipped on a store without precise_conflicts.)
        """

        async def body(store: Store) -> None:
            self._require_precise(store)
            await _put(store, {b"a": b"0", b"b": b"0"})
            changes: list[Callable[[Transaction], None]] = [
                lambda tr: tr.set(b"a", b"1"),
                lambda tr: tr.clear(b"a"),
                lambda tr: tr.clear_range(b"", b"b"),
                lambda tr: tr.set(b"a", b"0"),  # the same value is still a write
            ]
            for change in changes:
                await _put(store, {b"a": b"0"})
                async with store.transaction() as tr:
                    assert await tr.get(b"a") == b"0"
                    async with store.transaction() as other:
                        change(other)
                        await other.commit()
                    tr.set(b"b", b"written")
                    with pytest.raises(Conflict) as info:
                        await tr.commit()
                    assert info.value.retryable
            async with store.transaction() as tr:
                assert await tr.get(b"new") is None
                await _put(store, {b"new": b"1"})
                tr.set(b"b", b"written")
                with pytest.raises(Conflict):
                    await tr.commit()
            assert await _contents(store, b"b", b"c") == {b"b": b"0"}

        self._run(store_factory, body)

    def test_a_phantom_in_a_read_range_conflicts(self, store_factory: StoreFactory) -> None:
        """A commit that inserts into, or clears part of, a range read makes its reader conflict."""

        async def body(store: Store) -> None:
            self._require_precise(store)
            changes: list[Callable[[Transaction], None]] = [
                lambda tr: tr.set(b"r2", b"phantom"),
                lambda tr: tr.set(b"r", b"at the begin"),
                lambda tr: tr.clear(b"r1"),
                lambda tr: tr.clear_range(b"q", b"r1\x00"),
                lambda tr: tr.clear_range(b"r3", b"z"),
            ]
            for change in changes:
                await _replace(store, {b"r1": b"1", b"r3": b"3"})
                async with store.transaction() as tr:
                    assert len(await tr.get_range(b"r", b"s")) == 2
                    async with store.transaction() as other:
                        change(other)
                        await other.commit()
                    tr.set(b"w", b"written")
                    assert not await _try_commit(tr)
            assert await _contents(store, b"w", b"x") == {}

        self._run(store_factory, body)

    def test_disjoint_writes_do_not_conflict(self, store_factory: StoreFactory) -> None:
        """Commits that write only outside what a transaction read do not make it conflict."""

        async def body(store: Store) -> None:
            self._require_precise(store)
            await _put(store, {b"a": b"0", b"c1": b"0"})
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"0"
                assert await tr.get_range(b"c", b"e") == [(b"c1", b"0")]
                async with store.transaction() as other:
                    other.set(key_after(b"a"), b"just after a")
                    other.set(b"b", b"between")
                    other.set(b"e", b"the range's end, exclusive")
                    other.clear_range(key_after(b"a"), b"c")
                    other.clear_range(b"e", b"f")
                    other.set(b"\x00", b"first")
                    await other.commit()
                tr.set(b"a", b"1")
                tr.set(b"c1", b"1")
                await tr.commit()
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                assert await tr.get(b"c1") == b"1"

        self._run(store_factory, body)

    def test_a_limited_range_read_conflicts_only_on_the_part_scanned(
        self, store_factory: StoreFactory
    ) -> None:
        """A range read cut short by its limit conflicts only up to the last key it returned."""
        stored = {b"L1": b"", b"L3": b"", b"L5": b"", b"L7": b""}
        # (reverse, key another commit sets, whether the reader must conflict)
        cases = [
            (False, b"L4", False),
            (False, b"L3\x00", False),
            (False, b"L3", True),
            (False, b"L2", True),
            (False, b"L0", True),
            (True, b"L4", False),
            (True, b"L4\xff", False),
            (True, b"L5", True),
            (True, b"L6", True),
            (True, b"L8", True),
        ]

        async def body(store: Store) -> None:
            self._require_precise(store)
            for reverse, key, conflicts in cases:
                await _replace(store, stored)
                async with store.transaction() as tr:
                    rows = await tr.get_range(b"L0", b"L9", limit=2, reverse=reverse)
                    assert [k for k, _ in rows] == ([b"L7", b"L5"] if reverse else [b"L1", b"L3"])
                    await _put(store, {key: b"other"})
                    tr.set(b"w", b"1")
                    assert await _try_commit(tr) is not conflicts, (reverse, key)
            # Own writes count among the rows returned, so they bound the part scanned too.
            await _replace(store, stored)
            async with store.transaction() as tr:
                tr.set(b"L2", b"own")
                assert [k for k, _ in await tr.get_range(b"L0", b"L9", limit=2)] == [b"L1", b"L2"]
                await _put(store, {b"L25": b"past the part scanned"})
                tr.set(b"w", b"1")
                await tr.commit()

        self._run(store_factory, body)

    def test_snapshot_reads_add_no_conflict(self, store_factory: StoreFactory) -> None:
        """Keys and ranges read with snapshot=True may change without making the reader conflict."""

        async def body(store: Store) -> None:
            self._require_precise(store)
            await _put(store, {b"a": b"0", b"r1": b"0"})
            async with store.transaction() as tr:
                assert await tr.get(b"a", snapshot=True) == b"0"
                assert await tr.get(b"missing", snapshot=True) is None
                assert await tr.get_range(b"r", b"s", snapshot=True) == [(b"r1", b"0")]
                assert await tr.get_range(b"r", b"s", limit=1, snapshot=True, reverse=True) == [
                    (b"r1", b"0")
                ]
                await _put(store, {b"a": b"1", b"missing": b"1", b"r2": b"1"})
                assert await tr.get(b"a", snapshot=True) == b"0"
                tr.set(b"w", b"1")
                await tr.commit()
            assert await _contents(store, b"w", b"x") == {b"w": b"1"}

        self._run(store_factory, body)

    def test_reading_own_writes_adds_no_conflict(self, store_factory: StoreFactory) -> None:
        """Point reads answered by the transaction's own writes add no conflict."""

        async def body(store: Store) -> None:
            self._require_precise(store)
            await _put(store, {b"a": b"0", b"b": b"0", b"c1": b"0"})
            async with store.transaction() as tr:
                tr.set(b"a", b"mine")
                tr.clear(b"b")
                tr.clear_range(b"c", b"d")
                assert await tr.get(b"a") == b"mine"
                assert await tr.get(b"b") is None
                assert await tr.get(b"c1") is None
                await _put(store, {b"a": b"other", b"b": b"other", b"c1": b"other"})
                await tr.commit()
            assert await _contents(store) == {b"a": b"mine"}

        self._run(store_factory, body)

    def test_blind_writes_do_not_conflict(self, store_factory: StoreFactory) -> None:
        """A transaction that read nothing commits over concurrent writes; the last commit wins."""

        async def body(store: Store) -> None:
            self._require_precise(store)
            async with store.transaction() as t1, store.transaction() as t2:
                await t1.read_version()
                await t2.read_version()
                t1.set(b"k", b"t1")
                t1.clear_range(b"r", b"s")
                t2.set(b"k", b"t2")
                t2.set(b"r1", b"t2")
                await t2.commit()
                await t1.commit()
            assert await _contents(store) == {b"k": b"t1"}

        self._run(store_factory, body)

    # -- limits ----------------------------------------------------------------------------

    def test_invalid_keys_are_refused(self, store_factory: StoreFactory) -> None:
        """Empty, non-bytes and system keys raise InvalidKey; the transaction stays usable."""
        bad: list[Any] = [
            b"",
            "a",
            None,
            1,
            bytearray(b"a"),
            memoryview(b"a"),
            b"\xff",
            b"\xff\x00",
        ]

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                for key in bad:
                    with pytest.raises(InvalidKey):
                        await tr.get(key)
                    with pytest.raises(InvalidKey):
                        tr.set(key, b"v")
                    with pytest.raises(InvalidKey):
                        tr.clear(key)
                for begin, end in [
                    ("a", "b"),
                    (b"a", None),
                    (b"a", b"\xff\x00"),
                    (b"\xff\x01", _END),
                ]:
                    bounds: list[Any] = [begin, end]
                    with pytest.raises(InvalidKey):
                        await tr.get_range(*bounds)
                    with pytest.raises(InvalidKey):
                        tr.clear_range(*bounds)
                tr.set(b"\xfe\xff", b"the last user keys are fine")
                assert await tr.get_range(b"", _END) == [
                    (b"\xfe\xff", b"the last user keys are fine")
                ]
                await tr.commit()
            assert await _contents(store) == {b"\xfe\xff": b"the last user keys are fine"}

        self._run(store_factory, body)

    def test_key_size_limit(self, store_factory: StoreFactory) -> None:
        """Keys of 10,000 bytes work; 10,001 raise KeyTooLarge and write nothing."""
        largest = _user_key(KEY_SIZE_MAX_BYTES, b"largest")
        too_large = _user_key(KEY_SIZE_MAX_BYTES + 1, b"too large")

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                tr.set(largest, b"v")
                with pytest.raises(KeyTooLarge):
                    tr.set(too_large, b"v")
                with pytest.raises(KeyTooLarge):
                    await tr.get(too_large)
                with pytest.raises(KeyTooLarge):
                    tr.clear(too_large)
                await tr.commit()
            async with store.transaction() as tr:
                assert await tr.get(largest) == b"v"
                assert await tr.get_range(largest, key_after(largest)) == [(largest, b"v")]
                assert await tr.get_range(b"", _END) == [(largest, b"v")]
                tr.clear_range(largest, key_after(largest))
                await tr.commit()
            assert await _contents(store) == {}

        self._run(store_factory, body)

    def test_value_size_limit(self, store_factory: StoreFactory) -> None:
        """Values of 100,000 bytes work; 100,001 raise ValueTooLarge and buffer nothing."""
        largest = _noise(VALUE_SIZE_MAX_BYTES, b"largest value")

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                tr.set(b"big", largest)
                with pytest.raises(ValueTooLarge):
                    tr.set(b"too big", largest + b"!")
                with pytest.raises(ValueTooLarge):
                    tr.set(b"big", largest + b"!")
                bad: Any = "text"
                with pytest.raises((TypeError, StorageError)):
                    tr.set(b"text", bad)
                assert await tr.get(b"big") == largest
                assert await tr.get(b"too big") is None
                await tr.commit()
            assert await _contents(store) == {b"big": largest}

        self._run(store_factory, body)

    def test_transaction_size_limit(self, store_factory: StoreFactory) -> None:
        """A transaction that writes over 10 MB raises TransactionTooLarge and writes nothing."""
        value = _noise(VALUE_SIZE_MAX_BYTES, b"ten megabytes")

        async def body(store: Store) -> None:
            fits = TRANSACTION_SIZE_MAX_BYTES // (VALUE_SIZE_MAX_BYTES + 10)
            async with store.transaction() as tr:
                tr.set(b"first", b"1")
                for i in range(fits):
                    tr.set(b"chunk%03d" % i, value)
                with pytest.raises(TransactionTooLarge):
                    for i in range(fits, fits + 2):
                        tr.set(b"chunk%03d" % i, value)
                with pytest.raises(TransactionTooLarge):
                    await tr.commit()
            assert await _contents(store) == {}
            await _put(store, {b"after": b"1"})
            assert await _contents(store) == {b"after": b"1"}

        self._run(store_factory, body)

    def test_read_conflict_ranges_count_toward_the_size_limit(
        self, store_factory: StoreFactory
    ) -> None:
        """The bounds of the ranges a transaction reads count toward its 10 MB."""
        low = b"r" + b"\x01" * (KEY_SIZE_MAX_BYTES - 1)
        high = b"r" + b"\x02" * (KEY_SIZE_MAX_BYTES - 1)

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                tr.clear_range(b"r", b"s")  # so the reads below are answered locally
                with pytest.raises(TransactionTooLarge):
                    for _ in range(TRANSACTION_SIZE_MAX_BYTES // (2 * KEY_SIZE_MAX_BYTES) + 1):
                        assert await tr.get_range(low, high) == []
                with pytest.raises(TransactionTooLarge):
                    await tr.commit()

        self._run(store_factory, body)

    def test_transactions_older_than_5_s_are_refused(self, store_factory: StoreFactory) -> None:
        """A transaction past 5 s raises TransactionTooOld (retryable) from reads and commit."""
        clock = self._mock_clock()
        limit_s = TRANSACTION_DURATION_MAX_MS / 1000

        async def body(store: Store) -> None:
            await _put(store, {b"a": b"1"})
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                tr.set(b"b", b"1")
                clock.jump(limit_s - 1)
                assert await tr.get(b"a") == b"1"
                clock.jump(2)
                with pytest.raises(TransactionTooOld) as info:
                    await tr.get(b"a")
                assert info.value.retryable
                with pytest.raises(TransactionTooOld):
                    await tr.commit()
            async with store.transaction() as tr:
                tr.set(b"c", b"1")
                clock.jump(limit_s + 1)
                with pytest.raises(TransactionTooOld):
                    await tr.commit()
            async with store.transaction() as tr:
                await tr.get(b"a")
                clock.jump(limit_s + 1)
                with pytest.raises(TransactionTooOld):
                    await tr.get_range(b"", _END)
            assert await _contents(store) == {b"a": b"1"}

        run_with_store(store_factory, body, clock=clock)

    def test_invalid_ranges_are_refused(self, store_factory: StoreFactory) -> None:
        """A range whose begin is after its end, or a negative limit, raises InvalidRange."""

        async def body(store: Store) -> None:
            await _put(store, {b"a": b"1"})
            async with store.transaction() as tr:
                with pytest.raises(InvalidRange):
                    await tr.get_range(b"b", b"a")
                with pytest.raises(InvalidRange):
                    await tr.get_range(_END, b"")
                with pytest.raises(InvalidRange):
                    tr.clear_range(b"b", b"a")
                for limit in (-1, -100):
                    with pytest.raises(InvalidRange):
                        await tr.get_range(b"a", b"b", limit=limit)
                assert await tr.get_range(b"a", b"b") == [(b"a", b"1")]

        self._run(store_factory, body)

    def test_a_finished_transaction_refuses_use(self, store_factory: StoreFactory) -> None:
        """After commit, a refused commit or close, every operation raises TransactionClosed."""

        async def use(tr: Transaction) -> None:
            attempts: list[Callable[[], Awaitable[object]]] = [
                lambda: tr.get(b"a"),
                lambda: tr.get_range(b"a", b"b"),
                tr.read_version,
                tr.commit,
            ]
            for attempt in attempts:
                with pytest.raises(TransactionClosed):
                    await attempt()
            writes: list[Callable[[], None]] = [
                lambda: tr.set(b"a", b"1"),
                lambda: tr.clear(b"a"),
                lambda: tr.clear_range(b"a", b"b"),
            ]
            for write in writes:
                with pytest.raises(TransactionClosed):
                    write()

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                tr.set(b"a", b"0")
                await tr.commit()
            await use(tr)
            await tr.aclose()  # closing twice is harmless
            async with store.transaction() as tr:
                await tr.get(b"a")
            await use(tr)
            async with store.transaction() as t1, store.transaction() as t2:
                assert await t1.get(b"a") == await t2.get(b"a") == b"0"
                t1.set(b"a", b"1")
                t2.set(b"a", b"2")
                await t1.commit()
                assert not await _try_commit(t2)
                await use(t2)
            assert await _contents(store) == {b"a": b"1"}

        self._run(store_factory, body)

    # -- the store's clock -------------------------------------------------------------------

    def test_read_version_is_stable_within_a_transaction(self, store_factory: StoreFactory) -> None:
        """Every read_version() of one transaction returns the same version."""

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                first = await tr.read_version()
                assert isinstance(first, int)
                assert first >= 0
                await tr.get(b"a")
                await _put(store, {b"a": b"1"})
                await trio.sleep(0.01)
                assert await tr.read_version() == first
                tr.set(b"b", b"1")
                assert await tr.read_version() == first

        self._run(store_factory, body)

    def test_read_versions_advance_across_commits(self, store_factory: StoreFactory) -> None:
        """A transaction started after a commit reads at a later version than the committer did."""

        async def body(store: Store) -> None:
            previous = -1
            for i in range(5):
                async with store.transaction() as tr:
                    version = await tr.read_version()
                    assert version > previous, (i, version, previous)
                    tr.set(b"k", b"%d" % i)
                    await tr.commit()
                previous = version
            async with store.transaction() as t1:
                v1 = await t1.read_version()
            async with store.transaction() as t2:
                assert await t2.read_version() >= v1

        self._run(store_factory, body)

    def test_read_version_advances_with_time(self, store_factory: StoreFactory) -> None:
        """Versions advance by about VERSIONS_PER_SECOND per second of the store's clock."""
        pause_s = 0.25

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                before = await tr.read_version()
            await trio.sleep(pause_s)
            async with store.transaction() as tr:
                after = await tr.read_version()
            elapsed = after - before
            assert pause_s * VERSIONS_PER_SECOND / 2 <= elapsed <= 20 * VERSIONS_PER_SECOND, elapsed

        self._run(store_factory, body)

    # -- transact ----------------------------------------------------------------------------

    def test_transact_converges_under_contention(self, store_factory: StoreFactory) -> None:
        """Concurrent read-modify-write increments through transact() each land exactly once."""
        clients = 8

        async def body(store: Store) -> None:
            calls = 0

            async def increment(tr: Transaction) -> int:
                nonlocal calls
                calls += 1
                value = int(await tr.get(b"counter") or b"0")
                await trio.lowlevel.checkpoint()
                tr.set(b"counter", b"%d" % (value + 1))
                return value

            seen: list[int] = []

            async def client(rng: Rng) -> None:
                seen.append(await transact(store, increment, rng=rng, policy=_QUICK))

            rng = Rng(11)
            async with trio.open_nursery() as nursery:
                for i in range(clients):
                    nursery.start_soon(client, rng.fork(f"client-{i}"))
            assert await _contents(store) == {b"counter": b"%d" % clients}
            assert sorted(seen) == list(range(clients))
            assert calls >= clients

        self._run(store_factory, body)

    def test_transact_gives_up_after_attempts_max(self, store_factory: StoreFactory) -> None:
        """transact() raises the last Conflict, with a note, after attempts_max attempts."""

        async def body(store: Store) -> None:
            await _put(store, {b"n": b"0"})
            calls = 0

            async def always_overtaken(tr: Transaction) -> None:
                nonlocal calls
                calls += 1
                value = int(await tr.get(b"n") or b"0")
                async with store.transaction() as other:  # a rival bumps n first, every time
                    rival = int(await other.get(b"n") or b"0")
                    other.set(b"n", b"%d" % (rival + 100))
                    await other.commit()
                tr.set(b"n", b"%d" % (value + 1))

            policy = RetryPolicy(attempts_max=3, backoff_initial_ms=0, backoff_max_ms=0)
            with pytest.raises(Conflict) as info:
                await transact(store, always_overtaken, rng=Rng(1), policy=policy)
            assert calls == 3
            assert any("3 attempts" in note for note in getattr(info.value, "__notes__", []))
            assert await _contents(store) == {b"n": b"300"}

        self._run(store_factory, body)

    def test_transact_raises_other_errors_at_once(self, store_factory: StoreFactory) -> None:
        """transact() raises at once an error that is not retryable, or not a StorageError."""

        async def body(store: Store) -> None:
            calls = 0

            async def bad_key(tr: Transaction) -> None:
                nonlocal calls
                calls += 1
                tr.set(b"ok", b"1")
                tr.set(b"", b"the empty key")

            with pytest.raises(InvalidKey):
                await transact(store, bad_key, rng=Rng(1), policy=_QUICK)
            assert calls == 1

            async def broken(tr: Transaction) -> None:
                nonlocal calls
                calls += 1
                tr.set(b"ok", b"1")
                raise ValueError("a bug in the caller")

            with pytest.raises(ValueError, match="a bug"):
                await transact(store, broken, rng=Rng(1), policy=_QUICK)
            assert calls == 2
            assert await _contents(store) == {}

        self._run(store_factory, body)

    def test_commit_unknown_result_can_apply_a_blind_increment_twice(
        self, store_factory: StoreFactory
    ) -> None:
        """A blind increment retried after CommitUnknownResult applies twice if the first landed."""

        async def body(store: Store) -> None:
            for applied, expected in ((True, b"2"), (False, b"1")):
                wrapped = _UnknownResultStore(store, unknown_at=[1], applied=applied)
                key = b"blind-%d" % applied

                async def increment(tr: Transaction, key: bytes = key) -> None:
                    tr.set(key, b"%d" % (int(await tr.get(key) or b"0") + 1))

                await transact(wrapped, increment, rng=Rng(1), policy=_QUICK)
                assert wrapped.injected == 1
                assert wrapped.commit_attempts == 2
                assert await _contents(store, key, key_after(key)) == {key: expected}

        self._run(store_factory, body)

    def test_a_marker_makes_a_retried_transaction_apply_once(
        self, store_factory: StoreFactory
    ) -> None:
        """A transaction that checks and writes a marker applies once after CommitUnknownResult."""

        async def body(store: Store) -> None:
            for applied in (True, False):
                wrapped = _UnknownResultStore(store, unknown_at=[1, 2], applied=applied)
                key = b"counted-%d" % applied
                marker = b"marker-%d" % applied

                async def deposit(
                    tr: Transaction, key: bytes = key, marker: bytes = marker
                ) -> None:
                    if await tr.get(marker) is not None:
                        return  # an earlier attempt committed
                    tr.set(key, b"%d" % (int(await tr.get(key) or b"0") + 1))
                    tr.set(marker, b"")

                await transact(wrapped, deposit, rng=Rng(1), policy=_QUICK)
                assert wrapped.injected == 2
                assert await _contents(store, key, key_after(key)) == {key: b"1"}
                assert await _contents(store, marker, key_after(marker)) == {marker: b""}

        self._run(store_factory, body)

    # -- blobs -------------------------------------------------------------------------------

    def test_blobs_round_trip_at_chunk_boundaries(self, store_factory: StoreFactory) -> None:
        """Blobs of 0, 1, one chunk, one chunk plus one and ~2.5 MB read back unchanged."""
        sizes = [0, 1, CHUNK_SIZE_BYTES - 1, CHUNK_SIZE_BYTES, CHUNK_SIZE_BYTES + 1, 2_500_000]

        async def body(store: Store) -> None:
            for i, size in enumerate(sizes):
                prefix = pack(("blob", i))
                data = _noise(size, b"blob %d" % i)
                async with store.transaction() as tr:
                    write_blob(tr, prefix, data)
                    assert await read_blob(tr, prefix) == data  # read-your-writes
                    await tr.commit()
                async with store.transaction() as tr:
                    assert await read_blob(tr, prefix) == data, size
                    assert await read_blob(tr, prefix, snapshot=True) == data, size
                    rows = await tr.get_range(*prefix_range(prefix))
                    chunks = -(-size // CHUNK_SIZE_BYTES)
                    assert len(rows) == 1 + chunks, (size, len(rows))
                    assert all(len(value) <= VALUE_SIZE_MAX_BYTES for _, value in rows)
            async with store.transaction() as tr:
                assert await read_blob(tr, pack(("blob", "missing"))) is None

        self._run(store_factory, body)

    def test_overwriting_a_blob_leaves_no_stale_chunks(self, store_factory: StoreFactory) -> None:
        """Writing a smaller blob over a larger one, or clearing it, leaves none of its chunks."""
        prefix = pack(("blob", "doc"))
        begin, end = prefix_range(prefix)
        neighbours = {pack(("blob",)): b"before", end: b"just after", pack(("blob", "do")): b"x"}

        async def body(store: Store) -> None:
            await _put(store, neighbours)
            for size in (2_500_000, 150_000, 0, 250_000):
                data = _noise(size, b"%d" % size)
                async with store.transaction() as tr:
                    write_blob(tr, prefix, data)
                    await tr.commit()
                async with store.transaction() as tr:
                    assert await read_blob(tr, prefix) == data
                    assert len(await tr.get_range(begin, end)) == 1 + -(-size // CHUNK_SIZE_BYTES)
            async with store.transaction() as tr:
                clear_blob(tr, prefix)
                assert await read_blob(tr, prefix) is None
                await tr.commit()
            async with store.transaction() as tr:
                assert await read_blob(tr, prefix) is None
                assert await tr.get_range(begin, end) == []
            assert await _contents(store) == neighbours

        self._run(store_factory, body)

    def test_corrupt_blobs_are_detected(self, store_factory: StoreFactory) -> None:
        """A blob whose chunks or header were changed behind its back raises BlobCorrupt."""
        data = _noise(2 * CHUNK_SIZE_BYTES + 5_000, b"corrupt me")
        # Each damage gets the blob's rows (header first, then the chunks) and a transaction.
        damages: list[Callable[[list[KeyValue], Transaction], None]] = [
            lambda rows, tr: tr.set(rows[2][0], b"\x00" + rows[2][1][1:]),  # a flipped byte
            lambda rows, tr: tr.set(rows[3][0], rows[3][1][:-1]),  # a truncated chunk
            lambda rows, tr: tr.clear(rows[2][0]),  # a missing chunk
            lambda rows, tr: tr.set(rows[-1][0] + b"\x00", b"extra"),  # an extra key
            lambda rows, tr: tr.set(rows[0][0], b"junk"),  # a malformed header
            lambda rows, tr: tr.clear(rows[0][0]),  # no header
            lambda rows, tr: tr.set(rows[1][0], rows[2][1]),  # chunks swapped
        ]

        async def body(store: Store) -> None:
            for i, damage in enumerate(damages):
                prefix = pack(("blob", "corrupt", i))
                async with store.transaction() as tr:
                    write_blob(tr, prefix, data)
                    await tr.commit()
                async with store.transaction() as tr:
                    rows = await tr.get_range(*prefix_range(prefix))
                    assert len(rows) == 4
                    damage(rows, tr)
                    await tr.commit()
                async with store.transaction() as tr:
                    with pytest.raises(BlobCorrupt):
                        await read_blob(tr, prefix)

        self._run(store_factory, body)

    def test_blob_size_limit(self, store_factory: StoreFactory) -> None:
        """A blob of BLOB_SIZE_MAX_BYTES works; one byte more raises BlobTooLarge."""
        largest = _noise(BLOB_SIZE_MAX_BYTES, b"largest blob")

        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                with pytest.raises(BlobTooLarge):
                    write_blob(tr, pack(("blob", "huge")), largest + b"!")
                tr.set(b"still usable", b"1")
                await tr.commit()
            assert await _contents(store) == {b"still usable": b"1"}
            async with store.transaction() as tr:
                write_blob(tr, pack(("blob", "largest")), largest)
                await tr.commit()
            async with store.transaction() as tr:
                assert await read_blob(tr, pack(("blob", "largest"))) == largest
                assert await read_blob(tr, pack(("blob", "huge"))) is None

        self._run(store_factory, body)

    # -- the state machine -----------------------------------------------------------------

    def test_state_machine(self, store_factory: StoreFactory) -> None:
        """Concurrent transactions agree with a dict model, and every history is serializable."""
        machine = store_state_machine(store_factory, clock=self.trio_clock)
        run_state_machine_as_test(machine, settings=self.state_machine_settings)


# -- serializability of a committed history ----------------------------------------------------
