"""Building the model's prompt: pure functions of the agent's memory (no I/O).

The system prompt is the agent's instructions, then every core-memory block
(kelpie/agent/_blocks.py `render_memory`), then what is out of sight: how
many messages recall holds beyond the window and how many passages archival
memory holds. The messages are the summary of evicted turns (if any) and the
prompt window, in order.

The size estimate is characters / 4 (`CHARS_PER_TOKEN`): providers count
tokens differently, so the window is kept under `SUMMARIZE_AT` of the room
the context window leaves after the reply's `max_tokens`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import attrs

from kelpie.agent._blocks import Block, render_memory
from kelpie.agent._letta import iso_ms
from kelpie.agent._llm import LLMConfig, LLMRequest, PromptMessage, ToolSpec
from kelpie.agent._recall import Message

#: The prompt is summarised when it would pass this share of the room it has...
SUMMARIZE_AT = 0.9
#: ...down to about this share.
SUMMARIZE_TO = 0.5
#: Rough characters per token, for the prompt-size estimate.
CHARS_PER_TOKEN = 4

SUMMARY_HEADER = "[Summary of the earlier conversation]"


def system_prompt(
    instructions: str, blocks: Sequence[Block], *, now_ms: int, in_recall: int, passages: int
) -> str:
    metadata = "\n".join(
        [
            "<memory_metadata>",
            f"- The current time is {iso_ms(now_ms)}",
            f"- {in_recall} previous messages are stored in recall memory (not shown; "
            "use conversation_search)",
            f"- {passages} passages are stored in archival memory (use archival_memory_search)",
            "</memory_metadata>",
        ]
    )
    return f"{instructions}\n\n{render_memory(blocks)}\n\n{metadata}"


def fixed_chars(system: str, tools: Sequence[ToolSpec]) -> int:
    """The characters every request of this step carries besides its messages."""
    return len(system) + len(json.dumps([attrs.asdict(t) for t in tools]))


def room_tokens(config: LLMConfig) -> int:
    """How many tokens the prompt may take: the context window less the reply's room."""
    return config.context_window - config.max_tokens


def estimate_tokens(fixed: int, summary: str, window: Sequence[Message]) -> int:
    return (fixed + len(summary) + sum(m.size for m in window)) // CHARS_PER_TOKEN


def build_request(
    config: LLMConfig,
    system: str,
    tools: Sequence[ToolSpec],
    summary: str,
    window: Sequence[Message],
) -> LLMRequest:
    messages = [m.prompt for m in window]
    earlier = window[0].seq if window else 0
    if summary or earlier:
        note = (
            f"({earlier} earlier messages are in recall memory; search them with "
            "conversation_search)"
        )
        messages.insert(0, PromptMessage("user", f"{SUMMARY_HEADER}\n{summary}\n{note}".strip()))
    return LLMRequest(
        model=config.model,
        system=system,
        messages=tuple(messages),
        tools=tuple(tools),
        max_tokens=config.max_tokens,
        temperature=config.temperature,
    )
