"""The node network conformance suite: what every `NodeNetwork` must do.

Public so that a new network's tests can import it. It needs pytest (a dev
extra) and is never imported by runtime code. To run it against a network,
subclass `NetworkConformance` in a test module and provide a `network_factory`
fixture: an async callable `make(count)` that, inside a running trio loop,
returns `count` endpoints that can reach each other, with faults off. The suite
closes them (`aclose`) when the test ends.

    class TestMyNetwork(NetworkConformance):
        @pytest.fixture
        def network_factory(self) -> NetworkFactory:
            async def make(count: int) -> list[NodeNetwork]:
                return [MyNetwork() for _ in range(count)]
            return make

Each test runs in a fresh `trio.run`, on the clock `trio_clock()` returns
(trio's real clock by default; a simulated network may return a MockClock with
autojump). Servers run in the test's nursery and are stopped by cancelling
`serve`, as a node's would be. What the suite checks, test by test (each
docstring states the expectation): round trips, both ways, of empty, binary
and large payloads; a request to one's own address; handlers running
concurrently; many concurrent requests each getting its own reply; a handler
that raises (`RemoteFailure`, and the server keeps serving); a reply that comes
too late (`DeliveryUnknown`, not before `timeout_ms`, and the late reply is
never taken for a later request's); addresses nobody serves (`Unreachable`);
stopping a server while a handler runs (a `NetworkError` with
`maybe_delivered`); and, on a network with a `frame_size_max_bytes` attribute
(the largest payload it carries, request or reply), the size limits:
`FrameTooLarge` without reaching the handler, `RemoteFailure` for a reply over
the limit, and payloads of exactly the limit round trip. Every error the suite
provokes is checked to be the documented `NetworkError` subclass with the
documented `maybe_delivered` and a message.

A stopped server. Once `serve` has returned, nothing reaches its handler. A
caller that never talked to it gets `Unreachable`. A caller that did may hold
a connection the server closed on its way out, and if that close has not
reached the caller yet, its next request goes out on it and can only end in
`DeliveryUnknown` (the caller cannot tell a peer that died before reading from
one that died after): so that request may see either error, and the one after
it, which no longer has that connection, must see `Unreachable`. A request
waiting for a reply when `serve` is cancelled gets a `NetworkError` with
`maybe_delivered` true (`DeliveryUnknown` on TCP), and its handler is cancelled.

The suite checks itself: tests/env/test_network_conformance_selftest.py runs it
against deliberately broken networks, which it must fail.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import trio

from kelpie.env._network import (
    DeliveryUnknown,
    FrameTooLarge,
    Handler,
    NetworkError,
    NodeNetwork,
    RemoteFailure,
    Unreachable,
)

__all__ = ["NetworkConformance", "NetworkFactory", "run_with_networks"]

#: An async callable that, inside a running trio loop, returns `count` endpoints of one network.
NetworkFactory = Callable[[int], Awaitable[list[NodeNetwork]]]

#: The `maybe_delivered` each error type documents (kelpie/env/_network.py).
_DOCUMENTED_DELIVERY: tuple[tuple[type[NetworkError], bool], ...] = (
    (Unreachable, False),
    (FrameTooLarge, False),
    (DeliveryUnknown, True),
    (RemoteFailure, True),
)

#: The timeout of requests that are expected to succeed: generous, so a slow CI never trips it.
_TIMEOUT_MS = 5000.0


def run_with_networks(
    factory: NetworkFactory,
    count: int,
    test: Callable[[list[NodeNetwork]], Awaitable[None]],
    *,
    clock: trio.abc.Clock | None = None,
) -> None:
    """Runs `test(endpoints)` on `count` new endpoints in a fresh trio loop, then closes them.

    An exception group holding a single exception (a failed assertion inside
    a nursery) is unwrapped, so that the test fails with that exception.
    """

    async def main() -> None:
        networks = await factory(count)
        assert len(networks) == count, f"the factory made {len(networks)} endpoints, not {count}"
        try:
            await test(networks)
        finally:
            for network in networks:
                await network.aclose()

    sole: BaseException | None = None
    try:
        trio.run(main, clock=clock)
    except BaseExceptionGroup as group:
        sole = _sole_exception(group)
        if sole is None:
            raise
    if sole is not None:
        raise sole  # outside the except block, so that its own context is kept


def _sole_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one exception inside `group` (through nested groups), or None if there are more."""
    found: BaseException = group
    while isinstance(found, BaseExceptionGroup):
        if len(found.exceptions) != 1:
            return None
        found = found.exceptions[0]
    return found


