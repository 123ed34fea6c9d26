"""Fake OpenAI- and Anthropic-compatible HTTP servers, real ones, on 127.0.0.1.

A `FakeLLMServer` is a `ThreadingHTTPServer` on a free port that speaks one
wire protocol:

- "openai": `POST /v1/chat/completions`, a JSON `chat.completion`, or with
  `"stream": true` server-sent events `data: {chunk}` ending with `data: [DONE]`
  (and a usage chunk first when `stream_options.include_usage` is set);
- "anthropic": `POST /v1/messages`, a JSON `message`, or with `"stream": true`
  events `event: <type>` / `data: {...}` from `message_start` to `message_stop`.

It answers from a script (`server.script(...)`, first in, first out): a `Reply`
(text pieces, one per streamed delta, and tool calls), an HTTP error (`Fail`,
with headers such as Retry-After), a stream cut off before it ends
(`Truncate`), an error event inside a stream (`StreamError`), a raw body
(`Raw`), or no answer at all until the server closes (`Hang`). Without a
scripted answer it says 500. It records every request (`server.requests`:
path, headers, the JSON body) so that tests can check the exact wire format.

Streams are written event by event and flushed, on HTTP/1.0 (the body ends when
the connection closes), so a truncated stream is a clean early end, as when a
proxy drops a reply mid-way.
"""

from __future__ import annotations

import collections
import json
import sys
import threading
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import attrs

Protocol = Literal["openai", "anthropic"]

PATHS: dict[Protocol, str] = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages"}


@attrs.frozen
class Reply:
    """A model's answer. `tool_calls` are (id, name, arguments text) triples."""

    pieces: tuple[str, ...] = ()
    tool_calls: tuple[tuple[str, str, str], ...] = ()
    #: The provider's own finish/stop reason (default: from whether there are tool calls).
    finish: str | None = None
    prompt_tokens: int = 11
    completion_tokens: int = 7
    model: str = "fake-model-1"

    @property
    def text(self) -> str:
        return "".join(self.pieces)


@attrs.frozen
class Fail:
    """An HTTP error status with the provider's error body and extra headers."""

    status: int
    message: str = "scripted failure"
    headers: Mapping[str, str] = attrs.field(factory=dict)


@attrs.frozen
class Truncate:
    """A stream that sends these text pieces, then ends without finishing."""

    pieces: tuple[str, ...] = ()


@attrs.frozen
class StreamError:
    """A 200 stream that sends these pieces, then an error event of `error_type`."""

    error_type: str = "overloaded_error"
    pieces: tuple[str, ...] = ()


@attrs.frozen
class Raw:
    """Exactly this status, content type and body."""

    status: int
    content_type: str
    body: bytes


@attrs.frozen
class Hang:
    """No answer: the connection stays open until `seconds` pass or the server closes."""

    seconds: float = 30.0


Script = Reply | Fail | Truncate | StreamError | Raw | Hang


@attrs.frozen
class Recorded:
    """One request as the server received it."""

    path: str
    headers: Mapping[str, str]  # names in lower case
    body: Any


