"""Core memory: blocks, their limits, and how they are rendered into the system prompt.

A block (Letta's `Block`) is a labelled piece of text an agent always sees:
`label`, `value`, `limit` (characters), `description`, `read_only`, `metadata`.
Blocks are records of the store, not of one agent: an agent's own blocks and
standalone blocks shared between agents are the same thing, attached to one
agent or to several.

Limits, in characters (Letta counts characters): each block's `limit`
(default 5,000 for a new block), and `CORE_MEMORY_MAX_CHARS` (32 KiB) for all
the blocks one agent sees together. Every edit, from the REST API or from the
model's tools, runs in ONE serializable transaction that reads the block and the
core-memory ledger of every agent it is attached to (`core/<agent>`: the size of
each of that agent's blocks), checks both limits and writes them all. Two edits
of blocks of the same agent therefore conflict and run one after the other, so
no interleaving can take an agent past its total; an edit that would is refused
with `BlockLimitExceeded` saying by how much, and nothing is truncated.

The model's edits carry an idempotency key made from the tool call; the block
remembers its last `APPLIED_KEYS_MAX` keys, so an edit run again after a crash, or
retried after `commit_unknown_result`, is applied once.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from kelpie.core import KelpieError
from kelpie.env import Rng
from kelpie.storage import RetryPolicy, Store, Transaction, pack, read_blob, transact, write_blob

#: The most characters all of one agent's core-memory blocks may hold together.
CORE_MEMORY_MAX_CHARS = 32 * 1024
#: A new block's limit when none is given (Letta's default).
BLOCK_LIMIT_DEFAULT_CHARS = 5_000
#: The longest label; labels are also XML-ish tags in the prompt, so they are identifiers.
LABEL_MAX_CHARS = 100

#: How many recent edit keys a block remembers (an edit with one of them is not redone).
APPLIED_KEYS_MAX = 64
#: How block transactions retry conflicts and outages.
BLOCK_RETRY = RetryPolicy(attempts_max=30, backoff_initial_ms=2, backoff_max_ms=200)


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


def _check_fits(block: Block, value: str) -> None:
    if len(value) > block.limit:
        raise BlockLimitExceeded(
            f"block {block.label!r} would hold {len(value)} characters, over its limit of "
            f"{block.limit} (it holds {len(block.value)} now); nothing was changed. Make the "
            "text shorter, or replace old content instead of appending"
        )


def _block_key(block_id: str) -> bytes:
    return pack(("block", block_id))


def _ledger_key(agent_id: str) -> bytes:
    return pack(("core", agent_id))


async def _read(tr: Transaction, block_id: str) -> dict[str, Any] | None:
    data = await read_blob(tr, _block_key(block_id))
    return None if data is None else dict(json.loads(data))


def _write(tr: Transaction, record: Mapping[str, Any]) -> None:
    write_blob(tr, _block_key(record["id"]), json.dumps(record).encode())


async def _ledger(tr: Transaction, agent_id: str) -> dict[str, int]:
    raw = await tr.get(_ledger_key(agent_id))
    return {} if raw is None else dict(json.loads(raw))


async def _resize(tr: Transaction, record: Mapping[str, Any], new_len: int) -> None:
    """Checks `new_len` against the total of every agent the block is attached to, and
    records it in their ledgers."""
    block_id = record["id"]
    for agent_id in record["agents"]:
        ledger = await _ledger(tr, agent_id)
        others = sum(size for other, size in ledger.items() if other != block_id)
        if others + new_len > CORE_MEMORY_MAX_CHARS:
            raise BlockLimitExceeded(
                f"core memory of agent {agent_id} would hold {others + new_len} characters, "
                f"over its total of {CORE_MEMORY_MAX_CHARS} (its other blocks hold {others}); "
                "nothing was changed. Make the text shorter"
            )
        ledger[block_id] = new_len
        tr.set(_ledger_key(agent_id), json.dumps(ledger).encode())


async def _check_label_free(tr: Transaction, record: Mapping[str, Any], label: str) -> None:
    for agent_id in record["agents"]:
        for other in await _ledger(tr, agent_id):
            sibling = await _read(tr, other) if other != record["id"] else None
            if sibling is not None and sibling["label"] == label:
                raise BlockError(
                    f"agent {agent_id} already has a block labelled {label!r}; labels of one "
                    "agent's blocks must differ"
                )


def _record(block: Block, agents: list[str], applied: list[str]) -> dict[str, Any]:
    return block.to_json() | {"agents": agents, "applied": applied[-APPLIED_KEYS_MAX:]}


class BlockStore:
    """The blocks of one store, read and edited in transactions (see the module docstring)."""

    def __init__(self, store: Store, rng: Rng, policy: RetryPolicy = BLOCK_RETRY) -> None:
        self._store = store
        self._rng = rng
        self._policy = policy

    async def _run(self, fn: Any) -> Any:
        return await transact(self._store, fn, rng=self._rng, policy=self._policy)

    async def create(self, block: Block, *, attach_to: str | None = None) -> Block:
        """Stores a new block (made with `Block.new`); a retry of the same creation is a no-op."""

        async def create(tr: Transaction) -> Block:
            record = await _read(tr, block.id)
            if record is not None:
                if record["label"] != block.label:
                    raise BlockError(f"block {block.id} already exists")
                return Block.from_json(record)
            _write(tr, _record(block, [], []))
            return block

        made: Block = await self._run(create)
        if attach_to is not None:
            await self.attach(attach_to, [block.id])
        return made

    async def get(self, block_id: str) -> Block | None:
        async def get(tr: Transaction) -> dict[str, Any] | None:
            return await _read(tr, block_id)

        record = await self._run(get)
        return None if record is None else Block.from_json(record)

    async def get_many(self, block_ids: Sequence[str]) -> list[Block]:
        """The blocks that exist, in the order asked (one consistent snapshot)."""

        async def get(tr: Transaction) -> list[dict[str, Any]]:
            records = [await _read(tr, block_id) for block_id in block_ids]
            return [r for r in records if r is not None]

        return [Block.from_json(r) for r in await self._run(get)]

    async def attach(self, agent_id: str, block_ids: Sequence[str]) -> list[Block]:
        """Attaches blocks to an agent, within its core-memory total. Idempotent."""

        async def attach(tr: Transaction) -> list[Block]:
            ledger = await _ledger(tr, agent_id)
            blocks = []
            for block_id in block_ids:
                record = await _read(tr, block_id)
                if record is None:
                    raise BlockNotFound(f"block {block_id!r} does not exist")
                if agent_id not in record["agents"]:
                    record["agents"] = [*record["agents"], agent_id]
                    _write(tr, record)
                ledger[block_id] = len(record["value"])
                blocks.append(Block.from_json(record))
            labels = [b.label for b in blocks]
            if len(set(labels)) != len(labels):
                raise BlockError(f"an agent's blocks need distinct labels, got {labels}")
            total = sum(ledger.values())
            if total > CORE_MEMORY_MAX_CHARS:
                raise BlockLimitExceeded(
                    f"the blocks hold {total} characters together, over the core-memory "
                    f"total of {CORE_MEMORY_MAX_CHARS}"
                )
            tr.set(_ledger_key(agent_id), json.dumps(ledger).encode())
            return blocks

        result: list[Block] = await self._run(attach)
        return result

    async def update(self, block_id: str, fields: Mapping[str, Any]) -> Block:
        """A user's edit (REST): any of value, limit, description, read_only, metadata, label."""

        async def update(tr: Transaction) -> Block:
            record = await _read(tr, block_id)
            if record is None:
                raise BlockNotFound(f"block {block_id!r} does not exist")
            block = _update(Block.from_json(record), fields)
            if block.label != record["label"]:
                await _check_label_free(tr, record, block.label)
            await _resize(tr, record, len(block.value))
            _write(tr, _record(block, record["agents"], record["applied"]))
            return block

        result: Block = await self._run(update)
        return result

    async def edit(self, block_id: str, edit: Mapping[str, Any], *, key: str) -> Block:
        """The model's edit (`{"op": "append" | "replace" | "rewrite" | "insert", ...}`),
        applied once per `key`."""

        async def apply(tr: Transaction) -> Block:
            record = await _read(tr, block_id)
            if record is None:
                raise BlockNotFound(f"block {block_id!r} does not exist")
            block = Block.from_json(record)
            if key in record["applied"]:
                return block
            if block.read_only:
                raise BlockReadOnly(
                    f"block {block.label!r} is read-only; the agent cannot edit it (a user "
                    "can, through the API)"
                )
            value = _edit(block, edit.get("op"), edit)
            _check_fits(block, value)
            await _resize(tr, record, len(value))
            block = attrs.evolve(block, value=value)
            _write(tr, _record(block, record["agents"], [*record["applied"], key]))
            return block

        result: Block = await self._run(apply)
        return result
