"""Agents: memory tiers, LLM providers and the agent loop (DESIGN.md §7, docs/AGENTS.md).

An agent is an actor (kelpie.runtime) that keeps its memory in the store and
thinks through an LLM that calls tools. `open_agents` runs a node of agents and
gives an `Agents` to talk to them. The providers (kelpie/agent/_openai.py and
_anthropic.py) are made by `make_llm_client`, which imports only the SDK it
needs (importing `anthropic` takes over a second).
"""

from kelpie.agent._agent import AgentServices
from kelpie.agent._blocks import (
    BLOCK_LIMIT_DEFAULT_CHARS,
    CORE_MEMORY_MAX_CHARS,
    Block,
    BlockError,
    BlockLimitExceeded,
    BlockNotFound,
    BlockReadOnly,
)
from kelpie.agent._embedding import (
    Embedder,
    EmbeddingBadResponse,
    EmbeddingError,
    EmbeddingModelCorrupt,
    EmbeddingModelMissing,
    EmbeddingRateLimited,
    EmbeddingRejected,
    EmbeddingUnavailable,
    FakeEmbedder,
    OpenAIEmbedder,
    OpenAIEmbedderConfig,
)
from kelpie.agent._errors import (
    AgentError,
    AgentExists,
    AgentNotFound,
    ApprovalPending,
    InvalidAgentRequest,
    MessageNotFound,
    NoApprovalPending,
    PassageNotFound,
)
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
from kelpie.agent._minilm import MiniLMEmbedder
from kelpie.agent._providers import make_llm_client
from kelpie.agent._retry import LLMRetryPolicy, RetryingLLM
from kelpie.agent._service import AGENT_RUNTIME_CONFIG, Agents, llm_clients, open_agents
from kelpie.agent._tools import AGENT_TYPES

__all__ = [
    "AGENT_RUNTIME_CONFIG",
    "AGENT_TYPES",
    "BLOCK_LIMIT_DEFAULT_CHARS",
    "CORE_MEMORY_MAX_CHARS",
    "AgentError",
    "AgentExists",
    "AgentNotFound",
    "AgentServices",
    "Agents",
    "ApprovalPending",
    "Block",
    "BlockError",
    "BlockLimitExceeded",
    "BlockNotFound",
    "BlockReadOnly",
    "Embedder",
    "EmbeddingBadResponse",
    "EmbeddingError",
    "EmbeddingModelCorrupt",
    "EmbeddingModelMissing",
    "EmbeddingRateLimited",
    "EmbeddingRejected",
    "EmbeddingUnavailable",
    "FakeEmbedder",
    "InvalidAgentRequest",
    "LLMBadResponse",
    "LLMClient",
    "LLMConfig",
    "LLMError",
    "LLMRateLimited",
    "LLMRejected",
    "LLMRequest",
    "LLMResponse",
    "LLMRetryPolicy",
    "LLMUnavailable",
    "MessageNotFound",
    "MiniLMEmbedder",
    "NoApprovalPending",
    "OpenAIEmbedder",
    "OpenAIEmbedderConfig",
    "PassageNotFound",
    "PromptMessage",
    "RetryingLLM",
    "ToolCall",
    "ToolSpec",
    "Usage",
    "llm_clients",
    "make_llm_client",
    "open_agents",
]
