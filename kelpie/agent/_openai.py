"""OpenAI and every OpenAI-compatible API (vLLM, Ollama, llama.cpp, LM Studio...) through
the official `openai` SDK's chat completions.

`OpenAIClient` turns an `LLMRequest` into one `POST {base_url}/chat/completions`
and the reply (JSON, or server-sent events when streaming) into an
`LLMResponse`. Rules of the translation:

- The system prompt is the first message (role `system`), verbatim: it carries
  every core block, and nothing here trims it.
- An assistant message replays its text (`content`, null when empty and there
  are tool calls) and its calls as `tool_calls` [{id, type: function,
  function: {name, arguments}}], with `arguments` the model's raw text, valid
  JSON or not: the API takes a string, so a malformed call replays as it was.
  Each result is a `tool` message with the `tool_call_id` it answers.
- Tools are [{type: function, function: {name, description, parameters}}];
  `tools` and `tool_choice` are sent only when there are tools (OpenAI refuses
  an empty list, and `tool_choice` without tools).
- The reply's length cap is `max_tokens`, which every OpenAI-compatible server
  accepts, except on api.openai.com itself, where `max_tokens` is deprecated
  and refused by the reasoning models: there it is `max_completion_tokens`.
- Streaming asks for the usage in a last chunk (`stream_options.include_usage`),
  assembles tool calls from their deltas by `index`, and calls `on_text` with
  each content delta. A stream that ends before any `finish_reason` was cut
  off: `LLMBadResponse`. An `error` object inside the stream is `LLMUnavailable`,
  raised once the body has ended (a server ends it there), so that the response
  is read to its end rather than abandoned.
- A call without an id gets `call_<position>`; one without a name, or a reply
  without a choice, is `LLMBadResponse`.

The SDK builds and sends the request (auth, headers, base URL, timeout) and
raises the HTTP errors; a streamed body is read here (kelpie/agent/_providers.py
says why). The SDK runs on `env.http` with its retries off (RetryingLLM
retries) and is cut off from the process environment: see `_build_sdk_client`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import attrs
import httpx2
import openai

from kelpie.agent._llm import (
    Finish,
    LLMBadResponse,
    LLMError,
    LLMRequest,
    LLMResponse,
    LLMUnavailable,
    PromptMessage,
    TextSink,
    ToolCall,
    ToolSpec,
    Usage,
)
from kelpie.agent._providers import (
    NO_API_KEY,
    SdkProvider,
    ServerSentEvent,
    cause_of,
    field,
    hand_on,
    sdk_http_client,
    text_of,
)
from kelpie.agent._retry import error_for_status, shorten
from kelpie.env import Env

#: The base URL when an LLMConfig names none.
DEFAULT_BASE_URL = "https://api.openai.com/v1"

#: Hosts whose API wants `max_completion_tokens` instead of `max_tokens`.
_MAX_COMPLETION_TOKENS_HOSTS = frozenset({"api.openai.com"})

_EMPTY_SCHEMA: Mapping[str, Any] = {"type": "object", "properties": {}}


class OpenAIClient(SdkProvider):
    """Chat completions on an OpenAI-compatible API (see the module docstring)."""

    endpoint_type = "openai"

    def __init__(self, env: Env, *, base_url: str, api_key: str, timeout_ms: int) -> None:
        self.base_url = base_url or DEFAULT_BASE_URL
        self._timeout_s = timeout_ms / 1000
        host = httpx2.URL(self.base_url).host
        #: The request field of the reply's length cap (see the module docstring).
        self.max_tokens_field = (
            "max_completion_tokens" if host in _MAX_COMPLETION_TOKENS_HOSTS else "max_tokens"
        )
        self._sdk = _build_sdk_client(env, self.base_url, api_key, self._timeout_s)

    async def complete(
        self, request: LLMRequest, *, stream: bool = False, on_text: TextSink | None = None
    ) -> LLMResponse:
        params = chat_params(request, max_tokens_field=self.max_tokens_field)
        if not stream:
            completion = await self._call(
                self._sdk.chat.completions.create(**params, timeout=self._timeout_s)
            )
            return parse_completion(completion)
        streaming = self._sdk.chat.completions.with_streaming_response.create(
            **params, stream=True, stream_options={"include_usage": True}, timeout=self._timeout_s
        )
        assembly = StreamAssembly()

        async def add(event: ServerSentEvent) -> None:
            await hand_on(assembly.add(_data(event)), on_text)

        await self._read_events(streaming, add)
        return assembly.finish()

    def _translate(self, exc: Exception) -> LLMError | None:  # noqa: PLR0911 - one per kind
        """The `LLMError` for an exception of the SDK or the transport (None: not ours)."""
        where = f"openai API at {self.base_url}"
        if isinstance(exc, openai.APIStatusError):
            return error_for_status(
                exc.status_code,
                f"{where}: HTTP {exc.status_code}: {shorten(exc.message)}",
                headers=exc.response.headers,
            )
        if isinstance(exc, openai.APIResponseValidationError):
            return LLMBadResponse(f"{where}: reply not in the expected format: {exc.message}")
        if isinstance(exc, openai.APIConnectionError):  # APITimeoutError included
            return LLMUnavailable(f"{where}: {exc.message} ({cause_of(exc)})")
        if isinstance(exc, httpx2.DecodingError | ValueError):
            # The body is not JSON, or not decodable.
            return LLMBadResponse(f"{where}: reply could not be decoded: {shorten(str(exc))}")
        if isinstance(exc, httpx2.TimeoutException | httpx2.TransportError):
            # What breaks while a streamed body is read (the SDK is done by then).
            return LLMUnavailable(f"{where}: {type(exc).__name__}: {exc}")
        if isinstance(exc, openai.OpenAIError):
            return LLMError(f"{where}: {exc}")
        return None

    async def aclose(self) -> None:
        """Closes the SDK's HTTP client (the Env's transport stays open)."""
        await self._sdk.close()


def _build_sdk_client(
    env: Env, base_url: str, api_key: str, timeout_s: float
) -> openai.AsyncOpenAI:
    """The SDK's client on `env.http`, with every setting explicit.

    The SDK fills what it is not given from OPENAI_* environment variables, and
    some of them it reads even when given an explicit value: OPENAI_ORG_ID and
    OPENAI_PROJECT_ID become headers, and OPENAI_CUSTOM_HEADERS adds headers,
    including an `Authorization` that replaces our key. Kelpie's configuration
    comes from its own settings only, so all of that is undone here. It also
    pre-sets the platform the SDK would otherwise detect, on a worker thread,
    at the first request (a thread the simulator forbids); the SDK reports it in
    an X-Stainless-OS header only.
    """
    client = openai.AsyncOpenAI(
        api_key=api_key or NO_API_KEY,
        base_url=base_url,
        http_client=sdk_http_client(env, timeout_s),
        max_retries=0,
        timeout=timeout_s,
    )
    client.organization = None
    client.project = None
    client.admin_api_key = None
    client.webhook_secret = None
    client._custom_headers = {}
    client._platform = "Unknown"
    return client


def _data(event: ServerSentEvent) -> object:
    """The JSON of one event (None for the closing `[DONE]`)."""
    if event.data.startswith("[DONE]"):
        return None
    try:
        return json.loads(event.data)
    except ValueError as exc:
        raise LLMBadResponse(f"openai stream: an event is not JSON: {shorten(event.data)}") from exc


# -- request --------------------------------------------------------------------------


def chat_params(request: LLMRequest, *, max_tokens_field: str = "max_tokens") -> dict[str, Any]:
    """The keyword arguments of `chat.completions.create` for `request` (not streaming)."""
    params: dict[str, Any] = {
        "model": request.model,
        "messages": chat_messages(request),
        max_tokens_field: request.max_tokens,
    }
    if request.temperature is not None:
        params["temperature"] = request.temperature
    if request.tools:
        params["tools"] = [_tool(spec) for spec in request.tools]
        params["tool_choice"] = request.tool_choice
    return params


def chat_messages(request: LLMRequest) -> list[dict[str, Any]]:
    """The `messages` array: the system prompt, then the conversation in order."""
    messages: list[dict[str, Any]] = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.extend(_message(m) for m in request.messages)
    return messages


def _message(message: PromptMessage) -> dict[str, Any]:
    if message.role == "user":
        return {"role": "user", "content": message.content}
    if message.role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content}
    if not message.tool_calls:
        return {"role": "assistant", "content": message.content}
    return {
        "role": "assistant",
        "content": message.content or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ],
    }


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": spec.name,
            "description": spec.description,
            "parameters": dict(spec.parameters or _EMPTY_SCHEMA),
        },
    }


# -- reply ----------------------------------------------------------------------------


def finish_of(finish_reason: object, has_tool_calls: bool) -> Finish:
    """The neutral `Finish` of an OpenAI `finish_reason`."""
    if finish_reason in ("tool_calls", "function_call"):
        return "tool_calls"
    if finish_reason == "length":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def parse_completion(completion: object) -> LLMResponse:
    """The `LLMResponse` of a JSON reply; `LLMBadResponse` when it is not one."""
    choices = field(completion, "choices")
    if not isinstance(choices, list) or not choices:
        raise LLMBadResponse(f"openai reply has no choices: {shorten(repr(completion))}")
    message = field(choices[0], "message")
    if message is None:
        raise LLMBadResponse(f"openai reply's choice has no message: {shorten(repr(choices[0]))}")
    content = field(message, "content")
    if content is None:
        content = field(message, "refusal") or ""
    if not isinstance(content, str):
        raise LLMBadResponse(f"openai reply's content is not text: {shorten(repr(content))}")
    calls = []
    for position, raw in enumerate(field(message, "tool_calls") or ()):
        function = field(raw, "function")
        calls.append(
            _tool_call(
                position,
                field(raw, "id"),
                field(function, "name"),
                [text_of(field(function, "arguments"))],
            )
        )
    return LLMResponse(
        content=content,
        tool_calls=tuple(calls),
        finish=finish_of(field(choices[0], "finish_reason"), bool(calls)),
        usage=_usage(field(completion, "usage")),
        model=text_of(field(completion, "model")),
    )


def _tool_call(position: int, call_id: object, name: object, arguments: list[str]) -> ToolCall:
    if not isinstance(name, str) or not name:
        raise LLMBadResponse(f"openai reply: tool call #{position} has no function name")
    return ToolCall(
        id=text_of(call_id) or f"call_{position}",
        name=name,
        arguments="".join(arguments) or "{}",
    )


def _usage(raw: object) -> Usage:
    prompt = field(raw, "prompt_tokens")
    completion = field(raw, "completion_tokens")
    return Usage(
        prompt_tokens=prompt if isinstance(prompt, int) else 0,
        completion_tokens=completion if isinstance(completion, int) else 0,
    )


@attrs.define
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: list[str] = attrs.Factory(list)


@attrs.define
class StreamAssembly:
    """Builds one `LLMResponse` from the chunks of a streamed reply (choice 0 only)."""

    content: list[str] = attrs.Factory(list)
    calls: dict[int, _PartialCall] = attrs.Factory(dict)
    finish_reason: str | None = None
    usage: Usage = attrs.Factory(Usage)
    model: str = ""
    failure: LLMError | None = None

    def add(self, chunk: object) -> str:
        """Takes one chunk (None: the `[DONE]` marker); returns its text, maybe empty."""
        if chunk is None or self.failure is not None:
            return ""
        error = field(chunk, "error")
        if error:
            # The last event: kept, and raised by `finish` once the body is read to its end.
            message = field(error, "message") if isinstance(error, dict) else error
            self.failure = LLMUnavailable(f"openai stream: the server failed mid-reply: {message}")
            return ""
        self.model = text_of(field(chunk, "model")) or self.model
        if field(chunk, "usage") is not None:
            self.usage = _usage(field(chunk, "usage"))
        text = []
        for choice in field(chunk, "choices") or ():
            if field(choice, "index") not in (0, None):
                continue
            delta = field(choice, "delta")
            piece = field(delta, "content")
            if isinstance(piece, str) and piece:
                text.append(piece)
            for position, raw in enumerate(field(delta, "tool_calls") or ()):
                self._add_call_delta(position, raw)
            reason = field(choice, "finish_reason")
            if isinstance(reason, str) and reason:
                self.finish_reason = reason
        joined = "".join(text)
        self.content.append(joined)
        return joined

    def _add_call_delta(self, position: int, raw: object) -> None:
        index = field(raw, "index")
        call = self.calls.setdefault(index if isinstance(index, int) else position, _PartialCall())
        call.id = call.id or text_of(field(raw, "id"))
        function = field(raw, "function")
        call.name = call.name or text_of(field(function, "name"))
        call.arguments.append(text_of(field(function, "arguments")))

    def finish(self) -> LLMResponse:
        """The whole reply; `LLMBadResponse` when the stream was cut off."""
        if self.failure is not None:
            raise self.failure
        if self.finish_reason is None:
            raise LLMBadResponse(
                "openai stream ended before the model finished (no finish_reason): truncated"
            )
        calls = tuple(
            _tool_call(position, partial.id, partial.name, partial.arguments)
            for position, partial in enumerate(self.calls[i] for i in sorted(self.calls))
        )
        return LLMResponse(
            content="".join(self.content),
            tool_calls=calls,
            finish=finish_of(self.finish_reason, bool(calls)),
            usage=self.usage,
            model=self.model,
        )
