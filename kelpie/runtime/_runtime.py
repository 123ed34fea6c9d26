"""The actor runtime of one node: activation on demand, mailboxes, one message at a time.

`open_runtime(store, env, factory)` runs actors until the block ends:

    async with open_runtime(store, env, Counter) as runtime:
        reply = await runtime.invoke(ActorId("counter", "a"), "increment")

- An actor is activated on its first message: the runtime makes it with
  `factory(actor_id)`, loads its state from the store, calls `activate`, and
  starts one trio task that owns a bounded mailbox (`mailbox_size`). A message
  to a full mailbox fails at once with `MailboxFull` (back-pressure: nothing
  was delivered).
- Each actor handles one message at a time, in arrival order; actors run
  concurrently, so a slow actor never holds up another.
- Each invocation ends in ONE transaction: the working-memory writes the actor
  made through its context and its state (`dump_state()`, stored through the
  blob helper, so any size) are committed together, or not at all. That commit
  only sets keys, so it is idempotent and is retried (`commit_retry`) on
  conflicts, outages and commit_unknown_result. If `handle` raises, or the
  commit still fails, the caller gets the error and the actor's state goes
  back to the last committed one (`load_state`). If the invocation runs past
  `invocation_timeout_ms` (`InvocationTimeout`), or its commit's outcome stays
  unknown, the runtime reloads the state from the store before the next
  message, so it never builds on a guess.
- An actor that receives nothing for `idle_timeout_ms` (default 5 minutes) is
  deactivated (`deactivate`, then its task ends); so is the least recently used
  idle actor when activating one more would pass `active_max`. The next message
  activates it again, from the store.
- Leaving the block drains the runtime: new messages get `RuntimeClosed`,
  messages already in mailboxes are handled, every actor is deactivated.

A caller cancelled while it waits for a reply does not withdraw its message:
the actor still handles it (and may commit), as with a reply lost on the way.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import attrs
import outcome
import trio

from kelpie.env import Env
from kelpie.runtime._actor import Actor, ActorContext
from kelpie.runtime._errors import InvocationTimeout, MailboxFull, RuntimeClosed
from kelpie.runtime._ids import ActorId
from kelpie.storage import (
    CommitUnknownResult,
    RetryPolicy,
    StorageError,
    Store,
    Transaction,
    clear_blob,
    read_blob,
    transact,
    write_blob,
)


@attrs.frozen
class RuntimeConfig:
    """Limits of one node's runtime (durations in milliseconds)."""

    mailbox_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    idle_timeout_ms: int = attrs.field(default=300_000, validator=attrs.validators.ge(1))
    active_max: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    invocation_timeout_ms: int = attrs.field(default=60_000, validator=attrs.validators.ge(1))
    #: How loading an actor's state, and committing an invocation, retry the store.
    load_retry: RetryPolicy = attrs.Factory(RetryPolicy)
    commit_retry: RetryPolicy = attrs.Factory(RetryPolicy)


class _Reply:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: outcome.Outcome[Any] | None = None


_Message = tuple[Any, _Reply]


class _Activation:
    """One active actor: its object, context, mailbox and task state."""

    def __init__(self, actor_id: ActorId, actor: Actor, ctx: ActorContext, size: int) -> None:
        self.actor_id = actor_id
        self.actor = actor
        self.ctx = ctx
        self.send, self.receive = trio.open_memory_channel[_Message](size)
        self.committed: bytes | None = None
        self.stopping = False
        #: The state in memory may differ from the store's: reload before the actor runs again.
        self.stale = False
        self.busy = False
        self.stopped = trio.Event()
        self.idle_scope: trio.CancelScope | None = None
        self.last_used_s = trio.current_time()

    def request_stop(self) -> None:
        self.stopping = True
        if self.idle_scope is not None:
            self.idle_scope.cancel()


