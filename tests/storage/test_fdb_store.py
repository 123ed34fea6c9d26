"""The FoundationDB backend: the conformance suite on a real cluster, when there is one.

The run is switched on by KELPIE_FDB_CLUSTER_FILE. No registry reachable from
Kelpie's CI machines ships libfdb_c or fdbserver, so there the suite is skipped
with that reason, and only the client-library check below runs.
"""

from __future__ import annotations

import ctypes.util
import os

import pytest
import trio

from kelpie.core import ConfigError
from kelpie.env import Rng
from kelpie.storage import Store
from kelpie.storage.conformance import StoreConformance, StoreFactory

CLUSTER_FILE = os.environ.get("KELPIE_FDB_CLUSTER_FILE")
HAVE_CLIENT = ctypes.util.find_library("fdb_c") is not None

needs_cluster = pytest.mark.skipif(
    not CLUSTER_FILE,
    reason=(
        "set KELPIE_FDB_CLUSTER_FILE to run it: no registry reachable here ships "
        "FoundationDB's libfdb_c or fdbserver"
    ),
)


@needs_cluster
class TestFdbConformance(StoreConformance):
    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        from kelpie.storage._fdb import FdbStore

        async def make() -> Store:
            # A fresh prefix per test, so the suite never touches anything else.
            prefix = (
                b"kelpie-test/" + Rng(int.from_bytes(os.urandom(8))).randbytes(8).hex().encode()
            )
            store = await FdbStore.open(CLUSTER_FILE, prefix=prefix + b"/")
            async with store.transaction() as tr:
                tr.clear_range(b"\x00", b"\xff")
                await tr.commit()
            return store

        return make


@pytest.mark.skipif(HAVE_CLIENT, reason="libfdb_c is installed here")
def test_without_the_client_library_opening_says_what_to_install() -> None:
    from kelpie.storage._fdb import FdbStore

    async def main() -> None:
        with pytest.raises(ConfigError, match="libfdb_c"):
            await FdbStore.open("/nonexistent/fdb.cluster")

    trio.run(main)
