"""Counter actors on a cluster of simulated nodes, under every fault, in two phases.

Three to five nodes share the simulated store, each running a real
`open_runtime` with the simulated network as its `env.network`. Clients call
counter actors through whichever node they can reach: two thirds of them send
each increment with its own idempotency key and retry it with the same key
until it is acknowledged, whatever the error; the others send increments once,
without a key, and count each error as "may have applied" or "not applied" by
what the runtime documents; all of them also read. A nemesis crashes nodes
(their tasks are cancelled: memory gone, store intact; they restart later) and
pauses them for longer than a lease, also in the middle of a handler, while the
store injects every storage fault, the network every network fault (delay,
loss, reordering, duplication, one- and two-way partitions, clogging), and
BUGGIFY slows handlers down. The nodes' wall clocks skew, drift and jump too,
which the runtime must not care about: it never reads them (leases are judged
on the store's clock, durations on trio's).

Phase 1 (safety) runs with all of that for a drawn stretch of simulated time.
Phase 2 (liveness, as in TigerBeetle's VOPR) stops every fault and restarts
every crashed node, and demands that within `LIVENESS_BOUND_S` of simulated
time every client's last call is acknowledged; after `SETTLE_S` (for messages
still on their way to land), every actor must answer through every node within
the bound again.

Invariants:
- single activation: in the store's committed history, every commit an
  activation made (its stamp: the epoch of its node incarnation) happened while
  the actor's activation record named that epoch; no two activations ever
  commit under overlapping ownership;
- exactly once: the acknowledged replies for an actor never repeat a value;
  each counter lies between its acknowledged increments and those plus the
  keyless ones whose error said they may have applied (with only keyed calls:
  exactly the acknowledged count), so a call reported as not applied that was
  applied, or an acknowledged one that was lost, is caught;
- reads are linearizable: a read sees every increment acknowledged before it
  began, and none that was never sent (a node serving from a lapsed lease is
  caught);
- every actor answers through every node after the faults stop, all with the
  stored value, within the bound.

`cluster_unfenced` turns off the ownership re-check inside commits (the
runtime's test-only `fencing=False`): a paused node's in-flight commit then
lands after another node took the actor over, which these checkers must catch.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any

import attrs
import trio

from kelpie.core import KelpieError
from kelpie.env import DeliveryUnknown, RemoteFailure
from kelpie.runtime import (
    Actor,
    ActorContext,
    ActorId,
    ActorRuntime,
    InvocationInterrupted,
    InvocationTimeout,
    RuntimeConfig,
    open_runtime,
)
from kelpie.sim import (
    CheckFailed,
    ClockFaults,
    FaultConfig,
    NetworkFaults,
    PauseFaults,
    Scenario,
    SimContext,
    SimNode,
    StorageFaults,
    Workload,
)
from kelpie.storage import (
    CommitUnknownResult,
    RetryPolicy,
    StorageError,
    pack,
    read_blob,
    transact,
    unpack,
)

LEASE_MS = 1_000
#: After the faults stop, every call completes and every actor answers within this time.
LIVENESS_BOUND_S = 30.0
#: Longer than a message can be held up, or a late call take, once the faults stop.
SETTLE_S = 15.0
STAMP = b"stamp"


class ClusterCounter(Actor):
    """A counter that stamps each commit with the epoch of the node incarnation that made it."""

    def __init__(self, actor_id: ActorId, workload: ClusterWorkload) -> None:
        self.value = 0
        self.workload = workload

    def dump_state(self) -> bytes | None:
        return json.dumps(self.value).encode()

    def load_state(self, data: bytes | None) -> None:
        self.value = 0 if data is None else json.loads(data)

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "get":
            return self.value
        # An agent's step takes a while (an LLM call), and the process may stall in the middle
        # of one for longer than its lease (a GC pause): the commit that follows is then late.
        await trio.sleep(ctx.env.rng.uniform(0, 0.1))
        self.workload.maybe_stall(ctx.env.node)
        if ctx.env.faults.buggify("cluster.handle.slow"):
            await trio.sleep(ctx.env.rng.uniform(0, 0.5))
        self.value += 1
        ctx.kv_set(STAMP, pack((ctx.epoch, self.value)))
        return self.value


class NodeDown(Exception):
    """The client's node was down: the call was not sent."""


