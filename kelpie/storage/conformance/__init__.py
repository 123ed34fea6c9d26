"""The storage conformance suite: what every backend of the contract must do.

Public so that a new backend's tests can import it. It needs the dev extras
(pytest and Hypothesis) and is never imported by runtime code. To run it against
a backend, subclass `StoreConformance` in a test module and provide a
`store_factory` fixture: a callable that, inside a running trio loop, returns a
new, empty store, which the suite closes when the test ends.

    class TestMyBackend(StoreConformance):
        @pytest.fixture
        def store_factory(self, tmp_path):
            async def make() -> Store:
                return await MyStore.open(tmp_path / "db")
            return make

What the suite checks, test by test (each docstring states the expectation):
ordering (bytewise, and tuple order for packed keys); get, set, clear,
clear_range; range reads (bounds, limit, reverse, cleared keys); reads of the
transaction's own writes merged into stored data, with limits and reverse;
atomic commit; snapshot isolation; the anomalies every serializable store
refuses (lost update, write skew, write skew through a phantom); on backends
with `precise_conflicts`, FoundationDB's exact conflict rule; the limits and
their typed errors; the store's clock (`read_version`); `transact` (retries,
giving up, what commit_unknown_result means for a retried transaction); blobs.

`test_state_machine` runs a Hypothesis state machine (`store_state_machine`)
against a dict model: up to three concurrent transactions, every read checked
exactly, commit outcomes predicted exactly on precise backends, and on every
backend the committed history checked for serializability with
`serialization_cycle`.

Hypothesis rules are synchronous while a store lives in one trio run, so the
state machine drives that run as a trio guest run hosted by the test's own
thread (`_GuestLoop`): the suite starts no thread, as the repository's rules
ask of kelpie/.

Two knobs for a subclass: `trio_clock()` (trio's real clock by default; a
MockClock with autojump suits a store that sleeps in virtual time) and
`state_machine_settings` (50 examples of 30 steps by default: a fast backend
can afford more, and a slow one may skip the shrink phase). A test that must
age a transaction past 5 s jumps a MockClock rather than sleeping.

The suite checks itself: tests/storage/test_memory_store.py runs it against a
store that never conflicts, which it must fail.
"""

from kelpie.storage.conformance._common import StoreFactory
from kelpie.storage.conformance._history import (
    CommittedTransaction,
    Dependency,
    describe_cycle,
    serialization_cycle,
)
from kelpie.storage.conformance._machine import store_state_machine
from kelpie.storage.conformance._suite import StoreConformance, run_with_store

__all__ = [
    "CommittedTransaction",
    "Dependency",
    "StoreConformance",
    "StoreFactory",
    "describe_cycle",
    "run_with_store",
    "serialization_cycle",
    "store_state_machine",
]