class ActorRuntime:
    """The actors of one node (see the module docstring). Make it with `open_runtime`."""

    def __init__(
        self,
        store: Store,
        env: Env,
        factory: Callable[[ActorId], Actor],
        config: RuntimeConfig,
        nursery: trio.Nursery,
    ) -> None:
        self._store = store
        self._env = env
        self._factory = factory
        self._config = config
        self._nursery = nursery
        self._active: collections.OrderedDict[ActorId, _Activation] = collections.OrderedDict()
        self._closing = False
        #: Activations started and deactivations finished (for tests and benchmarks).
        self.activations = 0
        self.deactivations = 0

    @property
    def active_count(self) -> int:
        """How many actors are active (including ones being deactivated)."""
        return len(self._active)

    def is_active(self, actor_id: ActorId) -> bool:
        act = self._active.get(actor_id)
        return act is not None and not act.stopping

    async def invoke(self, actor_id: ActorId, message: Any) -> Any:
        """Delivers `message` to the actor, activating it if needed, and returns its reply.

        Raises what the actor raised, `InvocationTimeout`, a storage error from the
        commit, `MailboxFull` (nothing delivered) or `RuntimeClosed`.
        """
        if not isinstance(actor_id, ActorId):
            raise TypeError(f"invoke takes an ActorId, got {type(actor_id).__name__}")
        while True:
            if self._closing:
                raise RuntimeClosed(f"the runtime is shutting down; {actor_id} was not invoked")
            act = self._active.get(actor_id)
            if act is None:
                act = self._start(actor_id)
            elif act.stopping:
                await act.stopped.wait()  # deactivating: then activate it afresh
                continue
            break
        reply = _Reply()
        try:
            act.send.send_nowait((message, reply))
        except trio.WouldBlock:
            raise MailboxFull(
                f"the mailbox of {actor_id} holds {self._config.mailbox_size} messages; retry later"
            ) from None
        act.last_used_s = trio.current_time()
        self._active.move_to_end(actor_id)
        await reply.done.wait()
        assert reply.result is not None
        return reply.result.unwrap()

    # -- activations ------------------------------------------------------------------

    def _start(self, actor_id: ActorId) -> _Activation:
        cap = self._config.active_max
        if len(self._active) >= cap and sum(not a.stopping for a in self._active.values()) >= cap:
            self._evict_one()
        ctx = ActorContext(actor_id, self._env, self._store)
        act = _Activation(actor_id, self._factory(actor_id), ctx, self._config.mailbox_size)
        self._active[actor_id] = act
        self.activations += 1
        self._nursery.start_soon(self._serve, act, name=f"actor {actor_id}")
        return act

    def _evict_one(self) -> None:
        """Asks the least recently used idle actor to deactivate (the cap is soft)."""
        for act in self._active.values():
            if not act.busy and not act.stopping:
                act.request_stop()
                return

    async def _serve(self, act: _Activation) -> None:
        try:
            try:
                await self._load(act)
                await self._in_transaction(act, act.actor.activate)
            except Exception as exc:  # the activation failed: so does every waiting message
                act.stopping = True
                failure = exc
                self._fail_pending(act, lambda: failure)
                return
            await self._loop(act)
            with contextlib.suppress(Exception):  # its writes are lost; the actor is going away
                await self._in_transaction(act, act.actor.deactivate)
        finally:
            act.stopping = True
            self._fail_pending(
                act, lambda: RuntimeClosed(f"the runtime stopped before {act.actor_id} took this")
            )
            del self._active[act.actor_id]
            self.deactivations += 1
            act.stopped.set()

    async def _loop(self, act: _Activation) -> None:
        idle_s = self._config.idle_timeout_ms / 1000
        while True:
            try:
                message, reply = act.receive.receive_nowait()
            except trio.WouldBlock:
                if act.stopping:
                    return
                with trio.move_on_at(act.last_used_s + idle_s) as waiting:
                    act.idle_scope = waiting
                    message, reply = await act.receive.receive()
                act.idle_scope = None
                if waiting.cancelled_caught:
                    act.stopping = True  # idle, evicted or shut down: drain, then stop
                    continue
            act.busy = True
            try:
                value = await self._invoke(act, message)
            except Exception as exc:
                reply.result = outcome.Error(exc)
            except BaseException:  # Cancelled: the runtime is torn down; answer, then go
                reply.result = outcome.Error(
                    RuntimeClosed(f"the runtime stopped while {act.actor_id} handled this message")
                )
                reply.done.set()
                raise
            else:
                reply.result = outcome.Value(value)
            finally:
                act.busy = False
                act.last_used_s = trio.current_time()  # idle counts from the end of work
            reply.done.set()

    def _fail_pending(self, act: _Activation, error: Callable[[], Exception]) -> None:
        while True:
            try:
                _, reply = act.receive.receive_nowait()
            except trio.WouldBlock:
                return
            reply.result = outcome.Error(error())
            reply.done.set()

    # -- one invocation ---------------------------------------------------------------

    async def _load(self, act: _Activation) -> None:
        key = act.actor_id.key("state")

        async def read(tr: Transaction) -> bytes | None:
            return await read_blob(tr, key)

        data = await transact(self._store, read, rng=self._env.rng, policy=self._config.load_retry)
        act.committed = data
        act.actor.load_state(data)

    async def _invoke(self, act: _Activation, message: Any) -> Any:
        result: list[Any] = []

        async def call(ctx: ActorContext) -> None:
            result.append(await act.actor.handle(ctx, message))

        await self._in_transaction(act, call)
        return result[0]

    async def _reload(self, act: _Activation) -> None:
        """Makes memory match the store; if the store cannot say, the next use reloads first."""
        act.stale = True
        with contextlib.suppress(Exception):  # the caller gets the original error
            await self._load(act)
            act.stale = False

    async def _commit(
        self,
        act: _Activation,
        writes: dict[bytes, bytes | None],
        state: bytes | None,
        on_retry: Callable[[StorageError, int], None],
    ) -> None:
        """Commits an invocation's writes and state: blind sets, so retrying is safe."""
        key = act.actor_id.key("state")

        async def commit(tr: Transaction) -> None:
            for full, value in writes.items():
                if value is None:
                    tr.clear(full)
                else:
                    tr.set(full, value)
            if state != act.committed:
                if state is None:
                    clear_blob(tr, key)
                else:
                    write_blob(tr, key, state)

        await transact(
            self._store,
            commit,
            rng=self._env.rng,
            policy=self._config.commit_retry,
            on_retry=on_retry,
        )

    async def _in_transaction(
        self, act: _Activation, body: Callable[[ActorContext], Awaitable[None]]
    ) -> None:
        """Runs `body`, then commits its writes with the actor's state, or rolls back."""
        if act.stale:
            await self._load(act)  # raises: this message fails, and the actor stays stale
            act.stale = False
        timeout_s = self._config.invocation_timeout_ms / 1000
        writes: dict[bytes, bytes | None] = {}
        committing = False
        uncertain: list[bool] = []  # one entry per commit attempt whose outcome is unknown

        def on_retry(exc: Exception, attempt: int) -> None:
            if isinstance(exc, CommitUnknownResult):
                uncertain.append(True)

        act.ctx._writes = writes
        try:
            with trio.move_on_after(timeout_s) as deadline:
                try:
                    await body(act.ctx)
                finally:
                    act.ctx._writes = None
                state = act.actor.dump_state()
                if writes or state != act.committed:
                    committing = True
                    await self._commit(act, writes, state, on_retry)
        except Exception as exc:
            if isinstance(exc, CommitUnknownResult):
                await self._reload(act)  # the state may or may not be stored: ask the store
                raise
            if uncertain:  # an earlier attempt may have applied: the outcome is unknown
                await self._reload(act)
                raise CommitUnknownResult(
                    f"the commit of {act.actor_id} failed ({type(exc).__name__}) after an "
                    "attempt whose outcome is unknown; it may have applied"
                ) from exc
            act.actor.load_state(act.committed)
            raise
        except BaseException:  # Cancelled: no time to ask the store
            if committing:
                act.stale = True
            else:
                act.actor.load_state(act.committed)
            raise
        if deadline.cancelled_caught:
            await self._reload(act)  # a commit cut short may have applied: ask the store
            raise InvocationTimeout(
                f"{act.actor_id} took longer than {self._config.invocation_timeout_ms} ms; "
                "its commit, if one was under way, may have applied"
            )
        act.committed = state


@contextlib.asynccontextmanager
async def open_runtime(
    store: Store,
    env: Env,
    factory: Callable[[ActorId], Actor],
    config: RuntimeConfig = RuntimeConfig(),
) -> AsyncIterator[ActorRuntime]:
    """Runs a node's actors for the duration of the block, then drains them (module docstring)."""
    async with trio.open_nursery() as nursery:
        runtime = ActorRuntime(store, env, factory, config, nursery)
        try:
            yield runtime
        finally:
            runtime._closing = True
            for act in list(runtime._active.values()):
                act.request_stop()
