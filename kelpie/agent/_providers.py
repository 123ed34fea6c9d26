"""`make_llm_client`, and what the OpenAI and Anthropic providers share.

`make_llm_client` picks the provider an `LLMConfig` names (`model_endpoint_type`
"openai": any OpenAI-compatible API; "anthropic"), gives it the base URL
(`model_endpoint`, empty for the provider's public API), and wraps it in
`RetryingLLM`, whose per-attempt deadline is also the SDK's HTTP timeout. It
imports only the chosen provider's SDK: importing `anthropic` alone takes over
a second.

What both providers (kelpie/agent/_openai.py, _anthropic.py) use:

- `sdk_http_client`: the SDKs' HTTP client, on `env.http` and blind to the
  process environment (no proxies or .netrc from it).
- `ServerSentEvents`: the decoder of streamed replies. The SDKs' own stream
  classes nest async generators that they do not close (the OpenAI SDK leaves
  two behind at every `[DONE]`); under trio each one left behind is a
  ResourceWarning and is finalized whenever the garbage collector gets to it,
  which would also make a simulated run depend on the collector. So the
  providers let the SDK send the request and raise its errors, and read the
  stream body themselves, closing what they open.
- `error_for_status`, `retry_after_ms` and `shorten`: HTTP failures as
  `LLMError`s (defined in kelpie/agent/_retry.py, re-exported here for the
  embedding client).
"""

from __future__ import annotations

import abc
import codecs
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import attrs
import httpx2

from kelpie.agent._llm import LLMBadResponse, LLMClient, LLMConfig, LLMError, TextSink
from kelpie.agent._retry import (
    LLMRetryPolicy,
    RetryingLLM,
    error_for_status,
    retry_after_ms,
    shorten,
)
from kelpie.core import ConfigError

if TYPE_CHECKING:
    from kelpie.env import Env

__all__ = [
    "ENDPOINT_TYPES",
    "NO_API_KEY",
    "SSE_EVENT_MAX_CHARS",
    "SdkProvider",
    "ServerSentEvent",
    "ServerSentEvents",
    "cause_of",
    "error_for_status",
    "field",
    "hand_on",
    "make_llm_client",
    "retry_after_ms",
    "sdk_http_client",
    "shorten",
    "text_of",
]

T = TypeVar("T")

#: The accepted `model_endpoint_type`s.
ENDPOINT_TYPES = ("anthropic", "openai")

#: Sent as the API key when none is configured: a server that needs no key (a
#: local vLLM or Ollama) ignores it, one that needs a key answers 401.
NO_API_KEY = "kelpie-no-api-key"

#: The largest server-sent event accepted (its data, in characters); a bigger one is a
#: bad response.
SSE_EVENT_MAX_CHARS = 16 * 1024 * 1024


def make_llm_client(
    env: Env, config: LLMConfig, *, api_key: str, policy: LLMRetryPolicy | None = None
) -> RetryingLLM:
    """The retrying client for `config`, reaching its API through `env.http`.

    `api_key` may be empty for a server that needs none (`NO_API_KEY` is sent).
    Raises `ConfigError` for an endpoint type other than those of
    `ENDPOINT_TYPES`, or a base URL that is not an absolute http(s) URL.
    """
    endpoint_type = config.model_endpoint_type
    if endpoint_type not in ENDPOINT_TYPES:
        accepted = ", ".join(repr(name) for name in ENDPOINT_TYPES)
        raise ConfigError(
            f"llm_config.model_endpoint_type {endpoint_type!r} is not supported:"
            f" use one of {accepted}"
        )
    if config.model_endpoint:
        _check_base_url(config.model_endpoint)
    policy = policy or LLMRetryPolicy()
    base_url, timeout_ms = config.model_endpoint, policy.attempt_timeout_ms
    inner: LLMClient
    if endpoint_type == "openai":
        from kelpie.agent._openai import OpenAIClient

        inner = OpenAIClient(env, base_url=base_url, api_key=api_key, timeout_ms=timeout_ms)
    else:
        from kelpie.agent._anthropic import AnthropicClient

        inner = AnthropicClient(env, base_url=base_url, api_key=api_key, timeout_ms=timeout_ms)
    return RetryingLLM(inner, env, policy)


def _check_base_url(url: str) -> None:
    try:
        parsed = httpx2.URL(url)
    except (httpx2.InvalidURL, ValueError) as exc:
        raise ConfigError(f"llm_config.model_endpoint {url!r} is not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(
            f"llm_config.model_endpoint {url!r} must be an absolute http:// or https:// URL"
        )


def sdk_http_client(env: Env, timeout_s: float) -> httpx2.AsyncClient:
    """The HTTP client an SDK is built on: `env.http`, and nothing from the environment."""
    return httpx2.AsyncClient(transport=env.http, timeout=timeout_s, trust_env=False)


