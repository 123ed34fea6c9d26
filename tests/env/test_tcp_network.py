"""TcpNetwork passes the network conformance suite, and what only TCP does.

Besides the suite (on real sockets, on 127.0.0.1), this module checks the
arguments, the address format, the connection pool (reuse, its bound, stale
connections), the wire protocol against raw peers that break it on either side
(oversize, truncated or misplaced frames, a server that dies mid-request), and
what happens to connections on timeouts, cancellation and `aclose`.
"""

from __future__ import annotations

import functools
import logging
import math
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio

from kelpie.core import ConfigError
from kelpie.env import (
    FRAME_SIZE_MAX_BYTES,
    DeliveryUnknown,
    FrameTooLarge,
    Handler,
    NodeNetwork,
    RemoteFailure,
    TcpNetwork,
    Unreachable,
)
from kelpie.env.conformance import NetworkConformance, NetworkFactory

#: How long a test waits for something that should be prompt before it fails.
_GUARD_S = 5.0

_REQUEST, _REPLY_OK = 1, 2


class TestTcpNetwork(NetworkConformance):
    @pytest.fixture
    def network_factory(self) -> NetworkFactory:
        async def make(count: int) -> list[NodeNetwork]:
            return [TcpNetwork() for _ in range(count)]

        return make


# -- helpers -----------------------------------------------------------------------------------


def _frame(kind: int, payload: bytes) -> bytes:
    return (len(payload) + 1).to_bytes(4, "big") + bytes([kind]) + payload


async def _echo(payload: bytes) -> bytes:
    return payload


