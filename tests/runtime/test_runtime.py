"""One node's actor runtime, through its public surface, on real stores."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from kelpie.env import Env
from kelpie.runtime import (
    Actor,
    ActorContext,
    ActorFailed,
    ActorId,
    ContextUnavailable,
    InvalidActorId,
    InvocationInterrupted,
    InvocationTimeout,
    MailboxFull,
    RuntimeClosed,
    RuntimeConfig,
    open_runtime,
)
from kelpie.storage import (
    CommitUnknownResult,
    Conflict,
    MemoryStore,
    RetryPolicy,
    SqliteStore,
    StorageUnavailable,
)

ENV = Env.production(seed=1)


class Counter(Actor):
    """Counts; "boom" fails after changing its state and working memory; "sleep:S" sleeps."""

    log: list[str] = []  # noqa: RUF012 - shared on purpose: what every instance did

    def __init__(self, actor_id: ActorId) -> None:
        self.actor_id = actor_id
        self.value = 0
        self.inside = False

    def dump_state(self) -> bytes | None:
        return json.dumps({"value": self.value}).encode()

    def load_state(self, data: bytes | None) -> None:
        self.value = 0 if data is None else json.loads(data)["value"]

    async def activate(self, ctx: ActorContext) -> None:
        Counter.log.append(f"activate {self.actor_id.id} at {self.value}")

    async def deactivate(self, ctx: ActorContext) -> None:
        Counter.log.append(f"deactivate {self.actor_id.id} at {self.value}")

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        assert not self.inside, "two messages at once"
        self.inside = True
        try:
            if message == "get":
                return self.value
            if message == "increment":
                self.value += 1
                ctx.kv_set(b"last", str(self.value).encode())
                await trio.sleep(0)
                return self.value
            if message == "boom":
                self.value += 100
                ctx.kv_set(b"last", b"boom")
                raise ValueError("boom")
            if isinstance(message, str) and message.startswith("sleep:"):
                await trio.sleep(float(message.split(":")[1]))
                return "slept"
            if message == "last":
                last = await ctx.kv_get(b"last")
                return None if last is None else last.decode()
            if message == "big":
                self.value += 1
                return len(self.dump_state() or b"")
            raise ValueError(f"unknown message {message!r}")
        finally:
            self.inside = False


class BigState(Counter):
    def dump_state(self) -> bytes | None:
        return json.dumps({"value": self.value, "pad": "x" * 300_000}).encode()


def run(body: Callable[[], Awaitable[None]]) -> None:
    Counter.log = []
    trio.run(body, clock=trio.testing.MockClock(autojump_threshold=0))


A = ActorId("counter", "a")
B = ActorId("counter", "b")


@pytest.mark.parametrize(
    ("namespace", "id_", "message"),
    [
        ("", "a", "must not be empty"),
        ("counter", "", "must not be empty"),
        ("counter", "a b", "only letters"),
        ("counter", "x" * 129, "over the limit of 128"),
        ("counter", 7, "is a str"),
        ("-x", "a", "must start with"),
    ],
)
def test_actor_ids_are_validated(namespace: Any, id_: Any, message: str) -> None:
    with pytest.raises(InvalidActorId, match=message):
        ActorId(namespace, id_)


def test_state_survives_deactivation_and_a_new_runtime(tmp_path: Path) -> None:
    async def body() -> None:
        store = await SqliteStore.open(tmp_path / "k.db")
        try:
            async with open_runtime(store, ENV, Counter) as runtime:
                for i in range(1, 4):
                    assert await runtime.invoke(A, "increment") == i
            assert Counter.log == ["activate a at 0", "deactivate a at 3"]
            async with open_runtime(store, ENV, Counter) as runtime:
                assert await runtime.invoke(A, "get") == 3
                assert await runtime.invoke(A, "last") == "3"
        finally:
            await store.aclose()

    run(body)


def test_one_message_at_a_time_and_a_slow_actor_blocks_no_other() -> None:
    async def body() -> None:
        async with open_runtime(MemoryStore(), ENV, Counter) as runtime:
            results: list[Any] = []
            start = trio.current_time()

            async def call(actor: ActorId, message: str) -> None:
                results.append((actor.id, await runtime.invoke(actor, message)))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, A, "sleep:10")
                for _ in range(20):
                    nursery.start_soon(call, A, "increment")
                    nursery.start_soon(call, B, "increment")
                with trio.move_on_after(1):
                    while sum(1 for r in results if r[0] == "b") < 20:
                        await trio.sleep(0.01)
                assert trio.current_time() - start < 1  # b never waited for a's sleep
            assert sorted(v for k, v in results if k == "a" and v != "slept") == list(range(1, 21))

    run(body)


def test_a_failed_invocation_commits_nothing_and_rolls_the_state_back() -> None:
    async def body() -> None:
        async with open_runtime(MemoryStore(), ENV, Counter) as runtime:
            assert await runtime.invoke(A, "increment") == 1
            with pytest.raises(ActorFailed, match="ValueError: boom") as failed:
                await runtime.invoke(A, "boom")
            assert failed.value.error_type == "ValueError"
            assert isinstance(failed.value.__cause__, ValueError)
            assert await runtime.invoke(A, "get") == 1
            assert await runtime.invoke(A, "last") == "1"

    run(body)


def test_an_invocation_that_runs_too_long_times_out_and_commits_nothing() -> None:
    async def body() -> None:
        config = RuntimeConfig(invocation_timeout_ms=500)
        async with open_runtime(MemoryStore(), ENV, Counter, config) as runtime:
            await runtime.invoke(A, "increment")
            with pytest.raises(InvocationTimeout, match="500 ms"):
                await runtime.invoke(A, "sleep:2")
            assert await runtime.invoke(A, "get") == 1

    run(body)


def test_a_commit_that_fails_rolls_the_state_back() -> None:
    class Conflicting(MemoryStore):
        failing = False

        def transaction(self):  # type: ignore[no-untyped-def]
            tr = super().transaction()
            if self.failing:

                async def fail(*args: Any) -> None:
                    raise Conflict("injected")

                tr._commit_writes = fail  # type: ignore[method-assign]
            return tr

    async def body() -> None:
        store = Conflicting()
        async with open_runtime(store, ENV, Counter) as runtime:
            await runtime.invoke(A, "increment")
            store.failing = True  # every attempt of the commit's retries fails
            with pytest.raises(Conflict, match="injected"):
                await runtime.invoke(A, "increment")
            store.failing = False
            assert await runtime.invoke(A, "get") == 1

    run(body)


def test_a_full_mailbox_refuses_at_once() -> None:
    async def body() -> None:
        config = RuntimeConfig(mailbox_size=2)
        async with (
            open_runtime(MemoryStore(), ENV, Counter, config) as runtime,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(runtime.invoke, A, "sleep:1")
            await trio.sleep(0.1)  # being handled: the mailbox is empty again
            for _ in range(2):
                nursery.start_soon(runtime.invoke, A, "sleep:1")
            await trio.sleep(0.1)
            with pytest.raises(MailboxFull, match="holds 2 messages"):
                await runtime.invoke(A, "get")

    run(body)


def test_idle_actors_are_deactivated_and_come_back_from_the_store() -> None:
    async def body() -> None:
        config = RuntimeConfig(idle_timeout_ms=60_000)
        async with open_runtime(MemoryStore(), ENV, Counter, config) as runtime:
            await runtime.invoke(A, "increment")
            await trio.sleep(59)
            assert runtime.is_active(A)
            await trio.sleep(2)
            assert not runtime.is_active(A)
            assert Counter.log == ["activate a at 0", "deactivate a at 1"]
            assert await runtime.invoke(A, "increment") == 2
            assert Counter.log[-1] == "activate a at 1"

    run(body)


def test_the_least_recently_used_idle_actor_makes_room() -> None:
    async def body() -> None:
        config = RuntimeConfig(active_max=2)
        async with open_runtime(MemoryStore(), ENV, Counter, config) as runtime:
            ids = [ActorId("counter", f"n{i}") for i in range(3)]
            await runtime.invoke(ids[0], "increment")
            await runtime.invoke(ids[1], "increment")
            await runtime.invoke(ids[0], "increment")  # n1 is now the least recently used
            await runtime.invoke(ids[2], "increment")
            await trio.sleep(0.1)
            assert [runtime.is_active(i) for i in ids] == [True, False, True]
            assert runtime.active_count == 2
            assert await runtime.invoke(ids[1], "get") == 1

    run(body)


def test_state_larger_than_a_value_goes_through_blobs() -> None:
    async def body() -> None:
        store = MemoryStore()
        async with open_runtime(store, ENV, BigState) as runtime:
            assert await runtime.invoke(A, "big") > 300_000
        async with open_runtime(store, ENV, BigState) as runtime:
            assert await runtime.invoke(A, "get") == 1

    run(body)


def test_closing_drains_and_then_refuses() -> None:
    async def body() -> None:
        async with (
            open_runtime(MemoryStore(), ENV, Counter) as runtime,
            trio.open_nursery() as nursery,
        ):
            for _ in range(5):
                nursery.start_soon(runtime.invoke, A, "increment")
            await trio.sleep(0)
        with pytest.raises(RuntimeClosed):
            await runtime.invoke(A, "get")
        async with open_runtime(store := MemoryStore(), ENV, Counter) as runtime:
            await runtime.invoke(A, "increment")
        assert Counter.log[-1] == "deactivate a at 1"
        del store

    run(body)


def test_working_memory_outside_an_invocation_is_refused() -> None:
    ctx = ActorContext(A, ENV, MemoryStore())
    with pytest.raises(ContextUnavailable, match="outside"):
        ctx.kv_set(b"k", b"v")


def test_a_long_invocation_outlives_the_transaction_limit() -> None:
    """Handlers may run longer than a transaction may live (an LLM call does)."""

    async def body() -> None:
        async with open_runtime(MemoryStore(), ENV, Counter) as runtime:
            assert await runtime.invoke(A, "sleep:30") == "slept"
            assert await runtime.invoke(A, "increment") == 1

    run(body)


class Notes(Actor):
    def __init__(self, actor_id: ActorId) -> None:
        self.actor_id = actor_id

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        op, *args = message
        if op == "put":
            for key in args:
                ctx.kv_set(key.encode(), b"v")
            if "fail" in args:
                raise ValueError("fail")
            return None
        if op == "drop":
            ctx.kv_delete(args[0].encode())
            return [[k.decode(), v.decode()] for k, v in await ctx.kv_items(limit=args[1])]
        items = await ctx.kv_items(args[0].encode() if args else b"")
        return [[k.decode(), v.decode()] for k, v in items]


def test_working_memory_reads_see_the_invocation_s_own_writes() -> None:
    async def body() -> None:
        async with open_runtime(MemoryStore(), ENV, Notes) as runtime:
            await runtime.invoke(A, ("put", "a1", "a2", "b1"))
            with pytest.raises(ActorFailed, match="ValueError: fail"):
                await runtime.invoke(A, ("put", "a3", "fail"))
            assert [k for k, _ in await runtime.invoke(A, ("list", "a"))] == ["a1", "a2"]
            assert [k for k, _ in await runtime.invoke(A, ("drop", "a1", 2))] == ["a2", "b1"]
            assert [k for k, _ in await runtime.invoke(A, ("list",))] == ["a2", "b1"]

    run(body)


class Scripted(MemoryStore):
    """A MemoryStore whose next commits follow `plan`: "ok", "applied_unknown" (applied, then
    CommitUnknownResult) or "unavailable" (refused, nothing applied)."""

    def __init__(self) -> None:
        super().__init__()
        self.plan: list[str] = []

    def transaction(self):  # type: ignore[no-untyped-def]
        tr = super().transaction()
        store, original = self, tr._commit_writes

        async def commit(*args: Any) -> None:
            action = store.plan.pop(0) if store.plan else "ok"
            if action == "unavailable":
                raise StorageUnavailable("scripted: refused")
            await original(*args)
            if action == "applied_unknown":
                raise CommitUnknownResult("scripted: applied, outcome unknown")

        tr._commit_writes = commit  # type: ignore[method-assign]
        return tr


def test_a_commit_that_may_have_applied_is_never_rolled_back_in_memory_only() -> None:
    """An attempt applied with an unknown outcome, then the retries failed: the caller learns the
    outcome is unknown, and the actor continues from what the store holds, not from a guess."""

    async def body() -> None:
        store = Scripted()
        config = RuntimeConfig(commit_retry=RetryPolicy(attempts_max=2, backoff_initial_ms=1))
        async with open_runtime(store, ENV, Counter, config) as runtime:
            assert await runtime.invoke(A, "increment") == 1
            store.plan = ["applied_unknown", "unavailable"]
            with pytest.raises(CommitUnknownResult):
                await runtime.invoke(A, "increment")
            assert await runtime.invoke(A, "get") == 2  # the store has it
            assert await runtime.invoke(A, "increment") == 3

    run(body)


def test_an_actor_s_own_timeout_is_not_the_runtime_s() -> None:
    class Impatient(Counter):
        async def handle(self, ctx: ActorContext, message: Any) -> Any:
            with trio.fail_after(0.1):
                await trio.sleep(1)

    async def body() -> None:
        async with open_runtime(MemoryStore(), ENV, Impatient) as runtime:
            with pytest.raises(ActorFailed, match="TooSlowError") as failed:
                await runtime.invoke(A, "x")
            assert failed.value.error_type == "TooSlowError"

    run(body)


def test_cancelling_the_runtime_answers_every_waiting_caller() -> None:
    async def body() -> None:
        outcomes: list[str] = []

        async def call(runtime: Any, message: str) -> None:
            try:
                await runtime.invoke(A, message)
                outcomes.append("reply")
            except RuntimeClosed:
                outcomes.append("closed")
            except InvocationInterrupted:
                outcomes.append("interrupted")

        async with trio.open_nursery() as clients:
            with trio.CancelScope() as scope:
                async with open_runtime(MemoryStore(), ENV, Counter) as runtime:
                    clients.start_soon(call, runtime, "sleep:10")
                    await trio.sleep(1)
                    clients.start_soon(call, runtime, "get")
                    await trio.sleep(1)
                    scope.cancel()
                    await trio.sleep(1)
        assert sorted(outcomes) == ["closed", "interrupted"]

    run(body)
