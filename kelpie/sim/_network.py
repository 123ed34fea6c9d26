"""The simulated node network: request/reply between simulated nodes, with network faults.

`SimNetwork` is the fabric of one run; `endpoint(node)` is one node's
`NodeNetwork` (kelpie/env/_network.py), which the simulator puts in that node's
`Env.network`. A node's address is its name. Time is trio's (virtual in a
simulation) and every random choice comes from the `Rng` passed in.

How a request travels (each step is where a fault can strike):

1. The sender's pause gate (kelpie/sim/_pauses.py): a paused node sends nothing.
2. The request crosses the link src->dst: it is lost if the link is cut by a
   partition, or with probability loss_p; otherwise it takes a delay drawn
   uniformly from [0, delay_max_ms]. With probability duplicate_p a second copy
   is sent to a serving node, with its own loss draw and delay.
3. If the destination is serving when the request is sent, the copies are
   handed to it and each arrives after its delay. If it stops serving (a
   crash) before the reply is back, the copies die with it and a reset crosses
   back to the caller like a reply (cut, lost, delayed, clogged): the caller
   gets `DeliveryUnknown` then, as with a TCP connection reset after the
   request was written, or at its timeout if the reset is lost. If it is not
   serving, the connection attempt crosses the link; if the node serves by the
   time it arrives, the request is handed over then; if not, the refusal
   crosses back and the caller gets `Unreachable` after both delays (a lost
   attempt or refusal leaves it only its timeout, still `Unreachable`: as with
   a TCP connect that times out, nothing was delivered). An address that names
   no node is `Unreachable` after the forward delay.
4. On arrival a clogged link holds the message until the clog ends, then
   delivers it; the receiver's pause gate holds it while the receiver is
   paused; then the handler runs, in its own task inside the receiver's `serve`
   (cancelling `serve`, a crash, cancels its handlers).
5. The reply (or the handler's error, as `RemoteFailure`) waits out the
   receiver's pause gate and crosses dst->src like a request: cut, lost, delayed
   and clogged the same way. The first reply to arrive answers the call; a
   duplicate's reply, or one arriving after the caller gave up, is dropped.

The caller's `timeout_ms` bounds all of it: no reply in time is
`DeliveryUnknown`, whatever the reason (loss, partition, clog, a slow or paused
handler, a server that crashed), unless nothing can have been delivered (the sender
stayed paused, or no node served at the address), which is `Unreachable`.
Messages whose caller gave up still travel: a late or duplicated request still
runs its handler. After `aclose()`, an endpoint's requests are `Unreachable`
(like a closed `TcpNetwork`); it keeps serving. A `timeout_ms` that is not a
finite number above 0 is a `ConfigError`, as for the real network.

Fault model (`NetworkFaults`; all zero is a perfect network):

- Delay and reordering: every message (request, reply or refusal) takes its
  own delay in [0, delay_max_ms], so messages overtake each other.
- Loss: each message is dropped with probability loss_p.
- Duplication: each request is delivered twice with probability duplicate_p.
- Partitions: start as a Poisson process of partition_rate_per_s (drawn lazily
  from the run's stream, from the network's first use) and last up to
  partition_max_ms. Each splits the nodes into two random non-empty sides and
  cuts every link between them, both ways or (p=0.5) one way only: side a->b
  cut while b->a works. A message sent over a cut link is silently lost.
- Clogs (FoundationDB's clogging): start as a Poisson process of
  clog_rate_per_s and last up to clog_max_ms. Each clogs the links between two
  random nodes, both ways or (p=0.5) one way: a clogged link delivers nothing
  until the clog ends, then delivers everything it held.
- Explicit controls for scenarios: `partition(a, b, one_way=...)` (until
  healed), `clog(a, b, duration_ms)`, `heal()` (ends every partition and clog
  at once, and releases what clogs held), and `quiesce()` (or
  `heal(quiet=True)`): from then on no new partition, clog, loss or duplicate
  is injected, so after a heal everything is reachable again (a liveness
  phase). Delays remain.
- Frames: a request larger than `frame_size_max_bytes` (16 MiB, an attribute of
  each endpoint, like the real network's) is `FrameTooLarge` and is not sent; a
  reply larger than the server's or the caller's limit is `RemoteFailure`.
- Never injected: corruption of a payload (TCP checksums and our frames make
  it a non-issue), delivery to a node other than the address, a message from
  nowhere, or a reply to the wrong request. Partitions and clogs only ever
  affect links between two different nodes; loss, duplication and delay apply
  to a node's requests to itself too.

Every injected fault is reported through `on_fault(kind, fields)` (a
`network.fault` trace row in a simulation) and counted in `SimNetwork.injected`:
`loss`, `duplicate`, `partition` and `partition_end`, `partition_loss` (a
message sent over a cut link), `clog` and `clog_end`, `clog_hold` (a message
held by a clog). Partition and clog ends are reported when the network next
looks at its links (their `at` field is the exact time), or by `heal()`.
Everything iterates lists and dicts in insertion order, so a seed gives the
same run every time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import attrs
import trio

from kelpie.core import ConfigError
from kelpie.env import (
    DeliveryUnknown,
    FrameTooLarge,
    Handler,
    NodeNetwork,
    RemoteFailure,
    Rng,
    Unreachable,
)
from kelpie.sim._pauses import NodePauses

#: The largest payload the network carries, like the real network's frame limit.
FRAME_SIZE_MAX_BYTES = 16 * 1024 * 1024

_Link = tuple[str, str]
_OnFault = Callable[[str, dict[str, object]], None]


@attrs.frozen
class NetworkFaults:
    """The network faults a run injects (see kelpie/sim/_network.py). All zero: none."""

    delay_max_ms: float = 0.0
    loss_p: float = 0.0
    duplicate_p: float = 0.0
    partition_rate_per_s: float = 0.0
    partition_max_ms: float = 0.0
    clog_rate_per_s: float = 0.0
    clog_max_ms: float = 0.0

    @classmethod
    def every(cls) -> NetworkFaults:
        """Every network fault on, at rates a retrying workload still makes progress under."""
        return cls(
            delay_max_ms=5.0,
            loss_p=0.02,
            duplicate_p=0.02,
            partition_rate_per_s=0.2,
            partition_max_ms=500.0,
            clog_rate_per_s=0.5,
            clog_max_ms=200.0,
        )

    def describe(self) -> str:
        if self == NetworkFaults():
            return "off"
        fields = attrs.asdict(self)
        return " ".join(f"{name}={value:g}" for name, value in fields.items() if value)


@attrs.define(eq=False)
class _Call:
    """One request and its reply slot."""

    number: int
    src: str
    dst: str
    payload: bytes
    reply_limit: int
    done: trio.Event = attrs.Factory(trio.Event)
    reply: bytes | None = None
    error: str | None = None
    waiting: bool = True
    #: Whether a copy may have reached a serving node (else a timeout is `Unreachable`).
    sent: bool = False
    #: When the news that the server stopped reaches the caller (a connection reset).
    broken_at: float | None = None

    def answer(self, reply: bytes | None, error: str | None) -> None:
        """The first answer to arrive while the caller waits wins; later ones are dropped."""
        if self.waiting and not self.done.is_set():
            self.reply, self.error = reply, error
            self.done.set()

    def broken(self, at: float) -> None:
        """The server stopped with this request on its hands; the caller learns so at `at`."""
        if self.waiting and not self.done.is_set():
            self.broken_at = at
            self.done.set()


@attrs.frozen
class _Delivery:
    """One copy of a request on its way to a serving node."""

    call: _Call
    arrive_at: float
    copy: int  # 0: the original, 1: the duplicate


@attrs.frozen(eq=False)
class _Server:
    endpoint: SimEndpoint
    handler: Handler
    inbox: trio.MemorySendChannel[_Delivery]


@attrs.define(eq=False)
class _Window:
    """A partition or a clog under way: the links it affects, until `end`."""

    number: int
    kind: str  # "partition" or "clog"
    links: dict[_Link, None]
    end: float  # math.inf: until heal()


class SimNetwork:
    """The simulated network of one run (see the module docstring)."""

    def __init__(
        self,
        rng: Rng,
        faults: NetworkFaults = NetworkFaults(),
        *,
        on_fault: _OnFault | None = None,
        pauses: NodePauses | None = None,
    ) -> None:
        self.faults = faults
        self.injected: dict[str, int] = {}
        #: The frame limit each new endpoint starts with.
        self.frame_size_max_bytes = FRAME_SIZE_MAX_BYTES
        self._messages = rng.fork("messages")
        self._partition_times = rng.fork("partition-times")
        self._partition_shapes = rng.fork("partition-shapes")
        self._clog_times = rng.fork("clog-times")
        self._clog_shapes = rng.fork("clog-shapes")
        self._on_fault = on_fault
        self._pauses = pauses
        self._endpoints: dict[str, SimEndpoint] = {}
        self._servers: dict[str, _Server] = {}
        self._windows: list[_Window] = []
        self._windows_opened = 0
        self._calls = 0
        self._next_partition: float | None = None  # None: the network was never used
        self._next_clog = math.inf
        self._quiet_at = math.inf
        self._healed: trio.Event | None = None

    # -- the public surface ------------------------------------------------------------

    def endpoint(self, node: str) -> SimEndpoint:
        """`node`'s end of the network (made on first use; its address is `node`)."""
        endpoint = self._endpoints.get(node)
        if endpoint is None:
            if not node or node == "-":
                raise ValueError(f"not a node name: {node!r}")
            endpoint = self._endpoints[node] = SimEndpoint(self, node)
        return endpoint

    @property
    def nodes(self) -> tuple[str, ...]:
        """Every node with an endpoint, in the order they were made."""
        return tuple(self._endpoints)

    def serving(self, node: str) -> bool:
        """Whether `node` is serving now."""
        return node in self._servers

    def partition(
        self, a: str | Sequence[str], b: str | Sequence[str], *, one_way: bool = False
    ) -> None:
        """Cuts every link from `a` to `b` (and from `b` to `a` unless `one_way`) until `heal()`."""
        side, other = self._group(a), self._group(b)
        now = trio.current_time()
        self._advance(now)
        self._open("partition", side, other, one_way, now, math.inf, explicit=True)

    def clog(
        self,
        a: str | Sequence[str],
        b: str | Sequence[str],
        duration_ms: float,
        *,
        one_way: bool = False,
    ) -> None:
        """Clogs the links from `a` to `b` (and back unless `one_way`) for `duration_ms`."""
        if not duration_ms >= 0:
            raise ValueError(f"a clog lasts a non-negative time, got {duration_ms!r}")
        side, other = self._group(a), self._group(b)
        now = trio.current_time()
        self._advance(now)
        self._open("clog", side, other, one_way, now, now + duration_ms / 1000, explicit=True)

    def heal(self, *, quiet: bool = False) -> None:
        """Ends every partition and clog now (releasing held messages); `quiet`: also quiesce."""
        now = trio.current_time()
        self._advance(now)
        for window in list(self._windows):
            self._close(window, now)
        if self._healed is not None:
            self._healed.set()
            self._healed = None
        if quiet:
            self.quiesce()

    def quiesce(self) -> None:
        """From now on, no new partition, clog, loss or duplicate is injected (delays remain)."""
        now = trio.current_time()
        self._advance(now)
        self._quiet_at = min(self._quiet_at, now)

    # -- faults ------------------------------------------------------------------------

    def _inject(self, kind: str, **fields: object) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if self._on_fault is not None:
            self._on_fault(kind, fields)

    def _group(self, nodes: str | Sequence[str]) -> list[str]:
        group = [nodes] if isinstance(nodes, str) else list(nodes)
        unknown = [node for node in group if node not in self._endpoints]
        if unknown or not group:
            known = ", ".join(self._endpoints) or "none"
            raise ValueError(f"not nodes of this network: {unknown or group}; nodes: {known}")
        return group

    def _open(
        self,
        kind: str,
        side: list[str],
        other: list[str],
        one_way: bool,
        start: float,
        end: float,
        *,
        explicit: bool,
    ) -> None:
        links = {(a, b): None for a in side for b in other if a != b}
        if not one_way:
            links.update({(b, a): None for a in side for b in other if a != b})
        self._windows_opened += 1
        self._windows.append(_Window(self._windows_opened, kind, links, end))
        fields: dict[str, object] = {
            "window": self._windows_opened,
            "a": tuple(side),
            "b": tuple(other),
            "one_way": one_way,
            "at": round(start, 6),
        }
        if not math.isinf(end):
            fields["seconds"] = round(end - start, 6)
        if explicit:
            fields["explicit"] = True
        self._inject(kind, **fields)

    def _close(self, window: _Window, at: float) -> None:
        self._windows.remove(window)
        self._inject(f"{window.kind}_end", window=window.number, at=round(at, 6))

    def _advance(self, now: float) -> None:
        """Brings partitions and clogs up to `now`: starts and ends them in time order."""
        if self._next_partition is None:
            self._start_processes(now)
        assert self._next_partition is not None
        while True:
            ending: _Window | None = None
            for window in self._windows:
                if window.end <= now and (ending is None or window.end < ending.end):
                    ending = window
            due: list[tuple[float, int]] = []
            if ending is not None:
                due.append((ending.end, 0))
            if self._next_partition <= now and self._next_partition < self._quiet_at:
                due.append((self._next_partition, 1))
            if self._next_clog <= now and self._next_clog < self._quiet_at:
                due.append((self._next_clog, 2))
            if not due:
                return
            at, which = min(due)
            if which == 0:
                assert ending is not None
                self._close(ending, at)
            elif which == 1:
                self._start_random("partition", at)
            else:
                self._start_random("clog", at)

    def _start_processes(self, now: float) -> None:
        """The network's first use: the random partition and clog processes start now."""
        f = self.faults
        self._next_partition = math.inf
        if f.partition_rate_per_s > 0 and f.partition_max_ms > 0:
            self._next_partition = now + self._partition_times.expovariate(f.partition_rate_per_s)
        if f.clog_rate_per_s > 0 and f.clog_max_ms > 0:
            self._next_clog = now + self._clog_times.expovariate(f.clog_rate_per_s)

    def _start_random(self, kind: str, at: float) -> None:
        f = self.faults
        if kind == "partition":
            times, shapes = self._partition_times, self._partition_shapes
            rate, max_ms = f.partition_rate_per_s, f.partition_max_ms
        else:
            times, shapes = self._clog_times, self._clog_shapes
            rate, max_ms = f.clog_rate_per_s, f.clog_max_ms
        seconds = times.uniform(0, max_ms) / 1000
        following = at + times.expovariate(rate)
        if kind == "partition":
            self._next_partition = following
        else:
            self._next_clog = following
        nodes = list(self._endpoints)
        if len(nodes) < 2:
            return  # no link between two nodes to cut
        one_way = shapes.chance(0.5)
        if kind == "partition":
            chosen = shapes.sample(nodes, shapes.randint(1, len(nodes) - 1))
            side = [node for node in nodes if node in chosen]
            other = [node for node in nodes if node not in chosen]
        else:
            a = shapes.choice(nodes)
            side, other = [a], [shapes.choice([node for node in nodes if node != a])]
        self._open(kind, side, other, one_way, at, at + seconds, explicit=False)

    def _cut(self, src: str, dst: str) -> bool:
        return any(w.kind == "partition" and (src, dst) in w.links for w in self._windows)

    def _clogged_until(self, src: str, dst: str, now: float) -> float | None:
        ends = [w.end for w in self._windows if w.kind == "clog" and (src, dst) in w.links]
        end = max(ends, default=now)
        return end if end > now else None

    def _fate(self, src: str, dst: str, what: str, call: _Call) -> float | None:
        """Sends one message over src->dst now: its delay in seconds, or None if it is lost."""
        now = trio.current_time()
        self._advance(now)
        if self._cut(src, dst):
            self._inject("partition_loss", src=src, dst=dst, message=call.number, what=what)
            return None
        loss_p = self.faults.loss_p
        if loss_p and now < self._quiet_at and self._messages.chance(loss_p):
            self._inject("loss", src=src, dst=dst, message=call.number, what=what)
            return None
        if self.faults.delay_max_ms:
            return self._messages.uniform(0, self.faults.delay_max_ms) / 1000
        return 0.0

    def _duplicated(self, call: _Call) -> bool:
        duplicate_p = self.faults.duplicate_p
        if not (duplicate_p and trio.current_time() < self._quiet_at):
            return False
        if self._messages.chance(duplicate_p):
            self._inject("duplicate", src=call.src, dst=call.dst, message=call.number)
            return True
        return False

    async def _wait_unclogged(self, src: str, dst: str, call: _Call, what: str) -> None:
        """Holds a message that arrives on a clogged link until every clog on it has ended."""
        held = False
        while True:
            now = trio.current_time()
            self._advance(now)
            end = self._clogged_until(src, dst, now)
            if end is None:
                return
            if not held:
                held = True
                self._inject("clog_hold", src=src, dst=dst, message=call.number, what=what)
            if self._healed is None:
                self._healed = trio.Event()
            with trio.move_on_at(end):
                await self._healed.wait()

    async def _gate(self, node: str) -> None:
        if self._pauses is not None:
            await self._pauses.gate(node)

    # -- requests ----------------------------------------------------------------------

    async def _request(
        self, endpoint: SimEndpoint, address: str, payload: bytes, timeout_ms: float
    ) -> bytes:
        number = isinstance(timeout_ms, int | float) and not isinstance(timeout_ms, bool)
        if not number or not math.isfinite(timeout_ms) or timeout_ms <= 0:
            raise ConfigError(
                f"timeout_ms must be a finite number of milliseconds above 0, got {timeout_ms!r}"
            )
        payload = bytes(payload)
        limit = endpoint.frame_size_max_bytes
        if len(payload) > limit:
            raise FrameTooLarge(
                f"a request of {len(payload)} bytes to {address} exceeds the frame limit of "
                f"{limit} bytes; nothing was sent"
            )
        if endpoint.closed:
            raise Unreachable(f"cannot reach {address}: this endpoint is closed")
        self._calls += 1
        call = _Call(self._calls, endpoint.name, address, payload, limit)
        try:
            with trio.move_on_after(timeout_ms / 1000):
                await self._send(call)
                await call.done.wait()
                if call.broken_at is not None:
                    await trio.sleep_until(call.broken_at)
                    await self._wait_unclogged(address, endpoint.name, call, "reset")
                    raise DeliveryUnknown(
                        f"the connection to {address} broke: it stopped serving, perhaps "
                        "after handling the request"
                    )
        finally:
            call.waiting = False
        if call.error is not None:
            raise RemoteFailure(f"the handler at {address} failed: {call.error}")
        if call.reply is not None:
            return call.reply
        if call.sent:
            raise DeliveryUnknown(f"no reply from {address} within {timeout_ms:g} ms")
        raise Unreachable(f"could not send a request to {address} within {timeout_ms:g} ms")

    async def _send(self, call: _Call) -> None:
        """Sends `call`'s request; raises Unreachable if it is refused (see the docstring)."""
        src, dst = call.src, call.dst
        await self._gate(src)
        now = trio.current_time()
        server = self._servers.get(dst)
        call.sent = server is not None
        delay = self._fate(src, dst, "request", call)
        if server is not None:
            if delay is not None:
                server.inbox.send_nowait(_Delivery(call, now + delay, 0))
            if self._duplicated(call):
                copy_delay = self._fate(src, dst, "duplicate", call)
                if copy_delay is not None:
                    server.inbox.send_nowait(_Delivery(call, now + copy_delay, 1))
            return
        # Nobody serves at `dst` now: the connection attempt crosses the link.
        if delay is None:
            return  # lost on the way: the caller sees only its timeout
        await trio.sleep_until(now + delay)
        if dst not in self._endpoints:
            raise Unreachable(f"no node at address {dst!r}")
        await self._wait_unclogged(src, dst, call, "request")
        server = self._servers.get(dst)
        if server is not None:
            call.sent = True
            server.inbox.send_nowait(_Delivery(call, trio.current_time(), 0))
            return
        back = self._fate(dst, src, "refusal", call)
        if back is None:
            return  # the refusal was lost: the caller sees only its timeout
        await trio.sleep(back)
        await self._wait_unclogged(dst, src, call, "refusal")
        raise Unreachable(f"node {dst!r} is not serving")

    async def _deliver(self, server: _Server, delivery: _Delivery) -> None:
        """One copy of a request at its server (a task of `serve`).

        If `serve` is cancelled (a crash) before the reply has arrived, the
        caller's connection breaks: a reset crosses back to it like a reply.
        """
        call = delivery.call
        try:
            await self._handle(server, delivery)
        except trio.Cancelled:
            if call.waiting and not call.done.is_set():
                delay = self._fate(call.dst, call.src, "reset", call)
                if delay is not None:
                    call.broken(trio.current_time() + delay)
            raise

    async def _handle(self, server: _Server, delivery: _Delivery) -> None:
        """Arrival, the handler, and the reply's way back."""
        call = delivery.call
        src, dst = call.src, call.dst
        await trio.sleep_until(delivery.arrive_at)
        await self._wait_unclogged(src, dst, call, "request")
        await self._gate(dst)
        reply: bytes | None = None
        error: str | None = None
        try:
            result: object = await server.handler(call.payload)
        except Exception as exc:  # the handler's failure is the caller's RemoteFailure
            error = _describe(exc)
        else:
            limit = min(server.endpoint.frame_size_max_bytes, call.reply_limit)
            if not isinstance(result, bytes | bytearray | memoryview):
                error = f"the handler returned {type(result).__name__}, not bytes"
            elif len(result) > limit:
                error = f"the reply of {len(result)} bytes exceeds the frame limit of {limit} bytes"
            else:
                reply = bytes(result)
        await self._gate(dst)
        delay = self._fate(dst, src, "reply", call)
        if delay is None:
            return
        await trio.sleep(delay)
        await self._wait_unclogged(dst, src, call, "reply")
        call.answer(reply, error)

    def __repr__(self) -> str:
        return f"SimNetwork({self.faults.describe()}, nodes={list(self._endpoints)})"


