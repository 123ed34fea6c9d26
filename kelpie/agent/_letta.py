"""Stored messages as Letta's API messages (`LettaMessage`: user_message, assistant_message, ...).

One stored message may become several API messages (an assistant message with
text and two tool calls is a reasoning or assistant message and two tool-call
messages); they share the stored message's id, as in Letta. For a memgpt
agent, the model's own text is its inner monologue (`reasoning_message`) and
`send_message` calls are what the user sees (`assistant_message`); for the
other types the model's text is the reply.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Iterable
from typing import Any

from kelpie.agent._recall import Message
from kelpie.agent._tools import SEND_MESSAGE, uses_heartbeats


def iso_ms(ms: int) -> str:
    """A timestamp in milliseconds as ISO 8601 UTC (Letta's `date`)."""
    moment = datetime.datetime.fromtimestamp(ms / 1000, tz=datetime.UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def parse_iso_ms(text: str) -> int:
    """ISO 8601 (a date, or a date and time; no zone means UTC) as milliseconds."""
    moment = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return int(moment.timestamp() * 1000)


def send_message_text(arguments: str) -> str | None:
    try:
        args = json.loads(arguments)
    except ValueError:
        return None
    message = args.get("message") if isinstance(args, dict) else None
    return message if isinstance(message, str) else None


def to_letta(
    message: Message, agent_type: str, client_tools: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """The API messages one stored message shows as (none for the loop's own bookkeeping)."""
    base = {"id": message.id, "date": iso_ms(message.created_at_ms), "run_id": message.run_id}
    if message.otid:
        base["otid"] = message.otid
    if message.kind in ("heartbeat", "summary"):
        return []
    if message.role == "user":
        return [base | {"message_type": "user_message", "content": message.content}]
    if message.role == "system":
        return [base | {"message_type": "system_message", "content": message.content}]
    if message.role == "tool":
        if message.name == SEND_MESSAGE and message.status == "success":
            return []  # its call shows as the assistant_message; a failed one shows as a call
        return [
            base
            | {
                "message_type": "tool_return_message",
                "tool_return": message.content,
                "status": message.status or "success",
                "tool_call_id": message.tool_call_id,
                "name": message.name,
            }
        ]
    out: list[dict[str, Any]] = []
    memgpt = uses_heartbeats(agent_type)
    if message.content:
        if memgpt and message.tool_calls:
            out.append(base | {"message_type": "reasoning_message", "reasoning": message.content})
        else:
            out.append(base | {"message_type": "assistant_message", "content": message.content})
    client = set(client_tools)
    for call in message.tool_calls:
        text = send_message_text(call.arguments) if call.name == SEND_MESSAGE and memgpt else None
        if text is not None:
            out.append(base | {"message_type": "assistant_message", "content": text})
            continue
        payload = {"name": call.name, "arguments": call.arguments, "tool_call_id": call.id}
        kind = "approval_request_message" if call.name in client else "tool_call_message"
        out.append(base | {"message_type": kind, "tool_call": payload, "tool_calls": [payload]})
    return out
