"""A cluster of runtimes sharing one store: placement, forwarding, fencing, failover, drain.

Nodes talk over the simulated network with its faults off, in one trio run on
a MockClock; kelpie/sim is only the network here (the real TCP network runs
the same runtime in tests/runtime/test_cluster_processes.py).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import pytest
import trio
import trio.testing

from kelpie.env import DeliveryUnknown, Env, Rng
from kelpie.runtime import (
    Actor,
    ActorContext,
    ActorFailed,
    ActorId,
    ActorRuntime,
    ActorUnavailable,
    InvalidMessage,
    MailboxFull,
    RuntimeConfig,
    local_first,
    open_runtime,
)
from kelpie.runtime._wire import encode_request
from kelpie.sim import NetworkFaults, SimNetwork
from kelpie.storage import MemoryStore, StorageUnavailable, Store, Transaction, pack, transact

FAST = RuntimeConfig(lease_duration_ms=1_000, lease_renew_ms=200, forward_timeout_ms=5_000)


class Counter(Actor):
    def __init__(self, actor_id: ActorId) -> None:
        self.value = 0
        self.epoch = 0

    def dump_state(self) -> bytes | None:
        return json.dumps(self.value).encode()

    def load_state(self, data: bytes | None) -> None:
        self.value = 0 if data is None else json.loads(data)

    async def activate(self, ctx: ActorContext) -> None:
        self.epoch = ctx.epoch

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "get":
            return self.value
        if message == "where":
            return [ctx.env.node, ctx.epoch]
        if isinstance(message, dict) and "sleep" in message:
            await trio.sleep(message["sleep"])
        self.value += 1
        return self.value


def run(body: Callable[[], Awaitable[None]]) -> None:
    trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))


@attrs.define
class Cluster:
    store: Store
    network: SimNetwork
    nursery: trio.Nursery
    config: RuntimeConfig
    nodes: dict[str, ActorRuntime] = attrs.Factory(dict)
    scopes: dict[str, trio.CancelScope] = attrs.Factory(dict)
    stops: dict[str, trio.Event] = attrs.Factory(dict)

    def env(self, name: str, network: bool = True) -> Env:
        return attrs.evolve(
            Env.production(seed=len(self.nodes) + 1, node=name),
            network=self.network.endpoint(name) if network else None,
        )

    async def start(self, name: str, *, network: bool = True, **config: Any) -> ActorRuntime:
        started = trio.Event()
        stop = self.stops[name] = trio.Event()
        env = self.env(name, network)
        cfg = attrs.evolve(self.config, **config)

        async def life() -> None:
            with trio.CancelScope() as scope:
                self.scopes[name] = scope
                async with open_runtime(self.store, env, Counter, cfg) as runtime:
                    self.nodes[name] = runtime
                    started.set()
                    await stop.wait()

        self.nursery.start_soon(life)
        await started.wait()
        return self.nodes[name]

    def crash(self, name: str) -> None:
        self.scopes[name].cancel()


@contextlib.asynccontextmanager
async def cluster(config: RuntimeConfig = FAST) -> AsyncIterator[Cluster]:
    async with trio.open_nursery() as nursery:
        network = SimNetwork(Rng(7), NetworkFaults())
        c = Cluster(MemoryStore(), network, nursery, config)
        yield c
        for stop in c.stops.values():
            stop.set()


A = ActorId("counter", "a")


def test_a_call_through_any_node_reaches_the_one_activation() -> None:
    async def body() -> None:
        async with cluster() as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            n3 = await c.start("n3")
            replies = [await node.invoke(A, "increment") for node in (n1, n2, n3, n1, n2, n3)]
            assert replies == [1, 2, 3, 4, 5, 6]
            assert sum(node.is_active(A) for node in (n1, n2, n3)) == 1
            where = await n2.invoke(A, "where")
            host = c.nodes[where[0]]
            assert host.is_active(A) and where[1] == host.epoch
            assert n1.forwards + n2.forwards + n3.forwards >= 4

    run(body)


def test_placement_spreads_new_actors_over_the_least_loaded_nodes() -> None:
    async def body() -> None:
        async with cluster() as c:
            n1 = await c.start("n1")
            await c.start("n2")
            await c.start("n3")
            await trio.sleep(1)  # every node has renewed, and sees the others
            for i in range(30):
                await n1.invoke(ActorId("counter", f"x{i}"), "increment")
                await trio.sleep(0.5)  # loads are published at each renewal
            counts = sorted(node.active_count for node in c.nodes.values())
            assert counts[0] >= 5, counts

    run(body)


def test_local_first_placement_keeps_new_actors_on_the_calling_node() -> None:
    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            for i in range(5):
                await n2.invoke(ActorId("counter", f"x{i}"), "increment")
            assert n2.active_count == 5 and n1.active_count == 0 and n2.forwards == 0

    run(body)


def test_a_crashed_node_s_actors_move_once_its_lease_lapses() -> None:
    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            for _ in range(3):
                await n1.invoke(A, "increment")
            c.crash("n1")
            started = trio.current_time()
            assert await n2.invoke(A, "increment") == 4  # waits out the lease, then takes over
            assert n2.is_active(A)
            assert trio.current_time() - started < 5

    run(body)


def test_a_node_that_leaves_frees_its_actors_at_once() -> None:
    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            await n1.invoke(A, "increment")
            c.stops["n1"].set()
            while "n1" in c.nodes and c.nodes["n1"].epoch:
                await trio.sleep(0.01)
            await trio.sleep(0.1)
            started = trio.current_time()
            assert await n2.invoke(A, "increment") == 2
            assert trio.current_time() - started < 0.5  # no lease to wait out

    run(body)


def test_a_stale_activation_never_commits_and_its_call_is_rerouted() -> None:
    """The record is handed to another node behind n1's back: n1's next commit is refused by
    the fence, nothing of it is applied, and the call is answered by the new owner."""

    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            assert await n1.invoke(A, "increment") == 1
            assert await n1.invoke(A, "increment") == 2

            async def hand_over(tr: Transaction) -> None:
                tr.set(A.key("owner"), pack((n2.epoch, "n2")))

            await transact(c.store, hand_over, rng=Rng(1))
            assert await n1.invoke(A, "increment") == 3  # applied once, by n2
            assert n2.is_active(A) and not n1.is_active(A)
            assert await n2.invoke(A, "get") == 3

    run(body)


def test_without_the_fence_a_stale_activation_commits() -> None:
    """The test-only switch that the cluster_unfenced scenario uses really removes the fence."""

    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first, fencing=False)) as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            await n1.invoke(A, "increment")

            async def hand_over(tr: Transaction) -> None:
                tr.set(A.key("owner"), pack((n2.epoch, "n2")))

            await transact(c.store, hand_over, rng=Rng(1))
            assert await n1.invoke(A, "increment") == 2  # the stale activation committed
            assert n1.is_active(A)

    run(body)


def test_an_idempotency_key_applies_a_call_once_on_whichever_node() -> None:
    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            assert await n1.invoke(A, "increment", idempotency_key="k1") == 1
            assert await n1.invoke(A, "increment", idempotency_key="k1") == 1
            assert await n2.invoke(A, "increment", idempotency_key="k1") == 1
            c.crash("n1")
            while True:  # a call that met the crash may have applied: retry it, same key
                try:
                    assert await n2.invoke(A, "increment", idempotency_key="k1") == 1
                    break
                except DeliveryUnknown:
                    pass
            assert await n2.invoke(A, "increment", idempotency_key="k2") == 2
            assert await n2.invoke(A, "get") == 2

    run(body)


def test_the_idempotency_window_forgets_the_oldest_keys() -> None:
    async def body() -> None:
        async with cluster(attrs.evolve(FAST, idempotency_window=3)) as c:
            n1 = await c.start("n1")
            for i in range(5):
                await n1.invoke(A, "increment", idempotency_key=f"k{i}")
            assert await n1.invoke(A, "increment", idempotency_key="k4") == 5  # remembered
            assert await n1.invoke(A, "increment", idempotency_key="k0") == 6  # forgotten
            c.crash("n1")
            n2 = await c.start("n2")
            assert await n2.invoke(A, "increment", idempotency_key="k0") == 6  # reloaded
            assert await n2.invoke(A, "increment", idempotency_key="k1") == 7

    run(body)


def test_a_node_without_a_network_cannot_reach_actors_owned_elsewhere() -> None:
    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            n1 = await c.start("n1")
            lonely = await c.start("n2", network=False)
            await n1.invoke(A, "increment")
            with pytest.raises(ActorUnavailable, match="this node has no network"):
                await lonely.invoke(A, "increment")
            assert await n1.invoke(A, "get") == 1

    run(body)


def test_messages_must_be_json_values() -> None:
    async def body() -> None:
        async with cluster() as c:
            n1 = await c.start("n1")
            with pytest.raises(InvalidMessage, match="not a JSON value"):
                await n1.invoke(A, {"x": b"bytes"})
            with pytest.raises(InvalidMessage, match="idempotency key"):
                await n1.invoke(A, "increment", idempotency_key="")

    run(body)


def test_forwarded_calls_are_applied_once_on_a_network_that_duplicates_everything() -> None:
    """Calls without a key, forwarded over a network that delivers every request twice (late),
    each apply once: the key made for a call is kept across its retries, and a duplicate gets the
    first copy's answer, even a refusal."""

    async def body(seed: int) -> list[Any]:
        async with trio.open_nursery() as nursery:
            network = SimNetwork(Rng(seed), NetworkFaults(delay_max_ms=500, duplicate_p=1.0))
            config = attrs.evolve(FAST, placement=local_first, mailbox_size=1)
            c = Cluster(MemoryStore(), network, nursery, config)
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            await n1.invoke(A, "increment")
            nursery.start_soon(n1.invoke, A, {"sleep": 0.5})  # busy, so the mailbox fills
            await trio.sleep(0)
            outcomes: list[Any] = []
            for _ in range(3):
                try:
                    outcomes.append(await n2.invoke(A, "increment"))
                except MailboxFull:
                    outcomes.append("full")
            await trio.sleep(3)  # every late copy has arrived
            outcomes.append(await n1.invoke(A, "get"))
            for stop in c.stops.values():
                stop.set()
            return outcomes

    for seed in range(8):
        outcomes: list[Any] = []

        async def main(seed: int = seed, outcomes: list[Any] = outcomes) -> None:
            outcomes.extend(await body(seed))

        run(main)
        applied = [o for o in outcomes[:3] if o != "full"]
        assert outcomes[3] == 2 + len(applied), (seed, outcomes)  # the sleep, then each ok once