@asynccontextmanager
async def _serving(network: TcpNetwork, handler: Handler) -> AsyncIterator[str]:
    """Serves `handler` on `network` for the duration of the block; yields its address."""
    async with trio.open_nursery() as nursery:
        address: str = await nursery.start(network.serve, handler)
        yield address
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def _raw_server(
    handler: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[str]:
    """A bare TCP server on 127.0.0.1 running `handler(stream)` per connection; yields its address.

    It speaks no protocol of its own: each test's handler plays a broken peer.
    """
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        port = listeners[0].socket.getsockname()[1]
        yield f"127.0.0.1:{port}"
        nursery.cancel_scope.cancel()


async def _read_to_end(stream: trio.SocketStream) -> bytes:
    """Everything `stream` still delivers, until the peer closes it (or resets it)."""
    data = b""
    with trio.fail_after(_GUARD_S):
        while True:
            try:
                chunk = await stream.receive_some()
            except trio.BrokenResourceError:
                return data
            if not chunk:
                return data
            data += chunk


def _run(main: Callable[[], Awaitable[None]]) -> None:
    trio.run(main)


# -- arguments ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [
        ({"host": ""}, "host"),
        ({"port": -1}, "port"),
        ({"port": 65536}, "port"),
        ({"port": True}, "port"),
        ({"port": 80.0}, "port"),
        ({"frame_size_max_bytes": 0}, "frame_size_max_bytes"),
        ({"frame_size_max_bytes": 2**32 - 1}, "frame_size_max_bytes"),
        ({"connect_timeout_ms": 0}, "connect_timeout_ms"),
        ({"connect_timeout_ms": -5}, "connect_timeout_ms"),
        ({"connect_timeout_ms": math.nan}, "connect_timeout_ms"),
        ({"connect_timeout_ms": math.inf}, "connect_timeout_ms"),
        ({"idle_connections_per_peer": -1}, "idle_connections_per_peer"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs: dict[str, Any], named: str) -> None:
    """Rejects each bad argument with a ConfigError that names it."""
    with pytest.raises(ConfigError, match=named):
        TcpNetwork(**kwargs)


def test_defaults_and_exports() -> None:
    """Defaults to 127.0.0.1, an ephemeral port, 16 MiB frames and 8 idle connections a peer."""
    network = TcpNetwork()
    assert (network.host, network.port) == ("127.0.0.1", 0)
    assert network.frame_size_max_bytes == FRAME_SIZE_MAX_BYTES == 16 * 1024 * 1024
    assert network.connect_timeout_ms == 5000
    assert network.idle_connections_per_peer == 8
    assert TcpNetwork(frame_size_max_bytes=2**32 - 2, idle_connections_per_peer=0)


@pytest.mark.parametrize("timeout_ms", [0, -1, math.nan, math.inf])
def test_bad_timeout_is_config_error(timeout_ms: float) -> None:
    """Rejects a request timeout that is not a finite number of milliseconds above 0."""

    async def main() -> None:
        with pytest.raises(ConfigError, match="timeout_ms"):
            await TcpNetwork().request("127.0.0.1:9", b"", timeout_ms=timeout_ms)

    _run(main)


@pytest.mark.parametrize(
    "address",
    ["", "127.0.0.1", "127.0.0.1:", ":80", "host:http", "host:0", "host:65536", "host:-1",
     "host:٣", "::1:80", "[::1:80", "host: 80"],
)  # fmt: skip
def test_malformed_address_is_unreachable(address: str) -> None:
    """Raises Unreachable, naming the address, for anything but host:port or [ipv6]:port."""

    async def main() -> None:
        network = TcpNetwork()
        with pytest.raises(Unreachable, match="malformed node address") as info:
            await network.request(address, b"x", timeout_ms=1000)
        assert repr(address) in str(info.value)
        assert info.value.maybe_delivered is False

    _run(main)


# -- the connection pool -----------------------------------------------------------------------


def test_sequential_requests_reuse_one_connection() -> None:
    """Sends five requests in a row over one connection, and sets TCP_NODELAY on it."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork()
        async with _serving(server, _echo) as address:
            for i in range(5):
                assert await client.request(address, b"%d" % i, timeout_ms=1000) == b"%d" % i
            assert server.connections_accepted == 1
            (stream,) = client._idle[("127.0.0.1", int(address.split(":")[1]))]
            assert stream.getsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY)
        await client.aclose()

    _run(main)


def test_pool_keeps_at_most_idle_connections_per_peer() -> None:
    """Opens one connection per concurrent request and keeps only the configured number idle."""

    async def main() -> None:
        client, server = TcpNetwork(idle_connections_per_peer=2), TcpNetwork()
        arrived = 0
        all_arrived = trio.Event()

        async def handler(payload: bytes) -> bytes:
            nonlocal arrived
            arrived += 1
            if arrived % 4 == 0:
                all_arrived.set()
            await all_arrived.wait()  # holds every connection busy until all four are open
            return payload

        async def batch(address: str) -> None:
            async with trio.open_nursery() as nursery:
                for i in range(4):
                    nursery.start_soon(
                        functools.partial(client.request, timeout_ms=1000), address, b"%d" % i
                    )

        async with _serving(server, handler) as address:
            await batch(address)
            assert server.connections_accepted == 4
            all_arrived = trio.Event()
            await batch(address)
            assert server.connections_accepted == 6  # two reused, two new
        await client.aclose()

    _run(main)


def test_zero_idle_connections_never_reuses() -> None:
    """Opens a new connection for every request when idle_connections_per_peer is 0."""

    async def main() -> None:
        client, server = TcpNetwork(idle_connections_per_peer=0), TcpNetwork()
        async with _serving(server, _echo) as address:
            for _ in range(3):
                assert await client.request(address, b"x", timeout_ms=1000) == b"x"
            assert server.connections_accepted == 3
        await client.aclose()

    _run(main)


def test_pooled_connection_the_peer_closed_is_replaced() -> None:
    """Discards an idle connection the server closed and reaches its successor on a new one."""

    async def main() -> None:
        client, first = TcpNetwork(), TcpNetwork()
        async with _serving(first, _echo) as address:
            assert await client.request(address, b"a", timeout_ms=1000) == b"a"
        # The first server is gone and has closed the pooled connection; one on the same port
        # takes its place.
        second = TcpNetwork(port=int(address.rsplit(":", 1)[1]))
        async with _serving(second, _echo) as again:
            assert again == address
            assert await client.request(address, b"b", timeout_ms=1000) == b"b"
            assert second.connections_accepted == 1
        await client.aclose()

    _run(main)


def test_failed_send_on_a_pooled_connection_is_retried_on_a_new_one() -> None:
    """Retries a request once on a new connection when the pooled one fails to send."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork()
        async with _serving(server, _echo) as address:
            assert await client.request(address, b"a", timeout_ms=1000) == b"a"
            # Break the pooled connection's sending side without yielding, so the server
            # has not noticed and the stream does not look closed: the send itself fails.
            (stream,) = next(iter(client._idle.values()))
            # (Through a duplicate descriptor: trio refuses to send after its own shutdown.)
            with socket.fromfd(
                stream.socket.fileno(), stream.socket.family, stream.socket.type
            ) as dup:
                dup.shutdown(socket.SHUT_WR)
            assert await client.request(address, b"b", timeout_ms=1000) == b"b"
            assert server.connections_accepted == 2
        await client.aclose()

    _run(main)


def test_aclose_closes_idle_connections_and_ends_requests() -> None:
    """Closes pooled connections (the server sees them end) and refuses later requests."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork()
        async with _serving(server, _echo) as address:
            assert await client.request(address, b"a", timeout_ms=1000) == b"a"
            await client.aclose()
            await client.aclose()  # idempotent
            with pytest.raises(Unreachable, match="closed"):
                await client.request(address, b"b", timeout_ms=1000)

    _run(main)


# -- timeouts and cancellation -----------------------------------------------------------------


def test_cancelled_request_closes_its_connection() -> None:
    """Closes the connection of a cancelled request rather than pooling it."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork()
        started = trio.Event()

        async def handler(payload: bytes) -> bytes:
            if payload == b"stuck":
                started.set()
                await trio.sleep_forever()
            return payload

        async with _serving(server, handler) as address:
            async with trio.open_nursery() as nursery:
                request = functools.partial(client.request, timeout_ms=10_000)
                nursery.start_soon(request, address, b"stuck")
                await started.wait()
                nursery.cancel_scope.cancel()
            assert not client._idle
            assert await client.request(address, b"next", timeout_ms=1000) == b"next"
            assert server.connections_accepted == 2
        await client.aclose()

    _run(main)


def test_connect_that_cannot_complete_is_unreachable() -> None:
    """Raises Unreachable when the connection cannot be made in time (or at all)."""

    async def main() -> None:
        for network, timeout_ms in [(TcpNetwork(connect_timeout_ms=50), 5000), (TcpNetwork(), 50)]:
            with trio.fail_after(_GUARD_S), pytest.raises(Unreachable):
                # A TEST-NET-1 address (RFC 5737): never routed, so connecting times out or fails.
                await network.request("192.0.2.1:9", b"x", timeout_ms=timeout_ms)

    _run(main)


def test_timeout_while_sending_is_unreachable() -> None:
    """Raises Unreachable when the deadline strikes before the whole request was sent."""

    async def main() -> None:
        size = 32 * 1024 * 1024  # more than loopback buffers hold: the send must block
        client = TcpNetwork(frame_size_max_bytes=size)

        async def never_reads(stream: trio.SocketStream) -> None:
            await trio.sleep_forever()

        async with _raw_server(never_reads) as address:
            with pytest.raises(Unreachable, match="could not send"):
                await client.request(address, bytes(size), timeout_ms=200)
        await client.aclose()

    _run(main)


# -- raw peers breaking the protocol -----------------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "why"),
    [
        ((65 + 2).to_bytes(4, "big"), "announced a frame of 67 bytes"),
        ((0).to_bytes(4, "big"), "announced a frame of 0 bytes"),
        (_frame(9, b"hello"), "unexpected kind 9"),
        (_frame(_REPLY_OK, b"hello"), "unexpected kind 2"),
    ],
)
def test_server_closes_a_connection_that_breaks_the_protocol(
    sent: bytes, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Closes the connection of an oversize, empty or misplaced frame and keeps serving."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork(frame_size_max_bytes=65)
        calls: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(payload)
            return payload

        async with _serving(server, handler) as address:
            host, port = address.split(":")
            async with await trio.open_tcp_stream(host, int(port)) as raw:
                await raw.send_all(sent)
                assert await _read_to_end(raw) == b""
            assert await client.request(address, b"fine", timeout_ms=1000) == b"fine"
        assert calls == [b"fine"]
        await client.aclose()

    with caplog.at_level(logging.WARNING, logger="kelpie.env.tcp"):
        _run(main)
    assert why in caplog.text


@pytest.mark.parametrize(
    ("cut", "why"),
    [
        (2, "2 bytes into a frame"),
        (4, "4 bytes into a frame of 15 bytes"),
        (5, "5 bytes into a frame of 15 bytes"),
        (14, "14 bytes into a frame of 15 bytes"),
    ],
)
def test_server_survives_a_peer_closing_mid_frame(
    cut: int, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Drops a frame cut short by its sender's close (logging where), and keeps serving."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork()
        calls: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            calls.append(payload)
            return payload

        async with _serving(server, handler) as address:
            host, port = address.split(":")
            async with await trio.open_tcp_stream(host, int(port)) as raw:
                await raw.send_all(_frame(_REQUEST, b"0123456789")[:cut])
            await trio.sleep(0.02)
            assert await client.request(address, b"fine", timeout_ms=1000) == b"fine"
        assert calls == [b"fine"]
        await client.aclose()

    with caplog.at_level(logging.WARNING, logger="kelpie.env.tcp"):
        _run(main)
    assert f"closed the connection {why}" in caplog.text


def test_server_survives_a_client_leaving_mid_handler() -> None:
    """Finishes a handler whose client has gone, drops its reply, and keeps serving."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork()
        release, finished = trio.Event(), trio.Event()

        async def handler(payload: bytes) -> bytes:
            if payload == b"slow":
                await release.wait()
                finished.set()
                return b"x" * 100_000
            return payload

        async with _serving(server, handler) as address:
            host, port = address.split(":")
            async with await trio.open_tcp_stream(host, int(port)) as raw:
                await raw.send_all(_frame(_REQUEST, b"slow"))
                await trio.sleep(0.02)
            release.set()
            await finished.wait()
            await trio.sleep(0.02)
            assert await client.request(address, b"fine", timeout_ms=1000) == b"fine"
        await client.aclose()

    _run(main)


def test_server_dying_mid_request_is_delivery_unknown() -> None:
    """Raises DeliveryUnknown when the server reads the request and closes without replying."""

    async def main() -> None:
        client = TcpNetwork()

        async def dies(stream: trio.SocketStream) -> None:
            await stream.receive_some()

        async with _raw_server(dies) as address:
            with pytest.raises(DeliveryUnknown, match="after the request was sent"):
                await client.request(address, b"x", timeout_ms=1000)
        await client.aclose()

    _run(main)


@pytest.mark.parametrize(
    ("reply", "closes", "why"),
    [
        ((65 + 2).to_bytes(4, "big"), False, "the peer announced a frame of 67 bytes"),
        (_frame(_REQUEST, b"x"), False, "the peer sent a frame of unexpected kind 1"),
        (
            _frame(_REPLY_OK, b"0123456789")[:8],
            True,
            "the peer closed the connection 8 bytes into a frame of 15",
        ),
    ],
)
def test_broken_reply_is_delivery_unknown_and_closes_the_connection(
    reply: bytes, closes: bool, why: str
) -> None:
    """Raises DeliveryUnknown at once for an oversize, misplaced or truncated reply; hangs up."""

    async def main() -> None:
        client = TcpNetwork(frame_size_max_bytes=65)
        hung_up = trio.Event()

        async def broken(stream: trio.SocketStream) -> None:
            await stream.receive_some()
            await stream.send_all(reply)
            if not closes:  # else the server's close cuts the reply short
                await _read_to_end(stream)
                hung_up.set()

        async with _raw_server(broken) as address:
            with pytest.raises(DeliveryUnknown, match=f"after the request was sent: {why}"):
                await client.request(address, b"x", timeout_ms=_GUARD_S * 1000)
            if not closes:
                with trio.fail_after(_GUARD_S):
                    await hung_up.wait()
            assert not client._idle
        await client.aclose()

    _run(main)


def test_request_over_the_servers_limit_is_delivery_unknown() -> None:
    """Raises DeliveryUnknown when the server refuses a frame over its own (smaller) limit."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork(frame_size_max_bytes=64)
        async with _serving(server, _echo) as address:
            with pytest.raises(DeliveryUnknown):
                await client.request(address, bytes(65), timeout_ms=1000)
            assert await client.request(address, bytes(64), timeout_ms=1000) == bytes(64)
        await client.aclose()

    _run(main)


# -- limits and failures -----------------------------------------------------------------------


def test_frame_too_large_names_the_sizes() -> None:
    """Raises FrameTooLarge, naming both sizes, before connecting to anything."""

    async def main() -> None:
        network = TcpNetwork(frame_size_max_bytes=10)
        with pytest.raises(FrameTooLarge, match=r"11 bytes .* limit of 10 bytes"):
            await network.request("127.0.0.1:9", bytes(11), timeout_ms=1000)

    _run(main)


@pytest.mark.parametrize(
    ("frame_size_max_bytes", "reason_max"), [(FRAME_SIZE_MAX_BYTES, 1024), (40, 40)]
)
def test_failure_reason_is_cut_to_fit(frame_size_max_bytes: int, reason_max: int) -> None:
    """Cuts a long failure reason to 1 KiB, or to the frame limit if smaller, at a character."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork(frame_size_max_bytes=frame_size_max_bytes)

        async def handler(payload: bytes) -> bytes:
            raise RuntimeError("é" * 5000)

        async with _serving(server, handler) as address:
            with pytest.raises(RemoteFailure) as info:
                await client.request(address, b"x", timeout_ms=1000)
        reason = str(info.value).split(" failed: ", 1)[1]
        assert reason.startswith("RuntimeError: éé")
        assert "\ufffd" not in reason
        assert reason_max - 4 <= len(reason.encode()) <= reason_max
        assert reason.endswith("...")
        await client.aclose()

    _run(main)


def test_handler_returning_no_bytes_is_remote_failure() -> None:
    """Answers a handler that returns something other than bytes with RemoteFailure."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork()

        async def handler(payload: bytes) -> bytes:
            return None  # type: ignore[return-value]

        async with _serving(server, handler) as address:
            with pytest.raises(RemoteFailure, match="TypeError"):
                await client.request(address, b"x", timeout_ms=1000)
            with pytest.raises(RemoteFailure, match="TypeError"):
                await client.request(address, b"x", timeout_ms=1000)
        await client.aclose()

    _run(main)


def test_serving_on_a_taken_port_raises_oserror() -> None:
    """Lets the OSError of a port already in use propagate from serve."""

    async def main() -> None:
        first = TcpNetwork()
        async with _serving(first, _echo) as address:
            second = TcpNetwork(port=int(address.rsplit(":", 1)[1]))
            with pytest.raises(OSError):
                await second.serve(_echo)

    _run(main)


def test_ipv6_addresses_are_bracketed() -> None:
    """Reports "[::1]:port" when serving on ::1, and reaches it by that address."""

    async def main() -> None:
        client, server = TcpNetwork(), TcpNetwork("::1")
        try:
            listeners = await trio.open_tcp_listeners(0, host="::1")
        except OSError:
            pytest.skip("no IPv6 loopback here")
        for listener in listeners:
            await listener.aclose()
        async with _serving(server, _echo) as address:
            assert address.startswith("[::1]:")
            assert await client.request(address, b"v6", timeout_ms=1000) == b"v6"
        await client.aclose()

    _run(main)
