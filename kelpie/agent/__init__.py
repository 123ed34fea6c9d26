"""Agents: memory tiers, LLM providers and the agent loop (DESIGN.md §7).

An agent is an actor (kelpie.runtime) that keeps its memory in the store and
thinks through an LLM that calls tools.
"""

from kelpie.agent._llm import (
    LLMBadResponse,
    LLMClient,
    LLMConfig,
    LLMError,
    LLMRateLimited,
    LLMRejected,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    PromptMessage,
    ToolCall,
    ToolSpec,
    Usage,
)

__all__ = [
    "LLMBadResponse",
    "LLMClient",
    "LLMConfig",
    "LLMError",
    "LLMRateLimited",
    "LLMRejected",
    "LLMRequest",
    "LLMResponse",
    "LLMUnavailable",
    "PromptMessage",
    "ToolCall",
    "ToolSpec",
    "Usage",
]