# -- reading replies --------------------------------------------------------------------
#
# Replies are read with `field`, which takes the SDK's objects (a JSON reply) and
# plain dicts (a streamed one) alike, and never trusts a field to be there: a
# server that sends something else gets an LLMBadResponse, not an AttributeError.


def field(value: object, name: str) -> Any:
    """The field `name` of an SDK object or a dict, or None when it has none."""
    if isinstance(value, dict):
        return value.get(name)
    return getattr(value, name, None)


def text_of(value: object) -> str:
    """`value` when it is a string, else ""."""
    return value if isinstance(value, str) else ""


def cause_of(exc: BaseException) -> str:
    """What an SDK's wrapped error was caused by, for a message."""
    cause = exc.__cause__
    return f"{type(cause).__name__}: {cause}" if cause is not None else type(exc).__name__


async def hand_on(text: str, on_text: TextSink | None) -> None:
    """Passes streamed text to the consumer, if there is text and a consumer."""
    if text and on_text is not None:
        await on_text(text)


# -- server-sent events ---------------------------------------------------------------


@attrs.frozen
class ServerSentEvent:
    """One event of a stream: its `event:` name ("" when it has none) and its data."""

    event: str
    data: str


class ServerSentEvents:
    """Decodes a `text/event-stream` body, fed in chunks of bytes as they arrive.

    The parts of the format that LLM APIs use: `event:` and `data:` fields
    (several `data:` lines join with newlines), comments, CR/LF/CRLF line ends,
    a blank line ending each event. `id:` and `retry:` are ignored. Like the
    SDKs, `finish()` also returns an event the stream ended without a blank line
    after. Bytes that are not UTF-8, or an event over SSE_EVENT_MAX_CHARS, raise
    `LLMBadResponse`.
    """

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._partial = ""  # the unfinished last line
        self._cr = False  # the text so far ended with CR: a following LF is part of it
        self._event = ""
        self._data: list[str] = []
        self._data_size = 0  # characters in self._data

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        """The events that `chunk` completes."""
        try:
            text = self._decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise LLMBadResponse(f"a streamed reply is not UTF-8: {exc}") from exc
        return self._lines(text)

    def finish(self) -> list[ServerSentEvent]:
        """The events left when the stream ends."""
        try:
            text = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            raise LLMBadResponse(f"a streamed reply is not UTF-8: {exc}") from exc
        events = self._lines(text + "\n")
        events.extend(self._lines("\n"))
        return events

    def _lines(self, text: str) -> list[ServerSentEvent]:
        if self._cr and text.startswith("\n"):
            text = text[1:]
        self._cr = text.endswith("\r")
        lines = (self._partial + text).replace("\r\n", "\n").replace("\r", "\n").split("\n")
        self._partial = lines.pop()
        events = []
        for line in lines:
            event = self._line(line)
            if event is not None:
                events.append(event)
        if self._data_size + len(self._partial) > SSE_EVENT_MAX_CHARS:
            raise LLMBadResponse(f"a streamed event is over {SSE_EVENT_MAX_CHARS} characters")
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            if not self._data and not self._event:
                return None
            event = ServerSentEvent(self._event, "\n".join(self._data))
            self._event, self._data, self._data_size = "", [], 0
            return event
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
            self._data_size += len(value)
        return None


class SdkProvider(LLMClient):
    """What both SDK-backed providers do alike: turn SDK failures into `LLMError`s, and
    read a streamed body event by event (closing everything they open)."""

    @abc.abstractmethod
    def _translate(self, exc: Exception) -> LLMError | None:
        """The `LLMError` for an exception of the SDK or the transport (None: not ours)."""

    async def _call(self, operation: Awaitable[T]) -> T:
        """Awaits one SDK or transport operation, turning its failures into `LLMError`s.

        Only these operations: what `on_text` raises is the consumer's, not the provider's.
        """
        try:
            return await operation
        except Exception as exc:
            error = self._translate(exc)
            if error is None:
                raise
            raise error from exc

    async def _read_events(
        self,
        streaming: contextlib.AbstractAsyncContextManager[Any],
        on_event: Callable[[ServerSentEvent], Awaitable[None]],
    ) -> None:
        """Opens the SDK's streaming response and hands on each server-sent event."""
        async with contextlib.AsyncExitStack() as stack:
            response = await self._call(stack.enter_async_context(streaming))
            chunks: AsyncGenerator[bytes, None] = response.http_response.aiter_bytes()
            body = await stack.enter_async_context(contextlib.aclosing(chunks))
            events = ServerSentEvents()
            while (chunk := await self._call(anext(body, None))) is not None:
                for event in events.feed(chunk):
                    await on_event(event)
            for event in events.finish():
                await on_event(event)
