"""The actor the multi-process cluster tests run in `kelpie node` processes (--actor)."""

from __future__ import annotations

import json
from typing import Any

from kelpie.runtime import Actor, ActorContext, ActorId


class Counter(Actor):
    """`increment` adds one and returns the new value; `get` returns it; `where` names the node."""

    def __init__(self, actor_id: ActorId) -> None:
        self.value = 0

    def dump_state(self) -> bytes | None:
        return json.dumps(self.value).encode()

    def load_state(self, data: bytes | None) -> None:
        self.value = 0 if data is None else json.loads(data)

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "get":
            return self.value
        if message == "where":
            return ctx.env.node
        if message == "increment":
            self.value += 1
            return self.value
        raise ValueError(f"unknown message {message!r}")
