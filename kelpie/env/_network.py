"""The node network: request/reply messages between the nodes of a cluster.

A `NodeNetwork` is one node's view of the network. It does two things:

- `serve(handler)` answers requests sent to this node: each request's payload
  is passed to `handler`, concurrently with other requests, and what it returns
  is the reply. `serve` reports the node's address through `task_status`
  (`address = await nursery.start(network.serve, handler)`) and answers until
  it is cancelled.
- `request(address, payload, timeout_ms=...)` sends one request to the node at
  `address` and returns its reply.

Payloads are bytes; what they mean is the caller's business (the actor runtime
encodes its own messages). Every failure is a `NetworkError` that says whether
the request may have reached the peer's handler (`maybe_delivered`), which is
all a caller needs to decide whether a retry could repeat it:

- `Unreachable`: nothing was delivered (the peer refused the connection, is
  not listening, or the address is malformed). Safe to retry.
- `DeliveryUnknown`: the request may have been handled, even more than once
  on a network that duplicates: the reply did not come within `timeout_ms`, or
  the connection broke after the request was sent. Retry only what is
  idempotent.
- `FrameTooLarge`: the request is larger than the network carries; nothing was
  sent.
- `RemoteFailure`: the request was delivered and the peer's handler raised, or
  its reply was too large to send back.

`Env.production()` leaves the network unset (a node that needs one is given a
`TcpNetwork`, kelpie/env/_tcp.py); the simulator gives each node an endpoint of
its simulated network (kelpie/sim/_network.py), whose docstring states the
faults it injects.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable

import trio

from kelpie.core import KelpieError

#: What a node runs for each request it receives: payload in, reply out.
Handler = Callable[[bytes], Awaitable[bytes]]


class NetworkError(KelpieError):
    """A request between nodes failed; `maybe_delivered` says whether the peer may have acted."""

    maybe_delivered = True


class Unreachable(NetworkError):
    """Nothing was delivered: the peer is not listening, refused, or the address is malformed."""

    maybe_delivered = False


class DeliveryUnknown(NetworkError):
    """The request may have been handled (perhaps twice), but no reply came in time."""

    maybe_delivered = True


class FrameTooLarge(NetworkError):
    """The request is larger than the network carries; nothing was sent."""

    maybe_delivered = False


class RemoteFailure(NetworkError):
    """The peer received the request, but its handler raised or its reply was too large."""

    maybe_delivered = True


class NodeNetwork(abc.ABC):
    """One node's end of the cluster network (see the module docstring)."""

    @abc.abstractmethod
    async def serve(
        self,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Answers requests to this node with `handler` until cancelled.

        Calls `task_status.started(address)` once requests can arrive, with the
        address other nodes pass to `request`.
        """

    @abc.abstractmethod
    async def request(self, address: str, payload: bytes, *, timeout_ms: float) -> bytes:
        """Sends `payload` to the node at `address` and returns its reply (or a NetworkError)."""

    async def aclose(self) -> None:  # noqa: B027 - nothing to release by default
        """Releases what the network holds open (idle connections)."""
