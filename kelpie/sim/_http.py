"""The simulated HTTP world: the network between a node and the external services it calls.

`SimHttp` is an `httpx2.AsyncBaseTransport`, the type of `Env.http`
(kelpie/env/_http.py): the simulator passes one per run to every node's Env,
so production code builds its clients (`httpx2.AsyncClient(transport=env.http)`)
and the official SDKs on top of them exactly as in production, and every
request, retry and response parser of that code runs in the simulation.
Services are registered by host name (`register("llm.sim", handler)`); a
handler is an async callable from an `httpx2.Request` to an `httpx2.Response`
(`SimLLM`, kelpie/sim/_llm.py, is one). Time is trio's (virtual in a
simulation) and every random choice comes from the `Rng` passed in.

How a request travels:

1. The calling node's pause gate (kelpie/sim/_pauses.py): a paused node sends
   nothing. The node is the current task's (`CURRENT_NODE`).
2. Connecting takes one round trip, drawn uniformly from [0, latency_max_ms]
   per request. If that exceeds the request's connect timeout the request
   fails with `httpx2.ConnectTimeout` at the timeout. A host nobody registered
   fails after the round trip with `httpx2.ConnectError`, as a failed DNS
   lookup does.
3. The request takes half the round trip to arrive; the handler runs; the
   response head takes the other half back. If the head is not back within
   the read timeout, the request fails with `httpx2.ReadTimeout` and the
   handler is cancelled (the service sees the client disconnect).
4. The body: each chunk of a streamed body (an `httpx2.AsyncByteStream` the
   handler returned, whose chunks come with the handler's own delays) must
   arrive within the read timeout of the previous one, else the read fails
   with `httpx2.ReadTimeout`, as a socket read does; a paused caller reads
   nothing until its pause ends. A handler's stream that ends early ends the
   body early (a server that ended its response cleanly); one that raises
   `httpx2.RemoteProtocolError` is a connection cut mid-body, which is what
   httpx reports when a peer closes the connection before the end of a
   chunked body.

Timeouts are the request's own (`request.extensions["timeout"]`, a dict of
connect/read/write/pool seconds that every httpx client sets; None or a
missing key: no limit). This transport injects no faults of its own; the
services behind it do (see `LLMFaults`). A handler's `httpx2.TransportError`
reaches the caller as it is (a service may refuse or cut a connection); any
other exception is a bug in the simulated service and propagates.

Not modelled: connection pools and keep-alive (every request connects), the
write and pool timeouts (requests are small, the pool unbounded), TLS, and
work that outlives its client: a request whose client gave up is cancelled at
the service.

`aclose()` does nothing: the transport is shared by every client of every
Env of a run (see kelpie/env/_http.py).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable

import httpx2
import trio

from kelpie.env import Rng
from kelpie.sim._nodes import CURRENT_NODE
from kelpie.sim._pauses import NodePauses

#: A simulated service: answers one request (it may sleep, in virtual time).
HttpHandler = Callable[[httpx2.Request], Awaitable[httpx2.Response]]

#: The default upper bound of one round trip between a node and a service.
LATENCY_MAX_MS = 20.0


class SimHttp(httpx2.AsyncBaseTransport):
    """The simulated outbound HTTP of one run (see the module docstring)."""

    def __init__(
        self,
        rng: Rng,
        *,
        latency_max_ms: float = LATENCY_MAX_MS,
        pauses: NodePauses | None = None,
    ) -> None:
        if not latency_max_ms >= 0:
            raise ValueError(f"latency_max_ms must be >= 0, got {latency_max_ms!r}")
        self.latency_max_ms = latency_max_ms
        #: Requests that reached a service, by host.
        self.served: dict[str, int] = {}
        self._latency = rng.fork("latency")
        self._pauses = pauses
        self._handlers: dict[str, HttpHandler] = {}

    def register(self, host: str, handler: HttpHandler) -> None:
        """Serves every request to `host` (any port, any scheme) with `handler`."""
        host = host.lower()
        if not host:
            raise ValueError("a service needs a host name")
        if host in self._handlers:
            raise ValueError(f"a service is already registered at {host!r}")
        self._handlers[host] = handler

    def unregister(self, host: str) -> None:
        """Takes the service at `host` away: later requests fail as for an unknown host."""
        self._handlers.pop(host.lower(), None)

    @property
    def hosts(self) -> tuple[str, ...]:
        """The registered hosts, in registration order."""
        return tuple(self._handlers)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        timeouts = _timeouts(request)
        node = CURRENT_NODE.get()
        await self._gate(node)
        host = request.url.host.lower()
        handler = self._handlers.get(host)
        rtt_s = self._latency.uniform(0, self.latency_max_ms) / 1000
        connect_s = timeouts.get("connect")
        if connect_s is not None and rtt_s > connect_s:
            await trio.sleep(connect_s)
            raise httpx2.ConnectTimeout(
                f"connecting to {host} took longer than {connect_s:g} s", request=request
            )
        await trio.sleep(rtt_s)
        if handler is None:
            raise httpx2.ConnectError(
                f"[Errno -2] Name or service not known: no simulated service at {host!r}",
                request=request,
            )
        await request.aread()
        self.served[host] = self.served.get(host, 0) + 1
        read_s = timeouts.get("read")
        response: httpx2.Response | None = None
        with trio.move_on_after(_or_inf(read_s)):
            await trio.sleep(rtt_s / 2)
            response = await handler(request)
            await trio.sleep(rtt_s / 2)
        if response is None:
            raise httpx2.ReadTimeout(
                f"no response from {host} within {read_s:g} s", request=request
            )
        await self._gate(node)
        stream = response.stream
        if isinstance(stream, httpx2.AsyncByteStream):
            response.stream = _TimedStream(self, stream, node, read_s, request)
        return response

    async def _gate(self, node: str) -> None:
        if self._pauses is not None:
            await self._pauses.gate(node)

    async def aclose(self) -> None:
        """Does nothing: the transport outlives the clients built on it (see the module doc)."""

    def __repr__(self) -> str:
        return f"SimHttp(hosts={list(self._handlers)}, latency_max_ms={self.latency_max_ms:g})"


class _TimedStream(httpx2.AsyncByteStream):
    """A response body as the caller reads it: each chunk within the read timeout.

    An iterator object rather than an async generator: a body its reader leaves
    unfinished (the SDKs do) is then closed by `aclose()`, never left to the
    garbage collector.
    """

    def __init__(
        self,
        http: SimHttp,
        inner: httpx2.AsyncByteStream,
        node: str,
        read_s: float | None,
        request: httpx2.Request,
    ) -> None:
        self._http = http
        self._inner = inner
        self._node = node
        self._read_s = read_s
        self._request = request
        self._chunks: AsyncIterator[bytes] | None = None

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._chunks is None:
            self._chunks = aiter(self._inner)
        chunk: bytes | None = None
        with trio.move_on_after(_or_inf(self._read_s)):
            chunk = await anext(self._chunks)
        if chunk is None:
            host = self._request.url.host
            raise httpx2.ReadTimeout(
                f"the body from {host} stalled for {self._read_s:g} s", request=self._request
            )
        await self._http._gate(self._node)
        return chunk

    async def aclose(self) -> None:
        chunks, self._chunks = self._chunks, None
        if isinstance(chunks, AsyncGenerator):
            await chunks.aclose()
        await self._inner.aclose()


def _timeouts(request: httpx2.Request) -> dict[str, float | None]:
    timeout = request.extensions.get("timeout")
    if not isinstance(timeout, dict):
        return {}
    return {key: timeout.get(key) for key in ("connect", "read", "write", "pool")}


def _or_inf(seconds: float | None) -> float:
    return float("inf") if seconds is None else seconds
