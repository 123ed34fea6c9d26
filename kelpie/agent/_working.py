"""Working memory: a per-agent key-value store whose entries may expire.

Keys are short strings, values any JSON value; an entry set with a TTL expires
`ttl_ms` after it was set, on the agent's wall clock (`env.clock`: virtual time
in the simulator). Expired entries read as absent and are removed when next
touched. Entries live in the agent actor's working memory under `w/<key>`, so a
write commits with the step that made it.
"""

from __future__ import annotations

import json
from typing import Any

from kelpie.agent._errors import InvalidAgentRequest
from kelpie.runtime import ActorContext

_WORKING = b"w/"
KEY_MAX_CHARS = 256
#: The largest value, as JSON text.
VALUE_MAX_BYTES = 64 * 1024


def _key(key: object) -> bytes:
    if not isinstance(key, str) or not key or len(key) > KEY_MAX_CHARS:
        raise InvalidAgentRequest(
            f"a working-memory key is a non-empty string of at most {KEY_MAX_CHARS} "
            f"characters, got {key!r}"
        )
    return _WORKING + key.encode()


def _now_ms(ctx: ActorContext) -> int:
    return ctx.env.clock.wall_ms()


def working_set(ctx: ActorContext, key: str, value: Any, *, ttl_ms: int | None = None) -> None:
    if ttl_ms is not None and (
        not isinstance(ttl_ms, int) or isinstance(ttl_ms, bool) or ttl_ms < 1
    ):
        raise InvalidAgentRequest(f"ttl must be a positive number of milliseconds, got {ttl_ms!r}")
    record = {"value": value, "expires": None if ttl_ms is None else _now_ms(ctx) + ttl_ms}
    try:
        data = json.dumps(record).encode()
    except (TypeError, ValueError) as exc:
        raise InvalidAgentRequest(f"a working-memory value must be JSON: {exc}") from None
    if len(data) > VALUE_MAX_BYTES:
        raise InvalidAgentRequest(
            f"a working-memory value of {len(data)} bytes is over the limit of {VALUE_MAX_BYTES}"
        )
    ctx.kv_set(_key(key), data)


async def working_get(ctx: ActorContext, key: str) -> tuple[bool, Any]:
    """(found, value); an expired entry is not found (and is removed)."""
    full = _key(key)
    raw = await ctx.kv_get(full)
    if raw is None:
        return False, None
    record = json.loads(raw)
    if record["expires"] is not None and record["expires"] <= _now_ms(ctx):
        ctx.kv_delete(full)
        return False, None
    return True, record["value"]


def working_delete(ctx: ActorContext, key: str) -> None:
    ctx.kv_delete(_key(key))


async def working_items(ctx: ActorContext) -> dict[str, Any]:
    """Every live entry, by key."""
    now = _now_ms(ctx)
    out: dict[str, Any] = {}
    for full, raw in await ctx.kv_items(_WORKING):
        record = json.loads(raw)
        if record["expires"] is not None and record["expires"] <= now:
            ctx.kv_delete(full)
            continue
        out[full[len(_WORKING) :].decode()] = record["value"]
    return out
