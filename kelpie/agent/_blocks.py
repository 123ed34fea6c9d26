"""Core memory: blocks, their limits, and how they are rendered into the system prompt.

A block (Letta's `Block`) is a labelled piece of text an agent always sees:
`label`, `value`, `limit` (characters), `description`, `read_only`, `metadata`.
Every block is its own actor (kind "block"): one agent's blocks, and blocks
shared between agents (standalone blocks attached to several), are edited the
same way, one edit at a time, with the limit checked inside the block's own
invocation, so two agents appending at once can never push it over.

Limits, in characters (Letta counts characters): each block's `limit`
(default 5,000 for a new block), and `CORE_MEMORY_MAX_CHARS` (32 KiB) for all
the blocks one agent sees together. Every edit, from the REST API or from the
model's tools, is refused with a `BlockLimitExceeded` that says by how much;
nothing is ever truncated. LLM edits carry an idempotency key made from the
tool call, so an edit is applied once even when its step is run again after a
crash.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from kelpie.core import KelpieError
from kelpie.runtime import Actor, ActorContext, ActorId

#: The most characters all of one agent's core-memory blocks may hold together.
CORE_MEMORY_MAX_CHARS = 32 * 1024
#: A new block's limit when none is given (Letta's default).
BLOCK_LIMIT_DEFAULT_CHARS = 5_000
#: The longest label; labels are also XML-ish tags in the prompt, so they are identifiers.
LABEL_MAX_CHARS = 100

BLOCK_KIND = "block"


class BlockError(KelpieError):
    """A block operation was refused; the message says why and what to change."""


class BlockNotFound(BlockError):
    """No block has that id (or the agent has no block with that label)."""


class BlockLimitExceeded(BlockError):
    """An edit would make a block longer than its limit, or core memory longer than its total."""


class BlockReadOnly(BlockError):
    """The block is read-only for the agent's tools."""


def check_label(label: object) -> str:
    if (
        not isinstance(label, str)
        or not label
        or len(label) > LABEL_MAX_CHARS
        or not all(c.isalnum() or c in "_-" for c in label)
    ):
        raise BlockError(
            f"a block label is 1-{LABEL_MAX_CHARS} letters, digits, '_' or '-', got {label!r}"
        )
    return label


def _check_limit(limit: object) -> int:
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise BlockError(f"a block limit is a positive number of characters, got {limit!r}")
    if limit > CORE_MEMORY_MAX_CHARS:
        raise BlockLimitExceeded(
            f"a block limit of {limit} characters is over the core-memory total of "
            f"{CORE_MEMORY_MAX_CHARS}"
        )
    return limit