class NodeCrashed(NodeDown):
    """The client's node crashed while it had the call: it may have been applied."""


#: The errors after which a call may have been applied (docs/ACTORS.md, "Delivery").
MAYBE_APPLIED = (
    CommitUnknownResult,
    InvocationTimeout,
    InvocationInterrupted,
    DeliveryUnknown,
    RemoteFailure,
    NodeCrashed,
)


@attrs.define
class _Node:
    """One simulated node's process: its runtime while it is up."""

    sim: SimNode
    runtime: ActorRuntime | None = None
    calls: trio.Nursery | None = None
    scope: trio.CancelScope | None = None
    stop: trio.Event = attrs.Factory(trio.Event)
    restarted: trio.Event = attrs.Factory(trio.Event)
    crashes: int = 0

    async def call(self, actor: ActorId, message: str, key: str | None) -> Any:
        """Invokes through this node, as a request to its server: a crash loses the answer."""
        runtime, calls = self.runtime, self.calls
        if runtime is None or calls is None:
            raise NodeDown(f"{self.sim.name} is down")
        box: list[Any] = []
        done = trio.Event()

        async def run() -> None:
            try:
                box.append(("ok", await runtime.invoke(actor, message, idempotency_key=key)))
            except KelpieError as exc:
                box.append(("error", exc))
            finally:
                done.set()

        self.sim.start_soon(calls, run)  # the request is handled by this node's process
        await done.wait()
        if not box:
            raise NodeCrashed(f"{self.sim.name} crashed during the call")
        kind, value = box[0]
        if kind == "error":
            raise value
        return value


