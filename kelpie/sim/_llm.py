"""The simulated LLM: an HTTP service speaking the OpenAI and Anthropic wire protocols.

`SimLLM` is a handler for `SimHttp` (kelpie/sim/_http.py), so the official
`openai` and `anthropic` SDKs, and every line of Kelpie's providers on top of
them, run unchanged against it. It serves

- `POST /v1/chat/completions` (OpenAI chat completions): JSON, or server-sent
  events when `"stream": true` (`data: {chunk}` lines, then `data: [DONE]`,
  with a final usage chunk when `stream_options.include_usage` is set);
- `POST /v1/messages` (Anthropic Messages): JSON, or server-sent events
  (`message_start`, `content_block_start/delta/stop`, `message_delta`,
  `message_stop`, and a `ping`).

It checks requests as the real APIs do where an agent could get it wrong
(a 400 for a body that is not a JSON object, no messages, a missing
`max_tokens` on Anthropic, a bad tool name, a tool result that answers no
tool call of the message before it, or a tool call left unanswered) and
answers with plausible agent behaviour:

- With a `send_message` tool (Letta's memgpt agents), it calls 0-3 rounds of
  other tools (one call per response, or two when parallel calls are allowed),
  each with `request_heartbeat: true` (when the tool has that argument, and
  almost always), then answers with `send_message(message=...)`.
- Without one (letta_v1 and react agents), it calls 0-3 rounds of tools,
  sometimes with a sentence before them, then answers in plain text.
- A round is an assistant message with tool calls since the last genuine
  user message (tool results, and Letta's heartbeat and system-alert user
  messages, do not start a turn), so a conversation always ends: after
  `tool_rounds_max` rounds it answers. `tool_choice` is obeyed (none, a named
  tool, required/any).
- Arguments follow each tool's JSON schema (strings, numbers, booleans, enums,
  arrays, nested objects); Letta's memory tools get meaningful ones: a label
  of a block rendered in the system prompt (`<memory_blocks>` with
  `<label><description/><metadata/><value>...</value></label>`), an
  `old_content` that occurs in that block's value, contents and queries made
  of words from the conversation.

Every choice is a function of the seed and the request: each request draws
from a stream forked by the BLAKE2b digest of its body (as canonical JSON,
without `stream` and `stream_options`, so a streamed request gets the reply
its JSON twin gets) and the number of times that same body was seen before.
So identical runs give identical bytes whatever else runs concurrently, and a
retried request gets a fresh draw.
Time is trio's (virtual in a simulation): a time to first token and a time
per token, drawn per request, pace the answer and its streamed chunks.

Fault model (`LLMFaults`; each a probability per request, all zero by
default; every chance is drawn for every request, then at most one HTTP fault
(hang, rate limit, server error, in this order of precedence), at most one
content fault (over-long, unknown tool, malformed arguments, bad arguments)
and at most one early end of the body (a hang mid-stream, a reset, a
truncation) is applied, each the first in its list that fires and applies):

- `hang_p`: no answer at all, so only the client's read timeout ends the
  request (for a stream, with p=0.5 after a few chunks instead: a stalled
  stream);
- `rate_limit_p`: 429 with a `retry-after` header of 1-20 seconds (and
  `retry-after-ms`), and each protocol's error body;
- `server_error_p`: 500 or 503 (OpenAI), 500 or 529 `overloaded_error`
  (Anthropic);
- `unknown_tool_p`: one tool call names a tool the request did not offer;
- `malformed_arguments_p`: one tool call's arguments are not valid JSON
  (OpenAI, and Anthropic streams: the `input_json_delta`s), or, in an
  Anthropic JSON body where `input` is always an object, miss a required
  argument;
- `bad_arguments_p`: well-formed arguments a memory tool must refuse: a block
  label that does not exist, content over the block's `chars_limit`, an
  `old_content` the block does not hold;
- `over_long_p`: a text reply far longer than `max_tokens` worth (3x, in
  characters/4), with finish_reason `length` / stop_reason `max_tokens`;
- `truncated_stream_p`: a stream that ends cleanly but early, without its
  final events (no finish_reason chunk, usage or `[DONE]`; no `message_delta`
  or `message_stop`);
- `reset_p`: the connection is cut mid-body (a stream, or a JSON body):
  `httpx2.RemoteProtocolError`, as httpx reports a peer that closed the
  connection before the end of a chunked body.

Every fault fired is reported through `on_fault(kind, fields)` (an
`llm.fault` trace row in a simulation) and counted in `SimLLM.injected`;
`SimLLM.served` counts the requests answered (faulty or not). `quiesce()` stops
every fault from then on (a liveness phase); `faults` may also be replaced.

Not modelled: prompt caching, images, thinking blocks, the Responses API,
tool calls with `strict` schemas enforced, and context-window overflows.
Token counts are estimates: about one token per 4 characters.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, Literal

import attrs
import httpx2
import trio

from kelpie.env import Rng

_OnFault = Callable[[str, dict[str, object]], None]
_ValueMaker = Callable[[dict[str, Any], Rng, list[str], int], Any]
WireProtocol = Literal["openai", "anthropic"]

#: The rounds of tool calls a conversation gets per user turn before the final answer.
TOOL_ROUNDS_MAX = 3
#: Assumed when an OpenAI request gives no max_tokens.
_DEFAULT_MAX_TOKENS = 4096
#: The longest over-long reply, in characters.
_OVER_LONG_MAX_CHARS = 256 * 1024
#: `created` timestamps count virtual seconds from 2026-01-01T00:00:00Z.
_CREATED_EPOCH_S = 1_767_225_600
_TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
_WORD = re.compile(r"[A-Za-z][A-Za-z'-]{2,}")
_BLOCK = re.compile(r"<([A-Za-z0-9_.-]+)>(.*?)</\1>", re.DOTALL)
_VALUE = re.compile(r"<value>\n?(.*?)\n?</value>", re.DOTALL)
_LIMIT = re.compile(r"chars_limit\s*=\s*(\d+)")
_READ_ONLY = re.compile(r"read_only\s*=\s*true", re.IGNORECASE)
#: Words too common to be what a conversation is about.
_STOPWORDS_TEXT = (
    "the and for you your with that this what have are was were from about they them there "
    "their will would could should can just like into also been has had not but our out she "
    "her his him its it's i'm don't please tell know next want"
)
_STOPWORDS = frozenset(_STOPWORDS_TEXT.split())
_FALLBACK_WORDS = (
    "weather",
    "project",
    "deadline",
    "garden",
    "music",
    "travel",
    "coffee",
    "library",
    "birthday",
    "meeting",
)
#: What the memory tools' string arguments mean, by argument name.
_PROP_ROLES = {
    "label": "label",
    "old_content": "fragment",
    "old_str": "fragment",
    "old_string": "fragment",
    "query": "query",
    "search": "query",
    "keywords": "query",
    "message": "message",
    "inner_thoughts": "thought",
    "content": "sentence",
    "new_content": "sentence",
    "new_str": "sentence",
    "new_memory": "sentence",
    "text": "sentence",
    "memory": "sentence",
}
#: The most distinct words the model takes from a conversation.
_WORDS_MAX = 64
#: How deep generated arguments nest.
_SCHEMA_DEPTH_MAX = 4
_UNKNOWN_TOOLS = (
    "web_search",
    "run_python",
    "send_email",
    "core_memory_delete",
    "get_weather",
    "open_url",
)


@attrs.frozen
class LLMFaults:
    """The faults the simulated LLM injects (see kelpie/sim/_llm.py). All zero: none."""

    hang_p: float = 0.0
    rate_limit_p: float = 0.0
    server_error_p: float = 0.0
    unknown_tool_p: float = 0.0
    malformed_arguments_p: float = 0.0
    bad_arguments_p: float = 0.0
    over_long_p: float = 0.0
    truncated_stream_p: float = 0.0
    reset_p: float = 0.0

    @classmethod
    def every(cls) -> LLMFaults:
        """Every LLM fault on, at rates an agent that retries still gets its answers under."""
        return cls(
            hang_p=0.01,
            rate_limit_p=0.03,
            server_error_p=0.03,
            unknown_tool_p=0.03,
            malformed_arguments_p=0.03,
            bad_arguments_p=0.05,
            over_long_p=0.02,
            truncated_stream_p=0.03,
            reset_p=0.02,
        )

    def describe(self) -> str:
        if self == LLMFaults():
            return "off"
        fields = attrs.asdict(self)
        return " ".join(f"{name}={value:g}" for name, value in fields.items() if value)


# -- the request, as the simulated model sees it ---------------------------------------


class _BadRequest(Exception):
    """The request is one the real API would refuse with a 400."""


@attrs.frozen
class _Tool:
    name: str
    schema: dict[str, Any]


@attrs.frozen
class _Message:
    role: str  # "user" (a genuine user turn), "assistant", "tool" (results, heartbeats)
    text: str
    calls: int = 0  # the number of tool calls in an assistant message


@attrs.frozen
class _Block:
    label: str
    value: str
    limit: int | None
    read_only: bool


@attrs.frozen
class _Request:
    protocol: WireProtocol
    model: str
    system: str
    messages: tuple[_Message, ...]
    tools: tuple[_Tool, ...]
    #: "auto", "none", "required", or the name of the one tool to call.
    tool_choice: str
    parallel: bool
    max_tokens: int
    stream: bool
    include_usage: bool
    prompt_tokens: int

    def tool(self, name: str) -> _Tool | None:
        for tool in self.tools:
            if tool.name == name:
                return tool
        return None


@attrs.define
class _Call:
    id: str
    name: str
    arguments: dict[str, Any]
    #: The arguments as sent: JSON text, possibly malformed.
    text: str = ""
    #: For an Anthropic JSON body (whose `input` is always an object): the input sent.
    input_override: dict[str, Any] | None = None


@attrs.define
class _Reply:
    text: str
    calls: list[_Call]
    #: "stop", "tool_calls" or "length" (OpenAI's words; Anthropic's are mapped).
    finish: str


# -- the service ---------------------------------------------------------------------


class SimLLM:
    """A simulated LLM service for `SimHttp` (see the module docstring)."""

    def __init__(
        self,
        rng: Rng,
        *,
        faults: LLMFaults = LLMFaults(),
        on_fault: _OnFault | None = None,
        tool_rounds_max: int = TOOL_ROUNDS_MAX,
    ) -> None:
        if tool_rounds_max < 0:
            raise ValueError(f"tool_rounds_max must be >= 0, got {tool_rounds_max}")
        self.faults = faults
        self.tool_rounds_max = tool_rounds_max
        #: Requests answered (whatever the answer), and faults injected by kind.
        self.served = 0
        self.injected: dict[str, int] = {}
        self._rng = rng
        self._on_fault = on_fault
        self._seen: dict[str, int] = {}

    async def __call__(self, request: httpx2.Request) -> httpx2.Response:
        body = await request.aread()
        self.served += 1
        path = request.url.path.rstrip("/")
        if request.method != "POST" or not path.endswith(("/chat/completions", "/messages")):
            return _error(
                _protocol_of(path), 404, "not_found_error", f"no route {request.method} {path}"
            )
        protocol: WireProtocol = "openai" if path.endswith("/chat/completions") else "anthropic"
        try:
            data = json.loads(body)
        except ValueError as exc:
            return _error(protocol, 400, "invalid_request_error", f"the body is not JSON: {exc}")
        content = _content_of(data)
        rng = self._request_rng(content)
        try:
            parsed = _parse(protocol, data, len(content))
        except _BadRequest as exc:
            return _error(protocol, 400, "invalid_request_error", str(exc))
        return await self._answer(parsed, rng)

    def quiesce(self) -> None:
        """From now on, no fault is injected (a liveness phase)."""
        self.faults = LLMFaults()

    def _request_rng(self, content: bytes) -> Rng:
        """The stream of one request: its content, and how often that content was seen."""
        digest = hashlib.blake2b(content, digest_size=16).hexdigest()
        seen = self._seen.get(digest, 0)
        self._seen[digest] = seen + 1
        return self._rng.fork(f"{digest}:{seen}")

    def _inject(self, kind: str, **fields: object) -> None:
        self.injected[kind] = self.injected.get(kind, 0) + 1
        if self._on_fault is not None:
            self._on_fault(kind, fields)

    async def _answer(self, req: _Request, rng: Rng) -> httpx2.Response:
        f = self.faults
        draws = rng.fork("faults")
        # Every chance is drawn, in a fixed order, so one fault's rate never moves another's.
        fired = {
            name: draws.chance(getattr(f, f"{name}_p"))
            for name in (
                "hang",
                "rate_limit",
                "server_error",
                "unknown_tool",
                "malformed_arguments",
                "bad_arguments",
                "over_long",
                "truncated_stream",
                "reset",
            )
        }
        pace = rng.fork("pace")
        first_token_s = pace.uniform(0.1, 0.8)
        token_s = pace.uniform(0.005, 0.02)
        base = {"protocol": req.protocol, "stream": req.stream}
        hang_mid_stream = req.stream and draws.chance(0.5)
        if fired["hang"] and not hang_mid_stream:
            self._inject("hang", **base)
            await trio.sleep_forever()
        if fired["rate_limit"]:
            retry_after_s = draws.randint(1, 20)
            self._inject("rate_limit", retry_after_s=retry_after_s, **base)
            await trio.sleep(pace.uniform(0.005, 0.05))
            return _rate_limited(req.protocol, retry_after_s)
        if fired["server_error"]:
            status = draws.choice((500, 503) if req.protocol == "openai" else (500, 529))
            self._inject("server_error", status=status, **base)
            await trio.sleep(pace.uniform(0.005, 0.5))
            return _server_error(req.protocol, status)

        reply = self._reply(req, rng, fired)
        for call in reply.calls:
            if not call.text:
                call.text = json.dumps(call.arguments)

        completion_tokens = _tokens(reply.text) + sum(
            _tokens(c.name) + _tokens(c.text) for c in reply.calls
        )
        usage = (req.prompt_tokens, completion_tokens)
        ids = _Ids(rng.fork("ids"))
        if not req.stream:
            await trio.sleep(first_token_s + min(completion_tokens, req.max_tokens) * token_s)
            return self._json_response(req, reply, usage, ids, fired["reset"], draws)
        chunks = rng.fork("chunks")
        pieces = (
            _openai_events(req, reply, usage, ids, chunks)
            if req.protocol == "openai"
            else _anthropic_events(req, reply, usage, ids, chunks)
        )
        return self._stream_response(
            req, pieces, ids, (first_token_s, token_s), fired, hang_mid_stream, draws
        )

    def _reply(self, req: _Request, rng: Rng, fired: dict[str, bool]) -> _Reply:
        """The model's reply, with at most one content fault: the first that fires and applies."""
        base = {"protocol": req.protocol, "stream": req.stream}
        if fired["over_long"]:
            reply = _over_long(req, rng.fork("over-long"))
            self._inject("over_long", chars=len(reply.text), max_tokens=req.max_tokens, **base)
            return reply
        behaviour = _Behaviour(req, rng.fork("reply"), self.tool_rounds_max)
        reply = behaviour.reply()
        if fired["unknown_tool"] and req.tools and req.tool_choice != "none":
            name = _unknown_tool(req, reply, rng.fork("unknown-tool"))
            self._inject("unknown_tool", name=name, **base)
        elif fired["malformed_arguments"] and reply.calls:
            call = _malform(req, reply, rng.fork("malformed"))
            self._inject("malformed_arguments", name=call.name, **base)
        elif fired["bad_arguments"]:
            mistake = behaviour.spoil(reply, rng.fork("mistake"))
            if mistake is not None:
                self._inject("bad_arguments", mistake=mistake, **base)
        return reply

    def _json_response(
        self,
        req: _Request,
        reply: _Reply,
        usage: tuple[int, int],
        ids: _Ids,
        reset: bool,
        draws: Rng,
    ) -> httpx2.Response:
        body = (
            _openai_json(req, reply, usage, ids)
            if req.protocol == "openai"
            else _anthropic_json(req, reply, usage, ids)
        )
        data = json.dumps(body).encode()
        headers = _headers(req.protocol, ids, "application/json")
        if not reset:
            return httpx2.Response(200, headers=headers, content=data)
        cut = draws.randint(1, len(data) - 1)
        self._inject("reset", at_byte=cut, of_bytes=len(data), protocol=req.protocol, stream=False)
        return httpx2.Response(200, headers=headers, stream=_Body([(0.0, data[:cut])], "reset"))

    def _stream_response(
        self,
        req: _Request,
        pieces: list[_Piece],
        ids: _Ids,
        pace: tuple[float, float],
        fired: dict[str, bool],
        hang_mid_stream: bool,
        draws: Rng,
    ) -> httpx2.Response:
        base = {"protocol": req.protocol, "stream": True}
        # Where a stream fault cuts: after at least the first event, before the final ones.
        final = sum(1 for piece in pieces if piece.final)
        cut = draws.randint(1, max(1, len(pieces) - final))
        end: _End = "complete"
        if fired["hang"] and hang_mid_stream:
            end = "hang"
            self._inject("hang", after_events=cut, **base)
        elif fired["reset"]:
            end = "reset"
            self._inject("reset", after_events=cut, of_events=len(pieces), **base)
        elif fired["truncated_stream"]:
            end = "early"
            self._inject("truncated_stream", after_events=cut, of_events=len(pieces), **base)
        else:
            cut = len(pieces)
        first_token_s, token_s = pace
        timed = [
            (first_token_s if i == 0 else piece.tokens * token_s, piece.data)
            for i, piece in enumerate(pieces[:cut])
        ]
        headers = _headers(req.protocol, ids, "text/event-stream")
        return httpx2.Response(200, headers=headers, stream=_Body(timed, end))

    def __repr__(self) -> str:
        return f"SimLLM({self.faults.describe()}, served={self.served})"