# -- helpers -----------------------------------------------------------------------------------


class _Server:
    """One endpoint's `serve`, run in a test's nursery so that the test can stop it."""

    def __init__(self, network: NodeNetwork, handler: Handler) -> None:
        self.network = network
        self.handler = handler
        self.address = ""
        self._scope = trio.CancelScope()
        self._stopped = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        try:
            with self._scope:
                await self.network.serve(self.handler, task_status=task_status)
        finally:
            self._stopped.set()

    async def stop(self) -> None:
        """Cancels `serve` and waits until it has returned."""
        self._scope.cancel()
        await self._stopped.wait()


@contextlib.asynccontextmanager
async def _serving(network: NodeNetwork, handler: Handler) -> AsyncIterator[_Server]:
    """Serves `handler` on `network` for the duration of the block (or until `stop()`)."""
    async with trio.open_nursery() as nursery:
        server = _Server(network, handler)
        server.address = await nursery.start(server.run)
        assert isinstance(server.address, str), server.address
        yield server
        nursery.cancel_scope.cancel()


def _check_declared(exc: NetworkError) -> None:
    """Fails unless `exc` has the `maybe_delivered` its type documents, and a message."""
    documented = next((d for t, d in _DOCUMENTED_DELIVERY if isinstance(exc, t)), True)
    assert exc.maybe_delivered is documented, (
        f"{type(exc).__name__}.maybe_delivered is {exc.maybe_delivered!r}, documented {documented}"
    )
    assert str(exc), f"{type(exc).__name__} has no message"


async def _expect(expected: type[NetworkError], call: Awaitable[bytes]) -> NetworkError:
    """The error `call` raises, which must be an `expected` (else an AssertionError)."""
    try:
        reply = await call
    except NetworkError as exc:
        assert isinstance(exc, expected), (
            f"expected {expected.__name__}, got {type(exc).__name__}: {exc}"
        )
        _check_declared(exc)
        return exc
    raise AssertionError(f"expected {expected.__name__}, got the reply {reply[:40]!r}")


async def _echo(payload: bytes) -> bytes:
    return payload


def _frame_size_max(network: NodeNetwork) -> int:
    """The network's `frame_size_max_bytes`; skips the test when it has none."""
    size_max = getattr(network, "frame_size_max_bytes", None)
    if not isinstance(size_max, int):
        pytest.skip(f"{type(network).__name__} declares no frame_size_max_bytes")
    return size_max


# -- the suite ---------------------------------------------------------------------------------


