"""`TcpNetwork`: the real node network, request/reply over trio TCP streams.

One `TcpNetwork` is one node's end of the cluster network (the `NodeNetwork`
contract of kelpie/env/_network.py): `serve` listens on (host, port) and answers
each request with the handler's reply; `request` sends one request to another
node's "host:port" and waits for its reply.

Wire format. Both directions carry frames, one after another:

    +----------------------+--------+-----------------------+
    | length N (4 bytes,   | kind   | payload (N - 1 bytes) |
    | unsigned big-endian) | 1 byte |                       |
    +----------------------+--------+-----------------------+

`kind` is REQUEST (client to server), REPLY_OK (the handler's reply) or
REPLY_FAILED (the payload is a short UTF-8 reason). A connection carries one
request at a time: the client sends a REQUEST frame and reads exactly one reply
frame before it sends another, so no request ids are needed. Reads take exactly
the bytes a frame announces, never more, so nothing is left over to be misread
as the next reply.

Limits. `frame_size_max_bytes` (16 MiB by default) is the largest payload a
frame carries, request or reply; the length prefix is then at most one more.
- Sending a request over the limit raises `FrameTooLarge`; nothing is sent.
- A reply over the limit is replaced by REPLY_FAILED, so the caller gets
  `RemoteFailure` (the handler did run).
- A peer announcing a frame over the limit (or empty, or of an unknown or
  misplaced kind, or closing mid-frame) breaks the protocol: the connection is
  closed. A client whose request was sent then sees `DeliveryUnknown`.
- A failure reason is cut to 1 KiB (or the frame limit, if smaller).
- Idle connections: at most `idle_connections_per_peer` per peer are kept for
  reuse; the rest are closed when their request ends.

Timeouts. `timeout_ms` bounds a whole request: connecting, sending, and waiting
for the reply. Connecting alone is also bounded by `connect_timeout_ms`. Both
run on trio's clock, like every other deadline in Kelpie.

Error mapping. The rule is that a request may have been delivered once its
whole frame has been handed to the kernel (trio's `send_all` raises only before
the last byte is accepted, and a server acts only on a complete frame):
- a malformed address, a connection refused, failed or timed out, a request
  after `aclose()`, or a connection that broke (or a timeout that struck) before
  the frame was fully sent: `Unreachable`;
- a connection that broke, closed or broke the protocol after the frame was
  sent, or no reply within `timeout_ms`: `DeliveryUnknown`;
- REPLY_FAILED (the handler raised, or its reply was too large): `RemoteFailure`,
  whose message carries the reason, e.g. "ValueError: boom".
A reused idle connection that the peer has closed is detected before it is
used (it reads as readable: end of stream) and replaced by a new one; if the
send on it fails, the request is retried once on a new connection, which is
safe because it was not delivered. If the peer's close is still in flight when
the whole frame has been sent, the request ends in `DeliveryUnknown`: the
client cannot tell a server that closed before reading from one that died
after. A connection whose request timed out, broke or was cancelled is closed,
never reused: a late reply on it would otherwise be read as the answer to the
next request (a RemoteFailure leaves its connection sound, and pooled).

Server side. Each connection is served by its own task, reading request frames
one after another; different connections are answered concurrently. A handler
that raises is answered with REPLY_FAILED ("ExcType: message") and the server
keeps serving; a client that goes away mid-handler costs only its connection.
Cancelling `serve` stops listening and closes every connection, so a client
waiting for a reply sees `DeliveryUnknown` and a new one `Unreachable`.

Both ends set TCP_NODELAY (trio's SocketStream does so too): a frame is one
small write followed by a wait for the answer, the worst case for Nagle.

This module opens real sockets, which the repository's determinism rules
(tests/repo) allow only in kelpie/env; the simulator gives nodes a simulated
network instead (kelpie/sim/_network.py).
"""

from __future__ import annotations

import contextlib
import enum
import functools
import logging
import math
import struct

import trio

