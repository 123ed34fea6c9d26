"""`ActorContext.checkpoint`: a handler that works in steps commits each step."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from kelpie.env import Env
from kelpie.runtime import (
    Actor,
    ActorContext,
    ActorFailed,
    ActorId,
    ContextUnavailable,
    open_runtime,
)
from kelpie.storage import MemoryStore

ENV = Env.production(seed=3)


class Stepper(Actor):
    """'steps:N:fail' does N steps, checkpointing each, then fails if asked to."""

    def __init__(self, actor_id: ActorId) -> None:
        self.steps: list[int] = []

    def dump_state(self) -> bytes | None:
        return json.dumps(self.steps).encode()

    def load_state(self, data: bytes | None) -> None:
        self.steps = [] if data is None else json.loads(data)

    async def activate(self, ctx: ActorContext) -> None:
        with pytest.raises(ContextUnavailable, match="only a handler"):
            await ctx.checkpoint()

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "get":
            return [self.steps, (await ctx.kv_get(b"last") or b"").decode()]
        _, count, fail = message.split(":")
        for _ in range(int(count)):
            self.steps.append(len(self.steps))
            ctx.kv_set(b"last", str(self.steps[-1]).encode())
            await ctx.checkpoint()
        self.steps.append(-1)  # work after the last checkpoint: lost if the call fails
        ctx.kv_set(b"last", b"uncommitted")
        if fail == "fail":
            raise ValueError("after the checkpoints")
        return len(self.steps)


def test_checkpoints_survive_a_failure_after_them_and_the_rest_rolls_back() -> None:
    async def main() -> None:
        store = MemoryStore()
        actor = ActorId("stepper", "a")
        async with open_runtime(store, ENV, Stepper) as runtime:
            with pytest.raises(ActorFailed, match="after the checkpoints"):
                await runtime.invoke(actor, "steps:3:fail")
            assert await runtime.invoke(actor, "get") == [[0, 1, 2], "2"]
            assert await runtime.invoke(actor, "steps:1:ok") == 5
        async with open_runtime(store, ENV, Stepper) as runtime:  # from the store alone
            assert await runtime.invoke(actor, "get") == [[0, 1, 2, 3, -1], "uncommitted"]

    trio.run(main)


class Ranger(Actor):
    def __init__(self, actor_id: ActorId) -> None:
        pass

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "seed":
            for i in range(0, 10, 2):
                ctx.kv_set(b"k%d" % i, b"%d" % i)
            return None
        # pending writes merge with stored ones, in both directions, with limits
        ctx.kv_set(b"k3", b"3")
        ctx.kv_delete(b"k4")
        ctx.kv_set(b"z", b"outside")
        forward = await ctx.kv_range(b"k1", b"k7")
        backward = await ctx.kv_range(b"k1", b"k7", reverse=True, limit=2)
        limited = await ctx.kv_range(b"k", b"k9", limit=3)
        return [[k.decode() for k, _ in rows] for rows in (forward, backward, limited)]


def test_kv_range_merges_the_invocations_writes_in_either_direction() -> None:
    async def main() -> None:
        async with open_runtime(MemoryStore(), ENV, Ranger) as runtime:
            actor = ActorId("ranger", "r")
            await runtime.invoke(actor, "seed")
            assert await runtime.invoke(actor, "range") == [
                ["k2", "k3", "k6"],
                ["k6", "k3"],
                ["k0", "k2", "k3"],
            ]

    trio.run(main)


class CheckpointsLast(Actor):
    """Its last change is checkpointed: nothing is left for the invocation's own commit."""

    def __init__(self, actor_id: ActorId) -> None:
        self.n = 0

    def dump_state(self) -> bytes | None:
        return json.dumps(self.n).encode()

    def load_state(self, data: bytes | None) -> None:
        self.n = 0 if data is None else json.loads(data)

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "get":
            return self.n
        self.n += 1
        await ctx.checkpoint()
        return self.n


def test_a_call_that_checkpointed_still_records_its_idempotency_key() -> None:
    async def main() -> None:
        store = MemoryStore()
        actor = ActorId("last", "a")
        async with open_runtime(store, ENV, CheckpointsLast) as runtime:
            assert await runtime.invoke(actor, "inc", idempotency_key="k1") == 1
            assert await runtime.invoke(actor, "inc", idempotency_key="k1") == 1
        async with open_runtime(store, ENV, CheckpointsLast) as runtime:  # from the store
            assert await runtime.invoke(actor, "inc", idempotency_key="k1") == 1
            assert await runtime.invoke(actor, "get") == 1

    trio.run(main)
