"""Anthropic's Messages API through the official `anthropic` SDK.

`AnthropicClient` turns an `LLMRequest` into one `POST {base_url}/v1/messages`
and the reply (JSON, or server-sent events when streaming) into an
`LLMResponse`. Rules of the translation:

- The system prompt is the top-level `system`, verbatim (every core block).
- Messages alternate user/assistant, so the conversation is regrouped:
  an assistant message becomes a `text` block (when it has text) and one
  `tool_use` block per call; a tool result becomes a `tool_result` block of a
  *user* message; consecutive messages of one role (tool results in a row, a
  user's text after tool results) merge into one message, in which the
  `tool_result` blocks come first, as the API requires. Empty text makes no
  block (the API refuses empty text blocks), and a message left without blocks
  is dropped.
- A `tool_use` needs `input` as a JSON object, but a model can have emitted
  arguments that are not one. Those replay as `{"_raw": "<the text>"}`, so the
  model sees what it sent (next to the tool's error about it), and the request
  stays valid; empty arguments replay as `{}`.
- Tool call ids are replayed with every character outside [A-Za-z0-9_-]
  replaced by `_` (the API's id pattern), in `tool_use` and `tool_result` alike,
  so ids from another provider's history still pair up.
- Tools are {name, description, input_schema}; `tool_choice` is
  {"type": "auto" | "any" | "none"} and is sent only with tools.
- `max_tokens` is always sent (the API requires it); `temperature` never is:
  the SDK's Messages API (anthropic 2.x) has no such parameter.
- A reply's tool call keeps its `input` as compact JSON text; a streamed call's
  arguments are the concatenated `partial_json` exactly as the model sent it.
  Text blocks join (with nothing between them) into `content`, in order, which
  is also the order in which streaming hands them to `on_text`. Blocks of other
  kinds (thinking) are ignored.
- A stream that ends before `message_stop` was cut off: `LLMBadResponse`. An
  `error` event is mapped by its type (rate_limit_error, overloaded_error...) and
  raised once the body has ended (a server ends it there), so that the response
  is read to its end rather than abandoned.
- A base URL ending in `/v1` (Letta's configs say "https://api.anthropic.com/v1")
  has it removed, since the SDK adds `/v1/messages` itself.

The SDK builds and sends the request (auth, headers, base URL, timeout) and
raises the HTTP errors; a streamed body is read here (kelpie/agent/_providers.py
says why). The SDK runs on `env.http` with its retries off (RetryingLLM
retries) and is cut off from the process environment: see `_build_sdk_client`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import anthropic
import attrs
import httpx2

from kelpie.agent._llm import (
    Finish,
    LLMBadResponse,
    LLMError,
    LLMRateLimited,
    LLMRejected,
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
DEFAULT_BASE_URL = "https://api.anthropic.com"

#: The key under which tool arguments that are not a JSON object are replayed.
RAW_ARGUMENTS_KEY = "_raw"

_TOOL_CHOICE = {"auto": "auto", "required": "any", "none": "none"}
_NOT_AN_ID_CHARACTER = re.compile(r"[^A-Za-z0-9_-]")
_EMPTY_SCHEMA: Mapping[str, Any] = {"type": "object", "properties": {}}

#: `error.type`s of an error event inside a stream that retrying cannot help.
_REJECTED_ERROR_TYPES = frozenset(
    {
        "invalid_request_error",
        "authentication_error",
        "billing_error",
        "permission_error",
        "not_found_error",
        "request_too_large",
    }
)


class AnthropicClient(SdkProvider):
    """Anthropic's Messages API (see the module docstring)."""

    endpoint_type = "anthropic"

    def __init__(self, env: Env, *, base_url: str, api_key: str, timeout_ms: int) -> None:
        self.base_url = sdk_base_url(base_url)
        self._timeout_s = timeout_ms / 1000
        self._sdk = _build_sdk_client(env, self.base_url, api_key, self._timeout_s)

    async def complete(
        self, request: LLMRequest, *, stream: bool = False, on_text: TextSink | None = None
    ) -> LLMResponse:
        params = message_params(request)
        if not stream:
            message = await self._call(self._sdk.messages.create(**params, timeout=self._timeout_s))
            return parse_message(message)
        streaming = self._sdk.messages.with_streaming_response.create(
            **params, stream=True, timeout=self._timeout_s
        )
        assembly = StreamAssembly()

        async def add(event: ServerSentEvent) -> None:
            await hand_on(assembly.add(_data(event)), on_text)

        await self._read_events(streaming, add)
        return assembly.finish()

    def _translate(self, exc: Exception) -> LLMError | None:  # noqa: PLR0911 - one per kind
        """The `LLMError` for an exception of the SDK or the transport (None: not ours)."""
        where = f"anthropic API at {self.base_url}"
        if isinstance(exc, anthropic.APIStatusError):
            message = f"{where}: HTTP {exc.status_code}: {shorten(exc.message)}"
            return error_for_status(exc.status_code, message, headers=exc.response.headers)
        if isinstance(exc, anthropic.APIResponseValidationError):
            return LLMBadResponse(f"{where}: reply not in the expected format: {exc.message}")
        if isinstance(exc, anthropic.APIConnectionError):  # APITimeoutError included
            return LLMUnavailable(f"{where}: {exc.message} ({cause_of(exc)})")
        if isinstance(exc, httpx2.DecodingError | ValueError):
            # The body is not JSON, or not decodable.
            return LLMBadResponse(f"{where}: reply could not be decoded: {shorten(str(exc))}")
        if isinstance(exc, httpx2.TimeoutException | httpx2.TransportError):
            # What breaks while a streamed body is read (the SDK is done by then).
            return LLMUnavailable(f"{where}: {type(exc).__name__}: {exc}")
        if isinstance(exc, anthropic.AnthropicError):
            return LLMError(f"{where}: {exc}")
        return None

    async def aclose(self) -> None:
        """Closes the SDK's HTTP client (the Env's transport stays open)."""
        await self._sdk.close()


