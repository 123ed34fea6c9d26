"""The storage conformance suite: what every backend of the contract must do.

Public so that a new backend's tests can import it. It needs the dev extras
(pytest and Hypothesis). To run it against a backend, subclass
`StoreConformance` in a test module and provide a `store_factory` fixture: a
callable that, inside a running trio loop, returns a new, empty store, which
the suite closes when the test ends.

    class TestMyBackend(StoreConformance):
        @pytest.fixture
        def store_factory(self, tmp_path):
            async def make() -> Store:
                return await MyStore.open(tmp_path / "db")
            return make
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio

from kelpie.storage._api import Store
from kelpie.storage._errors import Conflict

StoreFactory = Callable[[], Awaitable[Store]]


def run_with_store(factory: StoreFactory, test: Callable[[Store], Awaitable[Any]]) -> None:
    """Runs `test(store)` on a new store in a fresh trio loop, then closes the store."""

    async def main() -> None:
        store = await factory()
        try:
            await test(store)
        finally:
            await store.aclose()

    trio.run(main)


class StoreConformance:
    """The suite (see the module docstring); every test gets a fresh store."""

    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        raise NotImplementedError("a subclass provides the store_factory fixture")

    def test_set_then_get(self, store_factory: StoreFactory) -> None:
        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                tr.set(b"a", b"1")
                await tr.commit()
            async with store.transaction() as tr:
                assert await tr.get(b"a") == b"1"
                assert await tr.get(b"b") is None

        run_with_store(store_factory, body)

    def test_lost_update_conflicts(self, store_factory: StoreFactory) -> None:
        async def body(store: Store) -> None:
            async with store.transaction() as tr:
                tr.set(b"n", b"0")
                await tr.commit()
            async with store.transaction() as t1, store.transaction() as t2:
                v1 = await t1.get(b"n")
                v2 = await t2.get(b"n")
                assert v1 == v2 == b"0"
                t1.set(b"n", b"1")
                t2.set(b"n", b"1")
                await t1.commit()
                with pytest.raises(Conflict):
                    await t2.commit()

        run_with_store(store_factory, body)