def test_a_request_and_its_duplicate_run_once_and_get_one_answer() -> None:
    async def body() -> None:
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            n1 = await c.start("n1")
            request = encode_request(A, b'"increment"', "kelpie:test:1", request_id="r1")
            first, second = await trio_gather(
                lambda: n1.handle_request(request), lambda: n1.handle_request(request)
            )
            assert first == second == b'{"v":1}'
            assert await n1.invoke(A, "get") == 1

    run(body)


async def trio_gather(*fns: Callable[[], Awaitable[bytes]]) -> list[bytes]:
    results: list[bytes] = [b""] * len(fns)

    async def one(i: int) -> None:
        results[i] = await fns[i]()

    async with trio.open_nursery() as nursery:
        for i in range(len(fns)):
            nursery.start_soon(one, i)
    return results


def test_callers_cannot_use_the_runtime_s_own_key_prefix() -> None:
    async def body() -> None:
        async with cluster() as c:
            n1 = await c.start("n1")
            with pytest.raises(InvalidMessage, match="the runtime's own"):
                await n1.invoke(A, "increment", idempotency_key="kelpie:x")

    run(body)


class _SlowCommits(Store):
    """A store whose writing commits can be made to fail or to take a while."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.writes_fail = False
        self.commit_delay_s = 0.0

    def transaction(self) -> Transaction:
        return _SlowTransaction(self, self.inner.transaction())

    async def aclose(self) -> None:
        await self.inner.aclose()


class _SlowTransaction(Transaction):
    def __init__(self, store: _SlowCommits, inner: Transaction) -> None:
        self._store, self._inner, self._writes = store, inner, False

    async def get(self, key: bytes, *, snapshot: bool = False) -> bytes | None:
        return await self._inner.get(key, snapshot=snapshot)

    async def get_range(self, begin: bytes, end: bytes, **kw: Any) -> Any:
        return await self._inner.get_range(begin, end, **kw)

    def set(self, key: bytes, value: bytes) -> None:
        self._writes = True
        self._inner.set(key, value)

    def clear(self, key: bytes) -> None:
        self._writes = True
        self._inner.clear(key)

    def clear_range(self, begin: bytes, end: bytes) -> None:
        self._writes = True
        self._inner.clear_range(begin, end)

    async def read_version(self) -> int:
        return await self._inner.read_version()

    async def commit(self) -> None:
        if self._writes and self._store.writes_fail:
            raise StorageUnavailable("test: writes refused")
        if self._writes and self._store.commit_delay_s:
            await trio.sleep(self._store.commit_delay_s)
        await self._inner.commit()

    async def aclose(self) -> None:
        await self._inner.aclose()


def test_a_renewal_racing_a_takeover_never_revives_the_lapsed_lease() -> None:
    """n1's renewal reads its record just before the lease lapses and commits just after n2 took
    A over: the takeover cleared n1's record, so the renewal conflicts, n1 learns it lapsed,
    joins again with a new epoch, and never answers from the state n2 now owns."""

    async def body() -> None:
        memory = MemoryStore()
        async with cluster(attrs.evolve(FAST, placement=local_first)) as c:
            slow = _SlowCommits(memory)
            c.store = slow
            n1 = await c.start("n1")
            c.store = memory
            n2 = await c.start("n2")
            assert await n1.invoke(A, "increment") == 1
            deadline = n1._membership.deadline_s
            while n1._membership.deadline_s == deadline:  # just after a renewal
                await trio.sleep(0.001)
            start, epoch = trio.current_time(), n1.epoch
            slow.writes_fail = True  # renewals fail...
            await trio.sleep(0.55)
            slow.writes_fail, slow.commit_delay_s = False, 0.5  # ...then one commits late
            await trio.sleep(start + 1.05 - trio.current_time())
            assert await n2.invoke(A, "increment") == 2  # the lease lapsed: n2 takes A
            await trio.sleep(start + 1.15 - trio.current_time())
            slow.commit_delay_s = 0
            assert await n1.invoke(A, "get") == 2  # never the stale 1
            await trio.sleep(2)
            assert n1.epoch != epoch
            assert await n1.invoke(A, "get") == 2 and await n2.invoke(A, "get") == 2

    run(body)


def test_a_draining_node_lets_go_of_idle_actors_at_once() -> None:
    """While n1 drains one busy actor, its other actors are free for n2 right away."""

    async def body() -> None:
        config = attrs.evolve(FAST, placement=local_first, invocation_timeout_ms=20_000)
        async with cluster(config) as c:
            n1 = await c.start("n1")
            n2 = await c.start("n2")
            await n1.invoke(A, "increment")
            c.nursery.start_soon(n1.invoke, ActorId("counter", "busy"), {"sleep": 8})
            await trio.sleep(0.1)
            c.stops["n1"].set()
            await trio.sleep(0.5)
            started = trio.current_time()
            assert await n2.invoke(A, "increment") == 2
            assert trio.current_time() - started < 1

    run(body)


class Broken(Counter):
    def __init__(self, actor_id: ActorId) -> None:
        super().__init__(actor_id)
        if actor_id.id == "factory":
            raise RuntimeError("cannot build")

    def dump_state(self) -> bytes | None:
        if self.value >= 2:
            raise TypeError("state not serializable")
        return super().dump_state()

    async def activate(self, ctx: ActorContext) -> None:
        if ctx.actor_id.id == "activate":
            raise RuntimeError("cannot connect")


def test_exceptions_from_the_actor_s_own_code_arrive_as_actor_failed() -> None:
    async def body() -> None:
        async with trio.open_nursery() as nursery:
            c = Cluster(MemoryStore(), SimNetwork(Rng(1), NetworkFaults()), nursery, FAST)
            env = c.env("n1")
            async with open_runtime(c.store, env, Broken, FAST) as n1:
                with pytest.raises(ActorFailed, match="factory of counter/factory raised Runt"):
                    await n1.invoke(ActorId("counter", "factory"), "increment")
                with pytest.raises(ActorFailed, match="RuntimeError: cannot connect") as one:
                    await n1.invoke(ActorId("counter", "activate"), "increment")
                assert one.value.error_type == "RuntimeError"
                assert await n1.invoke(A, "increment") == 1
                with pytest.raises(ActorFailed, match="dump_state of counter/a raised TypeError"):
                    await n1.invoke(A, "increment")
                assert await n1.invoke(A, "get") == 1

    run(body)
