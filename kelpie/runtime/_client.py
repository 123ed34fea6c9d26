"""`NodeClient`: calls actors from outside the cluster, through any node, over the node network.

A client holds the addresses of some nodes. Each call goes to one of them as a
routed request (kelpie/runtime/_wire.py); that node delivers it wherever the
actor lives, exactly as `ActorRuntime.invoke` would, and sends the reply back.
If a node cannot be reached (nothing delivered), the client tries the next
address. What a failure means is what it means for `invoke`; in particular a
`DeliveryUnknown` (the node did not answer in time: it may have died after
taking the call) may have been applied, so retry it with the same idempotency
key, through any node.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kelpie.core import ConfigError, KelpieError
from kelpie.env import NodeNetwork, Unreachable
from kelpie.runtime._errors import ActorUnavailable
from kelpie.runtime._ids import ActorId
from kelpie.runtime._wire import (
    NotHandled,
    Redirect,
    Value,
    check_idempotency_key,
    decode_reply,
    encode_request,
    encode_value,
)


class NodeClient:
    """Calls actors through the nodes at `addresses`, first reachable first."""

    def __init__(
        self, network: NodeNetwork, addresses: Sequence[str], *, timeout_ms: float = 75_000
    ) -> None:
        if not addresses:
            raise ConfigError("a NodeClient needs at least one node address")
        self._network = network
        self._addresses = list(addresses)
        self._timeout_ms = timeout_ms

    async def invoke(
        self,
        actor_id: ActorId,
        message: Any,
        *,
        idempotency_key: str | None = None,
        address: str | None = None,
    ) -> Any:
        """Delivers `message` to the actor and returns its reply (see `ActorRuntime.invoke`).

        Tries `address` first when given, then the others in order; raises the last
        refusal (`Unreachable`, or a node still starting) if none took the call.
        """
        if not isinstance(actor_id, ActorId):
            raise TypeError(f"invoke takes an ActorId, got {type(actor_id).__name__}")
        check_idempotency_key(idempotency_key)
        payload = encode_request(
            actor_id,
            encode_value(message, f"the message to {actor_id}"),
            idempotency_key,
            route=True,
        )
        order = [address] if address is not None else []
        order += [a for a in self._addresses if a != address]
        last: KelpieError | None = None
        for target in order:
            try:
                raw = await self._network.request(target, payload, timeout_ms=self._timeout_ms)
            except Unreachable as exc:
                last = exc
                continue
            result = decode_reply(raw)
            if isinstance(result, Value):
                return result.value
            if isinstance(result, NotHandled):  # e.g. a node still starting: try the next
                last = result.error
                continue
            if isinstance(result, Redirect):  # a routed call is never redirected
                raise ActorUnavailable(f"node {target} redirected a client's call to {actor_id}")
            raise result
        assert last is not None
        raise last
