"""One node of an actor cluster: activation on demand, mailboxes, routing between nodes.

`open_runtime(store, env, factory)` runs a node until the block ends:

    async with open_runtime(store, env, Counter) as runtime:
        reply = await runtime.invoke(ActorId("counter", "a"), "increment")

Every runtime is a node of the cluster of all runtimes sharing `store` (one
node is a cluster of one). It joins with a lease and an epoch
(kelpie/runtime/_membership.py) and renews the lease every `lease_renew_ms`.

- An invocation goes to the actor's owner (kelpie/runtime/_directory.py): if
  the actor is active here, into its mailbox; if another live node owns it,
  over `env.network` to that node; if nobody owns it, to the node the placement
  policy picks (least loaded by default), which takes it. Routing failures that
  delivered nothing (a redirect, an owner that moved or is unreachable, a node
  draining) are retried, with backoff, up to `route_retry`; then the caller
  gets `ActorUnavailable`.
- An actor is activated on the node that owns it: the runtime makes it with
  `factory(actor_id)`, and in one transaction takes ownership and loads its
  state and its recent idempotency keys; then calls `activate` and starts one
  trio task with a bounded mailbox (`mailbox_size`). A message to a full
  mailbox fails at once with `MailboxFull` (back-pressure: nothing delivered).
- Each actor handles one message at a time, in arrival order; actors run
  concurrently, so a slow actor never holds up another.
- Each invocation ends in ONE transaction: the working-memory writes the actor
  made through its context, its state (`dump_state()`, through the blob
  helper, so any size), and the reply under the call's idempotency key are
  committed together, or not at all, and only while the activation's record
  still names this node's epoch (the fence). That commit only sets keys, so it
  is retried (`commit_retry`) on conflicts, outages and commit_unknown_result.
  If `handle` raises (the caller gets `ActorFailed`, or the Kelpie error it
  raised), or the commit fails, the state goes back to the last committed one
  (`load_state`). After `InvocationTimeout`, or a commit whose outcome stays
  unknown, the state is reloaded from the store before the next message.
- A call with an `idempotency_key` is applied at most once: the reply of a
  committed call is stored with it, and a repeat of the key (a retry after an
  unknown outcome, a duplicate on the network) gets that reply without running
  the actor again. An actor remembers its last `idempotency_window` keys.
- An actor that receives nothing for `idle_timeout_ms` (default 5 minutes) is
  deactivated (`deactivate`, then its task ends); so is the least recently used
  idle actor when activating one more would pass `active_max`. The node keeps
  owning it, and activates it again from the store on the next message.
- If the node's lease lapses, every activation it had stops (their commits
  would be refused), and the node joins again with a new epoch.
- Leaving the block drains the node: it stops taking new actors, new messages
  get `RuntimeClosed`, messages already in mailboxes are handled, every actor
  is deactivated, and the node leaves the cluster, which frees its actors for
  the other nodes at once.

Delivery: a call that returns was applied exactly once. A call that fails with
`CommitUnknownResult`, `InvocationTimeout`, `InvocationInterrupted`, or a
network `DeliveryUnknown`/`RemoteFailure` may have been applied; retry it with
the same idempotency key to be sure it is applied once. Any other error means
nothing was applied.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any, TypeVar

import attrs
import outcome
import trio

from kelpie.core import ConfigError, KelpieError
from kelpie.env import Env, FrameTooLarge, NetworkError
from kelpie.runtime._actor import Actor, ActorContext
from kelpie.runtime._directory import Owner, acquire, fence, locate, owner_key
from kelpie.runtime._errors import (
    ActorFailed,
    ActorUnavailable,
    AlreadyApplied,
    InvocationInterrupted,
    InvocationTimeout,
    MailboxFull,
    OwnershipLost,
    RuntimeClosed,
)
from kelpie.runtime._ids import ActorId
from kelpie.runtime._membership import LEASE_SAFETY, Membership, NodeRecord, read_node
from kelpie.runtime._placement import Placement, least_loaded
from kelpie.runtime._wire import (
    GENERATED_KEY_PREFIX,
    NotHandled,
    Redirect,
    Request,
    Value,
    check_idempotency_key,
    decode_reply,
    decode_request,
    decode_value,
    encode_request,
    encode_value,
    reply_error,
    reply_not_handled,
    reply_redirect,
    reply_value,
)
from kelpie.storage import (
    VALUE_SIZE_MAX_BYTES,
    CommitUnknownResult,
    RetryPolicy,
    StorageError,
    Store,
    Transaction,
    clear_blob,
    pack,
    read_blob,
    transact,
    unpack,
    write_blob,
)

T = TypeVar("T")

#: How many answers to other nodes' requests a node keeps for their duplicates (each also
#: expires after 2 x forward_timeout_ms). A duplicate arriving later still cannot apply a
#: committed call twice: the actor's idempotency window catches it.
_REQUESTS_KEPT_MAX = 10_000
#: How many actor locations a node remembers (routing hints; a wrong one is redirected).
_ROUTES_KEPT_MAX = 10_000

#: Room an idempotency record needs besides its reply.
_IDEM_OVERHEAD_BYTES = 1_024


@attrs.frozen
class RuntimeConfig:
    """Limits and timings of one node (durations in milliseconds)."""

    mailbox_size: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    idle_timeout_ms: int = attrs.field(default=300_000, validator=attrs.validators.ge(1))
    active_max: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    invocation_timeout_ms: int = attrs.field(default=60_000, validator=attrs.validators.ge(1))
    #: How loading an actor's state, and committing an invocation, retry the store.
    load_retry: RetryPolicy = attrs.Factory(RetryPolicy)
    commit_retry: RetryPolicy = attrs.Factory(RetryPolicy)
    #: A node's lease on the store's clock, and how often it renews it.
    lease_duration_ms: int = attrs.field(default=10_000, validator=attrs.validators.ge(1))
    lease_renew_ms: int = attrs.field(default=2_000, validator=attrs.validators.ge(1))
    membership_retry: RetryPolicy = attrs.Factory(
        lambda: RetryPolicy(attempts_max=5, backoff_initial_ms=10, backoff_max_ms=200)
    )
    #: How long a starting node keeps trying to join the cluster while the store fails.
    start_timeout_ms: int = attrs.field(default=60_000, validator=attrs.validators.ge(1))
    #: How long a call forwarded to another node may take before its outcome is unknown.
    forward_timeout_ms: int = attrs.field(default=75_000, validator=attrs.validators.ge(1))
    #: How routing retries when nothing was delivered (redirects, moves, unreachable owners).
    route_retry: RetryPolicy = attrs.Factory(
        lambda: RetryPolicy(attempts_max=20, backoff_initial_ms=5, backoff_max_ms=500)
    )
    #: How many recent idempotency keys (and their replies) each actor remembers.
    idempotency_window: int = attrs.field(default=1_000, validator=attrs.validators.ge(1))
    #: Where an actor nobody owns is activated (kelpie/runtime/_placement.py).
    placement: Placement = least_loaded
    #: TESTING ONLY. False skips the ownership re-check inside every commit: a planted
    #: bug that the cluster scenarios must catch. Never turn it off in production.
    fencing: bool = True

    def __attrs_post_init__(self) -> None:
        if self.lease_renew_ms * 2 > self.lease_duration_ms * LEASE_SAFETY:
            raise ConfigError(
                f"lease_renew_ms={self.lease_renew_ms} must be at most "
                f"{LEASE_SAFETY / 2:g} x lease_duration_ms={self.lease_duration_ms}, so a node "
                "renews at least twice before it stops trusting its lease"
            )


class _NotHandled(Exception):
    """Internal: the message was not handled (nothing applied); route it again."""

    def __init__(self, error: KelpieError, redirect: NodeRecord | None = None) -> None:
        super().__init__(str(error))
        self.error = error
        self.redirect = redirect


#: The answer a duplicate gets when the node stopped while handling the first copy.
_INTERRUPTED = reply_error(
    InvocationInterrupted("the node stopped while handling this call; it may have applied")
)


class _Answer:
    """The answer to one request from another node, kept for duplicates of it."""

    __slots__ = ("done", "expires_s", "reply")

    def __init__(self, expires_s: float) -> None:
        self.done = trio.Event()
        self.expires_s = expires_s
        self.reply = _INTERRUPTED


class _Reply:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: outcome.Outcome[bytes] | None = None


#: (message, idempotency key, reply)
_Message = tuple[Any, str | None, _Reply]


class _Activation:
    """One active actor: its object, context, mailbox and task state."""

    def __init__(self, actor_id: ActorId, actor: Actor, ctx: ActorContext, size: int, owner: Owner):
        self.actor_id = actor_id
        self.actor = actor
        self.ctx = ctx
        self.owner = owner
        self.send, self.receive = trio.open_memory_channel[_Message](size)
        self.committed: bytes | None = None
        #: What `dump_state()` gave for the committed state: a state equal to it is unchanged
        #: (a new actor's initial state needs no commit of its own).
        self.clean: bytes | None = None
        #: Recent idempotency keys -> stored reply (None: too large to keep), oldest first.
        self.replies: collections.OrderedDict[str, bytes | None] = collections.OrderedDict()
        self.idem_next = 0
        self.stopping = False
        #: This activation's ownership is gone: it must not run again.
        self.lost = False
        #: The state in memory may differ from the store's: reload before the actor runs again.
        self.stale = False
        self.busy = False
        #: The running invocation committed a checkpoint (ActorContext.checkpoint).
        self.checkpointed = False
        self.stopped = trio.Event()
        self.idle_scope: trio.CancelScope | None = None
        self.last_used_s = trio.current_time()

    def request_stop(self) -> None:
        self.stopping = True
        if self.idle_scope is not None:
            self.idle_scope.cancel()


class ActorRuntime:
    """One node's actors (see the module docstring). Make it with `open_runtime`."""

    def __init__(
        self,
        store: Store,
        env: Env,
        factory: Callable[[ActorId], Actor],
        config: RuntimeConfig,
        membership: Membership,
    ) -> None:
        self._store = store
        self._env = env
        self._factory = factory
        self._config = config
        self._membership = membership
        self._network = env.network
        self._nursery: trio.Nursery | None = None
        self._context = contextvars.copy_context()
        self._active: collections.OrderedDict[ActorId, _Activation] = collections.OrderedDict()
        self._closing = False
        self._nodes: list[NodeRecord] = []
        #: Actors placed on each node (by epoch) since the loads were last read.
        self._placed: dict[int, int] = {}
        self._routes: collections.OrderedDict[ActorId, NodeRecord] = collections.OrderedDict()
        self._forwarded = itertools.count()
        self._nonce = f"{env.rng.getrandbits(64):016x}"
        #: Requests from other nodes by id, answered or under way (duplicates get the same).
        self._requests: collections.OrderedDict[str, _Answer] = collections.OrderedDict()
        #: Activations started and deactivations finished (for tests and benchmarks).
        self.activations = 0
        self.deactivations = 0
        #: Calls this node forwarded to another node.
        self.forwards = 0

    @property
    def name(self) -> str:
        """The node's name (`env.node`)."""
        return self._membership.name

    @property
    def address(self) -> str:
        """Where other nodes reach this one ("" without a network)."""
        return self._membership.address

    @property
    def epoch(self) -> int:
        """This node incarnation's epoch (0 while it has none: joining again)."""
        return self._membership.epoch

    @property
    def active_count(self) -> int:
        """How many actors are active here (including ones being deactivated)."""
        return len(self._active)

    def is_active(self, actor_id: ActorId) -> bool:
        act = self._active.get(actor_id)
        return act is not None and not act.stopping and not act.lost

    # -- calls ------------------------------------------------------------------------

    async def invoke(
        self, actor_id: ActorId, message: Any, *, idempotency_key: str | None = None
    ) -> Any:
        """Delivers `message` to the actor, wherever it lives, and returns its reply.

        `message` and the reply are JSON values (kelpie/runtime/_wire.py). Raises
        the Kelpie error the actor raised, `ActorFailed` for any other exception of
        the actor's, `InvocationTimeout`, a storage error from the commit,
        `MailboxFull`, `ActorUnavailable`, `RuntimeClosed`, or a network error
        (see the module docstring for which of these may have been applied).
        """
        if not isinstance(actor_id, ActorId):
            raise TypeError(f"invoke takes an ActorId, got {type(actor_id).__name__}")
        check_idempotency_key(idempotency_key)
        data = encode_value(message, f"the message to {actor_id}")
        policy = self._config.route_retry
        hint: NodeRecord | None = None
        #: The call's key; one made up for it once it is forwarded, kept for every retry.
        keys = [idempotency_key]
        attempt = 1
        while True:
            try:
                return await self._attempt(actor_id, data, keys, hint)
            except _NotHandled as exc:
                if self._closing:
                    raise RuntimeClosed(
                        f"the runtime is shutting down; {actor_id} was not invoked"
                    ) from None
                if attempt >= policy.attempts_max:
                    raise ActorUnavailable(
                        f"{actor_id} could not be reached in {attempt} attempts "
                        f"(last: {exc.error}); nothing was delivered"
                    ) from exc.error
                hint = exc.redirect
            await trio.sleep(policy.backoff_ms(attempt, self._env.rng) / 1000)
            attempt += 1

    async def _attempt(
        self, actor_id: ActorId, data: bytes, keys: list[str | None], hint: NodeRecord | None
    ) -> Any:
        while True:
            key = keys[0]
            if self._closing:
                raise RuntimeClosed(f"the runtime is shutting down; {actor_id} was not invoked")
            act = self._active.get(actor_id)
            if act is not None:
                if act.stopping or act.lost:
                    await act.stopped.wait()  # deactivating: then route afresh
                    continue
                return decode_value(await self._deliver(act, decode_value(data), key))
            target, hint = (hint if hint is not None else await self._place(actor_id)), None
            if target.epoch != self.epoch:
                if keys[0] is None:  # the network may duplicate it: it must not apply twice
                    keys[0] = self._new_key()
                return await self._forward(target, actor_id, data, keys[0])
            await self._await_lease()
            if actor_id not in self._active:  # (it may have been activated meanwhile)
                act = self._start(actor_id)
                return decode_value(await self._deliver(act, decode_value(data), key))

    async def _place(self, actor_id: ActorId) -> NodeRecord:
        """The node to send the call to: its owner, or where placement puts it.

        A node remembers where it last sent each actor (a hint: a node that does not
        own it redirects, and a failed send forgets it), so a forwarded call usually
        costs no store read.
        """
        route = self._routes.get(actor_id)
        if route is not None and any(node.epoch == route.epoch for node in self._nodes):
            self._routes.move_to_end(actor_id)
            return route

        async def find(tr: Transaction) -> NodeRecord | None:
            return (await locate(tr, actor_id)).node

        owner = await transact(self._store, find, rng=self._env.rng, policy=self._config.load_retry)
        if owner is None:
            # Loads as last published, plus what this node placed since: every node is
            # judged equally stale, and a burst of new actors spreads out.
            me = NodeRecord(self.epoch, self.name, self.address, 0, 0, self._closing)
            nodes = [node for node in self._nodes if node.epoch != me.epoch]
            nodes.append(next((n for n in self._nodes if n.epoch == me.epoch), me))
            nodes = [
                attrs.evolve(node, load=node.load + self._placed.get(node.epoch, 0))
                for node in nodes
            ]
            owner = self._config.placement(nodes, me, self._env.rng)
            self._placed[owner.epoch] = self._placed.get(owner.epoch, 0) + 1
        if owner.epoch != self.epoch:
            self._remember(actor_id, owner)
        return owner

    def _remember(self, actor_id: ActorId, node: NodeRecord | None) -> None:
        if node is None:
            self._routes.pop(actor_id, None)
            return
        self._routes[actor_id] = node
        self._routes.move_to_end(actor_id)
        while len(self._routes) > _ROUTES_KEPT_MAX:
            self._routes.popitem(last=False)

    async def _deliver(self, act: _Activation, message: Any, key: str | None) -> bytes:
        reply = _Reply()
        try:
            act.send.send_nowait((message, key, reply))
        except trio.WouldBlock:
            raise MailboxFull(
                f"the mailbox of {act.actor_id} holds {self._config.mailbox_size} messages; "
                "retry later"
            ) from None
        act.last_used_s = trio.current_time()
        self._active.move_to_end(act.actor_id)
        await reply.done.wait()
        assert reply.result is not None
        return reply.result.unwrap()

    async def _forward(
        self, node: NodeRecord, actor_id: ActorId, data: bytes, key: str | None
    ) -> Any:
        if self._network is None or not node.address:
            raise ActorUnavailable(
                f"{actor_id} is owned by node {node.name} (epoch {node.epoch}), and "
                f"{'this node has no network' if self._network is None else 'it has no address'}"
            )
        self.forwards += 1
        request = encode_request(actor_id, data, key, request_id=self._new_key())
        try:
            raw = await self._network.request(
                node.address, request, timeout_ms=self._config.forward_timeout_ms
            )
        except FrameTooLarge:
            raise
        except NetworkError as exc:
            self._remember(actor_id, None)
            if exc.maybe_delivered:
                raise
            raise _NotHandled(ActorUnavailable(f"node {node.name} is unreachable: {exc}")) from None
        result = decode_reply(raw)
        if isinstance(result, Value):
            return result.value
        if isinstance(result, Redirect):
            target = NodeRecord(result.epoch, "?", result.address, 0, 0, False)
            self._remember(actor_id, target)
            raise _NotHandled(ActorUnavailable(f"{actor_id} moved"), redirect=target)
        if isinstance(result, NotHandled):
            self._remember(actor_id, None)
            raise _NotHandled(result.error)
        raise result

    def _new_key(self) -> str:
        """A key no other call in the cluster has: this incarnation's nonce and a counter."""
        return f"{GENERATED_KEY_PREFIX}{self._nonce}:{next(self._forwarded)}"

    async def handle_request(self, payload: bytes) -> bytes:
        """Answers an invocation from another node or a client (the network's handler).

        A copy of a request the network duplicated (same request id) gets the answer
        of the first copy, waiting for it if need be, for `2 x forward_timeout_ms`.
        """
        try:
            request = decode_request(payload)
        except KelpieError as exc:
            return reply_error(exc)
        if request.request_id is None:
            return await self._answer(request)
        now = trio.current_time()
        while self._requests:  # forget answers older than any copy can be, or too many
            oldest = next(iter(self._requests.values()))
            if oldest.expires_s > now and len(self._requests) < _REQUESTS_KEPT_MAX:
                break
            self._requests.popitem(last=False)
        seen = self._requests.get(request.request_id)
        if seen is not None:
            await seen.done.wait()
            return seen.reply
        seen = self._requests[request.request_id] = _Answer(
            now + 2 * self._config.forward_timeout_ms / 1000
        )
        try:
            seen.reply = await self._answer(request)
        finally:
            seen.done.set()  # (cancelled: the duplicate gets "maybe applied")
        return seen.reply

    async def _answer(self, request: Request) -> bytes:
        actor_id, message, key = request.actor_id, request.message, request.key
        try:
            if request.route:  # a client's call: route it like a local one
                value = await self.invoke(actor_id, message, idempotency_key=key)
                return reply_value(encode_value(value, "the reply"))
            return reply_value(await self._serve_call(actor_id, message, key))
        except _NotHandled as exc:
            if exc.redirect is not None:
                return reply_redirect(exc.redirect.address, exc.redirect.epoch)
            return reply_not_handled(exc.error)
        except KelpieError as exc:
            return reply_error(exc)

    async def _serve_call(self, actor_id: ActorId, message: Any, key: str | None) -> bytes:
        while True:
            act = self._active.get(actor_id)
            if act is None:
                if self._closing:
                    raise _NotHandled(RuntimeClosed(f"node {self.name} is leaving the cluster"))
                await self._await_lease()
                if actor_id in self._active:
                    continue
                act = self._start(actor_id)
            elif act.stopping or act.lost:
                await act.stopped.wait()
                continue
            return await self._deliver(act, message, key)

    # -- the lease --------------------------------------------------------------------

    async def _await_lease(self) -> None:
        """Returns once this node may act; `ActorUnavailable` if that does not come soon."""
        membership = self._membership
        if membership.holds_lease():
            return
        with trio.move_on_after(self._config.lease_duration_ms / 1000):
            while not membership.holds_lease():
                await membership.lease_changed.wait()
            return
        raise _NotHandled(
            ActorUnavailable(
                f"node {self.name} holds no lease (is the store reachable?); nothing was delivered"
            )
        )

    async def keep_lease(self) -> None:
        """Renews the lease until cancelled; after a lapse, stops every actor and joins again."""
        renew_s = self._config.lease_renew_ms / 1000
        while True:
            await trio.sleep(renew_s)
            if self._closing and self._membership.epoch == 0:
                return  # left the cluster: never join again
            try:
                if self._membership.epoch == 0 or not await self._membership.renew(
                    load=len(self._active), draining=self._closing
                ):
                    await self._rejoin()
                self._nodes = await self._membership.live_nodes()
                self._placed.clear()
            except StorageError:
                continue  # the next round tries again; past the deadline the node waits

    async def _rejoin(self) -> None:
        if self._closing:
            return
        for act in list(self._active.values()):
            act.lost = True
            act.request_stop()
        await self._membership.join(load=len(self._active))

    # -- activations ------------------------------------------------------------------

    def _start(self, actor_id: ActorId) -> _Activation:
        assert self._nursery is not None
        if self._closing:
            raise _NotHandled(RuntimeClosed(f"node {self.name} is leaving; {actor_id} not taken"))
        if len(self._active) >= self._config.active_max:
            self._evict_one()
        owner = Owner(self.epoch, self.name)
        ctx = ActorContext(actor_id, self._env, self._store, owner.epoch)
        actor = _hook(actor_id, "the actor factory", self._factory, actor_id)
        act = _Activation(actor_id, actor, ctx, self._config.mailbox_size, owner)
        self._active[actor_id] = act
        self.activations += 1
        # The actor's task belongs to this node, not to the caller that woke it: it runs in
        # the node's context (context variables as they were when the node started).
        self._context.run(
            functools.partial(self._nursery.start_soon, name=f"actor {actor_id}"), self._serve, act
        )
        return act

    def _evict_one(self) -> None:
        """Asks the least recently used idle actor to deactivate (the cap is soft: those
        already stopping still count until they are gone)."""
        for act in self._active.values():
            if not act.busy and not act.stopping:
                act.request_stop()
                return

    async def _serve(self, act: _Activation) -> None:
        try:
            try:
                await self._activate(act)
            except Exception as exc:  # the activation failed: so does every waiting message
                act.stopping = True
                failure = exc
                self._fail_pending(act, lambda: _copy_error(failure))
                return
            await self._loop(act)
            if not act.lost:
                with contextlib.suppress(Exception):  # its writes are lost; it is going away
                    await self._in_transaction(act, act.actor.deactivate, None)
                if self._closing:  # leaving: let another node take it now, not at our leave
                    with contextlib.suppress(Exception):
                        await self._release(act)
        finally:
            act.stopping = True
            self._fail_pending(
                act,
                lambda: _NotHandled(RuntimeClosed(f"{act.actor_id} stopped before taking this")),
            )
            del self._active[act.actor_id]
            self.deactivations += 1
            act.stopped.set()

    async def _release(self, act: _Activation) -> None:
        """Clears the actor's activation record, if it is still this activation's."""
        owner = act.owner

        async def release(tr: Transaction) -> None:
            await fence(tr, act.actor_id, owner)
            tr.clear(owner_key(act.actor_id))

        await transact(self._store, release, rng=self._env.rng, policy=self._config.commit_retry)

    async def _activate(self, act: _Activation) -> None:
        owner = await self._load(act)
        if owner is not None:
            act.lost = True
            raise _NotHandled(
                ActorUnavailable(f"{act.actor_id} is owned by node {owner.name}"), redirect=owner
            )
        self._env.emit("actor.activated", actor=str(act.actor_id), epoch=act.owner.epoch)
        await self._in_transaction(act, act.actor.activate, None)

    async def _loop(self, act: _Activation) -> None:
        idle_s = self._config.idle_timeout_ms / 1000
        while not act.lost:
            try:
                message, key, reply = act.receive.receive_nowait()
            except trio.WouldBlock:
                if act.stopping:
                    return
                with trio.move_on_at(act.last_used_s + idle_s) as waiting:
                    act.idle_scope = waiting
                    message, key, reply = await act.receive.receive()
                act.idle_scope = None
                if waiting.cancelled_caught:
                    act.stopping = True  # idle, evicted or shut down: drain, then stop
                    continue
            act.busy = True
            try:
                value = await self._invoke(act, message, key)
            except Exception as exc:
                reply.result = outcome.Error(exc)
            except BaseException:  # Cancelled: the runtime is torn down; answer, then go
                reply.result = outcome.Error(
                    InvocationInterrupted(
                        f"the node stopped while {act.actor_id} handled this message; "
                        "it may have been applied"
                    )
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
                _, _, reply = act.receive.receive_nowait()
            except trio.WouldBlock:
                return
            reply.result = outcome.Error(error())
            reply.done.set()

    # -- one invocation ---------------------------------------------------------------

    async def _load(self, act: _Activation) -> NodeRecord | None:
        """Takes ownership and loads state and recent idempotency keys (or names the owner)."""
        state_key = act.actor_id.key("state")
        begin, end = act.actor_id.range("idem")
        window = self._config.idempotency_window
        owner = act.owner

        async def read(tr: Transaction) -> tuple[NodeRecord | None, bytes | None, list[Any]]:
            mine = await read_node(tr, owner.epoch)
            if mine is None or not mine.live_at(await tr.read_version()):
                raise _NotHandled(
                    OwnershipLost(f"node {self.name}'s lease (epoch {owner.epoch}) has lapsed")
                )
            other = await acquire(tr, act.actor_id, owner)
            if other is not None:
                return other, None, []
            data = await read_blob(tr, state_key)
            rows = await tr.get_range(begin, end, limit=window, reverse=True)
            return None, data, rows

        other, data, rows = await transact(
            self._store, read, rng=self._env.rng, policy=self._config.load_retry
        )
        if other is not None:
            return other
        act.committed = data
        _hook(act.actor_id, "load_state", act.actor.load_state, data)
        act.clean = _hook(act.actor_id, "dump_state", act.actor.dump_state)
        act.replies.clear()
        for _, value in reversed(rows):
            idem_key, reply = unpack(value)
            act.replies[idem_key] = reply
        act.idem_next = unpack(rows[0][0])[-1] + 1 if rows else 0
        return None

    async def _invoke(self, act: _Activation, message: Any, key: str | None) -> bytes:
        result: list[bytes] = []

        async def call(ctx: ActorContext) -> None:
            ctx._checkpoint = functools.partial(self._checkpoint, act)
            try:
                value = await act.actor.handle(ctx, message)
            finally:
                ctx._checkpoint = None
            result.append(encode_value(value, f"the reply of {act.actor_id}"))

        stored = await self._in_transaction(act, call, key, result)
        return result[0] if stored is None else stored

    async def _reload(self, act: _Activation) -> None:
        """Makes memory match the store; if the store cannot say, the next use reloads first."""
        act.stale = True
        with contextlib.suppress(Exception):  # the caller gets the original error
            if await self._load(act) is not None:
                act.lost = True
            act.stale = False

    async def _commit(
        self,
        act: _Activation,
        writes: dict[bytes, bytes | None],
        state: bytes | None,
        idem: tuple[str, bytes | None] | None,
        on_retry: Callable[[StorageError, int], None],
    ) -> None:
        """Commits an invocation's writes, state and reply: blind sets, so retrying is safe."""
        key = act.actor_id.key("state")
        owner = act.owner
        fencing = self._config.fencing
        seq = act.idem_next
        window = self._config.idempotency_window

        async def commit(tr: Transaction) -> None:
            if fencing:
                await fence(tr, act.actor_id, owner)
            for full, value in writes.items():
                if value is None:
                    tr.clear(full)
                else:
                    tr.set(full, value)
            if state != act.clean:
                if state is None:
                    clear_blob(tr, key)
                else:
                    write_blob(tr, key, state)
            if idem is not None:
                tr.set(act.actor_id.key("idem", seq), pack(idem))
                if seq >= window:
                    tr.clear(act.actor_id.key("idem", seq - window))

        await transact(
            self._store,
            commit,
            rng=self._env.rng,
            policy=self._config.commit_retry,
            on_retry=on_retry,
        )
        if idem is not None:
            act.replies[idem[0]] = idem[1]
            act.idem_next = seq + 1
            while len(act.replies) > window:
                act.replies.popitem(last=False)

    async def _checkpoint(self, act: _Activation) -> None:
        """Commits what the running handler has done so far (ActorContext.checkpoint)."""
        writes = act.ctx._buffer()
        state = _hook(act.actor_id, "dump_state", act.actor.dump_state)
        if not writes and state == act.clean:
            return
        uncertain: list[bool] = []

        def on_retry(exc: Exception, attempt: int) -> None:
            if isinstance(exc, CommitUnknownResult):
                uncertain.append(True)

        act.checkpointed = True  # the call has applied something: its key must be recorded
        try:
            await self._commit(act, dict(writes), state, None, on_retry)
        except CommitUnknownResult:
            raise
        except Exception as exc:
            if uncertain:
                raise CommitUnknownResult(
                    f"a checkpoint of {act.actor_id} failed ({type(exc).__name__}) after an "
                    "attempt whose outcome is unknown; it may have applied"
                ) from exc
            raise
        except BaseException:  # cancelled mid-commit: the store may hold it; ask it later
            act.stale = True
            raise
        writes.clear()
        act.committed = act.clean = state

    def _restore(self, act: _Activation) -> None:
        """Rolls the actor's memory back to its last committed state (or marks it for a reload)."""
        try:
            act.actor.load_state(act.committed)
        except Exception:  # its own code failed: rebuild it from the store before it runs again
            act.stale = True

    async def _check_owner(self, act: _Activation) -> None:
        """Raises `_NotHandled` unless this activation may still act for its actor."""
        if not self._membership.holds_lease():
            await self._await_lease()
        if act.lost or act.owner.epoch != self._membership.epoch:
            act.lost = True
            raise _NotHandled(
                OwnershipLost(f"{act.actor_id}'s activation belongs to an earlier epoch")
            )

    async def _prepare(self, act: _Activation, key: str | None) -> bytes | None:
        """Readies the activation for a call; returns the stored reply if `key` was applied."""
        await self._check_owner(act)
        if act.stale:
            if await self._load(act) is not None:  # raises: this message fails; still stale
                act.lost = True
                raise _NotHandled(OwnershipLost(f"{act.actor_id} moved to another node"))
            act.stale = False
        if key is None or key not in act.replies:
            return None
        stored = act.replies[key]
        if stored is None:
            raise AlreadyApplied(
                f"the call with idempotency key {key!r} to {act.actor_id} was applied "
                "before; its reply was too large to keep"
            )
        return stored

    async def _in_transaction(
        self,
        act: _Activation,
        body: Callable[[ActorContext], Awaitable[None]],
        key: str | None,
        result: list[bytes] | None = None,
    ) -> bytes | None:
        """Runs `body`, then commits its writes with the actor's state, or rolls back.

        Returns the stored reply when `key` was applied before (then `body` does not run).
        """
        stored = await self._prepare(act, key)
        if stored is not None:
            return stored
        timeout_s = self._config.invocation_timeout_ms / 1000
        writes: dict[bytes, bytes | None] = {}
        committing = False
        uncertain: list[bool] = []  # one entry per commit attempt whose outcome is unknown

        def on_retry(exc: Exception, attempt: int) -> None:
            if isinstance(exc, CommitUnknownResult):
                uncertain.append(True)

        act.ctx._writes = writes
        act.checkpointed = False
        try:
            with trio.move_on_after(timeout_s) as deadline:
                await _run_body(act, body)
                state = _hook(act.actor_id, "dump_state", act.actor.dump_state)
                # After a checkpoint the call has applied something even when nothing
                # changed since: its idempotency record is committed all the same.
                if writes or state != act.clean or (key is not None and act.checkpointed):
                    committing = True
                    await self._commit(act, writes, state, _idem(key, result), on_retry)
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
            self._restore(act)
            if isinstance(exc, OwnershipLost):
                act.lost = True
                self._env.emit("actor.fenced", actor=str(act.actor_id), epoch=act.owner.epoch)
                raise _NotHandled(exc) from None
            raise
        except BaseException:  # Cancelled: no time to ask the store
            if committing:
                act.stale = True
            elif not act.stale:  # (a checkpoint cut short marked it stale already)
                self._restore(act)
            raise
        if deadline.cancelled_caught:
            await self._reload(act)  # a commit cut short may have applied: ask the store
            raise InvocationTimeout(
                f"{act.actor_id} took longer than {self._config.invocation_timeout_ms} ms; "
                "its commit, if one was under way, may have applied"
            )
        act.committed = act.clean = state
        return None


async def _run_body(act: _Activation, body: Callable[[ActorContext], Awaitable[None]]) -> None:
    """Runs one hook or handler of the actor's; its own exceptions become `ActorFailed`."""
    try:
        await body(act.ctx)
    except KelpieError:
        raise
    except Exception as exc:
        raise ActorFailed(
            f"{act.actor_id} raised {type(exc).__name__}: {exc}", error_type=type(exc).__name__
        ) from exc
    finally:
        act.ctx._writes = None


def _hook(actor_id: ActorId, what: str, fn: Callable[..., T], *args: Any) -> T:
    """Calls the actor's own code; what it raises (but a Kelpie error) becomes `ActorFailed`."""
    try:
        return fn(*args)
    except KelpieError:
        raise
    except Exception as exc:
        raise ActorFailed(
            f"{what} of {actor_id} raised {type(exc).__name__}: {exc}",
            error_type=type(exc).__name__,
        ) from exc


def _copy_error(error: Exception) -> Exception:
    """An error of the same meaning for one more caller (never one object raised in two tasks)."""
    if isinstance(error, _NotHandled):
        return _NotHandled(_copy_error(error.error), error.redirect)  # type: ignore[arg-type]
    if isinstance(error, ActorFailed):
        copy: Exception = ActorFailed(str(error), error_type=error.error_type)
    elif isinstance(error, KelpieError):
        try:
            copy = type(error)(str(error))
        except TypeError:
            copy = ActorFailed(str(error), error_type=type(error).__name__)
    else:
        copy = ActorFailed(f"{type(error).__name__}: {error}", error_type=type(error).__name__)
    copy.__cause__ = error
    return copy


def _idem(key: str | None, result: list[bytes] | None) -> tuple[str, bytes | None] | None:
    """The idempotency record a committing call stores: its key and reply (if it fits)."""
    if key is None or not result:
        return None
    reply = result[0]
    keep = len(reply) + len(key) + _IDEM_OVERHEAD_BYTES <= VALUE_SIZE_MAX_BYTES
    return key, reply if keep else None


async def _join(membership: Membership, env: Env, config: RuntimeConfig) -> None:
    """Joins the cluster, retrying the store for up to `start_timeout_ms`, then raises."""
    deadline = trio.current_time() + config.start_timeout_ms / 1000
    attempt = 1
    while True:
        try:
            await membership.join()
        except StorageError:
            pause_s = config.membership_retry.backoff_ms(attempt, env.rng) / 1000
            if trio.current_time() + pause_s > deadline:
                raise
            await trio.sleep(pause_s)
            attempt += 1
        else:
            return


def _leaves(error: BaseException) -> list[BaseException]:
    if isinstance(error, BaseExceptionGroup):
        return [leaf for inner in error.exceptions for leaf in _leaves(inner)]
    return [error]


@contextlib.contextmanager
def _one_error() -> Iterator[None]:
    """Raises a lone error out of nurseries as itself, not wrapped in exception groups."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if len(leaves) != 1:
            raise
        error = leaves[0]
    else:
        return
    raise error


@contextlib.asynccontextmanager
async def open_runtime(
    store: Store,
    env: Env,
    factory: Callable[[ActorId], Actor],
    config: RuntimeConfig = RuntimeConfig(),
) -> AsyncIterator[ActorRuntime]:
    """Runs a node for the duration of the block, then drains it (module docstring).

    The node serves other nodes over `env.network` when it has one, and is named
    `env.node`.
    """
    with _one_error():
        async with _open_node(store, env, factory, config) as runtime:
            yield runtime


@contextlib.asynccontextmanager
async def _open_node(
    store: Store, env: Env, factory: Callable[[ActorId], Actor], config: RuntimeConfig
) -> AsyncIterator[ActorRuntime]:
    async with trio.open_nursery() as services:
        address = ""
        runtime: ActorRuntime | None = None

        async def handle(payload: bytes) -> bytes:
            if runtime is None:  # not joined yet: nothing can be owned here
                return reply_not_handled(ActorUnavailable(f"node {env.node} is starting"))
            return await runtime.handle_request(payload)

        if env.network is not None:
            address = await services.start(env.network.serve, handle)
        membership = Membership(
            store,
            env,
            address=address,
            lease_duration_ms=config.lease_duration_ms,
            retry=config.membership_retry,
        )
        await _join(membership, env, config)
        runtime = ActorRuntime(store, env, factory, config, membership)
        services.start_soon(runtime.keep_lease, name=f"lease {env.node}")
        try:
            async with trio.open_nursery() as actors:
                runtime._nursery = actors
                try:
                    with contextlib.suppress(StorageError):  # else the first renewal fills it
                        runtime._nodes = await membership.live_nodes()
                    yield runtime
                finally:
                    runtime._closing = True
                    for act in list(runtime._active.values()):
                        act.request_stop()
            with contextlib.suppress(StorageError):  # else its lease lapses by itself
                await membership.leave()
        finally:
            services.cancel_scope.cancel()
