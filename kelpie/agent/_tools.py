"""The tools the model sees: Letta's names and argument schemas, and which agent type gets which.

Memory tools (executed by the agent against its own memory, kelpie/agent/_agent.py):
- every type: `conversation_search`, `archival_memory_insert`, `archival_memory_search`;
- `memgpt_agent`: `send_message` (its only way to talk to the user),
  `core_memory_append`, `core_memory_replace`, `pause_heartbeats`; every tool
  but `send_message`'s reply path takes `request_heartbeat` to ask for another step;
- `letta_v1_agent` (Letta's newer memory tools): `memory_insert`,
  `memory_replace`, `memory_rethink`;
- `react_agent`: the classic memory tools (`core_memory_append`,
  `core_memory_replace`) without heartbeats: it reasons and acts in a plain
  tool loop and answers in text.

Client tools (declared by the client with a request) are executed by the client:
the turn pauses for their results (kelpie/agent/_loop.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from kelpie.agent._llm import ToolSpec

AgentType = Literal["memgpt_agent", "letta_v1_agent", "react_agent"]
AGENT_TYPES: tuple[AgentType, ...] = ("memgpt_agent", "letta_v1_agent", "react_agent")

SEND_MESSAGE = "send_message"
HEARTBEAT_ARG = "request_heartbeat"

_HEARTBEAT_PROPERTY = {
    "type": "boolean",
    "description": (
        "Request an immediate heartbeat after the function runs. Set to true if you want to "
        "chain several function calls before you answer."
    ),
}


def _schema(properties: Mapping[str, Any], required: tuple[str, ...]) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties), "required": list(required)}


_STR = {"type": "string"}

_SPECS: dict[str, tuple[str, dict[str, Any], tuple[str, ...]]] = {
    SEND_MESSAGE: (
        "Sends a message to the human user.",
        {"message": _STR | {"description": "Message contents. All unicode is supported."}},
        ("message",),
    ),
    "core_memory_append": (
        "Append to the contents of a core memory block.",
        {
            "label": _STR | {"description": "The label of the block to edit."},
            "content": _STR | {"description": "Content to write to the memory."},
        },
        ("label", "content"),
    ),
    "core_memory_replace": (
        "Replace the contents of a core memory block. To delete memories, use an empty "
        "string for new_content.",
        {
            "label": _STR | {"description": "The label of the block to edit."},
            "old_content": _STR | {"description": "The text to replace (must match exactly)."},
            "new_content": _STR | {"description": "The text to write in its place."},
        },
        ("label", "old_content", "new_content"),
    ),
    "memory_insert": (
        "Insert text at a line of a memory block.",
        {
            "label": _STR | {"description": "The label of the block to edit."},
            "new_str": _STR | {"description": "The text to insert."},
            "insert_line": {
                "type": "integer",
                "description": "The line after which to insert (0: the start; -1: the end).",
            },
        },
        ("label", "new_str"),
    ),
    "memory_replace": (
        "Replace a unique piece of text in a memory block.",
        {
            "label": _STR | {"description": "The label of the block to edit."},
            "old_str": _STR | {"description": "The text to replace (must appear exactly once)."},
            "new_str": _STR | {"description": "The new text (empty to delete)."},
        },
        ("label", "old_str", "new_str"),
    ),
    "memory_rethink": (
        "Rewrite a whole memory block, to reorganise or condense it.",
        {
            "label": _STR | {"description": "The label of the block to rewrite."},
            "new_memory": _STR | {"description": "The block's new contents."},
        },
        ("label", "new_memory"),
    ),
    "archival_memory_insert": (
        "Add a passage to archival memory, for later semantic search.",
        {
            "content": _STR | {"description": "The passage to store."},
            "tags": {
                "type": "array",
                "items": _STR,
                "description": "Optional tags to categorise the passage.",
            },
        },
        ("content",),
    ),
    "archival_memory_search": (
        "Search archival memory by meaning (semantic search), with optional filters.",
        {
            "query": _STR | {"description": "What to look for."},
            "tags": {
                "type": "array",
                "items": _STR,
                "description": "Only passages with these tags.",
            },
            "tag_match_mode": {
                "type": "string",
                "enum": ["any", "all"],
                "description": "Whether a passage needs any or all of the tags.",
            },
            "top_k": {"type": "integer", "description": "How many results (default 5)."},
            "start_datetime": _STR
            | {"description": "Only passages from this ISO 8601 time on (inclusive)."},
            "end_datetime": _STR
            | {"description": "Only passages up to this ISO 8601 time (inclusive)."},
        },
        ("query",),
    ),
    "conversation_search": (
        "Search the whole conversation history (recall memory) by text, newest first.",
        {
            "query": _STR | {"description": "Words the messages must contain."},
            "roles": {
                "type": "array",
                "items": {"type": "string", "enum": ["assistant", "user", "tool"]},
                "description": "Only messages from these roles.",
            },
            "limit": {"type": "integer", "description": "How many results (default 10)."},
            "start_date": _STR | {"description": "Only messages from this ISO 8601 time on."},
            "end_date": _STR | {"description": "Only messages up to this ISO 8601 time."},
        },
        ("query",),
    ),
    "pause_heartbeats": (
        "Stop heartbeats for a while: tool calls will not trigger another step until then.",
        {"minutes": {"type": "integer", "description": "For how many minutes (at most 360)."}},
        ("minutes",),
    ),
}

_COMMON = ("conversation_search", "archival_memory_insert", "archival_memory_search")
_BY_TYPE: dict[str, tuple[str, ...]] = {
    "memgpt_agent": (
        SEND_MESSAGE,
        "core_memory_append",
        "core_memory_replace",
        *_COMMON,
        "pause_heartbeats",
    ),
    "letta_v1_agent": ("memory_insert", "memory_replace", "memory_rethink", *_COMMON),
    "react_agent": ("core_memory_append", "core_memory_replace", *_COMMON),
}

#: Every built-in tool's name.
BUILTIN_TOOLS: tuple[str, ...] = tuple(_SPECS)


def base_tools(agent_type: str) -> tuple[str, ...]:
    """The built-in tools an agent of `agent_type` gets by default."""
    return _BY_TYPE[agent_type]


def uses_heartbeats(agent_type: str) -> bool:
    return agent_type == "memgpt_agent"


def builtin_spec(name: str, agent_type: str) -> ToolSpec:
    """The schema the model sees; memgpt tools (but send_message) take `request_heartbeat`."""
    description, properties, required = _SPECS[name]
    if uses_heartbeats(agent_type) and name != SEND_MESSAGE:
        properties = properties | {HEARTBEAT_ARG: _HEARTBEAT_PROPERTY}
        required = (*required, HEARTBEAT_ARG)
    return ToolSpec(name, description, _schema(properties, required))


def client_spec(name: str, description: str, parameters: Mapping[str, Any] | None) -> ToolSpec:
    return ToolSpec(name, description, dict(parameters or _schema({}, ())))
