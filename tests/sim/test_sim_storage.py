"""The simulated store: the conformance suite with faults off, and every fault with a consumer."""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Awaitable, Callable

import attrs
import pytest
import trio

from kelpie.env import Rng
from kelpie.sim import FaultConfig, Scenario, SimStore, StorageFaults, run_scenario
from kelpie.storage import (
    CommitUnknownResult,
    Conflict,
    CorruptionDetected,
    StorageUnavailable,
    Store,
    TransactionTooOld,
)
from kelpie.storage.conformance import StoreConformance, StoreFactory
from scenarios.bank import BankWorkload


class TestSimStoreConformance(StoreConformance):
    @pytest.fixture
    def store_factory(self) -> StoreFactory:
        async def make() -> Store:
            return SimStore(Rng(7))

        return make


def _run(fn: Callable[[], Awaitable[None]]) -> None:
    trio.run(fn, clock=trio.testing.MockClock(autojump_threshold=0))


async def _put(store: SimStore, key: bytes, value: bytes) -> None:
    async with store.transaction() as tr:
        tr.set(key, value)
        await tr.commit()


def test_read_errors_fail_reads() -> None:
    async def main() -> None:
        store = SimStore(Rng(1), StorageFaults(read_error_p=1.0))
        await _put(store, b"k", b"v")
        async with store.transaction() as tr:
            with pytest.raises(StorageUnavailable, match="read failure"):
                await tr.get(b"k")
        assert store.injected["read_error"] == 1

    _run(main)


def test_commit_errors_apply_nothing() -> None:
    async def main() -> None:
        store = SimStore(Rng(1), StorageFaults(commit_error_p=1.0))
        async with store.transaction() as tr:
            tr.set(b"k", b"v")
            with pytest.raises(StorageUnavailable, match="not applied"):
                await tr.commit()
        assert store.snapshot() == {}

    _run(main)


def test_injected_conflicts_apply_nothing() -> None:
    async def main() -> None:
        store = SimStore(Rng(1), StorageFaults(conflict_p=1.0))
        async with store.transaction() as tr:
            tr.set(b"k", b"v")
            with pytest.raises(Conflict, match="simulated"):
                await tr.commit()
        assert store.snapshot() == {}

    _run(main)


@pytest.mark.parametrize(
    ("field", "applied"), [("unknown_applied_p", True), ("unknown_lost_p", False)]
)
def test_unknown_results_may_or_may_not_apply(field: str, applied: bool) -> None:
    async def main() -> None:
        store = SimStore(Rng(1), StorageFaults(**{field: 1.0}))
        async with store.transaction() as tr:
            tr.set(b"k", b"v")
            with pytest.raises(CommitUnknownResult):
                await tr.commit()
        assert store.snapshot() == ({b"k": b"v"} if applied else {})

    _run(main)


def test_corruption_is_detected_and_never_served() -> None:
    async def main() -> None:
        store = SimStore(Rng(1), StorageFaults(corruption_p=1.0))
        await _put(store, b"k", b"value")
        for _ in range(20):
            async with store.transaction() as tr:
                with pytest.raises(CorruptionDetected, match="checksum"):
                    await tr.get(b"k")
        assert store.injected["corruption"] == 20
        assert store.snapshot() == {b"k": b"value"}  # the stored copy is intact

    _run(main)


def test_latency_takes_virtual_time() -> None:
    async def main() -> None:
        store = SimStore(Rng(1), StorageFaults(latency_max_ms=100.0))
        start = trio.current_time()
        for _ in range(10):
            await _put(store, b"k", b"v")
        assert trio.current_time() - start > 0.1

    _run(main)


def test_outages_refuse_service_for_a_while() -> None:
    async def main() -> None:
        store = SimStore(Rng(3), StorageFaults(outage_rate_per_s=5.0, outage_max_ms=500.0))
        outcomes = []
        for _ in range(400):
            try:
                await _put(store, b"k", b"v")
                outcomes.append(True)
            except StorageUnavailable:
                outcomes.append(False)
            await trio.sleep(0.01)
        assert store.injected["outage"] > 0
        assert not all(outcomes)
        assert any(outcomes)
        # Refusals come in runs (windows), not as independent coin flips.
        runs = sum(1 for a, b in itertools.pairwise(outcomes) if a and not b)
        assert runs < outcomes.count(False)

    _run(main)