class NetworkConformance:
    """The suite (see the module docstring); every test gets fresh endpoints."""

    #: How long a test waits for something that should happen promptly before it fails
    #: (a hung request, a deadlock between handlers), in seconds on the test's clock.
    guard_s = 5.0

    #: The largest `frame_size_max_bytes` the size tests send a payload of (they skip above).
    frame_size_tested_max_bytes = 64 * 1024 * 1024

    @pytest.fixture
    def network_factory(self) -> NetworkFactory:
        raise NotImplementedError("a subclass provides the network_factory fixture")

    def trio_clock(self) -> trio.abc.Clock | None:
        """The clock each test's trio loop runs on; None (the default) is trio's real clock."""
        return None

    def _run(
        self,
        factory: NetworkFactory,
        count: int,
        body: Callable[[list[NodeNetwork]], Awaitable[None]],
    ) -> None:
        run_with_networks(factory, count, body, clock=self.trio_clock())

    @contextlib.contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        """Fails, saying it was waiting for `what`, if the block takes longer than `guard_s`."""
        with trio.move_on_after(self.guard_s) as scope:
            yield
        if scope.cancelled_caught:
            raise AssertionError(f"gave up after {self.guard_s} s waiting for {what}")

    def _tested_size_max(self, network: NodeNetwork) -> int:
        size_max = _frame_size_max(network)
        if size_max > self.frame_size_tested_max_bytes:
            pytest.skip(f"frame_size_max_bytes={size_max} is above frame_size_tested_max_bytes")
        return size_max

    # -- round trips ---------------------------------------------------------------------------

    def test_round_trip(self, network_factory: NetworkFactory) -> None:
        """Returns the handler's reply, both ways, for empty, binary and 100 kB payloads.

        The large payload is cut to fit a smaller `frame_size_max_bytes`, reply included.
        """

        def replier(name: bytes) -> Handler:
            async def handler(payload: bytes) -> bytes:
                if payload == b"an empty reply, please":
                    return b""
                return name + b":" + payload[::-1]

            return handler

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            large = bytes(range(256)) * 400
            for network in networks:
                size_max = getattr(network, "frame_size_max_bytes", None)
                if isinstance(size_max, int):
                    large = large[: size_max - 2]  # room for the handler's "a:" in the reply
            payloads = [b"", b"x", bytes(range(256)), large]
            async with _serving(a, replier(b"a")) as at_a, _serving(b, replier(b"b")) as at_b:
                assert at_a.address != at_b.address
                for payload in payloads:
                    got = await b.request(at_a.address, payload, timeout_ms=_TIMEOUT_MS)
                    assert got == b"a:" + payload[::-1], f"reply to {payload[:20]!r}"
                    got = await a.request(at_b.address, payload, timeout_ms=_TIMEOUT_MS)
                    assert got == b"b:" + payload[::-1], f"reply to {payload[:20]!r}"
                empty = await a.request(at_b.address, b"an empty reply, please", timeout_ms=1e3)
                assert empty == b""

        self._run(network_factory, 2, body)

    def test_many_sequential_requests(self, network_factory: NetworkFactory) -> None:
        """Answers 200 requests in a row from one caller, each with its own reply."""

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            async with _serving(b, _echo) as server:
                for i in range(200):
                    payload = b"%d" % i
                    assert await a.request(server.address, payload, timeout_ms=_TIMEOUT_MS) == (
                        payload
                    )

        self._run(network_factory, 2, body)

    def test_request_to_own_address(self, network_factory: NetworkFactory) -> None:
        """Answers a request an endpoint sends to its own address."""

        async def handler(payload: bytes) -> bytes:
            return b"self:" + payload

        async def body(networks: list[NodeNetwork]) -> None:
            (a,) = networks
            async with _serving(a, handler) as server:
                assert await a.request(server.address, b"hi", timeout_ms=_TIMEOUT_MS) == (
                    b"self:hi"
                )

        self._run(network_factory, 1, body)

    def test_largest_payloads_round_trip(self, network_factory: NetworkFactory) -> None:
        """Carries a request and a reply of exactly `frame_size_max_bytes` (where declared)."""

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            size_max = min(self._tested_size_max(a), self._tested_size_max(b))
            payload = bytes(range(256)) * (size_max // 256) + b"\x07" * (size_max % 256)

            async def handler(request: bytes) -> bytes:
                assert request == payload
                return request[::-1]

            async with _serving(b, handler) as server:
                got = await a.request(server.address, payload, timeout_ms=_TIMEOUT_MS)
            assert got == payload[::-1]

        self._run(network_factory, 2, body)

    # -- concurrency ---------------------------------------------------------------------------

    def test_handlers_run_concurrently(self, network_factory: NetworkFactory) -> None:
        """Completes two requests whose handlers each wait for the other to start."""
        arrived = {b"first": trio.Event(), b"second": trio.Event()}

        async def handler(payload: bytes) -> bytes:
            arrived[payload].set()
            other = b"second" if payload == b"first" else b"first"
            await arrived[other].wait()
            return b"done:" + payload

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            replies: dict[bytes, bytes] = {}

            async def call(payload: bytes) -> None:
                replies[payload] = await a.request(server.address, payload, timeout_ms=_TIMEOUT_MS)

            async with _serving(b, handler) as server:
                with self._guard("two handlers that wait for each other"):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(call, b"first")
                        nursery.start_soon(call, b"second")
            assert replies == {b"first": b"done:first", b"second": b"done:second"}

        self._run(network_factory, 2, body)

    def test_concurrent_requests_get_their_own_replies(
        self, network_factory: NetworkFactory
    ) -> None:
        """Gives each of 60 concurrent requests from two callers the reply to its own payload."""

        async def handler(payload: bytes) -> bytes:
            await trio.sleep(int(payload.split(b":")[1]) % 4 / 1000)  # replies finish out of order
            return b"reply to " + payload

        async def body(networks: list[NodeNetwork]) -> None:
            server_end, *callers = networks
            replies: dict[bytes, bytes] = {}

            async def call(caller: NodeNetwork, payload: bytes) -> None:
                replies[payload] = await caller.request(
                    server.address, payload, timeout_ms=_TIMEOUT_MS
                )

            async with _serving(server_end, handler) as server, trio.open_nursery() as nursery:
                for i in range(30):
                    for n, caller in enumerate(callers):
                        nursery.start_soon(call, caller, b"%d:%d" % (n, i))
            assert len(replies) == 60
            assert all(reply == b"reply to " + payload for payload, reply in replies.items())

        self._run(network_factory, 3, body)

    # -- failures ------------------------------------------------------------------------------

    def test_handler_failure_is_remote_failure(self, network_factory: NetworkFactory) -> None:
        """Raises RemoteFailure naming the handler's error; the server keeps answering."""

        async def handler(payload: bytes) -> bytes:
            if payload == b"fail":
                raise ValueError("boom from the handler")
            return b"ok:" + payload

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            async with _serving(b, handler) as server:
                for i in range(3):
                    call = a.request(server.address, b"fail", timeout_ms=_TIMEOUT_MS)
                    error = await _expect(RemoteFailure, call)
                    assert "boom from the handler" in str(error), str(error)
                    got = await a.request(server.address, b"%d" % i, timeout_ms=_TIMEOUT_MS)
                    assert got == b"ok:%d" % i

        self._run(network_factory, 2, body)

    def test_late_reply_is_delivery_unknown(self, network_factory: NetworkFactory) -> None:
        """Raises DeliveryUnknown once `timeout_ms` passes; the late reply is never misread.

        The handler replies 150 ms after a 50 ms timeout; once it has, a new
        request gets its own reply, not the late one.
        """
        finished = trio.Event()

        async def handler(payload: bytes) -> bytes:
            if payload == b"slow":
                await trio.sleep(0.15)
                finished.set()
                return b"late"
            return b"fresh:" + payload

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            async with _serving(b, handler) as server:
                started = trio.current_time()
                with self._guard("the request to time out"):
                    await _expect(
                        DeliveryUnknown, a.request(server.address, b"slow", timeout_ms=50)
                    )
                elapsed = trio.current_time() - started
                assert elapsed >= 0.05, f"timed out after {elapsed * 1000:.1f} ms, before 50 ms"
                with self._guard("the slow handler to finish"):
                    await finished.wait()
                await trio.sleep(0.05)  # time for the late reply to arrive anywhere it might
                for i in range(3):
                    got = await a.request(server.address, b"%d" % i, timeout_ms=_TIMEOUT_MS)
                    assert got == b"fresh:%d" % i

        self._run(network_factory, 2, body)

    def test_address_never_contacted_is_unreachable(self, network_factory: NetworkFactory) -> None:
        """Raises Unreachable for the address of a server that stopped before anyone called it."""

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            async with _serving(b, _echo) as server:
                await server.stop()
                for caller in (a, b):
                    call = caller.request(server.address, b"x", timeout_ms=_TIMEOUT_MS)
                    await _expect(Unreachable, call)

        self._run(network_factory, 2, body)

    def test_stopped_server_becomes_unreachable(self, network_factory: NetworkFactory) -> None:
        """After a server stops, a caller that used it gets a NetworkError, then Unreachable.

        The first request may see DeliveryUnknown, if it went out on a
        connection whose closing had not reached the caller yet (see the module
        docstring); the second must see Unreachable, and no handler runs.
        """
        calls: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(payload)
            return payload

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            async with _serving(b, handler) as server:
                assert await a.request(server.address, b"before", timeout_ms=_TIMEOUT_MS)
                await server.stop()
                with self._guard("requests to a stopped server to fail"):
                    try:
                        await a.request(server.address, b"first", timeout_ms=_TIMEOUT_MS)
                    except (Unreachable, DeliveryUnknown) as exc:
                        _check_declared(exc)
                    else:
                        raise AssertionError("a stopped server answered a request")
                    call = a.request(server.address, b"second", timeout_ms=_TIMEOUT_MS)
                    await _expect(Unreachable, call)
            assert calls == [b"before"]

        self._run(network_factory, 2, body)

    def test_stopping_serve_fails_a_pending_request(self, network_factory: NetworkFactory) -> None:
        """Fails a request whose handler is running when `serve` is cancelled, maybe delivered.

        The caller gets a NetworkError with `maybe_delivered` true well before its
        timeout, and the handler is cancelled along with `serve`.
        """
        handler_started = trio.Event()
        handler_cancelled = trio.Event()

        async def handler(payload: bytes) -> bytes:
            handler_started.set()
            try:
                await trio.sleep_forever()
            finally:
                handler_cancelled.set()

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            errors: list[NetworkError] = []

            async def call(address: str) -> None:
                try:
                    await a.request(address, b"stuck", timeout_ms=self.guard_s * 4000)
                except NetworkError as exc:
                    errors.append(exc)

            with self._guard("the pending request to fail"):
                async with _serving(b, handler) as server, trio.open_nursery() as nursery:
                    nursery.start_soon(call, server.address)
                    await handler_started.wait()
                    await server.stop()
            assert handler_cancelled.is_set(), "the handler outlived its serve"
            assert len(errors) == 1, "the pending request returned a reply"
            _check_declared(errors[0])
            assert errors[0].maybe_delivered, f"{errors[0]!r} says the request was not delivered"

        self._run(network_factory, 2, body)

    def test_errors_declare_whether_they_may_have_been_delivered(
        self, network_factory: NetworkFactory
    ) -> None:
        """Every error type is a NetworkError whose `maybe_delivered` matches the docs."""
        for error_type, maybe_delivered in _DOCUMENTED_DELIVERY:
            assert issubclass(error_type, NetworkError)
            assert error_type.maybe_delivered is maybe_delivered, error_type.__name__
            _check_declared(error_type("a message"))
        assert NetworkError.maybe_delivered is True

    # -- size limits ---------------------------------------------------------------------------

    def test_oversize_request_is_frame_too_large(self, network_factory: NetworkFactory) -> None:
        """Raises FrameTooLarge for a request one byte over the limit; no handler sees it."""
        calls: list[int] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(len(payload))
            return b"ok"

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            size_max = self._tested_size_max(a)
            async with _serving(b, handler) as server:
                call = a.request(server.address, bytes(size_max + 1), timeout_ms=_TIMEOUT_MS)
                await _expect(FrameTooLarge, call)
                assert await a.request(server.address, b"small", timeout_ms=_TIMEOUT_MS) == b"ok"
            assert calls == [5], f"the handler saw requests of {calls} bytes"

        self._run(network_factory, 2, body)

    def test_oversize_reply_is_remote_failure(self, network_factory: NetworkFactory) -> None:
        """Raises RemoteFailure when the reply is one byte over the limit; serving goes on."""

        async def body(networks: list[NodeNetwork]) -> None:
            a, b = networks
            size_max = self._tested_size_max(b)

            async def handler(payload: bytes) -> bytes:
                return bytes(size_max + 1) if payload == b"big" else b"small"

            async with _serving(b, handler) as server:
                await _expect(RemoteFailure, a.request(server.address, b"big", timeout_ms=1e4))
                assert await a.request(server.address, b"x", timeout_ms=_TIMEOUT_MS) == b"small"

        self._run(network_factory, 2, body)
