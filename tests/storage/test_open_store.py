"""`open_store` picks the backend a configuration string names, and refuses anything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from kelpie.core import ConfigError
from kelpie.storage import MemoryStore, open_store


def test_memory_and_sqlite_open(tmp_path: Path) -> None:
    async def main() -> None:
        store = await open_store("memory")
        assert isinstance(store, MemoryStore)
        await store.aclose()
        path = tmp_path / "k.db"
        store = await open_store(f"sqlite:{path}")
        try:
            assert store.backend == "sqlite"
            async with store.transaction() as tr:
                tr.set(b"k", b"v")
                await tr.commit()
        finally:
            await store.aclose()
        assert path.exists()

    trio.run(main)


@pytest.mark.parametrize("spec", ["", "mem", "sqlite:", "redis://localhost", "/tmp/x.db"])
def test_unknown_specs_name_the_accepted_forms(spec: str) -> None:
    async def main() -> None:
        with pytest.raises(ConfigError, match="sqlite"):
            await open_store(spec)

    trio.run(main)
