"""Recall memory: every message of an agent's history, kept durably, paged and searchable.

Messages live in the agent actor's working memory (so each is committed with
the step that produced it), one row per message under `m/<seq>` (8-byte
big-endian sequence number, so key order is history order) and an index row
`mi/<id>` -> seq. Nothing is ever dropped: the prompt window
(kelpie/agent/_context.py) decides which messages the model sees; recall keeps
them all.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence
from typing import Any, Literal

import attrs

from kelpie.agent._errors import MessageNotFound
from kelpie.agent._llm import PromptMessage, ToolCall
from kelpie.runtime import ActorContext

MessageRole = Literal["system", "user", "assistant", "tool"]

#: What a stored message is, beyond its role (empty: an ordinary message).
#: "heartbeat": the loop's automated "continue" message; "summary": the summary of
#: evicted messages; "approval": a client's answer to an approval request.
MessageKind = Literal["", "heartbeat", "summary", "approval", "error"]

_MSG = b"m/"
_MSG_ID = b"mi/"
_CHUNK = b"mc/"

#: A stored message row holds at most this many bytes; a longer message is split into
#: rows of this size (a row of the store holds at most 100,000 bytes).
CHUNK_BYTES = 90_000
#: The largest message, as stored JSON: a longer user message or tool result is refused.
MESSAGE_MAX_BYTES = 1024 * 1024


def _seq_key(seq: int) -> bytes:
    return _MSG + seq.to_bytes(8, "big")


@attrs.frozen
class Message:
    """One stored message (Letta's internal message)."""

    id: str
    seq: int
    role: MessageRole
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    #: A tool result's tool name, or a user message's sender name.
    name: str = ""
    created_at_ms: int = 0
    run_id: str = ""
    #: The client's offline id for a user message (Letta's `otid`).
    otid: str = ""
    kind: MessageKind = ""
    #: A tool result's status: "success" or "error".
    status: str = ""

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"id": self.id, "seq": self.seq, "role": self.role}
        for name in ("content", "tool_call_id", "name", "run_id", "otid", "kind", "status"):
            value = getattr(self, name)
            if value:
                data[name] = value
        if self.tool_calls:
            data["tool_calls"] = [[c.id, c.name, c.arguments] for c in self.tool_calls]
        data["at"] = self.created_at_ms
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Message:
        return cls(
            id=data["id"],
            seq=data["seq"],
            role=data["role"],
            content=data.get("content", ""),
            tool_calls=tuple(ToolCall(*c) for c in data.get("tool_calls", ())),
            tool_call_id=data.get("tool_call_id", ""),
            name=data.get("name", ""),
            created_at_ms=data["at"],
            run_id=data.get("run_id", ""),
            otid=data.get("otid", ""),
            kind=data.get("kind", ""),
            status=data.get("status", ""),
        )

    @functools.cached_property
    def prompt(self) -> PromptMessage:
        """This message as the model sees it (made once: the prompt is rebuilt every step)."""
        return self.to_prompt()

    @functools.cached_property
    def size(self) -> int:
        """`chars()`, made once."""
        return self.chars()

    def to_prompt(self) -> PromptMessage:
        if self.role == "tool":
            return PromptMessage(
                "tool", self.content, tool_call_id=self.tool_call_id, name=self.name
            )
        if self.role == "assistant":
            return PromptMessage("assistant", self.content, tool_calls=self.tool_calls)
        return PromptMessage("user", self.content)

    def chars(self) -> int:
        """A size estimate for the prompt window."""
        return (
            len(self.content)
            + sum(len(c.name) + len(c.arguments) + 16 for c in self.tool_calls)
            + len(self.tool_call_id)
            + 8
        )


def encoded_size(message: Message) -> int:
    return len(json.dumps(message.to_json()).encode())


def store_message(ctx: ActorContext, message: Message) -> None:
    """Adds `message` to recall when the current step commits (split if it is long)."""
    data = json.dumps(message.to_json()).encode()
    assert len(data) <= MESSAGE_MAX_BYTES, "callers refuse or cut longer messages"
    if len(data) <= CHUNK_BYTES:
        ctx.kv_set(_seq_key(message.seq), data)
    else:
        pieces = [data[i : i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)]
        head = {"chunks": len(pieces), "seq": message.seq}
        ctx.kv_set(_seq_key(message.seq), json.dumps(head).encode())
        for i, piece in enumerate(pieces):
            ctx.kv_set(_chunk_key(message.seq, i), piece)
    ctx.kv_set(_MSG_ID + message.id.encode(), str(message.seq).encode())


def _chunk_key(seq: int, index: int) -> bytes:
    return _CHUNK + seq.to_bytes(8, "big") + index.to_bytes(4, "big")


async def _decode(ctx: ActorContext, value: bytes) -> Message:
    data = json.loads(value)
    if "id" not in data:  # a long message's head row: its JSON is in its chunk rows
        seq = data["seq"]
        rows = await ctx.kv_range(_chunk_key(seq, 0), _chunk_key(seq + 1, 0))
        assert len(rows) == data["chunks"], (seq, len(rows), data)
        data = json.loads(b"".join(piece for _, piece in rows))
    return Message.from_json(data)


async def messages_from(ctx: ActorContext, seq: int, *, limit: int = 0) -> list[Message]:
    """The messages with sequence number >= `seq`, oldest first (at most `limit`)."""
    rows = await ctx.kv_range(_seq_key(seq), _seq_key(2**63), limit=limit)
    return [await _decode(ctx, value) for _, value in rows]


async def get_message(ctx: ActorContext, message_id: str) -> Message | None:
    raw = await ctx.kv_get(_MSG_ID + message_id.encode())
    if raw is None:
        return None
    value = await ctx.kv_get(_seq_key(int(raw)))
    return None if value is None else await _decode(ctx, value)


async def page_messages(
    ctx: ActorContext,
    *,
    after: str | None = None,
    before: str | None = None,
    limit: int = 50,
    ascending: bool = True,
) -> list[Message]:
    """A page of the history: ids after/before are exclusive bounds (Letta's list semantics)."""
    begin, end = 0, 2**63
    for bound, is_after in ((after, True), (before, False)):
        if bound is None:
            continue
        raw = await ctx.kv_get(_MSG_ID + bound.encode())
        if raw is None:
            raise MessageNotFound(f"no message {bound!r} in this agent's history")
        if is_after == ascending:
            begin = max(begin, int(raw) + 1)
        else:
            end = min(end, int(raw))
    rows = await ctx.kv_range(_seq_key(begin), _seq_key(end), limit=limit, reverse=not ascending)
    return [await _decode(ctx, value) for _, value in rows]


async def search_messages(
    ctx: ActorContext,
    *,
    query: str = "",
    roles: Sequence[str] = (),
    start_ms: int | None = None,
    end_ms: int | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[Message], int]:
    """Messages whose text contains every word of `query` (any case), newest first.

    Returns (the page, how many matched in all). Heartbeats and summaries are not
    searched: they are the loop's own words.
    """
    words = [w for w in query.lower().split() if w]
    matches: list[Message] = []
    rows = await ctx.kv_items(_MSG)
    for _, value in reversed(rows):
        message = await _decode(ctx, value)
        if message.kind in ("heartbeat", "summary"):
            continue
        if roles and message.role not in roles:
            continue
        if start_ms is not None and message.created_at_ms < start_ms:
            continue
        if end_ms is not None and message.created_at_ms > end_ms:
            continue
        text = (message.content + " " + " ".join(c.arguments for c in message.tool_calls)).lower()
        if all(word in text for word in words):
            matches.append(message)
    return matches[offset : offset + limit], len(matches)