def sdk_base_url(base_url: str) -> str:
    """The SDK's base URL for a configured one: the default when empty, without a final /v1."""
    url = (base_url or DEFAULT_BASE_URL).rstrip("/")
    return url.removesuffix("/v1") or DEFAULT_BASE_URL


def _build_sdk_client(
    env: Env, base_url: str, api_key: str, timeout_s: float
) -> anthropic.AsyncAnthropic:
    """The SDK's client on `env.http`, with every setting explicit.

    Given an explicit key and base URL, the SDK still reads ANTHROPIC_CUSTOM_HEADERS
    (extra headers on every request) and the ANTHROPIC_OPEN_TELEMETRY_* variables;
    both are overridden here, so that Kelpie's settings are the only ones. Tracing
    is off (it would read the wall clock per request). The platform the SDK would
    detect on a worker thread at the first request (which the simulator forbids)
    is pre-set; the SDK reports it in an X-Stainless-OS header only.
    """
    client = anthropic.AsyncAnthropic(
        api_key=api_key or NO_API_KEY,
        base_url=base_url,
        webhook_key="",
        http_client=sdk_http_client(env, timeout_s),
        max_retries=0,
        timeout=timeout_s,
        open_telemetry={"traces": False, "propagation": False},
    )
    client._custom_headers = {}
    client._platform = "Unknown"
    return client


def _data(event: ServerSentEvent) -> object:
    """The JSON of one event (None for an event without data, such as a bare ping)."""
    if not event.data:
        return None
    try:
        return json.loads(event.data)
    except ValueError as exc:
        raise LLMBadResponse(
            f"anthropic stream: a {event.event or 'nameless'} event is not JSON:"
            f" {shorten(event.data)}"
        ) from exc


def _error_event(error: object) -> LLMError:
    """The `LLMError` for an `error` event inside a 200 stream: its type says what failed."""
    error_type = field(error, "type")
    message = f"anthropic stream: error event {error_type}: {field(error, 'message')}"
    if error_type == "rate_limit_error":
        return LLMRateLimited(message)
    if error_type in _REJECTED_ERROR_TYPES:
        return LLMRejected(message)
    return LLMUnavailable(message)  # overloaded_error, api_error, and any unknown type


# -- request --------------------------------------------------------------------------