# -- parsing requests ----------------------------------------------------------------


def _content_of(data: object) -> bytes:
    """A request's content as canonical JSON, whether it asked for a stream or not."""
    if isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in ("stream", "stream_options")}
    return json.dumps(data, sort_keys=True, separators=(",", ":")).encode()


def _protocol_of(path: str) -> WireProtocol:
    return "openai" if "/chat/" in path else "anthropic"


def _parse(protocol: WireProtocol, data: object, size: int) -> _Request:
    if not isinstance(data, dict):
        raise _BadRequest("the body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise _BadRequest("model: a model name is required")
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _BadRequest("messages: at least one message is required")
    if not all(isinstance(m, dict) for m in messages):
        raise _BadRequest("messages: every message must be an object")
    if data.get("stream") not in (None, True, False):
        raise _BadRequest("stream: must be a boolean")
    if protocol == "openai":
        return _parse_openai(data, model, messages, size)
    return _parse_anthropic(data, model, messages, size)


def _parse_tools(raw: object, protocol: WireProtocol) -> tuple[_Tool, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise _BadRequest("tools: must be a list")
    tools: list[_Tool] = []
    for index, entry in enumerate(raw):
        if not isinstance(entry, dict):
            raise _BadRequest(f"tools.{index}: must be an object")
        if protocol == "openai":
            function = entry.get("function")
            if entry.get("type") != "function" or not isinstance(function, dict):
                raise _BadRequest(f"tools.{index}: only function tools are supported")
            name, schema = function.get("name"), function.get("parameters", {})
        else:
            name, schema = entry.get("name"), entry.get("input_schema")
            if not isinstance(schema, dict):
                raise _BadRequest(f"tools.{index}.input_schema: Field required")
        if not isinstance(name, str) or not _TOOL_NAME.match(name):
            raise _BadRequest(f"tools.{index}.name: must match ^[a-zA-Z0-9_-]{{1,64}}$: {name!r}")
        if any(tool.name == name for tool in tools):
            raise _BadRequest(f"tools: tool names must be unique: {name!r}")
        tools.append(_Tool(name, schema if isinstance(schema, dict) else {}))
    return tuple(tools)


def _text_of(content: object) -> str:
    """The text of a message's content: a string, or a list of text parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict):
                text = part.get("text")
                if isinstance(text, str):
                    parts.append(text)
                elif part.get("type") == "tool_result":
                    parts.append(_text_of(part.get("content")))
        return "\n".join(parts)
    return ""


def _user_message(text: str) -> _Message:
    """A user message: a genuine turn, or one of Letta's packed system messages."""
    stripped = text.strip()
    if stripped.startswith("{"):
        try:
            packed = json.loads(stripped)
        except ValueError:
            packed = None
        if isinstance(packed, dict) and isinstance(packed.get("type"), str):
            if packed["type"] != "user_message":
                return _Message("tool", text)  # a heartbeat, a system alert, a login
            inner = packed.get("message")
            return _Message("user", inner if isinstance(inner, str) else text)
    if "[This is an automated system message" in text:
        return _Message("tool", text)
    return _Message("user", text)


def _parse_openai(
    data: dict[str, Any], model: str, raw: list[dict[str, Any]], size: int
) -> _Request:
    system, messages = _openai_messages(raw)
    tools = _parse_tools(data.get("tools"), "openai")
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    options = data.get("stream_options")
    return _Request(
        protocol="openai",
        model=model,
        system=system,
        messages=messages,
        tools=tools,
        tool_choice=_openai_tool_choice(data.get("tool_choice", "auto"), tools),
        parallel=data.get("parallel_tool_calls", True) is not False,
        max_tokens=_max_tokens(max_tokens, default=_DEFAULT_MAX_TOKENS),
        stream=data.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        prompt_tokens=_tokens_of_size(size),
    )


def _openai_messages(raw: list[dict[str, Any]]) -> tuple[str, tuple[_Message, ...]]:
    """The system prompt and the conversation; checks that tool calls and results pair up."""
    system: list[str] = []
    messages: list[_Message] = []
    pending: list[str] = []  # tool calls of the last assistant message not yet answered
    for index, m in enumerate(raw):
        role, text = m.get("role"), _text_of(m.get("content"))
        if role != "tool" and pending:
            raise _BadRequest(
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(pending)}"
            )
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            messages.append(_user_message(text))
        elif role == "assistant":
            calls = m.get("tool_calls") or []
            call_ids = _ids_of(calls if isinstance(calls, list) else [None], "id")
            if call_ids is None:
                raise _BadRequest(f"messages.{index}.tool_calls: every tool call needs an id")
            pending = call_ids
            messages.append(_Message("assistant", text, len(calls)))
        elif role == "tool":
            if m.get("tool_call_id") not in pending:
                raise _BadRequest(
                    f"messages.[{index}].role: messages with role 'tool' must be a response "
                    "to a preceeding message with 'tool_calls'."
                )
            pending.remove(m["tool_call_id"])
            messages.append(_Message("tool", text))
        else:
            raise _BadRequest(f"messages.{index}.role: unknown role {role!r}")
    if pending:
        raise _BadRequest(f"tool_call_ids without response messages: {', '.join(pending)}")
    return "\n".join(system), tuple(messages)


def _openai_tool_choice(choice: object, tools: tuple[_Tool, ...]) -> str:
    if isinstance(choice, dict):
        function = choice.get("function")
        choice = function.get("name") if isinstance(function, dict) else None
        if not isinstance(choice, str):
            raise _BadRequest("tool_choice: a named tool choice needs function.name")
    if choice in ("auto", "none", "required"):
        return str(choice)
    if not any(t.name == choice for t in tools):
        raise _BadRequest(f"tool_choice: no tool named {choice!r}")
    return str(choice)


def _parse_anthropic(
    data: dict[str, Any], model: str, raw: list[dict[str, Any]], size: int
) -> _Request:
    if "max_tokens" not in data:
        raise _BadRequest("max_tokens: Field required")
    tools = _parse_tools(data.get("tools"), "anthropic")
    choice = data.get("tool_choice") or {"type": "auto"}
    if not isinstance(choice, dict):
        raise _BadRequest("tool_choice: must be an object")
    return _Request(
        protocol="anthropic",
        model=model,
        system=_text_of(data.get("system")),
        messages=_anthropic_messages(raw),
        tools=tools,
        tool_choice=_anthropic_tool_choice(choice, tools),
        parallel=choice.get("disable_parallel_tool_use") is not True,
        max_tokens=_max_tokens(data.get("max_tokens"), default=None),
        stream=data.get("stream") is True,
        include_usage=True,
        prompt_tokens=_tokens_of_size(size),
    )


def _anthropic_messages(raw: list[dict[str, Any]]) -> tuple[_Message, ...]:
    """The conversation; checks that every tool_use is answered in the very next message."""
    messages: list[_Message] = []
    pending: list[str] = []
    for index, m in enumerate(raw):
        role, content = m.get("role"), m.get("content")
        blocks = [b for b in content if isinstance(b, dict)] if isinstance(content, list) else []
        answered = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
        missing = [p for p in pending if p not in answered or role != "user"]
        if missing:
            raise _BadRequest(
                f"messages.{index}: `tool_use` ids were found without `tool_result` blocks "
                f"immediately after: {', '.join(missing)}"
            )
        unexpected = [a for a in answered if a not in pending]
        if unexpected:
            raise _BadRequest(
                f"messages.{index}.content: unexpected `tool_use_id` found in `tool_result` "
                f"blocks: {unexpected[0]}. Each `tool_result` block must have a corresponding "
                "`tool_use` block in the previous message."
            )
        if role == "user":
            text = _text_of(content)
            messages.append(_Message("tool", text) if answered else _user_message(text))
            pending = []
        elif role == "assistant":
            uses = _ids_of([b for b in blocks if b.get("type") == "tool_use"], "id")
            if uses is None:
                raise _BadRequest(f"messages.{index}.content: every tool_use needs an id")
            pending = uses
            messages.append(_Message("assistant", _text_of(content), len(pending)))
        else:
            raise _BadRequest(f"messages.{index}.role: must be 'user' or 'assistant'")
    if pending:
        raise _BadRequest(
            "`tool_use` ids were found without `tool_result` blocks immediately after: "
            + ", ".join(pending)
        )
    return tuple(messages)


def _ids_of(items: list[Any], key: str) -> list[str] | None:
    """The string `key` of every item, or None if an item is not an object with one."""
    ids = [item.get(key) if isinstance(item, dict) else None for item in items]
    return [i for i in ids if isinstance(i, str)] if all(isinstance(i, str) for i in ids) else None


def _anthropic_tool_choice(choice: dict[str, Any], tools: tuple[_Tool, ...]) -> str:
    kind = choice.get("type")
    if kind == "tool":
        name = choice.get("name")
        if not isinstance(name, str) or not any(t.name == name for t in tools):
            raise _BadRequest(f"tool_choice.name: no tool named {name!r}")
        return name
    named = {"auto": "auto", "none": "none", "any": "required"}.get(str(kind))
    if named is None:
        raise _BadRequest(f"tool_choice.type: unknown {kind!r}")
    return named


def _max_tokens(value: object, *, default: int | None) -> int:
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise _BadRequest(f"max_tokens: must be an integer >= 1, got {value!r}")
    return value


def _tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _tokens_of_size(size: int) -> int:
    return max(1, (size + 3) // 4)


def _memory_blocks(system: str) -> list[_Block]:
    """The core memory blocks rendered Letta-style in the system prompt."""
    start, end = system.find("<memory_blocks>"), system.find("</memory_blocks>")
    if start < 0 or end < start:
        return []
    blocks = []
    for match in _BLOCK.finditer(system[start + len("<memory_blocks>") : end]):
        label, inner = match.group(1), match.group(2)
        value = _VALUE.search(inner)
        if value is None:
            continue
        limit = _LIMIT.search(inner)
        blocks.append(
            _Block(
                label=label,
                value=value.group(1),
                limit=int(limit.group(1)) if limit else None,
                read_only=_READ_ONLY.search(inner) is not None,
            )
        )
    return blocks


# -- behaviour -----------------------------------------------------------------------


class _Behaviour:
    """What the simulated model says to one request."""

    def __init__(self, req: _Request, rng: Rng, rounds_max: int) -> None:
        self.req = req
        self.rng = rng
        self.rounds_max = rounds_max
        self.blocks = _memory_blocks(req.system)
        self.words = _conversation_words(req.messages, self.blocks)
        self._ids = _Ids(rng.fork("call-ids"))

    def rounds(self) -> int:
        """Assistant messages with tool calls since the last genuine user message."""
        count = 0
        for message in reversed(self.req.messages):
            if message.role == "user":
                break
            if message.role == "assistant" and message.calls:
                count += 1
        return count

    def reply(self) -> _Reply:
        req, rng = self.req, self.rng
        names = [tool.name for tool in req.tools]
        memgpt = "send_message" in names
        others = [name for name in names if name != "send_message"]
        if not names or req.tool_choice == "none":
            return _Reply(self.answer_text(), [], "stop")
        if req.tool_choice not in ("auto", "required"):
            return _Reply("", [self.call(req.tool_choice, heartbeat=True)], "tool_calls")
        rounds = self.rounds()
        go_on = 0.6 - 0.15 * rounds
        if others and rounds < self.rounds_max and rng.chance(go_on):
            count = 2 if req.parallel and len(others) > 1 and rng.chance(0.25) else 1
            chosen = rng.sample(others, count)
            calls = [self.call(name, heartbeat=rng.chance(0.95)) for name in chosen]
            text = "" if memgpt or not rng.chance(0.3) else self.preamble()
            return _Reply(text, calls, "tool_calls")
        if memgpt:
            message = self.answer_text()
            return _Reply("", [self.call("send_message", message=message)], "tool_calls")
        if req.tool_choice == "required":
            return _Reply("", [self.call(rng.choice(names), heartbeat=False)], "tool_calls")
        return _Reply(self.answer_text(), [], "stop")

    # -- texts

    def pick_words(self, low: int, high: int) -> list[str]:
        pool = self.words or list(_FALLBACK_WORDS)
        return self.rng.sample(pool, min(len(pool), self.rng.randint(low, high)))

    def sentence(self) -> str:
        words = self.pick_words(1, 3)
        template = self.rng.choice(
            (
                "The user mentioned {}.",
                "User cares about {}.",
                "Remember: the user talked about {}.",
                "Note to self: {} came up in conversation.",
            )
        )
        return template.format(" and ".join(words))

    def preamble(self) -> str:
        return self.rng.choice(
            (
                "Let me check my memory first.",
                "One moment, I'll look that up.",
                "I'll make a note of that.",
            )
        )

    def answer_text(self) -> str:
        words = self.pick_words(1, 2)
        topic = " and ".join(words)
        template = self.rng.choice(
            (
                "Thanks for telling me about {}. I'll keep it in mind.",
                "Got it: {}. Is there anything else you'd like to talk about?",
                "I remember you mentioned {}. How is that going?",
                "Interesting, {}! Tell me more.",
                "Noted. I've thought about {} and I'm happy to help.",
            )
        )
        return template.format(topic)

    # -- tool calls

    def call(self, name: str, *, heartbeat: bool = True, message: str | None = None) -> _Call:
        tool = self.req.tool(name)
        schema = tool.schema if tool is not None else {}
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        arguments = self.arguments(name, schema)
        if message is not None and "message" in props:
            arguments["message"] = message
        if "request_heartbeat" in props:
            arguments["request_heartbeat"] = heartbeat and name != "send_message"
        return _Call(self._ids.call_id(self.req.protocol), name, arguments)

    def arguments(self, name: str, schema: dict[str, Any]) -> dict[str, Any]:
        props = schema.get("properties")
        props = props if isinstance(props, dict) else {}
        required = schema.get("required")
        required = required if isinstance(required, list) else []
        block = self.choose_block(name)
        arguments: dict[str, Any] = {}
        for prop, sub in props.items():
            if prop == "request_heartbeat":
                continue
            if prop not in required and not self.rng.chance(0.3):
                continue
            arguments[prop] = self.argument(prop, sub if isinstance(sub, dict) else {}, block)
        return arguments

    def choose_block(self, tool: str) -> _Block | None:
        writable = [b for b in self.blocks if not b.read_only] or self.blocks
        if "replace" in tool or "rethink" in tool:
            filled = [b for b in writable if b.value.strip()]
            writable = filled or writable
        return self.rng.choice(writable) if writable else None

    def argument(self, prop: str, schema: dict[str, Any], block: _Block | None) -> Any:
        role = _PROP_ROLES.get(prop)
        if role is None or _type_of(schema) != "string" or "enum" in schema:
            return _from_schema(schema, self.rng, self.words, depth=0)
        if role == "label":
            return block.label if block is not None else self.rng.choice(("human", "persona"))
        if role == "fragment":
            return _fragment(block.value if block else "", self.rng) or self.sentence()
        texts: dict[str, Callable[[], str]] = {
            "query": lambda: " ".join(self.pick_words(1, 3)),
            "message": self.answer_text,
            "thought": lambda: f"The user wrote about {' and '.join(self.pick_words(1, 2))}.",
            "sentence": self.sentence,
        }
        return texts[role]()

    def spoil(self, reply: _Reply, rng: Rng) -> str | None:
        """Makes the first memory-tool call of `reply` one its tool must refuse (the
        bad_arguments fault): returns "tool:mistake", or None when no call can carry one."""
        for call in reply.calls:
            mistake = self.mistake(call.arguments, rng)
            if mistake is not None:
                return f"{call.name}:{mistake}"
        return None

    def mistake(self, arguments: dict[str, Any], rng: Rng) -> str | None:
        options = []
        if "label" in arguments:
            options.append("unknown_label")
        if "old_content" in arguments or "old_str" in arguments:
            options.append("missing_old_content")
        content_key = next(
            (k for k in ("content", "new_content", "new_str", "new_memory") if k in arguments),
            None,
        )
        if content_key is not None:
            options.append("over_limit")
        if not options:
            return None
        mistake = rng.choice(options)
        block = next((b for b in self.blocks if b.label == arguments.get("label")), None)
        if mistake == "unknown_label":
            labels = {b.label for b in self.blocks}
            label = "scratchpad"
            while label in labels:
                label += "_x"
            arguments["label"] = label
        elif mistake == "missing_old_content":
            key = "old_content" if "old_content" in arguments else "old_str"
            arguments[key] = "words that were never in this block " + "".join(
                rng.choice("qxzjk") for _ in range(8)
            )
        else:
            assert content_key is not None
            limit = block.limit if block is not None and block.limit else 5000
            filler = self.sentence() + " "
            arguments[content_key] = (filler * (limit // len(filler) + 2))[: limit + 100]
        return mistake


def _conversation_words(messages: Sequence[_Message], blocks: Sequence[_Block]) -> list[str]:
    """Distinct content words of the user's messages (the latest first); if they are few,
    of the memory blocks too. Tool results are left out: mostly JSON keys and status words."""
    texts = [m.text for m in reversed(messages) if m.role == "user"]
    seen: dict[str, None] = {}
    for text in [*texts, *(b.value for b in blocks)]:
        if len(seen) >= _WORDS_MAX or (len(seen) >= 3 and text not in texts):
            break
        for word in _WORD.findall(text):
            lowered = word.lower()
            if lowered not in _STOPWORDS:
                seen[lowered] = None
    return list(seen)[:_WORDS_MAX]


def _fragment(value: str, rng: Rng) -> str:
    """1-4 consecutive words of `value`, exactly as they appear in it (empty if none)."""
    spans = [m.span() for m in re.finditer(r"\S+", value)]
    if not spans:
        return ""
    start = rng.randrange(len(spans))
    stop = min(len(spans), start + rng.randint(1, 4))
    return value[spans[start][0] : spans[stop - 1][1]]


def _type_of(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        kind = kinds[0] if kinds else "null"
    if isinstance(kind, str):
        return kind
    if "properties" in schema:
        return "object"
    if "items" in schema:
        return "array"
    if "enum" in schema:
        return "enum"
    return "string"


def _from_schema(schema: dict[str, Any], rng: Rng, words: list[str], depth: int) -> Any:
    """A value that conforms to (the common subset of) JSON Schema."""
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return rng.choice(enum)
    for key in ("anyOf", "oneOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            usable = [o for o in options if isinstance(o, dict) and o.get("type") != "null"]
            return _from_schema(rng.choice(usable) if usable else {}, rng, words, depth)
    make: _ValueMaker = _VALUE_MAKERS.get(_type_of(schema), _string)
    return make(schema, rng, words, depth)


def _boolean(schema: dict[str, Any], rng: Rng, words: list[str], depth: int) -> bool:
    return rng.chance(0.5)


def _null(schema: dict[str, Any], rng: Rng, words: list[str], depth: int) -> None:
    return None


def _numeric(schema: dict[str, Any], rng: Rng, words: list[str], depth: int) -> int | float:
    low = math.ceil(_number(schema, "minimum", "exclusiveMinimum", 0))
    high = math.floor(_number(schema, "maximum", "exclusiveMaximum", low + 100))
    value = rng.randint(low, max(low, high))
    return value if _type_of(schema) == "integer" else value + rng.randint(0, 99) / 100


def _array(schema: dict[str, Any], rng: Rng, words: list[str], depth: int) -> list[Any]:
    items = schema.get("items")
    low = int(_number(schema, "minItems", "", 0))
    high = max(low, min(int(_number(schema, "maxItems", "", 3)), 3))
    if depth >= _SCHEMA_DEPTH_MAX:
        return []
    return [
        _from_schema(items if isinstance(items, dict) else {}, rng, words, depth + 1)
        for _ in range(rng.randint(low, high))
    ]


def _object(schema: dict[str, Any], rng: Rng, words: list[str], depth: int) -> dict[str, Any]:
    if depth >= _SCHEMA_DEPTH_MAX:
        return {}
    props = schema.get("properties")
    required = schema.get("required") or []
    result: dict[str, Any] = {}
    for name, sub in (props if isinstance(props, dict) else {}).items():
        if name in required or rng.chance(0.5):
            result[name] = _from_schema(sub if isinstance(sub, dict) else {}, rng, words, depth + 1)
    return result


def _number(schema: dict[str, Any], key: str, exclusive_key: str, default: float) -> float:
    """A numeric bound of `schema` (an exclusive one moved inward by 1), or `default`."""
    for name, step in ((key, 0), (exclusive_key, 1 if "min" in exclusive_key.lower() else -1)):
        value = schema.get(name) if name else None
        if isinstance(value, int | float) and not isinstance(value, bool):
            return value + step
    return default


def _string(schema: dict[str, Any], rng: Rng, words: list[str], depth: int = 0) -> str:
    fmt = schema.get("format")
    if fmt == "date-time":
        return f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T12:00:00Z"
    if fmt == "date":
        return f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}"
    pool = words or list(_FALLBACK_WORDS)
    text = " ".join(rng.choice(pool) for _ in range(rng.randint(1, 4)))
    low, high = int(_number(schema, "minLength", "", 0)), schema.get("maxLength")
    while len(text) < low:
        text += " " + rng.choice(pool)
    return text[:high] if isinstance(high, int) else text


_VALUE_MAKERS: dict[str, _ValueMaker] = {
    "boolean": _boolean,
    "null": _null,
    "integer": _numeric,
    "number": _numeric,
    "array": _array,
    "object": _object,
    "string": _string,
}


# -- faults that change the reply ------------------------------------------------------


def _over_long(req: _Request, rng: Rng) -> _Reply:
    words = list(_FALLBACK_WORDS)
    chars = min(req.max_tokens * 4 * 3, _OVER_LONG_MAX_CHARS)
    parts: list[str] = []
    size = 0
    while size < chars:
        sentence = (
            f"And then there is {rng.choice(words)}, which reminds me of {rng.choice(words)}. "
        )
        parts.append(sentence)
        size += len(sentence)
    return _Reply("".join(parts)[:chars], [], "length")


def _unknown_tool(req: _Request, reply: _Reply, rng: Rng) -> str:
    offered = {tool.name for tool in req.tools}
    candidates = [name for name in _UNKNOWN_TOOLS if name not in offered]
    name = rng.choice(candidates) if candidates else "tool_" + "".join(sorted(offered))[:40]
    while name in offered:
        name += "_x"
    arguments = {"query": " ".join(rng.choice(_FALLBACK_WORDS) for _ in range(2))}
    ids = _Ids(rng.fork("ids"))
    call = _Call(ids.call_id(req.protocol), name, arguments)
    if reply.calls:
        reply.calls[rng.randrange(len(reply.calls))] = call
    else:
        reply.calls.append(call)
        reply.finish = "tool_calls"
    return name


def _malform(req: _Request, reply: _Reply, rng: Rng) -> _Call:
    call = reply.calls[rng.randrange(len(reply.calls))]
    text = json.dumps(call.arguments)
    how = rng.choice(("truncated", "unquoted", "trailing"))
    if how == "truncated" or len(text) < 4:
        call.text = text[: max(1, len(text) // 2)]
    elif how == "unquoted":
        call.text = text.replace('"', "", 2)
    else:
        call.text = text[:-1] + ",}"
    if req.protocol == "anthropic" and not req.stream:
        # An Anthropic JSON body's `input` is always an object: the model's slip shows
        # as an argument missing (or, without required ones, as an unexpected one).
        tool = req.tool(call.name)
        required = tool.schema.get("required", []) if tool is not None else []
        broken = dict(call.arguments)
        present = [key for key in required if key in broken]
        if present:
            del broken[rng.choice(present)]
        else:
            broken["unexpected_argument"] = 1
        call.input_override = broken
    return call


# -- ids and headers -----------------------------------------------------------------


class _Ids:
    """Provider-style ids, drawn from the request's stream."""

    _ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"

    def __init__(self, rng: Rng) -> None:
        self._rng = rng

    def _chars(self, n: int) -> str:
        return "".join(self._rng.choice(self._ALPHABET) for _ in range(n))

    def call_id(self, protocol: WireProtocol) -> str:
        return f"call_{self._chars(24)}" if protocol == "openai" else f"toolu_01{self._chars(22)}"

    def response_id(self, protocol: WireProtocol) -> str:
        return f"chatcmpl-{self._chars(29)}" if protocol == "openai" else f"msg_01{self._chars(22)}"

    def request_id(self) -> str:
        return f"req_{self._chars(24)}"


def _headers(protocol: WireProtocol, ids: _Ids, content_type: str) -> dict[str, str]:
    key = "x-request-id" if protocol == "openai" else "request-id"
    return {"content-type": content_type, key: ids.request_id()}


def _error(protocol: WireProtocol, status: int, kind: str, message: str) -> httpx2.Response:
    if protocol == "openai":
        body: dict[str, Any] = {
            "error": {"message": message, "type": kind, "param": None, "code": kind}
        }
    else:
        body = {"type": "error", "error": {"type": kind, "message": message}}
    return httpx2.Response(status, json=body)


def _rate_limited(protocol: WireProtocol, retry_after_s: int) -> httpx2.Response:
    response = _error(
        protocol,
        429,
        "rate_limit_exceeded" if protocol == "openai" else "rate_limit_error",
        f"Rate limit reached. Please try again in {retry_after_s}s.",
    )
    response.headers["retry-after"] = str(retry_after_s)
    response.headers["retry-after-ms"] = str(retry_after_s * 1000)
    return response


def _server_error(protocol: WireProtocol, status: int) -> httpx2.Response:
    if status == 529:
        return _error(protocol, status, "overloaded_error", "Overloaded")
    if status == 503:
        return _error(
            protocol, status, "server_error", "The server is overloaded or not ready yet."
        )
    kind = "server_error" if protocol == "openai" else "api_error"
    return _error(protocol, status, kind, "The server had an error processing your request.")


# -- rendering: JSON bodies ------------------------------------------------------------


def _created() -> int:
    return _CREATED_EPOCH_S + int(trio.current_time())


def _openai_json(req: _Request, reply: _Reply, usage: tuple[int, int], ids: _Ids) -> dict[str, Any]:
    message: dict[str, Any] = {
        "role": "assistant",
        "content": reply.text or None,
        "refusal": None,
        "annotations": [],
    }
    if reply.calls:
        message["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.text}}
            for c in reply.calls
        ]
    return {
        "id": ids.response_id("openai"),
        "object": "chat.completion",
        "created": _created(),
        "model": req.model,
        "choices": [
            {"index": 0, "message": message, "logprobs": None, "finish_reason": reply.finish}
        ],
        "usage": _openai_usage(usage),
        "service_tier": "default",
        "system_fingerprint": None,
    }


def _openai_usage(usage: tuple[int, int]) -> dict[str, int]:
    prompt, completion = usage
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


_STOP_REASONS = {"stop": "end_turn", "tool_calls": "tool_use", "length": "max_tokens"}


def _anthropic_json(
    req: _Request, reply: _Reply, usage: tuple[int, int], ids: _Ids
) -> dict[str, Any]:
    content: list[dict[str, Any]] = []
    if reply.text:
        content.append({"type": "text", "text": reply.text})
    for call in reply.calls:
        arguments = call.input_override if call.input_override is not None else call.arguments
        content.append({"type": "tool_use", "id": call.id, "name": call.name, "input": arguments})
    return {
        "id": ids.response_id("anthropic"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": content,
        "stop_reason": _STOP_REASONS[reply.finish],
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": usage[1]},
    }


# -- rendering: event streams ----------------------------------------------------------


@attrs.frozen
class _Piece:
    """One server-sent event: its bytes, the tokens it carries (its pace), and whether it
    is one of the final events a truncated stream never sends."""

    data: bytes
    tokens: int = 0
    final: bool = False


def _chunks(text: str, rng: Rng) -> list[str]:
    """`text` cut into stream deltas of 1-4 tokens (at most ~200 deltas, for long texts)."""
    floor = max(1, len(text) // 200)
    pieces, at = [], 0
    while at < len(text):
        size = max(floor, 4 * rng.randint(1, 4))
        pieces.append(text[at : at + size])
        at += size
    return pieces


def _openai_events(
    req: _Request, reply: _Reply, usage: tuple[int, int], ids: _Ids, rng: Rng
) -> list[_Piece]:
    head = {
        "id": ids.response_id("openai"),
        "object": "chat.completion.chunk",
        "created": _created(),
        "model": req.model,
        "service_tier": "default",
        "system_fingerprint": None,
    }

    def event(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        chunk: dict[str, Any] = {
            **head,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if req.include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    pieces = [_Piece(event({"role": "assistant", "content": "", "refusal": None}))]
    for text in _chunks(reply.text, rng):
        pieces.append(_Piece(event({"content": text}), _tokens(text)))
    for index, call in enumerate(reply.calls):
        start = {
            "index": index,
            "id": call.id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        pieces.append(_Piece(event({"tool_calls": [start]}), _tokens(call.name)))
        for text in _chunks(call.text, rng):
            delta = {"tool_calls": [{"index": index, "function": {"arguments": text}}]}
            pieces.append(_Piece(event(delta), _tokens(text)))
    pieces.append(_Piece(event({}, reply.finish), final=True))
    if req.include_usage:
        chunk = {**head, "choices": [], "usage": _openai_usage(usage)}
        pieces.append(_Piece(b"data: " + json.dumps(chunk).encode() + b"\n\n", final=True))
    pieces.append(_Piece(b"data: [DONE]\n\n", final=True))
    return pieces


def _anthropic_events(
    req: _Request, reply: _Reply, usage: tuple[int, int], ids: _Ids, rng: Rng
) -> list[_Piece]:

    def event(kind: str, data: dict[str, Any]) -> bytes:
        return (
            f"event: {kind}\ndata: ".encode()
            + json.dumps({"type": kind, **data}).encode()
            + b"\n\n"
        )

    message: dict[str, Any] = {
        "id": ids.response_id("anthropic"),
        "type": "message",
        "role": "assistant",
        "model": req.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": usage[0], "output_tokens": 1},
    }
    pieces = [_Piece(event("message_start", {"message": message})), _Piece(event("ping", {}))]
    index = 0
    if reply.text:
        start = {"index": index, "content_block": {"type": "text", "text": ""}}
        pieces.append(_Piece(event("content_block_start", start)))
        for text in _chunks(reply.text, rng):
            delta = {"index": index, "delta": {"type": "text_delta", "text": text}}
            pieces.append(_Piece(event("content_block_delta", delta), _tokens(text)))
        pieces.append(_Piece(event("content_block_stop", {"index": index})))
        index += 1
    for call in reply.calls:
        block = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
        pieces.append(
            _Piece(event("content_block_start", {"index": index, "content_block": block}))
        )
        for text in ["", *_chunks(call.text, rng)]:
            delta = {"index": index, "delta": {"type": "input_json_delta", "partial_json": text}}
            pieces.append(_Piece(event("content_block_delta", delta), _tokens(text)))
        pieces.append(_Piece(event("content_block_stop", {"index": index})))
        index += 1
    end = {
        "delta": {"stop_reason": _STOP_REASONS[reply.finish], "stop_sequence": None},
        "usage": {"output_tokens": usage[1]},
    }
    pieces.append(_Piece(event("message_delta", end), final=True))
    pieces.append(_Piece(event("message_stop", {}), final=True))
    return pieces


_End = Literal["complete", "early", "reset", "hang"]


class _Body(httpx2.AsyncByteStream):
    """A response body sent piece by piece, each after its delay, and how it ends.

    An iterator object rather than an async generator, so that a body its reader
    leaves unfinished is never left to the garbage collector.
    """

    def __init__(self, pieces: list[tuple[float, bytes]], end: _End) -> None:
        self._pieces = pieces
        self._end = end
        self._sent = 0

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self

    async def __anext__(self) -> bytes:
        if self._sent < len(self._pieces):
            delay_s, data = self._pieces[self._sent]
            await trio.sleep(delay_s)
            self._sent += 1
            return data
        if self._end == "hang":
            await trio.sleep_forever()
        if self._end == "reset":
            raise httpx2.RemoteProtocolError(
                "peer closed connection without sending complete message body "
                "(incomplete chunked read)"
            )
        raise StopAsyncIteration