class FakeLLMServer:
    """A real HTTP server speaking `protocol`, answering from a script (module docstring)."""

    def __init__(self, protocol: Protocol) -> None:
        self.protocol: Protocol = protocol
        self.requests: list[Recorded] = []
        #: Exceptions the handlers raised other than a client hanging up: a test bug.
        self.errors: list[BaseException] = []
        self._script: collections.deque[Script] = collections.deque()
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._httpd = _Server(self)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True
        )

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The base URL a client of this protocol is configured with."""
        root = f"http://127.0.0.1:{self.port}"
        return f"{root}/v1" if self.protocol == "openai" else root

    def script(self, *answers: Script) -> None:
        """Queues answers for the next requests, in order."""
        with self._lock:
            self._script.extend(answers)

    @property
    def unused(self) -> int:
        """How many scripted answers no request has taken."""
        with self._lock:
            return len(self._script)

    def start(self) -> FakeLLMServer:
        self._thread.start()
        return self

    def close(self) -> None:
        """Releases hanging handlers, stops serving and joins every thread."""
        self._closing.set()
        self._httpd.shutdown()
        self._httpd.server_close()  # joins the handler threads
        self._thread.join()

    def __enter__(self) -> FakeLLMServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- called by the handler threads ---------------------------------------------

    def _take(self, recorded: Recorded) -> Script | None:
        with self._lock:
            self.requests.append(recorded)
            return self._script.popleft() if self._script else None

    def _wait_for_close(self, seconds: float) -> None:
        self._closing.wait(seconds)


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, owner: FakeLLMServer) -> None:
        self.owner = owner
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if exc is not None and not isinstance(exc, ConnectionError):
            self.owner.errors.append(exc)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read `server.requests` instead."""

    def do_POST(self) -> None:
        owner = self.server.owner
        length = int(self.headers.get("content-length") or 0)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw
        headers = {name.lower(): value for name, value in self.headers.items()}
        answer = owner._take(Recorded(self.path, headers, body))
        if self.path != PATHS[owner.protocol]:
            self._json(404, _error_body(owner.protocol, 404, f"no route {self.path}"))
        elif answer is None:
            self._json(500, _error_body(owner.protocol, 500, "no scripted answer left"))
        else:
            stream = isinstance(body, dict) and body.get("stream") is True
            self._answer(owner, answer, body if stream else None)

    def _answer(self, owner: FakeLLMServer, answer: Script, stream_body: Any) -> None:
        protocol = owner.protocol
        if isinstance(answer, Hang):
            owner._wait_for_close(answer.seconds)
            self.close_connection = True  # no answer at all
        elif isinstance(answer, Fail):
            body = _error_body(protocol, answer.status, answer.message)
            self._json(answer.status, body, answer.headers)
        elif isinstance(answer, Raw):
            self._send(answer.status, answer.content_type, answer.body)
        elif stream_body is None:
            if not isinstance(answer, Reply):
                raise TypeError(f"{answer!r} needs a streaming request")
            self._json(200, _RENDER[protocol].message(answer))
        else:
            include_usage = (stream_body.get("stream_options") or {}).get("include_usage", False)
            self._stream(_RENDER[protocol].events(answer, include_usage=include_usage))

    def _json(self, status: int, body: object, headers: Mapping[str, str] | None = None) -> None:
        self._send(status, "application/json", json.dumps(body).encode(), headers)

    def _send(
        self,
        status: int,
        content_type: str,
        payload: bytes,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(payload)

    def _stream(self, events: Iterator[bytes]) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.end_headers()
        for event in events:
            self.wfile.write(event)
            self.wfile.flush()
        self.close_connection = True


def _error_body(protocol: Protocol, status: int, message: str) -> object:
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        429: "rate_limit_error",
        529: "overloaded_error",
    }.get(status, "api_error")
    if protocol == "openai":
        return {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return {"type": "error", "error": {"type": kind, "message": message}}


def _sse(data: object, event: str | None = None) -> bytes:
    head = f"event: {event}\n" if event else ""
    text = data if isinstance(data, str) else json.dumps(data)
    return f"{head}data: {text}\n\n".encode()


def _halves(text: str) -> tuple[str, str]:
    middle = len(text) // 2
    return text[:middle], text[middle:]


class _OpenAI:
    """The chat-completions wire format."""

    @staticmethod
    def _usage(reply: Reply) -> dict[str, int]:
        return {
            "prompt_tokens": reply.prompt_tokens,
            "completion_tokens": reply.completion_tokens,
            "total_tokens": reply.prompt_tokens + reply.completion_tokens,
        }

    @staticmethod
    def _finish(reply: Reply) -> str:
        return reply.finish or ("tool_calls" if reply.tool_calls else "stop")

    @classmethod
    def message(cls, reply: Reply) -> object:
        message: dict[str, Any] = {"role": "assistant", "content": reply.text or None}
        if reply.tool_calls:
            message["tool_calls"] = [
                {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                for i, n, a in reply.tool_calls
            ]
        return {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": reply.model,
            "choices": [{"index": 0, "message": message, "finish_reason": cls._finish(reply)}],
            "usage": cls._usage(reply),
        }

    @staticmethod
    def _chunk(model: str, delta: object, finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return _sse(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "created": 0,
                "model": model,
                "choices": [choice],
            }
        )

    @classmethod
    def events(cls, answer: Script, *, include_usage: bool) -> Iterator[bytes]:
        model = answer.model if isinstance(answer, Reply) else "fake-model-1"
        yield cls._chunk(model, {"role": "assistant", "content": ""})
        pieces = answer.pieces if isinstance(answer, Reply | Truncate | StreamError) else ()
        for piece in pieces:
            yield cls._chunk(model, {"content": piece})
        if isinstance(answer, StreamError):
            yield _sse({"error": {"message": "scripted stream error", "type": answer.error_type}})
            return
        if not isinstance(answer, Reply):
            return  # truncated: no finish_reason, no [DONE]
        for index, (call_id, name, arguments) in enumerate(answer.tool_calls):
            first, second = _halves(arguments)
            function = {"name": name, "arguments": first}
            yield cls._chunk(
                model,
                {
                    "tool_calls": [
                        {"index": index, "id": call_id, "type": "function", "function": function}
                    ]
                },
            )
            yield cls._chunk(
                model, {"tool_calls": [{"index": index, "function": {"arguments": second}}]}
            )
        yield cls._chunk(model, {}, cls._finish(answer))
        if include_usage:
            yield _sse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion.chunk",
                    "created": 0,
                    "model": model,
                    "choices": [],
                    "usage": cls._usage(answer),
                }
            )
        yield _sse("[DONE]")