class ClusterWorkload(Workload):
    def __init__(self, *, fencing: bool = True) -> None:
        self.fencing = fencing

    async def setup(self, ctx: SimContext) -> None:
        rng = ctx.rng
        self.actors = [ActorId("counter", f"c{i}") for i in range(rng.randint(2, 6))]
        self.nodes = [_Node(node) for node in ctx.nodes[: rng.randint(3, len(ctx.nodes))]]
        self.clients = rng.randint(3, 8)
        self.phase1_s = rng.uniform(5.0, 20.0)
        self.crash_rate_per_s = rng.choice([0.0, 0.2, 0.5])
        self.pause_rate_per_s = rng.choice([0.1, 0.3])
        self.stall_p = rng.choice([0.02, 0.05, 0.1])
        self.stall_rng = rng.fork("stalls")
        self.ctx = ctx
        self.config = RuntimeConfig(
            mailbox_size=rng.randint(4, 32),
            idle_timeout_ms=rng.choice([50, 500, 5_000]),
            active_max=rng.randint(1, len(self.actors)),
            invocation_timeout_ms=rng.choice([2_000, 10_000]),
            lease_duration_ms=LEASE_MS,
            lease_renew_ms=LEASE_MS // 5,
            forward_timeout_ms=rng.choice([1_000, 3_000]),
            load_retry=RetryPolicy(attempts_max=10, backoff_initial_ms=1, backoff_max_ms=20),
            commit_retry=RetryPolicy(attempts_max=5, backoff_initial_ms=1, backoff_max_ms=20),
            membership_retry=RetryPolicy(attempts_max=5, backoff_initial_ms=1, backoff_max_ms=20),
            route_retry=RetryPolicy(attempts_max=10, backoff_initial_ms=5, backoff_max_ms=200),
            fencing=self.fencing,
        )
        self.acked: dict[ActorId, list[int]] = {actor: [] for actor in self.actors}
        #: Increments sent (keyed ones once, however often retried), and keyless ones whose
        #: error said they may have applied.
        self.started = dict.fromkeys(self.actors, 0)
        self.maybe = dict.fromkeys(self.actors, 0)
        self.retries = 0
        self.errors: dict[str, int] = {}
        self.faults_on = True
        self.pending: dict[str, str] = {}  # client -> what it is waiting for

    # -- nodes ------------------------------------------------------------------------

    async def life(self, ctx: SimContext, node: _Node) -> None:
        """Runs the node's runtime; after a crash, starts it again (until phase 2 ends)."""
        rng = ctx.rng.fork(f"life:{node.sim.name}")
        while not node.stop.is_set():
            with trio.CancelScope() as scope:
                node.scope = scope
                try:
                    async with (
                        open_runtime(ctx.store, node.sim.env, self.counter, self.config) as rt,
                        trio.open_nursery() as calls,
                    ):
                        node.runtime, node.calls = rt, calls
                        node.restarted.set()
                        await node.stop.wait()
                        node.runtime = None  # no new calls; the ones under way finish
                except StorageError as exc:  # could not join the cluster: try again later
                    ctx.emit("cluster.start_failed", node=node.sim.name, error=type(exc).__name__)
            node.runtime = node.calls = node.scope = None
            if node.stop.is_set():
                return
            if scope.cancelled_caught:
                node.crashes += 1
            await trio.sleep(rng.uniform(0.0, 2.0) if self.faults_on else 0.0)

    def maybe_stall(self, node: str) -> None:
        """Pauses `node` in the middle of a handler, now and then (while the faults are on)."""
        if self.faults_on and self.stall_rng.chance(self.stall_p):
            seconds = self.stall_rng.uniform(1.5, 6.0) * LEASE_MS / 1000
            self.ctx.emit("cluster.stall", node=node, seconds=round(seconds, 3))
            self.ctx.pauses.pause(node, seconds)

    def counter(self, actor_id: ActorId) -> ClusterCounter:
        return ClusterCounter(actor_id, self)

    def crash(self, ctx: SimContext, node: _Node) -> None:
        if node.scope is not None:
            ctx.emit("cluster.crash", node=node.sim.name)
            node.restarted = trio.Event()
            node.scope.cancel()

    async def nemesis(self, ctx: SimContext) -> None:
        rng = ctx.rng.fork("nemesis")
        rate = self.crash_rate_per_s + self.pause_rate_per_s
        if not rate:
            return
        while True:
            await trio.sleep(rng.expovariate(rate))
            node = rng.choice(self.nodes)
            if rng.random() < self.crash_rate_per_s / rate:
                self.crash(ctx, node)
            else:
                seconds = rng.uniform(1.2, 3.0) * LEASE_MS / 1000
                ctx.emit("cluster.pause", node=node.sim.name, seconds=round(seconds, 3))
                ctx.pauses.pause(node.sim.name, seconds)

    # -- clients ----------------------------------------------------------------------

    async def client(self, ctx: SimContext, n: int, until_s: float) -> None:
        rng = ctx.rng.fork(f"client:{n}")
        home = self.nodes[n % len(self.nodes)]
        keyed = n % 3 != 2  # a third of the clients call once, without a key
        i = 0
        while trio.current_time() < until_s:
            actor = rng.choice(self.actors)
            i += 1
            if rng.random() < 0.2:
                await self.read(rng, home, actor)
            elif keyed:
                key = f"k{n}-{i}"
                self.pending[f"client {n}"] = f"increment {actor} key {key}"
                self.started[actor] += 1
                reply = await self.until_acked(ctx, rng, home, actor, key)
                self.acked[actor].append(reply)
                del self.pending[f"client {n}"]
            else:
                await self.call_once(home, actor)
            await trio.sleep(rng.uniform(0, 0.05))

    async def call_once(self, node: _Node, actor: ActorId) -> None:
        """One increment without a key: its error must say truly whether it may have applied."""
        self.started[actor] += 1
        try:
            reply = int(await node.call(actor, "increment", None))
        except MAYBE_APPLIED:
            self.maybe[actor] += 1
        except (KelpieError, NodeDown) as exc:  # nothing was applied
            name = type(exc).__name__
            self.errors[name] = self.errors.get(name, 0) + 1
            self.started[actor] -= 1
        else:
            self.acked[actor].append(reply)

    async def read(self, rng: Any, node: _Node, actor: ActorId) -> None:
        """A read must see every increment acknowledged before it began, and nothing never sent."""
        floor = len(self.acked[actor])
        try:
            value = int(await node.call(actor, "get", None))
        except (KelpieError, NodeDown):
            return
        if not floor <= value <= self.started[actor]:
            raise CheckFailed(
                f"a read of {actor} through {node.sim.name} saw {value}: {floor} increments "
                f"were acknowledged before it began and {self.started[actor]} were ever sent "
                "(a stale or phantom read)"
            )

    async def until_acked(
        self, ctx: SimContext, rng: Any, home: _Node, actor: ActorId, key: str
    ) -> int:
        """Calls until acknowledged: the same key on every retry, through any node that is up."""
        node = home
        while True:
            try:
                return int(await node.call(actor, "increment", key))
            except (KelpieError, NodeDown) as exc:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
                self.retries += 1
            await trio.sleep(rng.uniform(0, 0.1))
            up = [other for other in self.nodes if other.runtime is not None]
            node = home if home.runtime is not None or not up else rng.choice(up)

    # -- phases -----------------------------------------------------------------------

    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                name = f"life {node.sim.name}"
                ctx.spawn(nursery, self.life, ctx, node, node=node.sim, name=name)
            nemesis = trio.CancelScope()
            nursery.start_soon(self.run_nemesis, ctx, nemesis, name="nemesis")
            until_s = trio.current_time() + self.phase1_s
            async with trio.open_nursery() as clients:
                for n in range(self.clients):
                    home = self.nodes[n % len(self.nodes)].sim
                    ctx.spawn(clients, self.client, ctx, n, until_s, node=home, name=f"client {n}")
                await trio.sleep(self.phase1_s)
                nemesis.cancel()
                await self.quiesce(ctx)
                await self.within_bound(self.settle())
                # A keyless call whose caller gave up may still be on its way (a message
                # outlives its caller's timeout): let every such message land first.
                await trio.sleep(SETTLE_S)
                await self.within_bound(self.all_answer(ctx))
            for node in self.nodes:
                node.stop.set()

    async def run_nemesis(self, ctx: SimContext, scope: trio.CancelScope) -> None:
        with scope:
            await self.nemesis(ctx)

    async def quiesce(self, ctx: SimContext) -> None:
        """Phase 2: every fault stops, and every crashed node comes back."""
        ctx.phase("liveness")
        self.faults_on = False
        ctx.network.heal(quiet=True)
        ctx.pauses.quiesce()
        ctx.store.quiesce()

    async def within_bound(self, phase: Awaitable[None]) -> None:
        with trio.move_on_after(LIVENESS_BOUND_S) as bound:
            await phase
        if bound.cancelled_caught:
            raise CheckFailed(
                f"liveness: {LIVENESS_BOUND_S:g} s after the faults stopped, still "
                f"waiting for: {sorted(self.pending.items())}"
            )

    async def settle(self) -> None:
        """Every client's last call is acknowledged, and every node is up."""
        while self.pending:
            await trio.sleep(0.05)
        for node in self.nodes:
            while node.runtime is None:
                await trio.sleep(0.05)

    async def all_answer(self, ctx: SimContext) -> None:
        """Asks every actor through every node: all answer, and agree."""
        self.final: dict[ActorId, int] = {}
        rng = ctx.rng.fork("liveness")
        for actor in self.actors:
            for node in self.nodes:
                self.pending[f"get {actor} via {node.sim.name}"] = "reply"
                value = await self.until_acked_get(rng, node, actor)
                previous = self.final.setdefault(actor, value)
                if previous != value:
                    raise CheckFailed(
                        f"{actor} answered {value} through {node.sim.name} but {previous} "
                        "through another node, with no increment in between"
                    )
                del self.pending[f"get {actor} via {node.sim.name}"]

    async def until_acked_get(self, rng: Any, node: _Node, actor: ActorId) -> int:
        while True:
            try:
                return int(await node.call(actor, "get", None))
            except (KelpieError, NodeDown):
                await trio.sleep(rng.uniform(0, 0.1))

    # -- checks -----------------------------------------------------------------------

    async def check(self, ctx: SimContext) -> None:
        self.check_ownership(ctx)
        for actor in self.actors:
            stored = await self.stored(ctx, actor)
            acked = sorted(self.acked[actor])
            maybe = self.maybe[actor]
            if len(set(acked)) != len(acked) or (acked and acked[-1] > stored):
                raise CheckFailed(
                    f"{actor}: the acknowledged replies {acked} repeat a value or pass the stored "
                    f"{stored}: an increment was applied twice or an acknowledged one was lost"
                )
            if not len(acked) <= stored <= len(acked) + maybe or self.final[actor] != stored:
                raise CheckFailed(
                    f"{actor} holds {stored} in the store and answered {self.final[actor]}, but "
                    f"{len(acked)} increments were acknowledged and {maybe} more may have "
                    "applied (a call said to have failed outright was applied, or one was lost)"
                )
        ctx.emit(
            "cluster.summary",
            acked=sum(len(v) for v in self.acked.values()),
            retries=self.retries,
            errors=sorted(self.errors.items()),
            crashes=sum(node.crashes for node in self.nodes),
            storage=sorted(ctx.store.injected.items()),
            network=sorted(ctx.network.injected.items()),
        )

    def check_ownership(self, ctx: SimContext) -> None:
        """No commit of an activation after its actor's record named another epoch."""
        owner_keys = {actor.key("owner"): actor for actor in self.actors}
        stamp_keys = {actor.key("kv") + STAMP: actor for actor in self.actors}
        owner: dict[ActorId, tuple[int, int]] = {}  # actor -> (epoch, since version)
        history = [t for t in ctx.store.history if t.commit_version is not None]
        history.sort(key=lambda t: t.commit_version or 0)
        for tr in history:
            assert tr.mutations is not None
            stamps: list[tuple[ActorId, int]] = []
            for key, value in tr.mutations.sets:
                if key in stamp_keys and value is not None:
                    stamps.append((stamp_keys[key], unpack(value)[0]))
            for actor, epoch in stamps:
                held = owner.get(actor)
                if held is None or held[0] != epoch:
                    raise CheckFailed(
                        f"single activation violated: {actor} committed by the activation of "
                        f"epoch {epoch} (node {tr.node}) at version {tr.commit_version}, while "
                        f"its record named epoch {held[0] if held else None} since version "
                        f"{held[1] if held else None}"
                    )
            for key, value in tr.mutations.sets:
                if key in owner_keys and value is not None:
                    owner[owner_keys[key]] = (unpack(value)[0], tr.commit_version or 0)

    async def stored(self, ctx: SimContext, actor: ActorId) -> int:
        async def read(tr: Any) -> bytes | None:
            return await read_blob(tr, actor.key("state"))

        data = await transact(ctx.store, read, rng=ctx.rng, policy=RetryPolicy(200, 1, 50))
        return 0 if data is None else int(json.loads(data))


FAULTS = FaultConfig(
    clock=ClockFaults(skew_max_ms=5_000, drift_max_ppm=500, jump_rate_per_s=0.1, jump_max_ms=2_000),
    storage=StorageFaults.every(),
    network=NetworkFaults.every(),
    pauses=PauseFaults(rate_per_s=0.05, max_ms=300.0),
)

SCENARIOS = (
    Scenario(
        name="cluster",
        summary="counter actors on 3-5 nodes: crashes, pauses, partitions, every store fault",
        nodes=5,
        faults=FAULTS,
        workload=ClusterWorkload,
        max_time_s=600.0,
        max_steps=3_000_000,
    ),
    Scenario(
        name="cluster_unfenced",
        summary="cluster with the commit fence switched off: the checkers must catch it",
        nodes=5,
        faults=FAULTS,
        workload=lambda: ClusterWorkload(fencing=False),
        max_time_s=600.0,
        max_steps=3_000_000,
        planted_bug="commits skip the re-read of the activation record (fencing=False)",
    ),
)
