"""The network conformance suite has teeth, and does not depend on TCP or real time.

Each broken network wraps a real `TcpNetwork` and breaks one promise of the
`NodeNetwork` contract. The suite's tests that cover that promise must fail
(with an AssertionError, not a crash or a hang), while the same tests pass on
the unbroken wrapper, so that the failure is the break's doing.

A minimal in-process network (`_InProcessNetwork`) passes the whole suite on a
MockClock with autojump, as a simulated network will: the suite assumes
neither sockets nor the real clock.
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from kelpie.env import (
    DeliveryUnknown,
    FrameTooLarge,
    Handler,
    NodeNetwork,
    RemoteFailure,
    TcpNetwork,
    Unreachable,
)
from kelpie.env.conformance import NetworkConformance, NetworkFactory


class _Wrapper(NodeNetwork):
    """A TcpNetwork passed through unchanged; subclasses break one thing."""

    def __init__(self, inner: TcpNetwork) -> None:
        self.inner = inner
        self.frame_size_max_bytes = inner.frame_size_max_bytes

    def wrap(self, handler: Handler) -> Handler:
        return handler

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await self.inner.serve(self.wrap(handler), task_status=task_status)

    async def request(self, address: str, payload: bytes, *, timeout_ms: float) -> bytes:
        return await self.inner.request(address, payload, timeout_ms=timeout_ms)

    async def aclose(self) -> None:
        await self.inner.aclose()


class _SwallowsFailures(_Wrapper):
    """Answers a handler's exception with an empty reply instead of a failure."""

    def wrap(self, handler: Handler) -> Handler:
        async def swallowing(payload: bytes) -> bytes:
            try:
                return await handler(payload)
            except Exception:
                return b""

        return swallowing


class _NeverTimesOut(_Wrapper):
    """Ignores `timeout_ms` and waits as long as the reply takes."""

    async def request(self, address: str, payload: bytes, *, timeout_ms: float) -> bytes:
        return await self.inner.request(address, payload, timeout_ms=60_000)


class _ClaimsUndelivered(_Wrapper):
    """Reports requests that may have been handled as never delivered."""

    async def request(self, address: str, payload: bytes, *, timeout_ms: float) -> bytes:
        try:
            return await self.inner.request(address, payload, timeout_ms=timeout_ms)
        except DeliveryUnknown as exc:
            raise Unreachable(str(exc)) from exc


class _Serial(_Wrapper):
    """Runs one handler at a time."""

    def wrap(self, handler: Handler) -> Handler:
        lock = trio.Lock()

        async def serial(payload: bytes) -> bytes:
            async with lock:
                return await handler(payload)

        return serial


class _UnenforcedLimit(_Wrapper):
    """Declares a 1 KiB frame limit but carries anything."""

    def __init__(self, inner: TcpNetwork) -> None:
        super().__init__(inner)
        self.frame_size_max_bytes = 1024


def _factory(kind: type[_Wrapper]) -> NetworkFactory:
    async def make(count: int) -> list[NodeNetwork]:
        return [kind(TcpNetwork()) for _ in range(count)]

    return make


#: Each broken network, and suite tests it must fail.
_BREAKS = [
    (_SwallowsFailures, "test_handler_failure_is_remote_failure"),
    (_NeverTimesOut, "test_late_reply_is_delivery_unknown"),
    (_ClaimsUndelivered, "test_late_reply_is_delivery_unknown"),
    (_ClaimsUndelivered, "test_stopping_serve_fails_a_pending_request"),
    (_Serial, "test_handlers_run_concurrently"),
    (_UnenforcedLimit, "test_oversize_request_is_frame_too_large"),
    (_UnenforcedLimit, "test_oversize_reply_is_remote_failure"),
]


def _suite() -> NetworkConformance:
    suite = NetworkConformance()
    suite.guard_s = 0.5  # a hang fails fast here; the guard itself is under test
    return suite


@pytest.mark.parametrize(
    ("broken", "test_name"), _BREAKS, ids=[f"{b.__name__}-{t[5:]}" for b, t in _BREAKS]
)
def test_the_suite_fails_a_broken_network(broken: type[_Wrapper], test_name: str) -> None:
    """Fails the broken network with an AssertionError in the test covering its break."""
    with pytest.raises(AssertionError):
        getattr(_suite(), test_name)(_factory(broken))


@pytest.mark.parametrize("test_name", sorted({t for _, t in _BREAKS}))
def test_the_same_tests_pass_the_unbroken_wrapper(test_name: str) -> None:
    """Passes the wrapper without a break, so the failures above are the breaks' doing."""
    getattr(_suite(), test_name)(_factory(_Wrapper))


# -- a network without sockets, in virtual time ------------------------------------------------

#: What a request's handler task sends back: the reply, or the failure's text.
_Outcome = tuple[bytes | None, str]


class _InProcessNetwork(NodeNetwork):
    """Endpoints of one process-wide dict of servers: a request runs the handler directly.

    A request's handler runs in its server's nursery, so that cancelling `serve`
    cancels it; the caller then sees the reply channel close (DeliveryUnknown).
    """

    frame_size_max_bytes = 4096

    def __init__(self, servers: dict[str, tuple[trio.Nursery, Handler]], name: str) -> None:
        self._servers = servers
        self._name = name

    async def serve(
        self, handler: Handler, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with trio.open_nursery() as nursery:
            self._servers[self._name] = (nursery, handler)
            try:
                task_status.started(self._name)
                await trio.sleep_forever()
            finally:
                del self._servers[self._name]

    async def request(self, address: str, payload: bytes, *, timeout_ms: float) -> bytes:
        if len(payload) > self.frame_size_max_bytes:
            raise FrameTooLarge(f"{len(payload)} bytes is over {self.frame_size_max_bytes}")
        if address not in self._servers:
            raise Unreachable(f"nobody serves {address!r}")
        nursery, handler = self._servers[address]
        send, receive = trio.open_memory_channel[_Outcome](1)
        nursery.start_soon(self._handle, handler, payload, send)
        with receive, trio.move_on_after(timeout_ms / 1000):
            try:
                reply, failure = await receive.receive()
            except trio.EndOfChannel:
                raise DeliveryUnknown(f"{address} stopped while handling the request") from None
            if reply is None:
                raise RemoteFailure(f"the handler at {address} failed: {failure}")
            return reply
        raise DeliveryUnknown(f"no reply from {address} within {timeout_ms} ms")

    async def _handle(
        self, handler: Handler, payload: bytes, send: trio.MemorySendChannel[_Outcome]
    ) -> None:
        with send:
            try:
                reply = await handler(payload)
            except Exception as exc:
                outcome: _Outcome = (None, f"{type(exc).__name__}: {exc}")
            else:
                too_large = len(reply) > self.frame_size_max_bytes
                outcome = (None, "the reply is too large") if too_large else (reply, "")
            with contextlib.suppress(trio.BrokenResourceError):  # the caller gave up and left
                send.send_nowait(outcome)


class TestInProcessNetworkInVirtualTime(NetworkConformance):
    def trio_clock(self) -> trio.abc.Clock:
        return trio.testing.MockClock(autojump_threshold=0)

    @pytest.fixture
    def network_factory(self) -> NetworkFactory:
        async def make(count: int) -> list[NodeNetwork]:
            servers: dict[str, tuple[trio.Nursery, Handler]] = {}
            return [_InProcessNetwork(servers, f"node-{i}") for i in range(count)]

        return make