from kelpie.core import ConfigError
from kelpie.env._network import (
    DeliveryUnknown,
    FrameTooLarge,
    Handler,
    NodeNetwork,
    RemoteFailure,
    Unreachable,
)

_log = logging.getLogger("kelpie.env.tcp")

#: The default largest payload of one frame (request or reply).
FRAME_SIZE_MAX_BYTES = 16 * 1024 * 1024

#: The largest `frame_size_max_bytes` the 4-byte length prefix can announce (kind byte included).
_FRAME_SIZE_LIMIT_BYTES = 2**32 - 2

#: The longest failure reason sent in a REPLY_FAILED frame.
_REASON_SIZE_MAX_BYTES = 1024

#: The most bytes asked of the socket in one receive.
_RECEIVE_CHUNK_BYTES = 256 * 1024

#: The length prefix and the kind byte that start every frame.
_HEADER = struct.Struct(">IB")
_PREFIX_SIZE_BYTES = 4

#: A peer, as `request` connects to it: (host, port).
_Peer = tuple[str, int]


class _Kind(enum.IntEnum):
    """The kind byte of a frame (0 is left unused: a zeroed buffer is not a valid frame)."""

    REQUEST = 1
    REPLY_OK = 2
    REPLY_FAILED = 3


_REQUEST_KINDS = (_Kind.REQUEST,)
_REPLY_KINDS = (_Kind.REPLY_OK, _Kind.REPLY_FAILED)


class _ProtocolError(Exception):
    """The peer broke the wire format; the connection it came on must be closed."""


class _EndOfStream(_ProtocolError):
    """The peer closed the connection between two frames: the normal end of a connection."""


class _Progress:
    """How far one request got, so that a timeout knows whether it may have been delivered."""

    __slots__ = ("sent",)

    def __init__(self) -> None:
        #: The whole request frame was handed to the kernel: the peer may act on it.
        self.sent = False


