"""What the agent loop asks of an LLM, in no provider's format.

The agent loop builds an `LLMRequest` (a system prompt, the conversation as
`PromptMessage`s, the tools the model may call) and gets an `LLMResponse` back
(text, tool calls, why the model stopped, token usage). A provider (OpenAI,
Anthropic; kelpie/agent/_openai.py and _anthropic.py) translates both ways through
its official SDK, whose HTTP client is built on `env.http`.

Tool-call arguments stay the raw string the model produced: a model can emit
malformed JSON, and the loop answers that with a tool error the model sees,
never with a crash.

Errors (all `LLMError`, each saying whether a retry may help):
- `LLMRateLimited`: HTTP 429; `retry_after_ms` is the server's Retry-After when given.
- `LLMUnavailable`: a 5xx, a timeout, a refused or broken connection.
- `LLMBadResponse`: the reply could not be understood (a truncated stream, a
  body that is not the provider's format).
- `LLMRejected`: any other 4xx (bad key, unknown model, request too large): a
  retry sends the same request and gets the same answer.
"""

from __future__ import annotations

import abc
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Literal

import attrs

from kelpie.core import KelpieError

Role = Literal["user", "assistant", "tool"]
ToolChoice = Literal["auto", "required", "none"]
Finish = Literal["stop", "tool_calls", "length"]

#: Called with each piece of text as a streaming model produces it.
TextSink = Callable[[str], Awaitable[None]]


@attrs.frozen
class LLMConfig:
    """Which model an agent thinks with, and where (Letta's `llm_config`)."""

    model: str
    #: "openai" (any OpenAI-compatible API) or "anthropic".
    model_endpoint_type: str
    #: The API's base URL, e.g. "https://api.openai.com/v1" or "https://api.anthropic.com".
    model_endpoint: str
    #: The model's context window in tokens: the prompt is kept under it (recall memory).
    context_window: int = 128_000
    #: The most tokens one reply may take.
    max_tokens: int = 4096
    temperature: float | None = None


@attrs.frozen
class ToolCall:
    """One call the model asked for. `arguments` is the model's raw JSON text (maybe invalid)."""

    id: str
    name: str
    arguments: str


@attrs.frozen
class PromptMessage:
    """One message of the conversation sent to the model.

    - `user`: `content` is what the user (or the system, for a heartbeat) said.
    - `assistant`: `content` is the model's text (may be empty) and `tool_calls` the
      calls it made in the same message.
    - `tool`: the result of one tool call: `content` is the result text,
      `tool_call_id` the call it answers and `name` the tool's name.
    """

    role: Role
    content: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str = ""
    name: str = ""


@attrs.frozen
class ToolSpec:
    """A tool the model may call: its name, what it does, and a JSON Schema of its arguments."""

    name: str
    description: str
    parameters: Mapping[str, Any]


@attrs.frozen
class LLMRequest:
    """Everything one model call needs, in no provider's format."""

    model: str
    system: str
    messages: tuple[PromptMessage, ...]
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: ToolChoice = "auto"
    max_tokens: int = 4096
    temperature: float | None = None


@attrs.frozen
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@attrs.frozen
class LLMResponse:
    """The model's answer: text, tool calls (in order), why it stopped, and token usage."""

    content: str
    tool_calls: tuple[ToolCall, ...]
    finish: Finish
    usage: Usage = Usage()
    model: str = ""


class LLMClient(abc.ABC):
    """One provider's way of running an `LLMRequest`. Implementations are safe to share."""

    #: The provider's name as Letta spells `model_endpoint_type` ("openai", "anthropic").
    endpoint_type: str

    @abc.abstractmethod
    async def complete(
        self, request: LLMRequest, *, stream: bool = False, on_text: TextSink | None = None
    ) -> LLMResponse:
        """Runs `request` once (no retries: see `RetryingLLM`).

        With `stream=True` the provider streams the answer and calls `on_text`
        with each piece of text as it arrives; the return value is the same
        whole response either way. Raises an `LLMError`.
        """


class LLMError(KelpieError):
    """A model call failed. `retryable` says whether sending it again may succeed."""

    retryable: bool = False


class LLMRateLimited(LLMError):
    """The provider said 429 Too Many Requests."""

    retryable = True

    def __init__(self, message: str, *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        #: The server's Retry-After, in milliseconds (None: it gave none).
        self.retry_after_ms = retry_after_ms


class LLMUnavailable(LLMError):
    """A 5xx, a timeout, or a connection that failed or broke."""

    retryable = True


class LLMBadResponse(LLMError):
    """The provider's reply could not be understood (truncated stream, unexpected body)."""

    retryable = True


class LLMRejected(LLMError):
    """The provider refused the request (a 4xx other than 429): retrying cannot help."""

    def __init__(self, message: str, *, status_code: int | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
