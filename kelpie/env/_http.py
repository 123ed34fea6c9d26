"""Outbound HTTP: the transport every HTTP client in Kelpie is built on.

LLM APIs, embedding APIs and MCP servers over HTTP are all reached through
`env.http`, an `httpx2.AsyncBaseTransport` (the transport type of the official
`openai` and `anthropic` SDKs). Code makes its clients with
`httpx2.AsyncClient(transport=env.http, ...)` and never opens a connection any
other way, so the simulator can put its simulated services behind the very
same SDK code by passing a different transport.

The transport is shared by every client of one Env: closing a client must not
close it, so `aclose()` here does nothing and `close_pool()` (called by whoever
built the Env) releases the connections.
"""

from __future__ import annotations

import httpx2


class RealHttpTransport(httpx2.AsyncBaseTransport):
    """The real network: one connection pool, made on first use (TLS set-up is not free)."""

    def __init__(self) -> None:
        self._pool: httpx2.AsyncHTTPTransport | None = None

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        if self._pool is None:
            # Retries are the caller's (with the Env's clock and jitter), never the pool's.
            self._pool = httpx2.AsyncHTTPTransport(retries=0)
        return await self._pool.handle_async_request(request)

    async def aclose(self) -> None:
        """Does nothing: the transport outlives the clients built on it (see the module doc)."""

    async def close_pool(self) -> None:
        """Closes the pooled connections; the next request opens new ones."""
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.aclose()