class TcpNetwork(NodeNetwork):
    """A `NodeNetwork` over TCP (see the module docstring for the protocol and errors)."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        frame_size_max_bytes: int = FRAME_SIZE_MAX_BYTES,
        connect_timeout_ms: float = 5000,
        idle_connections_per_peer: int = 8,
    ) -> None:
        if not host:
            raise ConfigError("host must be a host name or IP address to listen on, not empty")
        _check_int("port", port, 0, 65535)
        _check_int("frame_size_max_bytes", frame_size_max_bytes, 1, _FRAME_SIZE_LIMIT_BYTES)
        _check_duration_ms("connect_timeout_ms", connect_timeout_ms)
        _check_int("idle_connections_per_peer", idle_connections_per_peer, 0, 1 << 20)
        self.host = host
        self.port = port
        self.frame_size_max_bytes = frame_size_max_bytes
        self.connect_timeout_ms = connect_timeout_ms
        self.idle_connections_per_peer = idle_connections_per_peer
        #: Connections accepted by this network's `serve`, over its lifetime.
        self.connections_accepted = 0
        self._idle: dict[_Peer, list[trio.SocketStream]] = {}
        self._closed = False

    def __repr__(self) -> str:
        return f"TcpNetwork({self.host!r}, {self.port})"

    # -- client side -----------------------------------------------------------------------

    async def request(self, address: str, payload: bytes, *, timeout_ms: float) -> bytes:
        """Sends `payload` to the node at `address` ("host:port") and returns its reply."""
        peer = parse_address(address)
        _check_duration_ms("timeout_ms", timeout_ms)
        if len(payload) > self.frame_size_max_bytes:
            raise FrameTooLarge(
                f"a request of {len(payload)} bytes to {address} exceeds the frame limit"
                f" of {self.frame_size_max_bytes} bytes; nothing was sent"
            )
        if self._closed:
            raise Unreachable(f"cannot reach {address}: this TcpNetwork is closed")
        frame = _encode_frame(_Kind.REQUEST, payload)
        progress = _Progress()
        with trio.move_on_after(timeout_ms / 1000):
            return await self._exchange(peer, address, frame, progress)
        if progress.sent:
            raise DeliveryUnknown(f"no reply from {address} within {timeout_ms:g} ms")
        raise Unreachable(f"could not send a request to {address} within {timeout_ms:g} ms")

    async def aclose(self) -> None:
        """Closes every idle connection; later requests raise `Unreachable`.

        A request still running closes its connection when it ends. Servers are
        stopped by cancelling `serve`, not by this.
        """
        self._closed = True
        idle, self._idle = self._idle, {}
        for streams in idle.values():
            for stream in streams:
                await trio.aclose_forcefully(stream)

    async def _exchange(
        self, peer: _Peer, address: str, frame: bytes, progress: _Progress
    ) -> bytes:
        """Sends `frame` to `peer` and reads the reply; the connection is pooled again if sound."""
        stream = await self._send(peer, address, frame)
        progress.sent = True
        try:
            kind, body = await _read_frame(stream, self.frame_size_max_bytes, _REPLY_KINDS)
        except (trio.BrokenResourceError, _ProtocolError) as exc:
            await trio.aclose_forcefully(stream)
            raise DeliveryUnknown(
                f"the connection to {address} failed after the request was sent: {exc}"
            ) from exc
        except BaseException:
            # A timeout or the caller's cancellation: a late reply must never be read.
            await trio.aclose_forcefully(stream)
            raise
        await self._give_back(peer, stream)
        if kind is _Kind.REPLY_FAILED:
            reason = body.decode("utf-8", errors="replace")
            raise RemoteFailure(f"the handler at {address} failed: {reason}")
        return body

    async def _send(self, peer: _Peer, address: str, frame: bytes) -> trio.SocketStream:
        """Sends `frame` on an idle connection to `peer`, or a new one; returns that connection.

        A failed send cannot have delivered the request (its last byte never
        reached the kernel), so a pooled connection that fails is replaced by a
        new connection once; a new connection that fails means `Unreachable`.
        """
        stream = await self._take_idle(peer)
        if stream is not None and await _try_send(stream, frame):
            return stream
        stream = await self._connect(peer, address)
        if await _try_send(stream, frame):
            return stream
        raise Unreachable(f"{address} closed the connection before the request was sent")

    async def _take_idle(self, peer: _Peer) -> trio.SocketStream | None:
        """A pooled connection to `peer` that still looks open, or None."""
        idle = self._idle.get(peer, [])
        stream = None
        while idle and stream is None:
            stream = idle.pop()  # the most recently used: the likeliest to be alive
            if stream.socket.is_readable():
                # An idle connection has nothing to read unless the peer closed it
                # (end of stream) or broke the protocol: either way it is unusable.
                await trio.aclose_forcefully(stream)
                stream = None
        if not idle:
            self._idle.pop(peer, None)
        return stream

    async def _give_back(self, peer: _Peer, stream: trio.SocketStream) -> None:
        """Pools a connection whose request ended cleanly, or closes it if the pool is full."""
        idle = self._idle.get(peer, [])
        if self._closed or len(idle) >= self.idle_connections_per_peer:
            await trio.aclose_forcefully(stream)
            return
        idle.append(stream)
        self._idle[peer] = idle

    async def _connect(self, peer: _Peer, address: str) -> trio.SocketStream:
        """A new connection to `peer`, or `Unreachable` (refused, failed, or too slow)."""
        host, port = peer
        with trio.move_on_after(self.connect_timeout_ms / 1000):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except OSError as exc:
                raise Unreachable(f"cannot connect to {address}: {_first_cause(exc)}") from exc
            _set_nodelay(stream)
            return stream
        raise Unreachable(f"cannot connect to {address} within {self.connect_timeout_ms:g} ms")

    # -- server side -----------------------------------------------------------------------

    async def serve(
        self,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listens on (host, port) and answers requests with `handler` until cancelled.

        Reports "host:port" through `task_status`: the address and port actually
        bound (the ephemeral one when `port` is 0; the first, if `host` names
        several addresses). Bind a concrete address for a cluster: a wildcard
        such as 0.0.0.0 is reported as is, which other machines cannot reach.
        An OSError from listening (the port is taken, the host is not local)
        propagates.
        """
        listeners = await trio.open_tcp_listeners(self.port, host=self.host)
        try:
            host, port = listeners[0].socket.getsockname()[:2]
            task_status.started(_format_address(host, port))
            await trio.serve_listeners(
                functools.partial(self._serve_connection, handler), listeners
            )
        finally:
            # serve_listeners closes them too; this covers a cancellation before it started.
            for listener in listeners:
                await trio.aclose_forcefully(listener)

    async def _serve_connection(self, handler: Handler, stream: trio.SocketStream) -> None:
        """Answers the request frames of one connection in turn, until it ends or misbehaves.

        trio.serve_listeners closes the stream when this returns or is cancelled.
        """
        self.connections_accepted += 1
        _set_nodelay(stream)
        try:
            while True:
                _, payload = await _read_frame(stream, self.frame_size_max_bytes, _REQUEST_KINDS)
                await stream.send_all(await self._answer(handler, payload))
        except _EndOfStream:
            pass  # the client closed the connection between requests: it is done with it
        except _ProtocolError as exc:
            _log.warning("closing a connection from %s: %s", _peer_of(stream), exc)
        except trio.BrokenResourceError:
            pass  # the client went away, perhaps while its handler ran: only this connection ends

    async def _answer(self, handler: Handler, payload: bytes) -> bytes:
        """The reply frame for one request: the handler's reply, or why there is none."""
        try:
            reply = await handler(payload)
            if len(reply) > self.frame_size_max_bytes:
                return self._failure_frame(
                    f"the reply of {len(reply)} bytes exceeds the frame limit"
                    f" of {self.frame_size_max_bytes} bytes"
                )
            frame = _encode_frame(_Kind.REPLY_OK, reply)
        except Exception as exc:  # the handler's failure is the caller's RemoteFailure
            return self._failure_frame(_describe(exc))
        return frame

    def _failure_frame(self, reason: str) -> bytes:
        """A REPLY_FAILED frame carrying `reason`, cut to fit both limits."""
        size_max = min(_REASON_SIZE_MAX_BYTES, self.frame_size_max_bytes)
        return _encode_frame(_Kind.REPLY_FAILED, _truncate_utf8(reason, size_max))