@attrs.frozen
class Block:
    """One core-memory block, as stored."""

    id: str
    label: str
    value: str = ""
    limit: int = BLOCK_LIMIT_DEFAULT_CHARS
    description: str = ""
    read_only: bool = False
    metadata: Mapping[str, Any] = attrs.field(factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "label": self.label,
            "value": self.value,
            "limit": self.limit,
            "description": self.description,
            "read_only": self.read_only,
            "metadata": dict(self.metadata),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Block:
        return cls(
            id=data["id"],
            label=data["label"],
            value=data["value"],
            limit=data["limit"],
            description=data.get("description") or "",
            read_only=bool(data.get("read_only", False)),
            metadata=dict(data.get("metadata") or {}),
        )

    @classmethod
    def new(
        cls,
        block_id: str,
        *,
        label: str,
        value: str = "",
        limit: int | None = None,
        description: str | None = None,
        read_only: bool = False,
        metadata: Mapping[str, Any] | None = None,
    ) -> Block:
        """A checked new block (`BlockError` on a bad field)."""
        if not isinstance(value, str):
            raise BlockError(f"a block value is a string, got {type(value).__name__}")
        if limit is None:
            limit = max(BLOCK_LIMIT_DEFAULT_CHARS, len(value))
        limit = _check_limit(limit)
        if len(value) > limit:
            raise BlockLimitExceeded(
                f"block {label!r}: a value of {len(value)} characters is over its limit of "
                f"{limit}; shorten it or raise the limit"
            )
        return cls(
            id=block_id,
            label=check_label(label),
            value=value,
            limit=limit,
            description=description or "",
            read_only=bool(read_only),
            metadata=dict(metadata or {}),
        )


def render_memory(blocks: Sequence[Block]) -> str:
    """Letta's rendering of core memory: every block with its description and size."""
    parts = [
        "<memory_blocks>",
        "The following memory blocks are currently engaged in your core memory unit:",
        "",
    ]
    for block in blocks:
        parts += [
            f"<{block.label}>",
            "<description>",
            block.description,
            "</description>",
            "<metadata>",
            f"- chars_current={len(block.value)}",
            f"- chars_limit={block.limit}",
            *(["- read_only=true"] if block.read_only else []),
            "</metadata>",
            "<value>",
            block.value,
            "</value>",
            f"</{block.label}>",
            "",
        ]
    parts.append("</memory_blocks>")
    return "\n".join(parts)


class BlockActor(Actor):
    """One block, edited one operation at a time. Messages are JSON objects with an "op".

    - `{"op": "create", "block": {...}}` -> the block (refused if it exists).
    - `{"op": "get"}` -> the block, or None.
    - `{"op": "update", "fields": {...}}` (REST: value, limit, description,
      read_only, metadata, label) -> the block.
    - `{"op": "append", "content", "room"}`, `{"op": "replace", "old", "new", "room"}`,
      `{"op": "rewrite", "value", "room"}`, `{"op": "insert", "content", "line", "room"}`
      (the model's edits; refused on a read-only block; `room` is the most
      characters the block may hold for the editing agent's core-memory total).
    - `{"op": "delete"}` -> None.
    """

    def __init__(self, actor_id: ActorId) -> None:
        self.actor_id = actor_id
        self.block: Block | None = None

    def dump_state(self) -> bytes | None:
        return None if self.block is None else json.dumps(self.block.to_json()).encode()

    def load_state(self, data: bytes | None) -> None:
        self.block = None if data is None else Block.from_json(json.loads(data))

    def _existing(self) -> Block:
        if self.block is None:
            raise BlockNotFound(f"block {self.actor_id.id} does not exist")
        return self.block

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        op = message.get("op") if isinstance(message, dict) else None
        if op == "get":
            return None if self.block is None else self.block.to_json()
        if op == "create":
            if self.block is not None:
                raise BlockError(f"block {self.actor_id.id} already exists")
            fields = dict(message["block"])
            fields.pop("id", None)
            self.block = Block.new(self.actor_id.id, **fields)
            return self.block.to_json()
        if op == "delete":
            self.block = None
            return None
        block = self._existing()
        if op == "update":
            self.block = _update(block, message["fields"])
            return self.block.to_json()
        if block.read_only:
            raise BlockReadOnly(
                f"block {block.label!r} is read-only; the agent cannot edit it (a user can, "
                "through the API)"
            )
        value = _edit(block, op, message)
        room = message.get("room")
        _check_fits(block, value, room if isinstance(room, int) else None)
        self.block = attrs.evolve(block, value=value)
        return self.block.to_json()


def _update(block: Block, fields: Mapping[str, Any]) -> Block:
    unknown = sorted(
        set(fields) - {"value", "limit", "description", "read_only", "metadata", "label"}
    )
    if unknown:
        raise BlockError(f"unknown block fields: {', '.join(unknown)}")
    merged = block.to_json() | {k: v for k, v in fields.items() if v is not None}
    merged.pop("id")
    return Block.new(block.id, **merged)


def _edit(block: Block, op: str | None, message: Mapping[str, Any]) -> str:
    if op == "append":
        content = _text(message, "content")
        return f"{block.value}\n{content}" if block.value else content
    if op == "replace":
        old, new = _text(message, "old"), _text(message, "new")
        if not old:
            raise BlockError("old_content must not be empty: say which text to replace")
        count = block.value.count(old)
        if count == 0:
            raise BlockError(
                f"old_content {old!r} is not in block {block.label!r}; it must match the "
                "block's text exactly"
            )
        if count > 1 and not message.get("all"):
            raise BlockError(
                f"old_content {old!r} appears {count} times in block {block.label!r}; "
                "give a longer, unique piece of text"
            )
        return block.value.replace(old, new)
    if op == "rewrite":
        return _text(message, "value")
    if op == "insert":
        content = _text(message, "content")
        line = message.get("line", -1)
        if not isinstance(line, int) or isinstance(line, bool):
            raise BlockError(f"insert_line must be an integer, got {line!r}")
        lines = block.value.split("\n") if block.value else []
        at = len(lines) if line < 0 or line > len(lines) else line
        return "\n".join([*lines[:at], content, *lines[at:]])
    raise BlockError(f"unknown block operation {op!r}")


def _text(message: Mapping[str, Any], name: str) -> str:
    value = message.get(name)
    if not isinstance(value, str):
        raise BlockError(f"{name} must be a string, got {type(value).__name__}")
    return value


def _check_fits(block: Block, value: str, room: int | None) -> None:
    if len(value) > block.limit:
        raise BlockLimitExceeded(
            f"block {block.label!r} would hold {len(value)} characters, over its limit of "
            f"{block.limit} (it holds {len(block.value)} now); nothing was changed. Make the "
            "text shorter, or replace old content instead of appending"
        )
    if room is not None and len(value) > room:
        raise BlockLimitExceeded(
            f"core memory would hold {len(value) - room} characters more than its total of "
            f"{CORE_MEMORY_MAX_CHARS}; nothing was changed. Make the text shorter"
        )


def block_actor_id(block_id: str) -> ActorId:
    return ActorId(BLOCK_KIND, block_id)