def message_params(request: LLMRequest) -> dict[str, Any]:
    """The keyword arguments of `messages.create` for `request` (not streaming)."""
    params: dict[str, Any] = {
        "model": request.model,
        "max_tokens": request.max_tokens,
        "messages": conversation(request.messages),
    }
    if request.system:
        params["system"] = request.system
    # No temperature: the Messages API of this SDK has none (`request.temperature` is
    # not sent; passing it through `extra_body` would be refused as an unknown field).
    if request.tools:
        params["tools"] = [_tool(spec) for spec in request.tools]
        params["tool_choice"] = {"type": _TOOL_CHOICE[request.tool_choice]}
    return params


def conversation(messages: Sequence[PromptMessage]) -> list[dict[str, Any]]:
    """The `messages` array: alternating roles, merged as the module docstring says."""
    merged: list[dict[str, Any]] = []
    for message in messages:
        role = "assistant" if message.role == "assistant" else "user"
        blocks = _blocks(message)
        if not blocks:
            continue
        if merged and merged[-1]["role"] == role:
            merged[-1]["content"].extend(blocks)
        else:
            merged.append({"role": role, "content": blocks})
    for entry in merged:
        if entry["role"] == "user":
            # Stable: the results keep their order, and so does the text after them.
            entry["content"].sort(key=lambda block: block["type"] != "tool_result")
    return merged


def _blocks(message: PromptMessage) -> list[dict[str, Any]]:
    if message.role == "tool":
        block: dict[str, Any] = {
            "type": "tool_result",
            "tool_use_id": tool_use_id(message.tool_call_id),
        }
        if message.content:
            block["content"] = message.content
        return [block]
    blocks: list[dict[str, Any]] = []
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    if message.role == "assistant":
        blocks.extend(
            {
                "type": "tool_use",
                "id": tool_use_id(call.id),
                "name": call.name,
                "input": tool_input(call.arguments),
            }
            for call in message.tool_calls
        )
    return blocks


def tool_use_id(call_id: str) -> str:
    """`call_id` as the API accepts it (see the module docstring)."""
    return _NOT_AN_ID_CHARACTER.sub("_", call_id) or "toolu_missing_id"


def tool_input(arguments: str) -> dict[str, Any]:
    """A tool call's raw arguments as a `tool_use` input (see the module docstring)."""
    if not arguments.strip():
        return {}
    try:
        parsed = json.loads(arguments)
    except ValueError:
        parsed = None
    if isinstance(parsed, dict):
        return parsed
    return {RAW_ARGUMENTS_KEY: arguments}


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "description": spec.description,
        "input_schema": dict(spec.parameters or _EMPTY_SCHEMA),
    }


# -- reply ----------------------------------------------------------------------------


def finish_of(stop_reason: object, has_tool_calls: bool) -> Finish:
    """The neutral `Finish` of an Anthropic `stop_reason`."""
    if stop_reason == "tool_use":
        return "tool_calls"
    if stop_reason == "max_tokens":
        return "length"
    return "tool_calls" if has_tool_calls else "stop"


def parse_message(message: object) -> LLMResponse:
    """The `LLMResponse` of a non-streaming reply; `LLMBadResponse` when it is not one."""
    blocks = field(message, "content")
    if not isinstance(blocks, list):
        raise LLMBadResponse(f"anthropic reply has no content: {shorten(repr(message))}")
    text: list[str] = []
    calls: list[ToolCall] = []
    for block in blocks:
        kind = field(block, "type")
        if kind == "text":
            text.append(text_of(field(block, "text")))
        elif kind == "tool_use":
            calls.append(_tool_call(len(calls), block))
    return LLMResponse(
        content="".join(text),
        tool_calls=tuple(calls),
        finish=finish_of(field(message, "stop_reason"), bool(calls)),
        usage=_usage(field(message, "usage")),
        model=text_of(field(message, "model")),
    )


def _tool_call(position: int, block: object) -> ToolCall:
    name = field(block, "name")
    if not isinstance(name, str) or not name:
        raise LLMBadResponse(f"anthropic tool_use block #{position} has no name: {block!r}")
    return ToolCall(
        id=text_of(field(block, "id")) or f"toolu_{position}",
        name=name,
        arguments=_json(field(block, "input")),
    )


