"""The actor the actor benchmarks run, in the benchmark process and in `kelpie node` children.

`kelpie node --actor _bench_actors:Counter` loads it with bench/ on PYTHONPATH.

Messages: "increment" adds one to the counter and commits it; "where" answers
the name of the node the actor runs on (`ctx.env.node`); anything else ("get")
answers the counter and changes nothing, so nothing is committed (a no-op).
"""

from __future__ import annotations

import json
from typing import Any

from kelpie.runtime import Actor, ActorContext, ActorId


class Counter(Actor):
    """A counter whose state is its value, as JSON."""

    def __init__(self, actor_id: ActorId) -> None:
        self.value = 0

    def dump_state(self) -> bytes | None:
        return json.dumps(self.value).encode()

    def load_state(self, data: bytes | None) -> None:
        self.value = 0 if data is None else json.loads(data)

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "increment":
            self.value += 1
        elif message == "where":
            return ctx.env.node
        return self.value