# -- addresses ---------------------------------------------------------------------------------


def parse_address(address: str) -> _Peer:
    """(host, port) of "host:port" or "[ipv6]:port"; `Unreachable` when malformed."""
    host, colon, port_text = address.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    if bracketed:
        host = host[1:-1]
    valid = (
        bool(colon)
        and bool(host)
        and (bracketed or ":" not in host)
        and port_text.isascii()
        and port_text.isdigit()
        and 1 <= int(port_text) <= 65535
    )
    if not valid:
        raise Unreachable(
            f"malformed node address {address!r}: expected 'host:port' or '[ipv6]:port'"
            " with a port from 1 to 65535"
        )
    return host, int(port_text)


def _format_address(host: str, port: int) -> str:
    """The "host:port" (or "[ipv6]:port") that `parse_address` reads."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _peer_of(stream: trio.SocketStream) -> str:
    """The remote end of `stream`, for log lines (best effort: it may be gone already)."""
    try:
        host, port = stream.socket.getpeername()[:2]
    except OSError:
        return "a disconnected peer"
    return _format_address(host, port)


# -- frames ------------------------------------------------------------------------------------


def _encode_frame(kind: _Kind, payload: bytes) -> bytes:
    """One whole frame: the length prefix (kind byte included), the kind, the payload."""
    return _HEADER.pack(len(payload) + 1, kind) + payload


async def _read_frame(
    stream: trio.SocketStream, payload_max: int, kinds: tuple[_Kind, ...]
) -> tuple[_Kind, bytes]:
    """The next frame on `stream`, which must be of one of `kinds`.

    Raises `_EndOfStream` when the stream ends before the frame starts, and
    `_ProtocolError` when it ends inside the frame or the frame is empty, over
    `payload_max`, or of a kind not in `kinds`. The length is checked before
    the body is read, and nothing past the frame is read.
    """
    prefix = await _receive_up_to(stream, _PREFIX_SIZE_BYTES)
    if not prefix:
        raise _EndOfStream("the peer closed the connection")
    if len(prefix) < _PREFIX_SIZE_BYTES:
        raise _ProtocolError(f"the peer closed the connection {len(prefix)} bytes into a frame")
    size = int.from_bytes(prefix, "big")
    if not 1 <= size <= payload_max + 1:
        raise _ProtocolError(
            f"the peer announced a frame of {size} bytes; frames carry 1 to"
            f" {payload_max + 1} bytes (kind byte included)"
        )
    kind = await _receive_up_to(stream, 1)
    if kind and kind[0] not in kinds:
        raise _ProtocolError(f"the peer sent a frame of unexpected kind {kind[0]}")
    payload = await _receive_up_to(stream, size - 1) if kind else b""
    received = len(kind) + len(payload)
    if received < size:
        raise _ProtocolError(
            f"the peer closed the connection {_PREFIX_SIZE_BYTES + received} bytes into"
            f" a frame of {_PREFIX_SIZE_BYTES + size} bytes"
        )
    return _Kind(kind[0]), payload


async def _receive_up_to(stream: trio.SocketStream, size: int) -> bytes:
    """`size` bytes from `stream` (never more), or fewer if the stream ends first."""
    chunks = []
    received = 0
    while received < size:
        chunk = await stream.receive_some(min(size - received, _RECEIVE_CHUNK_BYTES))
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


async def _try_send(stream: trio.SocketStream, frame: bytes) -> bool:
    """Sends `frame`; False (and the stream closed) if the connection is broken.

    On any other exception (a timeout, the caller's cancellation) the stream is
    closed too, since a partly written frame leaves it unusable.
    """
    try:
        await stream.send_all(frame)
    except trio.BrokenResourceError:
        await trio.aclose_forcefully(stream)
        return False
    except BaseException:
        await trio.aclose_forcefully(stream)
        raise
    return True


def _set_nodelay(stream: trio.SocketStream) -> None:
    """Turns off Nagle's algorithm: each frame is one write that waits for an answer."""
    # trio's SocketStream already does this; it fails only on a socket already reset.
    with contextlib.suppress(OSError):
        stream.setsockopt(trio.socket.IPPROTO_TCP, trio.socket.TCP_NODELAY, True)


# -- small helpers -----------------------------------------------------------------------------


def _describe(exc: BaseException) -> str:
    """The failure reason for `exc`: "ExcType: message" (just the type if str() fails)."""
    try:
        return f"{type(exc).__name__}: {exc}"
    except Exception:
        return f"{type(exc).__name__} (its message could not be formatted)"


def _first_cause(exc: OSError) -> BaseException:
    """The first underlying error of a failed connect (trio groups one per address tried)."""
    cause = exc.__cause__
    while isinstance(cause, BaseExceptionGroup) and cause.exceptions:
        cause = cause.exceptions[0]
    return cause if cause is not None else exc


def _truncate_utf8(text: str, size_max: int) -> bytes:
    """`text` as UTF-8 in at most `size_max` bytes, cut at a character boundary, marked "..."."""
    data = text.encode("utf-8", errors="replace")
    if len(data) <= size_max:
        return data
    marker = b"..." if size_max >= 16 else b""
    cut = data[: size_max - len(marker)].decode("utf-8", errors="ignore").encode("utf-8")
    return cut + marker


def _check_int(name: str, value: int, low: int, high: int) -> None:
    """ConfigError unless `value` is an int (not a bool) in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ConfigError(f"{name} must be an integer from {low} to {high}, got {value!r}")


def _check_duration_ms(name: str, value: float) -> None:
    """ConfigError unless `value` is a finite number of milliseconds above zero."""
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name} must be a finite number of milliseconds above 0, got {value!r}")