def _json(value: object) -> str:
    return json.dumps(value if value is not None else {}, ensure_ascii=False, separators=(",", ":"))


def _usage(raw: object) -> Usage:
    return Usage(prompt_tokens=_prompt_tokens(raw), completion_tokens=_int(raw, "output_tokens"))


def _prompt_tokens(raw: object) -> int:
    """Every input token: fresh, written to the cache and read from it."""
    names = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    return sum(_int(raw, name) for name in names)


def _int(raw: object, name: str) -> int:
    value = field(raw, name)
    return value if isinstance(value, int) else 0


@attrs.define
class _Block:
    kind: str
    text: list[str] = attrs.Factory(list)
    id: str = ""
    name: str = ""
    start_input: object = None


@attrs.define
class StreamAssembly:
    """Builds one `LLMResponse` from the events of a streamed reply."""

    blocks: dict[int, _Block] = attrs.Factory(dict)
    stop_reason: str | None = None
    stopped: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str = ""
    failure: LLMError | None = None

    def add(self, event: object) -> str:
        """Takes one event (None: one without data); returns its text, maybe empty."""
        kind = field(event, "type")
        if self.failure is not None:
            return ""
        if kind == "error":
            # The last event: kept, and raised by `finish` once the body is read to its end.
            self.failure = _error_event(field(event, "error"))
        elif kind == "message_start":
            message = field(event, "message")
            self.model = text_of(field(message, "model"))
            usage = field(message, "usage")
            self.prompt_tokens = _prompt_tokens(usage)
            self.completion_tokens = _int(usage, "output_tokens")
        elif kind == "content_block_start":
            block = field(event, "content_block")
            self.blocks[_index(event)] = _Block(
                kind=text_of(field(block, "type")),
                text=[text_of(field(block, "text"))],
                id=text_of(field(block, "id")),
                name=text_of(field(block, "name")),
                start_input=field(block, "input"),
            )
        elif kind == "content_block_delta":
            return self._add_delta(_index(event), field(event, "delta"))
        elif kind == "message_delta":
            reason = field(field(event, "delta"), "stop_reason")
            self.stop_reason = reason if isinstance(reason, str) else self.stop_reason
            usage = field(event, "usage")
            # Cumulative counts; the input ones only when the server repeats them.
            self.completion_tokens = _int(usage, "output_tokens") or self.completion_tokens
            self.prompt_tokens = _prompt_tokens(usage) or self.prompt_tokens
        elif kind == "message_stop":
            self.stopped = True
        return ""

    def _add_delta(self, index: int, delta: object) -> str:
        block = self.blocks.get(index)
        if block is None:
            raise LLMBadResponse(f"anthropic stream: a delta for block {index}, never started")
        kind = field(delta, "type")
        if kind == "text_delta" and block.kind == "text":
            piece = text_of(field(delta, "text"))
            block.text.append(piece)
            return piece
        if kind == "input_json_delta" and block.kind == "tool_use":
            block.text.append(text_of(field(delta, "partial_json")))
        return ""

    def finish(self) -> LLMResponse:
        """The whole reply; `LLMBadResponse` when the stream was cut off."""
        if self.failure is not None:
            raise self.failure
        if not self.stopped:
            raise LLMBadResponse("anthropic stream ended before message_stop: truncated")
        text: list[str] = []
        calls: list[ToolCall] = []
        for index in sorted(self.blocks):
            block = self.blocks[index]
            if block.kind == "text":
                text.extend(block.text)
            elif block.kind == "tool_use":
                if not block.name:
                    raise LLMBadResponse(f"anthropic streamed tool_use block {index} has no name")
                arguments = "".join(block.text) or _json(block.start_input)
                calls.append(
                    ToolCall(
                        id=block.id or f"toolu_{len(calls)}", name=block.name, arguments=arguments
                    )
                )
        return LLMResponse(
            content="".join(text),
            tool_calls=tuple(calls),
            finish=finish_of(self.stop_reason, bool(calls)),
            usage=Usage(self.prompt_tokens, self.completion_tokens),
            model=self.model,
        )


def _index(event: object) -> int:
    index = field(event, "index")
    if not isinstance(index, int):
        raise LLMBadResponse(f"anthropic stream: an event without a block index: {event!r}")
    return index