def test_history_checker_catches_a_store_without_conflict_detection() -> None:
    async def main() -> None:
        store = SimStore(Rng(1), check_conflicts=False)
        await _put(store, b"n", b"0")
        async with store.transaction() as t1, store.transaction() as t2:
            assert await t1.get(b"n") == await t2.get(b"n") == b"0"
            t1.set(b"n", b"1")
            t2.set(b"n", b"1")
            await t1.commit()
            await t2.commit()  # a lost update: the planted bug lets it through
        error = store.check_history()
        assert error is not None
        assert "read [b'n'=b'0']" in error
        assert "held [b'n'=b'1']" in error

    _run(main)


def test_history_checker_passes_a_correct_store() -> None:
    async def main() -> None:
        store = SimStore(Rng(1))
        await _put(store, b"n", b"0")
        async with store.transaction() as t1, store.transaction() as t2:
            await t1.get(b"n")
            await t2.get(b"n")
            t1.set(b"n", b"1")
            t2.set(b"n", b"2")
            await t1.commit()
            with pytest.raises(Conflict):
                await t2.commit()
        assert store.check_history() is None

    _run(main)


#: Each storage fault, alone, and what shows it fired in a bank run.
FAULTS = {
    "latency_max_ms": (StorageFaults(latency_max_ms=20.0), None),
    "read_error_p": (StorageFaults(read_error_p=0.1), "read_error"),
    "commit_error_p": (StorageFaults(commit_error_p=0.1), "commit_error"),
    "conflict_p": (StorageFaults(conflict_p=0.1), "conflict"),
    "unknown_applied_p": (StorageFaults(unknown_applied_p=0.1), "unknown_applied"),
    "unknown_lost_p": (StorageFaults(unknown_lost_p=0.1), "unknown_lost"),
    "corruption_p": (StorageFaults(corruption_p=0.05), "corruption"),
    # Outages are windows of virtual time: the operations must take some for one to hit.
    "outage": (
        StorageFaults(latency_max_ms=5.0, outage_rate_per_s=20.0, outage_max_ms=50.0),
        "outage_refusal",
    ),
}

#: What each run with a fault is compared with: the same faults but that one.
BASELINES = {"outage": StorageFaults(latency_max_ms=5.0)}


def test_every_declared_fault_is_exercised_here() -> None:
    declared = {f.name for f in attrs.fields(StorageFaults)}
    covered = {name for spec, _ in FAULTS.values() for name, v in attrs.asdict(spec).items() if v}
    assert covered | {"clock_drift_ppm"} == declared  # the clock: the test below


def test_the_store_clock_drifts_within_its_bound_and_leases_feel_it() -> None:
    """Each run draws one rate for the store's clock, within clock_drift_ppm of real time."""
    rates = set()
    for seed in range(20):
        store = SimStore(Rng(seed), StorageFaults(clock_drift_ppm=100_000))
        assert 0.9 <= store.clock_rate <= 1.1
        rates.add(round(store.clock_rate, 6))

        async def main(store: SimStore = store) -> None:
            async with store.transaction() as tr:
                start = await tr.read_version()
            await trio.sleep(10)
            async with store.transaction() as tr:
                elapsed = await tr.read_version() - start
            assert abs(elapsed - 10_000_000 * store.clock_rate) <= 2

        _run(main)
    assert len(rates) == 20
    assert SimStore(Rng(1)).clock_rate == 1.0


@pytest.mark.parametrize("name", sorted(FAULTS))
def test_each_storage_fault_changes_a_bank_run(name: str) -> None:
    faults, kind = FAULTS[name]
    injected: dict[str, int] = {}

    class Counting(BankWorkload):
        async def check(self, ctx):  # type: ignore[no-untyped-def]
            await super().check(ctx)
            for k, v in self.store.injected.items():
                injected[k] = injected.get(k, 0) + v

    def scenario(f: StorageFaults) -> Scenario:
        return Scenario(
            name=f"bank-{name}",
            summary="",
            nodes=3,
            faults=FaultConfig(storage=f),
            workload=Counting,
        )

    changed = 0
    for seed in range(4):
        quiet = run_scenario(scenario(BASELINES.get(name, StorageFaults())), seed)
        faulty = run_scenario(scenario(faults), seed)
        assert quiet.ok, quiet.failure
        assert faulty.ok, faulty.failure
        changed += faulty.trace_hash != quiet.trace_hash
        if kind is None:
            assert faulty.sim_time_s > quiet.sim_time_s
    assert changed >= 3
    if kind is not None:
        assert injected.get(kind, 0) > 0, injected