def _describe(exc: BaseException) -> str:
    """A handler's failure as the caller sees it: "ExcType: message"."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its message could not be formatted)"


class SimEndpoint(NodeNetwork):
    """One node's end of a `SimNetwork`: its address is the node's name."""

    def __init__(self, network: SimNetwork, name: str) -> None:
        self.network = network
        self.name = name
        #: The largest request this node sends, and reply it sends or accepts.
        self.frame_size_max_bytes = network.frame_size_max_bytes
        #: After `aclose()`, requests from this endpoint are `Unreachable` (serving goes on).
        self.closed = False

    @property
    def address(self) -> str:
        return self.name

    async def serve(
        self,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        net = self.network
        if self.name in net._servers:
            raise RuntimeError(
                f"node {self.name!r} is already serving: one serve per node at a time"
            )
        inbox, deliveries = trio.open_memory_channel[_Delivery](math.inf)
        server = _Server(self, handler, inbox)
        with inbox, deliveries:
            async with trio.open_nursery() as nursery:
                net._servers[self.name] = server
                try:
                    task_status.started(self.name)
                    async for delivery in deliveries:
                        call = delivery.call
                        nursery.start_soon(
                            net._deliver,
                            server,
                            delivery,
                            name=f"net.deliver {call.src}->{call.dst} #{call.number}",
                        )
                finally:
                    # Requests from now on find nobody serving, even while handlers wind down.
                    if net._servers.get(self.name) is server:
                        del net._servers[self.name]

    async def request(self, address: str, payload: bytes, *, timeout_ms: float) -> bytes:
        return await self.network._request(self, address, payload, timeout_ms)

    async def aclose(self) -> None:
        """Later requests from this endpoint are `Unreachable`, like a closed `TcpNetwork`."""
        self.closed = True
        await trio.lowlevel.checkpoint()

    def __repr__(self) -> str:
        return f"SimEndpoint({self.name!r})"
