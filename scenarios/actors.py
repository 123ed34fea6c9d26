"""Counter actors on one node's runtime, on the simulated store under every storage fault.

Clients on the node send increments to a handful of counter actors through one
`ActorRuntime` with a short idle timeout and a small cap on active actors, so
actors are deactivated, evicted and reactivated from the store all through the
run. The store injects every storage fault (latency, failures, spurious
conflicts, commit_unknown_result applied or lost, outages, corruption).

Invariants:
- an actor never handles two messages at once;
- after the run, each counter in the store is at least the number of increments
  acknowledged for it, and at most that plus the increments whose outcome was
  unknown (`CommitUnknownResult`, `InvocationTimeout`): any other failure must
  have left nothing behind, so the runtime's rollback is checked too;
- a counter read through the runtime equals the stored one, after the run.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from kelpie.runtime import (
    Actor,
    ActorContext,
    ActorError,
    ActorId,
    InvocationTimeout,
    RuntimeConfig,
    open_runtime,
)
from kelpie.sim import CheckFailed, FaultConfig, Scenario, SimContext, StorageFaults, Workload
from kelpie.storage import CommitUnknownResult, RetryPolicy, StorageError, read_blob, transact


class CounterActor(Actor):
    def __init__(self, actor_id: ActorId) -> None:
        self.value = 0
        self.busy = False

    def dump_state(self) -> bytes | None:
        return json.dumps(self.value).encode()

    def load_state(self, data: bytes | None) -> None:
        self.value = 0 if data is None else json.loads(data)

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if self.busy:
            raise CheckFailed(f"{ctx.actor_id} got a message while handling another")
        self.busy = True
        try:
            if ctx.env.faults.buggify("actors.handle.slow"):
                await trio.sleep(ctx.env.rng.uniform(0, 0.05))
            if message == "increment":
                self.value += 1
            return self.value
        finally:
            self.busy = False


class ForgetfulCounter(CounterActor):
    """A planted bug for the tests: ignores the runtime's rollbacks (keeps failed increments)."""

    loaded = False

    def load_state(self, data: bytes | None) -> None:
        if not self.loaded:
            self.loaded = True
            super().load_state(data)


class ActorsWorkload(Workload):
    def __init__(self, *, actor: type[CounterActor] = CounterActor) -> None:
        self.actor = actor

    async def setup(self, ctx: SimContext) -> None:
        rng = ctx.rng
        self.actors = [ActorId("counter", f"c{i}") for i in range(rng.randint(2, 6))]
        self.clients = rng.randint(2, 5)
        self.calls = rng.randint(10, 30)
        self.config = RuntimeConfig(
            mailbox_size=rng.randint(2, 16),
            idle_timeout_ms=rng.choice([5, 50, 500]),
            active_max=rng.randint(1, len(self.actors)),
            invocation_timeout_ms=2_000,
            commit_retry=RetryPolicy(attempts_max=5, backoff_initial_ms=1, backoff_max_ms=20),
            load_retry=RetryPolicy(attempts_max=30, backoff_initial_ms=1, backoff_max_ms=20),
        )
        self.acked = dict.fromkeys(self.actors, 0)
        self.failed = dict.fromkeys(self.actors, 0)
        self.unknown = dict.fromkeys(self.actors, 0)

    async def client(self, ctx: SimContext, runtime: Any, n: int) -> None:
        rng = ctx.rng.fork(f"client:{n}")
        for _ in range(self.calls):
            actor = rng.choice(self.actors)
            try:
                await runtime.invoke(actor, "increment")
            except (StorageError, ActorError) as exc:
                self.failed[actor] += 1
                if isinstance(exc, CommitUnknownResult | InvocationTimeout):
                    self.unknown[actor] += 1
                ctx.emit("actors.failed", actor=str(actor), error=type(exc).__name__)
                await trio.sleep(rng.uniform(0, 0.01))
            else:
                self.acked[actor] += 1
            await trio.sleep(rng.uniform(0, 0.02))

    async def run(self, ctx: SimContext) -> None:
        async with open_runtime(ctx.store, ctx.env, self.actor, self.config) as runtime:
            async with trio.open_nursery() as nursery:
                for n in range(self.clients):
                    ctx.spawn(nursery, self.client, ctx, runtime, n, name=f"client-{n}")
            self.activations = runtime.activations

    async def stored(self, ctx: SimContext, actor: ActorId) -> int:
        async def read(tr: Any) -> bytes | None:
            return await read_blob(tr, actor.key("state"))

        data = await transact(ctx.store, read, rng=ctx.rng, policy=RetryPolicy(200, 1, 50))
        return 0 if data is None else int(json.loads(data))

    async def check(self, ctx: SimContext) -> None:
        for actor in self.actors:
            value = await self.stored(ctx, actor)
            acked, unknown = self.acked[actor], self.unknown[actor]
            if not acked <= value <= acked + unknown:
                raise CheckFailed(
                    f"{actor} holds {value}, but {acked} increments were acknowledged, "
                    f"{unknown} had an unknown outcome and {self.failed[actor] - unknown} "
                    "failed outright"
                )
        ctx.emit(
            "actors.summary",
            acked=sum(self.acked.values()),
            failed=sum(self.failed.values()),
            activations=self.activations,
            faults=sorted(ctx.store.injected.items()),
        )


SCENARIOS = (
    Scenario(
        name="actors",
        summary="counter actors on one node's runtime: eviction, idle deactivation, storage faults",
        faults=FaultConfig(storage=StorageFaults.every()),
        workload=ActorsWorkload,
        max_time_s=600.0,
    ),
)