@pytest.mark.parametrize(
    ("planted", "symptom"),
    [
        ({"idempotent": False}, "applied twice or in part"),
        ({"check_conflicts": False}, "not conserved"),
    ],
)
def test_bank_catches_planted_bugs(planted: dict[str, bool], symptom: str) -> None:
    """Transfers without markers (retried after unknown results and crashes) and a store without
    conflict detection each fail the bank's checks on some of 30 seeds."""
    broken = Scenario(
        name="bank_broken",
        summary="",
        nodes=3,
        faults=FaultConfig(storage=StorageFaults.every()),
        workload=lambda: BankWorkload(**planted),
    )
    failures = [r.failure for r in (run_scenario(broken, s) for s in range(30)) if not r.ok]
    assert len(failures) >= 5
    assert any(f is not None and symptom in f.message for f in failures)


def test_history_records_only_what_a_limited_read_scanned() -> None:
    """A limited range read over its own writes fetches extra rows; a change to one of
    those (outside the part it returned) neither conflicts nor fails the history check."""

    async def main() -> None:
        store = SimStore(Rng(1))
        for key in (b"a", b"c", b"d"):
            await _put(store, key, b"0")
        async with store.transaction() as t1:
            t1.set(b"b", b"1")
            assert await t1.get_range(b"a", b"z", limit=1) == [(b"a", b"0")]
            await _put(store, b"c", b"1")
            await t1.commit()
        assert store.check_history() is None

    _run(main)


def test_a_failed_range_read_is_not_checked() -> None:
    """A range read that failed half way added no conflict range, so it is not in the history."""

    async def main() -> None:
        store = SimStore(Rng(5), StorageFaults(read_error_p=0.5))
        for key in (b"a", b"c", b"e"):
            while True:
                try:
                    await _put(store, key, b"0")
                    break
                except StorageUnavailable:
                    pass
        for _ in range(40):
            async with store.transaction() as tr:
                tr.clear_range(b"b", b"d")  # two stored pieces: a, then e
                with contextlib.suppress(StorageUnavailable):
                    await tr.get_range(b"a", b"z")
                tr.set(b"z", b"1")
                with contextlib.suppress(StorageUnavailable):
                    await tr.commit()
        assert store.check_history() is None

    _run(main)


def test_the_memory_store_refuses_versions_it_has_pruned() -> None:
    """A read or commit check at a version older than the kept history is TransactionTooOld,
    never an answer from missing history (here: latency stretches a transaction past it)."""

    async def main() -> None:
        store = SimStore(Rng(2))
        await _put(store, b"n", b"0")
        old = store.transaction()
        assert await old.get(b"n") == b"0"
        # Commits 7 s later prune the history the old transaction's snapshot needs.
        await trio.sleep(7)
        await _put(store, b"n", b"1")
        with pytest.raises(TransactionTooOld):
            store.inner.read(b"n", old._read_at)
        with pytest.raises(TransactionTooOld):
            store.inner.conflicting(old._read_at, [(b"n", b"n\x00")])
        await old.aclose()

    _run(main)


def test_quiesce_stops_every_storage_fault() -> None:
    """After quiesce() (a liveness phase) reads and commits succeed; latency remains."""

    async def main() -> None:
        faults = attrs.evolve(
            StorageFaults.every(), read_error_p=1.0, commit_error_p=1.0, latency_max_ms=10.0
        )
        store = SimStore(Rng(1), faults)
        async with store.transaction() as tr:
            with pytest.raises(StorageUnavailable):
                await tr.get(b"k")
        store.quiesce()
        before = dict(store.injected)
        start = trio.current_time()
        for _ in range(50):
            await _put(store, b"k", b"v")
            async with store.transaction() as tr:
                assert await tr.get(b"k") == b"v"
        assert trio.current_time() > start
        assert store.injected == before

    _run(main)
