"""`open_store`: a store from one string, the way a user configures it.

    memory                      the in-process memory backend (nothing survives a restart)
    sqlite:PATH                 a SQLite file, created if missing (sqlite:/srv/kelpie.db)
    postgresql://USER@HOST/DB   a PostgreSQL database (postgres:// works too); add
                                ?kelpie_table=NAME or SCHEMA.NAME for a table other
                                than kelpie_kv (the other parameters go to libpq)
    fdb:                        FoundationDB through its default cluster file
    fdb:PATH                    FoundationDB through the cluster file at PATH

Backends are imported only when named, so a deployment that never uses
PostgreSQL or FoundationDB never loads their client libraries.
"""

from __future__ import annotations

import urllib.parse

from kelpie.core import ConfigError
from kelpie.storage._api import Store
from kelpie.storage._memory import MemoryStore

FORMS = "memory, sqlite:PATH, postgresql://USER@HOST/DB, fdb: or fdb:CLUSTER_FILE"


async def open_store(spec: str) -> Store:
    """The store `spec` names (see the module docstring); ConfigError for anything else."""
    scheme, sep, rest = spec.partition(":")
    if spec == "memory":
        return MemoryStore()
    if sep and scheme == "sqlite":
        if not rest:
            raise ConfigError("sqlite: needs a file path, e.g. sqlite:/var/lib/kelpie/kelpie.db")
        from kelpie.storage._sqlite import SqliteStore

        return await SqliteStore.open(rest)
    if sep and scheme in ("postgresql", "postgres"):
        from kelpie.storage._postgres import PostgresStore

        url, table = _split_table(spec)
        return (
            await PostgresStore.open(url)
            if table is None
            else await PostgresStore.open(url, table=table)
        )
    if sep and scheme == "fdb":
        from kelpie.storage._fdb import FdbStore

        return await FdbStore.open(rest or None)
    raise ConfigError(f"unknown storage {spec!r}; use one of: {FORMS}")


def _split_table(url: str) -> tuple[str, str | None]:
    """(the URL without `kelpie_table`, its value): libpq refuses parameters it does not know."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    tables = [value for name, value in query if name == "kelpie_table"]
    if not tables:
        return url, None
    if len(tables) > 1:
        raise ConfigError(f"kelpie_table is given {len(tables)} times in {url!r}")
    rest = urllib.parse.urlencode([(n, v) for n, v in query if n != "kelpie_table"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), tables[0]
