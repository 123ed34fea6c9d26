"""`open_store` picks the backend a configuration string names, and refuses anything else."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
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


def test_postgres_urls_can_name_the_table(postgres_url: str, postgres_new_table: Any) -> None:
    """`?kelpie_table=` picks the table and is kept from libpq; other parameters reach it."""
    table = postgres_new_table()
    sep = "&" if "?" in postgres_url else "?"

    async def main() -> None:
        store = await open_store(f"{postgres_url}{sep}kelpie_table={table}&connect_timeout=5")
        try:
            async with store.transaction() as tr:
                tr.set(b"k", b"v")
                await tr.commit()
        finally:
            await store.aclose()
        with psycopg.connect(postgres_url) as conn:
            schema, name = table.split(".")
            found = conn.execute(f'SELECT count(*) FROM "{schema}"."{name}"').fetchone()
            assert found == (1,)
        with pytest.raises(ConfigError, match="kelpie_table is given 2 times"):
            await open_store(f"{postgres_url}{sep}kelpie_table=a&kelpie_table=b")

    trio.run(main)
