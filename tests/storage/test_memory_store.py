"""The memory backend passes the conformance suite; the suite fails a store that breaks the rules.

Besides the suite (with more state machine examples than the default, since the
memory store is fast), this module checks what only the memory store does
(pruning its version history) and checks the suite itself: its non-precise path
accepts a correct store, and both paths reject a store that never conflicts.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing
from hypothesis import Phase, settings
from hypothesis.stateful import run_state_machine_as_test

from kelpie.storage import KeyRange, MemoryStore, Store
from kelpie.storage.conformance import StoreConformance, StoreFactory, store_state_machine


class TestMemoryConformance(StoreConformance):
    state_machine_settings = settings(StoreConformance.state_machine_settings, max_examples=150)

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        async def make() -> Store:
            return MemoryStore()

        return make


class _NeverConflicts(MemoryStore):
    """A broken store: it commits everything, so lost updates and write skew go through."""

    def conflicting(self, read_version: int, read_conflicts: list[KeyRange]) -> list[KeyRange]:
        return []


def _factory(store_type: type[MemoryStore], *, precise: bool) -> StoreFactory:
    async def make() -> Store:
        store = store_type()
        store.precise_conflicts = precise
        return store

    return make


#: Quick, reproducible settings for checking the checker: no shrinking, a fixed seed.
_FIND = settings(
    StoreConformance.state_machine_settings,
    max_examples=200,
    derandomize=True,
    phases=[Phase.generate],
)


def test_the_state_machine_accepts_a_correct_store_declared_imprecise() -> None:
    """On a store without precise_conflicts, a correct store's histories pass the cycle check."""
    machine = store_state_machine(_factory(MemoryStore, precise=False))
    run_state_machine_as_test(machine, settings=settings(_FIND, max_examples=50))


def test_the_suite_fails_a_store_that_never_conflicts() -> None:
    """The anomaly tests and the state machine (precise) reject a store without conflicts."""
    factory = _factory(_NeverConflicts, precise=True)
    suite = StoreConformance()
    with pytest.raises(AssertionError):
        suite.test_lost_update_is_refused(factory)
    with pytest.raises(AssertionError):
        suite.test_write_skew_is_refused(factory)
    with pytest.raises(AssertionError, match="FDB's rule says it conflicts"):
        run_state_machine_as_test(store_state_machine(factory), settings=_FIND)


def test_the_history_check_fails_an_imprecise_store_that_never_conflicts() -> None:
    """Without a prediction to compare with, the serialization graph still finds the cycle."""
    machine = store_state_machine(_factory(_NeverConflicts, precise=False))
    with pytest.raises(AssertionError, match="not serializable"):
        run_state_machine_as_test(machine, settings=_FIND)


def _run_virtual(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


def test_history_is_pruned_but_young_snapshots_stay_readable() -> None:
    """Versions older than the transaction window are dropped; a 4.9 s old snapshot still reads."""

    async def main() -> None:
        store = MemoryStore()
        async with store.transaction() as tr:
            tr.set(b"k", b"0")
            tr.set(b"gone", b"x")
            await tr.commit()
        async with store.transaction() as tr:
            tr.clear(b"gone")
            await tr.commit()
        async with store.transaction() as old:
            assert await old.get(b"k") == b"0"
            for i in range(1, 50):
                await trio.sleep(0.1)
                async with store.transaction() as tr:
                    tr.set(b"k", b"%d" % i)
                    await tr.commit()
            assert await old.get(b"k") == b"0"  # 4.9 s old: still its snapshot
            assert await old.get_range(b"", b"\xff") == [(b"k", b"0")]
        for i in range(50, 200):
            await trio.sleep(0.1)
            async with store.transaction() as tr:
                tr.set(b"k", b"%d" % i)
                await tr.commit()
        # 6 s of history at 10 commits a second, and the cleared key is forgotten.
        assert len(store._history[b"k"]) <= 62
        assert len(store._log) <= 62
        assert b"gone" not in store._history
        assert store.snapshot() == {b"k": b"199"}
        assert store.commits == 201

    _run_virtual(main)


def test_committed_version_is_above_the_read_version() -> None:
    """A commit takes a version above its transaction's read version and every earlier commit."""

    async def main() -> None:
        store = MemoryStore()
        versions = []
        for i in range(3):
            tr = store.transaction()
            async with tr:
                read_version = await tr.read_version()
                tr.set(b"k", b"%d" % i)
                await tr.commit()
            assert tr.committed_version is not None
            assert tr.committed_version > read_version
            versions.append(tr.committed_version)
        assert versions == sorted(set(versions))
        assert store.version == versions[-1]

    trio.run(main)
