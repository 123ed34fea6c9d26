"""The memory backend passes the conformance suite."""

from __future__ import annotations

import pytest

from kelpie.storage import MemoryStore, Store
from kelpie.storage.conformance import StoreConformance, StoreFactory


class TestMemoryConformance(StoreConformance):
    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        async def make() -> Store:
            return MemoryStore()

        return make