class _Anthropic:
    """The Messages wire format."""

    @staticmethod
    def _stop(reply: Reply) -> str:
        return reply.finish or ("tool_use" if reply.tool_calls else "end_turn")

    @classmethod
    def message(cls, reply: Reply) -> object:
        content: list[dict[str, Any]] = []
        if reply.text:
            content.append({"type": "text", "text": reply.text})
        content.extend(
            {"type": "tool_use", "id": i, "name": n, "input": json.loads(a)}
            for i, n, a in reply.tool_calls
        )
        return {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": content,
            "stop_reason": cls._stop(reply),
            "stop_sequence": None,
            "usage": {
                "input_tokens": reply.prompt_tokens,
                "output_tokens": reply.completion_tokens,
            },
        }

    @staticmethod
    def _event(data: dict[str, Any]) -> bytes:
        return _sse(data, event=data["type"])

    @classmethod
    def events(cls, answer: Script, *, include_usage: bool) -> Iterator[bytes]:
        reply = answer if isinstance(answer, Reply) else Reply()
        start: dict[str, Any] = {
            "id": "msg_fake",
            "type": "message",
            "role": "assistant",
            "model": reply.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": reply.prompt_tokens, "output_tokens": 1},
        }
        yield cls._event({"type": "message_start", "message": start})
        pieces = answer.pieces if isinstance(answer, Reply | Truncate | StreamError) else ()
        if pieces:
            block = {"type": "text", "text": ""}
            yield cls._event({"type": "content_block_start", "index": 0, "content_block": block})
            yield _sse({"type": "ping"}, event="ping")
            for piece in pieces:
                delta = {"type": "text_delta", "text": piece}
                yield cls._event({"type": "content_block_delta", "index": 0, "delta": delta})
            if isinstance(answer, Reply):
                yield cls._event({"type": "content_block_stop", "index": 0})
        if isinstance(answer, StreamError):
            error = {"type": answer.error_type, "message": "scripted stream error"}
            yield _sse({"type": "error", "error": error}, event="error")
            return
        if not isinstance(answer, Reply):
            return  # truncated: no message_delta, no message_stop
        index = 1 if pieces else 0
        for offset, (call_id, name, arguments) in enumerate(reply.tool_calls):
            at = index + offset
            tool: dict[str, Any] = {"type": "tool_use", "id": call_id, "name": name, "input": {}}
            yield cls._event({"type": "content_block_start", "index": at, "content_block": tool})
            for part in _halves(arguments):
                delta = {"type": "input_json_delta", "partial_json": part}
                yield cls._event({"type": "content_block_delta", "index": at, "delta": delta})
            yield cls._event({"type": "content_block_stop", "index": at})
        yield cls._event(
            {
                "type": "message_delta",
                "delta": {"stop_reason": cls._stop(reply), "stop_sequence": None},
                "usage": {"output_tokens": reply.completion_tokens},
            }
        )
        yield cls._event({"type": "message_stop"})


_RENDER: dict[Protocol, type[_OpenAI] | type[_Anthropic]] = {
    "openai": _OpenAI,
    "anthropic": _Anthropic,
}
