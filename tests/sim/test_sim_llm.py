"""The simulated HTTP world (SimHttp) and the simulated LLM (SimLLM), through the real SDKs.

Everything here goes through the official `openai` and `anthropic` SDKs (or a
plain `httpx2.AsyncClient`) on a `SimHttp` transport, in virtual time: under
`trio.run` with trio's MockClock, or inside a `kelpie.sim` run.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import re
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import anthropic
import attrs
import httpx2
import openai
import pytest
import trio
import trio.testing

from kelpie.env import Rng
from kelpie.sim import (
    FailureKind,
    FaultConfig,
    LLMFaults,
    NetworkFaults,
    PauseFaults,
    SimConfig,
    SimContext,
    SimHttp,
    SimLLM,
    Simulation,
    TraceRow,
)

HOST = "llm.sim"
PROTOCOLS = ("openai", "anthropic")

# -- a Letta-style agent's prompt and tools ----------------------------------------------

BLOCKS = {
    "persona": ("The persona block.", "I am Sam, a curious and friendly companion.", 5000),
    "human": ("What I know about the human.", "Name: Chad. Likes hiking and strong coffee.", 300),
}


def system_prompt(blocks: dict[str, tuple[str, str, int]] = BLOCKS) -> str:
    """A system prompt with core memory rendered the way Letta renders it."""
    rendered = "".join(
        f"<{label}>\n<description>\n{description}\n</description>\n<metadata>\n"
        f"- chars_current={len(value)}\n- chars_limit={limit}\n</metadata>\n<value>\n{value}\n"
        f"</value>\n</{label}>\n\n"
        for label, (description, value, limit) in blocks.items()
    )
    return (
        "You are Letta, a memory-augmented agent.\n<memory_blocks>\nThe following memory "
        f"blocks are currently engaged in your core memory unit:\n\n{rendered}</memory_blocks>"
    )


def _schema(props: dict[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": props, "required": required}


_HEARTBEAT = {"request_heartbeat": {"type": "boolean", "description": "Call me again."}}
_S = {"type": "string"}

MEMGPT_TOOLS: dict[str, dict[str, Any]] = {
    "send_message": _schema({"message": _S}, ["message"]),
    "core_memory_append": _schema(
        {"label": _S, "content": _S, **_HEARTBEAT}, ["label", "content", "request_heartbeat"]
    ),
    "core_memory_replace": _schema(
        {"label": _S, "old_content": _S, "new_content": _S, **_HEARTBEAT},
        ["label", "old_content", "new_content", "request_heartbeat"],
    ),
    "archival_memory_insert": _schema(
        {"content": _S, **_HEARTBEAT}, ["content", "request_heartbeat"]
    ),
    "archival_memory_search": _schema(
        {"query": _S, "page": {"type": "integer", "minimum": 0}, **_HEARTBEAT},
        ["query", "request_heartbeat"],
    ),
    "conversation_search": _schema(
        {"query": _S, "page": {"type": ["integer", "null"]}, **_HEARTBEAT},
        ["query", "request_heartbeat"],
    ),
}

V1_TOOLS: dict[str, dict[str, Any]] = {
    "memory_replace": _schema(
        {"label": _S, "old_str": _S, "new_str": _S}, ["label", "old_str", "new_str"]
    ),
    "memory_insert": _schema(
        {"label": _S, "new_str": _S, "insert_line": {"type": "integer", "minimum": -1}},
        ["label", "new_str"],
    ),
    "archival_memory_search": _schema({"query": _S}, ["query"]),
    "plan_trip": _schema(
        {
            "city": {"type": "string", "enum": ["Oslo", "Bergen", "Tromso"]},
            "nights": {"type": "integer", "exclusiveMinimum": 0, "maximum": 3},
            "budget": {"type": "number", "exclusiveMinimum": 0, "maximum": 5000},
            "flexible": {"type": "boolean"},
            "companions": {"type": "array", "items": _S, "maxItems": 4},
            "notes": {"anyOf": [_S, {"type": "null"}]},
            "hotel": _schema(
                {"stars": {"type": "integer", "minimum": 1, "maximum": 5}, "name": _S}, ["stars"]
            ),
        },
        ["city", "nights", "budget", "flexible", "companions", "hotel"],
    ),
}


def openai_tools(tools: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"type": "function", "function": {"name": name, "description": name, "parameters": s}}
        for name, s in tools.items()
    ]


def anthropic_tools(tools: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"name": name, "description": name, "input_schema": s} for name, s in tools.items()]


_PYTHON_TYPES: dict[str, type | tuple[type, ...]] = {
    "string": str,
    "integer": int,
    "number": (int, float),
    "boolean": bool,
    "array": list,
    "object": dict,
    "null": type(None),
}


def schema_errors(value: Any, schema: dict[str, Any], path: str = "$") -> list[str]:
    """What in `value` breaks `schema` (the JSON Schema subset the tools above use)."""
    if "anyOf" in schema:
        fits = any(not schema_errors(value, option, path) for option in schema["anyOf"])
        return [] if fits else [f"{path}: matches no anyOf option"]
    kinds = schema.get("type", [])
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if kinds and not any(_is_a(value, kind) for kind in kinds):
        return [f"{path}: {value!r} is not {kinds}"]
    if value not in schema.get("enum", [value]):
        return [f"{path}: {value!r} not in {schema['enum']}"]
    if isinstance(value, list):
        errors = [f"{path}: too many items"] if len(value) > schema.get("maxItems", 99) else []
        for i, item in enumerate(value):
            errors += schema_errors(item, schema.get("items", {}), f"{path}[{i}]")
        return errors
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors = [f"{path}.{k}: missing" for k in schema.get("required", []) if k not in value]
        errors += [f"{path}.{k}: unexpected" for k in value if k not in props]
        for key, item in value.items():
            errors += schema_errors(item, props.get(key, {}), f"{path}.{key}")
        return errors
    return _bound_errors(value, schema, path)


def _is_a(value: Any, kind: str) -> bool:
    if isinstance(value, bool) and kind in ("integer", "number"):
        return False
    return isinstance(value, _PYTHON_TYPES[kind])


def _bound_errors(value: Any, schema: dict[str, Any], path: str) -> list[str]:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return []
    errors = []
    if value < schema.get("minimum", value):
        errors.append(f"{path}: {value} < {schema['minimum']}")
    if value > schema.get("maximum", value):
        errors.append(f"{path}: {value} > {schema['maximum']}")
    if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
        errors.append(f"{path}: {value} <= {schema['exclusiveMinimum']}")
    return errors


def recorder(into: list[dict[str, object]]) -> Callable[[str, dict[str, object]], None]:
    """An `on_fault` callback that appends each fault's fields to `into`."""

    def record(kind: str, fields: dict[str, object]) -> None:
        into.append({"kind": kind, **fields})

    return record


# -- harness ---------------------------------------------------------------------------


@contextlib.contextmanager
def sdk_generators_left_open() -> Iterator[None]:
    """Ignores the ResourceWarnings of the async generators the SDKs leave open.

    The SDKs' stream classes nest async generators they never close (the OpenAI
    SDK leaves two behind at every `[DONE]`); under trio each is a ResourceWarning
    when it is collected. That is the SDKs' hygiene, not what these tests test (Kelpie's
    providers read stream bodies themselves for this reason), so it is ignored for
    generators of the SDKs and httpx2 only: one of Kelpie's would still fail a test.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Async generator '(openai|anthropic|httpx2)\.",
            category=ResourceWarning,
        )
        yield


def run_virtual(fn: Callable[[], Awaitable[Any]]) -> Any:
    """Runs `fn()` under trio in virtual time (trio's MockClock, jumping when idle).

    Whatever the SDKs left open is collected before the run ends, inside
    `sdk_generators_left_open`, never later in another test.
    """

    async def main() -> Any:
        result = await fn()
        gc.collect()
        await trio.lowlevel.checkpoint()
        return result

    with sdk_generators_left_open():
        return trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def sdk_clients(
    http: httpx2.AsyncBaseTransport, *, timeout_s: float = 60.0, retries: int = 0
) -> tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic]:
    """Both SDKs' clients on `http`, built as Kelpie's providers build them.

    The SDKs detect their platform on a worker thread at their first request,
    unless it is already set; the simulator forbids threads, so it is preset
    (see test_the_sdks_first_request_starts_a_thread_unless_the_platform_is_preset).
    """
    oa = openai.AsyncOpenAI(
        api_key="sk-sim",
        base_url=f"http://{HOST}/v1",
        http_client=httpx2.AsyncClient(transport=http, trust_env=False),
        max_retries=retries,
        timeout=timeout_s,
    )
    an = anthropic.AsyncAnthropic(
        api_key="sk-ant-sim",
        base_url=f"http://{HOST}",
        http_client=httpx2.AsyncClient(transport=http, trust_env=False),
        max_retries=retries,
        timeout=timeout_s,
    )
    oa._platform = "Unknown"
    an._platform = "Unknown"
    return oa, an


def world(seed: int = 1, faults: LLMFaults | None = None, **llm: Any) -> tuple[SimHttp, SimLLM]:
    """A SimHttp with a SimLLM of `seed` at HOST."""
    http = SimHttp(Rng(1000 + seed))
    sim_llm = SimLLM(Rng(seed), faults=faults or LLMFaults(), **llm)
    http.register(HOST, sim_llm)
    return http, sim_llm


class Reply:
    """One assistant reply, whichever protocol it came over."""

    def __init__(self, text: str, calls: list[tuple[str, str, str]], finish: str | None) -> None:
        self.text = text
        self.calls = calls  # (id, name, arguments as JSON text)
        self.finish = finish  # OpenAI's words: stop, tool_calls, length (None: none given)

    def arguments(self, index: int = 0) -> Any:
        return json.loads(self.calls[index][2])

    @property
    def names(self) -> list[str]:
        return [name for _, name, _ in self.calls]


_FINISH = {"end_turn": "stop", "tool_use": "tool_calls", "max_tokens": "length", None: None}


async def ask(
    protocol: str,
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic],
    messages: list[dict[str, Any]],
    tools: dict[str, dict[str, Any]],
    *,
    system: str = "",
    stream: bool = False,
    **extra: Any,
) -> Reply:
    """One request through the protocol's SDK; a stream is assembled from its raw events."""
    max_tokens = extra.pop("max_tokens", 256)
    if protocol == "openai":
        sys_msgs = [{"role": "system", "content": system}] if system else []
        params: dict[str, Any] = {"model": "gpt-sim", "messages": sys_msgs + messages}
        if tools:
            params["tools"] = openai_tools(tools)
        params.update(max_tokens=max_tokens, **extra)
        if not stream:
            completion = await clients[0].chat.completions.create(**params)
            choice = completion.choices[0]
            calls = [
                (c.id, c.function.name, c.function.arguments)
                for c in choice.message.tool_calls or []
                if c.type == "function"
            ]
            return Reply(choice.message.content or "", calls, choice.finish_reason)
        chunks = await clients[0].chat.completions.create(
            **params, stream=True, stream_options={"include_usage": True}
        )
        return await assemble_openai(chunks)
    params = {"model": "claude-sim", "messages": messages, "max_tokens": max_tokens}
    if system:
        params["system"] = system
    if tools:
        params["tools"] = anthropic_tools(tools)
    params.update(extra)
    if not stream:
        message = await clients[1].messages.create(**params)
        text = "".join(b.text for b in message.content if b.type == "text")
        calls = [
            (b.id, b.name, json.dumps(b.input)) for b in message.content if b.type == "tool_use"
        ]
        return Reply(text, calls, _FINISH[message.stop_reason])
    events = await clients[1].messages.create(**params, stream=True)
    return await assemble_anthropic(events)


async def assemble_openai(chunks: AsyncIterator[Any]) -> Reply:
    text, finish = "", None
    calls: dict[int, list[str]] = {}
    async for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, ["", "", ""])
                call[0] = delta.id or call[0]
                call[1] += (delta.function and delta.function.name) or ""
                call[2] += (delta.function and delta.function.arguments) or ""
            finish = choice.finish_reason or finish
    return Reply(text, [(c[0], c[1], c[2]) for _, c in sorted(calls.items())], finish)


async def assemble_anthropic(events: AsyncIterator[Any]) -> Reply:
    text, finish = "", None
    calls: dict[int, list[str]] = {}
    async for event in events:
        if event.type == "content_block_start" and event.content_block.type == "tool_use":
            calls[event.index] = [event.content_block.id, event.content_block.name, ""]
        elif event.type == "content_block_delta" and event.delta.type == "text_delta":
            text += event.delta.text
        elif event.type == "content_block_delta" and event.delta.type == "input_json_delta":
            calls[event.index][2] += event.delta.partial_json
        elif event.type == "message_delta":
            finish = _FINISH[event.delta.stop_reason]
    return Reply(text, [(c[0], c[1], c[2] or "{}") for _, c in sorted(calls.items())], finish)


def assistant_turn(protocol: str, reply: Reply, results: list[str]) -> list[dict[str, Any]]:
    """The assistant message that `reply` was, then a tool result for each of its calls."""
    if protocol == "openai":
        calls = [
            {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
            for i, n, a in reply.calls
        ]
        turn: list[dict[str, Any]] = [
            {"role": "assistant", "content": reply.text or None, "tool_calls": calls}
        ]
        turn += [
            {"role": "tool", "tool_call_id": i, "content": result}
            for (i, _, _), result in zip(reply.calls, results, strict=True)
        ]
        return turn
    content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
    content += [
        {"type": "tool_use", "id": i, "name": n, "input": json.loads(a)} for i, n, a in reply.calls
    ]
    blocks = [
        {"type": "tool_result", "tool_use_id": i, "content": result}
        for (i, _, _), result in zip(reply.calls, results, strict=True)
    ]
    return [{"role": "assistant", "content": content}, {"role": "user", "content": blocks}]


async def converse(
    protocol: str,
    clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic],
    tools: dict[str, dict[str, Any]],
    user: str,
    *,
    stream: bool = False,
    heartbeats: bool = False,
    limit: int = 12,
) -> list[Reply]:
    """One user turn of an agent loop: every tool call gets a result, until the model stops
    calling tools (or calls send_message). `heartbeats` adds Letta's heartbeat user message
    after each round's results, as Letta's memgpt agents do."""
    messages: list[dict[str, Any]] = [{"role": "user", "content": user}]
    replies: list[Reply] = []
    while len(replies) < limit:
        reply = await ask(protocol, clients, messages, tools, system=system_prompt(), stream=stream)
        replies.append(reply)
        if not reply.calls or "send_message" in reply.names:
            break
        results = [json.dumps({"status": "OK", "message": "None"}) for _ in reply.calls]
        messages += assistant_turn(protocol, reply, results)
        if heartbeats:
            beat = {"type": "heartbeat", "reason": "[This is an automated system message]"}
            messages.append({"role": "user", "content": json.dumps(beat)})
    return replies


def check_call(name: str, arguments: Any, tools: dict[str, dict[str, Any]]) -> None:
    """A call names an offered tool, its arguments fit its schema, memory edits make sense."""
    assert name in tools, name
    assert schema_errors(arguments, tools[name]) == [], (name, arguments)
    if "label" in arguments:
        assert arguments["label"] in BLOCKS, arguments
        value = BLOCKS[arguments["label"]][1]
        for key in ("old_content", "old_str"):
            if key in arguments:
                assert arguments[key] and arguments[key] in value, arguments


# -- the wire formats, parsed by the real SDKs ------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_replies_parse_in_the_sdk_with_calls_that_fit_the_schemas(
    protocol: str, stream: bool
) -> None:
    """Over many seeds, every reply parses in the SDK (JSON and SSE); every tool call names an
    offered tool with arguments that fit its schema; memory edits name real blocks and quote
    text they hold; both tool-call styles and plain answers occur."""

    async def main() -> set[str]:
        seen: set[str] = set()
        for seed in range(25):
            http, _ = world(seed)
            clients = sdk_clients(http)
            for tools in (MEMGPT_TOOLS, V1_TOOLS):
                user = "I'm planning a trip to Norway with my sister; we love fjords."
                for reply in await converse(protocol, clients, tools, user, stream=stream):
                    assert reply.finish in ("stop", "tool_calls"), reply.finish
                    assert (reply.finish == "tool_calls") == bool(reply.calls)
                    for index, (call_id, name, _) in enumerate(reply.calls):
                        check_call(name, reply.arguments(index), tools)
                        assert call_id.startswith("call_" if protocol == "openai" else "toolu_")
                        seen.add(name)
                    if not reply.calls:
                        assert reply.text
                        seen.add("<text>")
        return seen

    seen = run_virtual(main)
    assert {"send_message", "core_memory_replace", "plan_trip", "memory_replace", "<text>"} <= seen


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_stream_assembles_to_the_reply_its_json_twin_gets(protocol: str) -> None:
    """The same conversation asked as a stream or as JSON (of a service with the same seed)
    gets the same reply."""

    async def main() -> None:
        for seed in range(8):
            messages = [{"role": "user", "content": "What do you know about me and coffee?"}]
            kw: dict[str, Any] = {"system": system_prompt()}
            # Each on a fresh service: a request seen before gets a fresh draw.
            plain = await ask(protocol, sdk_clients(world(seed)[0]), messages, MEMGPT_TOOLS, **kw)
            clients = sdk_clients(world(seed)[0])
            streamed = await ask(protocol, clients, messages, MEMGPT_TOOLS, stream=True, **kw)
            assert (streamed.text, streamed.finish) == (plain.text, plain.finish)
            assert [(n, json.loads(a)) for _, n, a in streamed.calls] == [
                (n, json.loads(a)) for _, n, a in plain.calls
            ]

    run_virtual(main)


def test_openai_stream_carries_usage_and_the_sdk_stream_helper_accepts_it() -> None:
    """With include_usage the last chunk carries the usage (about len/4 tokens each way), and
    the SDK's own stream helper assembles the same completion as the JSON reply."""

    async def main() -> None:
        # Each request on a fresh service of one seed: a request seen before gets a fresh draw.
        def fresh() -> openai.AsyncOpenAI:
            return sdk_clients(world(3)[0])[0]

        params: dict[str, Any] = {
            "model": "gpt-sim",
            "messages": [
                {"role": "system", "content": system_prompt()},
                {"role": "user", "content": "Remember that my sister is called Ingrid."},
            ],
            "tools": openai_tools(MEMGPT_TOOLS),
            "max_tokens": 256,
        }
        plain = await fresh().chat.completions.create(**params)
        chunks = await fresh().chat.completions.create(
            **params, stream=True, stream_options={"include_usage": True}
        )
        usages = [chunk.usage async for chunk in chunks if chunk.usage is not None]
        assert len(usages) == 1
        assert usages[0].model_dump() == plain.usage.model_dump()
        body_chars = len(json.dumps(params))
        assert 0.5 < usages[0].prompt_tokens / (body_chars / 4) < 1.5
        async with fresh().chat.completions.stream(**params) as helper:
            final = await helper.get_final_completion()
        assert final.choices[0].finish_reason == plain.choices[0].finish_reason
        calls = final.choices[0].message.tool_calls or []
        assert [c.function.arguments for c in calls] == [
            c.function.arguments for c in plain.choices[0].message.tool_calls or []
        ]

    run_virtual(main)


def test_anthropic_stream_helper_accepts_the_events() -> None:
    """The SDK's MessageStream accumulates the events into the message the JSON reply is."""

    async def main() -> None:
        for seed in range(6):
            params: dict[str, Any] = {
                "model": "claude-sim",
                "system": system_prompt(),
                "messages": [{"role": "user", "content": "Any tips for hiking near Bergen?"}],
                "tools": anthropic_tools(V1_TOOLS),
                "max_tokens": 256,
            }
            plain = await sdk_clients(world(seed)[0])[1].messages.create(**params)
            async with sdk_clients(world(seed)[0])[1].messages.stream(**params) as helper:
                final = await helper.get_final_message()
            assert final.model_dump() == plain.model_dump()

    run_virtual(main)


# -- behaviour -------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("heartbeats", [False, True], ids=["results", "heartbeats"])
def test_memgpt_conversations_end_with_send_message_within_the_bound(
    protocol: str, heartbeats: bool
) -> None:
    """Fed a result for every call, a memgpt-style conversation ends with send_message after
    at most tool_rounds_max rounds of other tools (Letta's heartbeat user messages do not
    start a new turn); the rounds before it vary between seeds, from none to the maximum, and
    each other call asks for a heartbeat (almost always)."""

    async def main() -> None:
        lengths, heartbeats_asked, other_calls = set(), 0, 0
        for seed in range(40):
            http, _ = world(seed, tool_rounds_max=3)
            replies = await converse(
                protocol,
                sdk_clients(http),
                MEMGPT_TOOLS,
                "Hi! I just got a puppy.",
                heartbeats=heartbeats,
            )
            assert replies[-1].names == ["send_message"], [r.names for r in replies]
            lengths.add(len(replies))
            for reply in replies[:-1]:
                assert reply.calls and "send_message" not in reply.names
                for index in range(len(reply.calls)):
                    other_calls += 1
                    heartbeats_asked += reply.arguments(index)["request_heartbeat"]
        assert lengths == {1, 2, 3, 4}
        assert heartbeats_asked >= 0.8 * other_calls

    run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_without_send_message_the_model_answers_in_plain_text(protocol: str) -> None:
    """Without send_message (letta_v1, react) the conversation ends in a text answer within
    the bound, and some replies put a sentence before their tool calls."""

    async def main() -> None:
        preambles = 0
        for seed in range(30):
            http, _ = world(seed, tool_rounds_max=2)
            replies = await converse(protocol, sdk_clients(http), V1_TOOLS, "Plan a trip!")
            assert len(replies) <= 3
            assert replies[-1].calls == [] and replies[-1].finish == "stop"
            assert replies[-1].text
            preambles += sum(1 for r in replies[:-1] if r.text)
        assert preambles > 0

    run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_tool_choice_and_parallel_calls_are_obeyed(protocol: str) -> None:
    """tool_choice none gives text, a named tool is called, required never gives text; with
    parallel calls disabled each reply has one call, with them allowed some have two."""

    async def main() -> None:
        named = {"openai": {"type": "function", "function": {"name": "plan_trip"}}}
        named["anthropic"] = {"type": "tool", "name": "plan_trip"}
        required = {"openai": "required", "anthropic": {"type": "any"}}[protocol]
        none = {"openai": "none", "anthropic": {"type": "none"}}[protocol]
        serial = (
            {"parallel_tool_calls": False}
            if protocol == "openai"
            else {"tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
        )
        messages = [{"role": "user", "content": "Book something nice in Norway."}]
        widths = set()
        for seed in range(30):
            clients = sdk_clients(world(seed)[0])
            reply = await ask(protocol, clients, messages, V1_TOOLS, tool_choice=none)
            assert reply.calls == [] and reply.text
            reply = await ask(protocol, clients, messages, V1_TOOLS, tool_choice=named[protocol])
            assert reply.names == ["plan_trip"]
            check_call("plan_trip", reply.arguments(), V1_TOOLS)
            reply = await ask(protocol, clients, messages, V1_TOOLS, tool_choice=required)
            assert reply.calls
            reply = await ask(protocol, clients, messages, V1_TOOLS, **serial)
            assert len(reply.calls) <= 1
            widths.add(len((await ask(protocol, clients, messages, V1_TOOLS)).calls))
        assert 2 in widths

    run_virtual(main)


@pytest.mark.parametrize(
    ("protocol", "messages", "error"),
    [
        (
            "openai",
            [{"role": "tool", "tool_call_id": "call_x", "content": "ok"}],
            "must be a response to a preceeding message with 'tool_calls'",
        ),
        (
            "openai",
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "x", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "user", "content": "hello?"},
            ],
            "did not have response messages: call_1",
        ),
        (
            "anthropic",
            [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [{"type": "tool_use", "id": "toolu_1", "name": "x", "input": {}}],
                },
                {"role": "user", "content": "hello?"},
            ],
            "`tool_use` ids were found without `tool_result` blocks immediately after: toolu_1",
        ),
        (
            "anthropic",
            [
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}],
                }
            ],
            "unexpected `tool_use_id` found in `tool_result` blocks: toolu_9",
        ),
    ],
)
def test_requests_the_real_api_refuses_get_a_400(
    protocol: str, messages: list[dict[str, Any]], error: str
) -> None:
    """Tool results that answer no call, and calls left unanswered, are refused with a 400,
    which the SDK raises as BadRequestError."""

    async def main() -> None:
        clients = sdk_clients(world()[0])
        bad_request = openai.BadRequestError if protocol == "openai" else anthropic.BadRequestError
        with pytest.raises(bad_request, match=re.escape(error)):
            await ask(protocol, clients, messages, {})

    run_virtual(main)


# -- determinism -----------------------------------------------------------------------


def _raw_exchange(seed: int) -> list[bytes]:
    """Raw response bytes of a fixed sequence of requests, JSON and streamed, both protocols."""

    async def main() -> list[bytes]:
        http, _ = world(seed, LLMFaults.every())
        bodies: list[bytes] = []
        async with httpx2.AsyncClient(transport=http, timeout=30) as client:
            for turn in range(6):
                for stream in (False, True):
                    user = {"role": "user", "content": f"turn {turn}: the garden needs water"}
                    openai_body = {
                        "model": "m",
                        "messages": [{"role": "system", "content": system_prompt()}, user],
                        "tools": openai_tools(MEMGPT_TOOLS),
                        "stream": stream,
                    }
                    anthropic_body = {
                        "model": "m",
                        "system": system_prompt(),
                        "messages": [user],
                        "tools": anthropic_tools(MEMGPT_TOOLS),
                        "max_tokens": 300,
                        "stream": stream,
                    }
                    for path, body in (
                        ("/v1/chat/completions", openai_body),
                        ("/v1/messages", anthropic_body),
                    ):
                        try:
                            async with client.stream(
                                "POST", f"http://{HOST}{path}", json=body
                            ) as r:
                                data = b"".join([chunk async for chunk in r.aiter_bytes()])
                                bodies.append(f"{r.status_code} {dict(r.headers)}".encode() + data)
                        except httpx2.TransportError as exc:
                            bodies.append(f"{type(exc).__name__} at {trio.current_time()}".encode())
        return bodies

    result: list[bytes] = run_virtual(main)
    return result


def test_the_same_seed_gives_byte_identical_responses_and_another_seed_does_not() -> None:
    """Two runs of one seed give the same bytes for every request (faults included); another
    seed gives other bytes."""
    first = _raw_exchange(5)
    assert len(first) == 24
    assert _raw_exchange(5) == first
    other = _raw_exchange(6)
    assert sum(a != b for a, b in zip(first, other, strict=True)) > 12


def test_a_repeated_request_gets_a_fresh_draw() -> None:
    """The same request sent again (a retry) is answered anew, not replayed."""

    async def main() -> None:
        http, llm = world(2)
        oa, _ = sdk_clients(http)
        messages = [{"role": "user", "content": "Tell me a fact about otters."}]
        replies = [(await ask("openai", (oa, None), messages, MEMGPT_TOOLS)) for _ in range(4)]
        assert len({r.calls[0][0] for r in replies}) == 4  # fresh ids every time
        assert llm.served == 4

    run_virtual(main)


# -- faults ----------------------------------------------------------------------------


def _only(kind: str, p: float = 1.0) -> LLMFaults:
    return LLMFaults(**{f"{kind}_p": p})


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_hang_ends_at_the_clients_timeout(protocol: str, stream: bool) -> None:
    """A hung request (or, for streams, sometimes a stalled one) ends at the client's read
    timeout, in virtual time. The SDK raises APITimeoutError, except for a stream of the
    anthropic SDK that stalls after its headers: its raw event stream lets
    httpx2.ReadTimeout through."""

    async def main() -> set[str]:
        outcomes = set()
        for seed in range(12):
            faults: list[dict[str, object]] = []
            http, llm = world(seed, _only("hang"), on_fault=recorder(faults))
            clients = sdk_clients(http, timeout_s=7.0)
            start = trio.current_time()
            messages = [{"role": "user", "content": "hello"}]
            with pytest.raises(
                (openai.APITimeoutError, anthropic.APITimeoutError, httpx2.ReadTimeout)
            ) as info:
                await ask(protocol, clients, messages, MEMGPT_TOOLS, stream=stream)
            assert 7.0 <= trio.current_time() - start < 9.0
            assert llm.injected == {"hang": 1}
            mid_stream = "after_events" in faults[0]
            assert mid_stream <= stream
            if isinstance(info.value, httpx2.ReadTimeout):
                assert (protocol, mid_stream) == ("anthropic", True)
            outcomes.add(f"{type(info.value).__name__}:{mid_stream}")
        return outcomes

    outcomes = run_virtual(main)
    if stream:
        assert len(outcomes) == 2  # both before the headers and mid-stream


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_rate_limit_is_a_429_with_retry_after_which_the_sdk_honours(protocol: str) -> None:
    """A 429 carries retry-after (seconds) and is RateLimitError; an SDK allowed to retry
    waits that long (virtual time) and then gets its answer."""

    async def main() -> None:
        http, llm = world(4, _only("rate_limit"))
        messages = [{"role": "user", "content": "hello"}]
        with pytest.raises((openai.RateLimitError, anthropic.RateLimitError)) as info:
            await ask(protocol, sdk_clients(http), messages, MEMGPT_TOOLS)
        retry_after = int(info.value.response.headers["retry-after"])
        assert 1 <= retry_after <= 20
        assert info.value.status_code == 429

        fired: list[dict[str, object]] = []
        http, llm = world(4, _only("rate_limit", 0.6), on_fault=recorder(fired))
        start = trio.current_time()
        reply = await ask(protocol, sdk_clients(http, retries=8), messages, MEMGPT_TOOLS)
        assert reply.calls
        waits = [int(str(fault["retry_after_s"])) for fault in fired]
        assert waits and llm.served == len(waits) + 1
        assert trio.current_time() - start >= sum(waits)

    run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_server_errors_are_5xx(protocol: str) -> None:
    """Server errors are 500/503 (OpenAI) or 500/529 (Anthropic's overloaded_error), raised by
    the SDK as InternalServerError (OverloadedError for a 529)."""

    async def main() -> set[int]:
        statuses = set()
        for seed in range(12):
            http, _ = world(seed, _only("server_error"))
            with pytest.raises((openai.InternalServerError, anthropic.InternalServerError)) as info:
                await ask(protocol, sdk_clients(http), [{"role": "user", "content": "hi"}], {})
            statuses.add(info.value.status_code)
            if info.value.status_code == 529:
                assert isinstance(info.value, anthropic.OverloadedError)
        return statuses

    expected = {500, 503} if protocol == "openai" else {500, 529}
    assert run_virtual(main) == expected


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_malformed_arguments(protocol: str, stream: bool) -> None:
    """One call's arguments are not JSON (OpenAI; Anthropic streams' input_json_delta); in an
    Anthropic JSON body, whose input is always an object, a required argument is missing."""

    async def main() -> None:
        for seed in range(8):
            http, llm = world(seed, _only("malformed_arguments"))
            messages = [{"role": "user", "content": "Save this: I like tea."}]
            reply = await ask(protocol, sdk_clients(http), messages, MEMGPT_TOOLS, stream=stream)
            assert llm.injected == {"malformed_arguments": 1}
            broken = []
            for _, name, text in reply.calls:
                try:
                    schema_ok = not schema_errors(json.loads(text), MEMGPT_TOOLS[name])
                except ValueError:
                    broken.append("json")
                else:
                    if not schema_ok:
                        broken.append("schema")
            assert broken == (
                ["schema"] if (protocol, stream) == ("anthropic", False) else ["json"]
            )

    run_virtual(main)


def test_anthropic_stream_helper_raises_on_malformed_arguments() -> None:
    """The anthropic SDK's MessageStream raises ValueError on tool input JSON it cannot parse
    (it parses in partial mode, so a merely truncated input passes, incomplete)."""

    async def main() -> set[str]:
        outcomes = set()
        for seed in range(10):
            http, _ = world(seed, _only("malformed_arguments"))
            _, an = sdk_clients(http)
            params: dict[str, Any] = {
                "model": "claude-sim",
                "messages": [{"role": "user", "content": "hi"}],
                "tools": anthropic_tools(MEMGPT_TOOLS),
                "max_tokens": 100,
            }
            try:
                async with an.messages.stream(**params) as helper:
                    await helper.get_final_message()
                outcomes.add("accepted")
            except ValueError as exc:
                assert "Unable to parse tool parameter JSON" in str(exc)
                outcomes.add("ValueError")
        return outcomes

    assert "ValueError" in run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_unknown_tool_names(protocol: str, stream: bool) -> None:
    """A call names a tool the request did not offer; the SDK passes it on as it is."""

    async def main() -> None:
        for seed in range(6):
            http, llm = world(seed, _only("unknown_tool"))
            messages = [{"role": "user", "content": "What's new?"}]
            reply = await ask(protocol, sdk_clients(http), messages, V1_TOOLS, stream=stream)
            unknown = [name for name in reply.names if name not in V1_TOOLS]
            assert len(unknown) == 1 and reply.finish == "tool_calls"
            assert llm.injected == {"unknown_tool": 1}

    run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_an_over_long_reply_exceeds_max_tokens_with_a_length_finish(
    protocol: str, stream: bool
) -> None:
    """The reply's text is 3x max_tokens worth (at ~4 characters a token), finish "length"
    (OpenAI) or stop_reason "max_tokens" (Anthropic)."""

    async def main() -> None:
        http, _ = world(1, _only("over_long"))
        messages = [{"role": "user", "content": "Write me an essay."}]
        reply = await ask(
            protocol, sdk_clients(http), messages, MEMGPT_TOOLS, stream=stream, max_tokens=100
        )
        assert reply.finish == "length"
        assert len(reply.text) == 100 * 4 * 3
        assert reply.calls == []

    run_virtual(main)


def test_the_sdk_stream_helpers_on_over_long_and_truncated_replies() -> None:
    """openai's chat.completions.stream() refuses an over-long reply (LengthFinishReasonError);
    anthropic's messages.stream() returns a truncated stream's message with no stop_reason."""

    async def main() -> None:
        oa, _ = sdk_clients(world(1, _only("over_long"))[0])
        messages: list[Any] = [{"role": "user", "content": "Write me an essay."}]
        with pytest.raises(openai.LengthFinishReasonError):
            async with oa.chat.completions.stream(
                model="gpt-sim", messages=messages, max_tokens=100
            ) as helper:
                await helper.get_final_completion()
        _, an = sdk_clients(world(1, _only("truncated_stream"))[0])
        async with an.messages.stream(
            model="claude-sim", messages=messages, max_tokens=100
        ) as stream:
            message = await stream.get_final_message()
        assert message.stop_reason is None

    run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_truncated_stream_ends_quietly_without_its_final_events(protocol: str) -> None:
    """A truncated stream ends without error in both SDKs, before any finish_reason (OpenAI:
    no finish chunk, usage or [DONE]) or message_delta and message_stop (Anthropic): only the
    missing finish tells the reader that it was cut."""

    async def main() -> None:
        for seed in range(8):
            http, llm = world(seed, _only("truncated_stream"))
            messages = [{"role": "user", "content": "hello"}]
            reply = await ask(protocol, sdk_clients(http), messages, MEMGPT_TOOLS, stream=True)
            assert reply.finish is None
            assert llm.injected == {"truncated_stream": 1}
            # A JSON request is never truncated by this fault.
            reply = await ask(protocol, sdk_clients(http), messages, MEMGPT_TOOLS)
            assert reply.finish is not None

    run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_reset_cuts_the_connection_mid_body(protocol: str, stream: bool) -> None:
    """A connection cut mid-body is APIConnectionError (caused by httpx2.RemoteProtocolError),
    except in the anthropic SDK's raw event stream, which lets the RemoteProtocolError
    through."""

    async def main() -> None:
        http, llm = world(2, _only("reset"))
        messages = [{"role": "user", "content": "hello"}]
        with pytest.raises(
            (openai.APIConnectionError, anthropic.APIConnectionError, httpx2.RemoteProtocolError)
        ) as info:
            await ask(protocol, sdk_clients(http), messages, MEMGPT_TOOLS, stream=stream)
        assert llm.injected == {"reset": 1}
        error = info.value
        if (protocol, stream) == ("anthropic", True):
            assert isinstance(error, httpx2.RemoteProtocolError)
        else:
            assert isinstance(error.__cause__, httpx2.RemoteProtocolError)

    run_virtual(main)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_bad_arguments_are_well_formed_edits_a_memory_tool_must_refuse(protocol: str) -> None:
    """An unknown block label, content over the block's chars_limit, or an old_content the
    block does not hold: valid JSON that fits the schema, which the tool must refuse."""

    async def main() -> set[str]:
        mistakes = set()
        choice = (
            {"type": "function", "function": {"name": "core_memory_replace"}}
            if protocol == "openai"
            else {"type": "tool", "name": "core_memory_replace"}
        )
        for seed in range(20):
            found: list[dict[str, object]] = []
            http, _ = world(seed, _only("bad_arguments"), on_fault=recorder(found))
            messages = [{"role": "user", "content": "I moved to Tromso."}]
            kw: dict[str, Any] = {"system": system_prompt(), "tool_choice": choice}
            reply = await ask(protocol, sdk_clients(http), messages, MEMGPT_TOOLS, **kw)
            args = reply.arguments()
            assert schema_errors(args, MEMGPT_TOOLS["core_memory_replace"]) == []
            (fault,) = found
            mistake = str(fault["mistake"])
            assert mistake.startswith("core_memory_replace:")
            if mistake.endswith("unknown_label"):
                assert args["label"] not in BLOCKS
            elif mistake.endswith("missing_old_content"):
                assert args["old_content"] not in BLOCKS[args["label"]][1]
            else:
                assert len(args["new_content"]) > BLOCKS[args["label"]][2]
            mistakes.add(mistake.split(":")[1])
        return mistakes

    assert run_virtual(main) == {"unknown_label", "missing_old_content", "over_limit"}


def test_llm_faults_describe_themselves_and_every_turns_all_on() -> None:
    """LLMFaults() is off; every() turns every fault on; FaultConfig prints them."""
    assert LLMFaults().describe() == "off"
    every = LLMFaults.every()
    fields = [a.name for a in attrs.fields(LLMFaults)]
    assert all(getattr(every, name) > 0 for name in fields)
    assert all(f"{name}=" in every.describe() for name in fields)
    assert "llm(off)" in FaultConfig().describe()
    assert "llm(hang_p=0.5)" in FaultConfig(llm=LLMFaults(hang_p=0.5)).describe()


# -- SimHttp ---------------------------------------------------------------------------


def test_an_unknown_host_is_a_connection_error() -> None:
    """A host nobody registered fails like a DNS lookup: ConnectError (the SDK:
    APIConnectionError); unregistering a service makes its host unknown."""

    async def main() -> None:
        http, _ = world()
        async with httpx2.AsyncClient(transport=http) as client:
            with pytest.raises(httpx2.ConnectError, match="no simulated service at 'elsewhere'"):
                await client.get("http://elsewhere/v1/models")
        http.unregister(HOST)
        oa, _ = sdk_clients(http)
        with pytest.raises(openai.APIConnectionError):
            await ask("openai", (oa, None), [{"role": "user", "content": "hi"}], {})

    run_virtual(main)


async def _slow(request: httpx2.Request) -> httpx2.Response:
    await trio.sleep(100)
    return httpx2.Response(200, text="late")


def test_the_read_timeout_bounds_the_wait_for_the_head_in_virtual_time() -> None:
    """A handler slower than the read timeout fails the request with ReadTimeout at the
    timeout (plus the connect round trip), in virtual time; a faster one answers."""

    async def main() -> None:
        http = SimHttp(Rng(1), latency_max_ms=20)
        http.register("slow.sim", _slow)
        async with httpx2.AsyncClient(transport=http, timeout=5.0) as client:
            start = trio.current_time()
            with pytest.raises(httpx2.ReadTimeout):
                await client.get("http://slow.sim/")
            assert 5.0 <= trio.current_time() - start <= 5.02
            response = await client.get("http://slow.sim/", timeout=200)
            assert response.text == "late"
        assert http.served == {"slow.sim": 2}

    run_virtual(main)


def test_a_connect_slower_than_the_connect_timeout_is_connect_timeout() -> None:
    """The connect round trip is drawn per request; past the connect timeout: ConnectTimeout."""

    async def main() -> None:
        http = SimHttp(Rng(1), latency_max_ms=10_000)
        http.register("far.sim", _slow)
        timeout = httpx2.Timeout(5.0, connect=0.5)
        async with httpx2.AsyncClient(transport=http, timeout=timeout) as client:
            start = trio.current_time()
            with pytest.raises(httpx2.ConnectTimeout):
                await client.get("http://far.sim/")
            assert trio.current_time() - start == pytest.approx(0.5)
        assert http.served == {}

    run_virtual(main)


class _Trickle(httpx2.AsyncByteStream):
    """A body: a chunk, a pause of `gap_s`, then a second chunk, or a cut connection."""

    def __init__(self, gap_s: float, *, cut: bool = False) -> None:
        self.gap_s, self.cut = gap_s, cut

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield b"first "
        await trio.sleep(self.gap_s)
        if self.cut:
            raise httpx2.RemoteProtocolError("peer closed connection")
        yield b"second"


def test_a_stalled_body_is_a_read_timeout_and_the_body_keeps_its_pace() -> None:
    """Each chunk of a streamed body must come within the read timeout of the one before;
    chunks within it arrive at the handler's pace; a cut is RemoteProtocolError."""

    async def main() -> None:
        http = SimHttp(Rng(1), latency_max_ms=0)
        gaps = {"/stall": 30.0, "/pace": 3.0, "/cut": 1.0}

        async def trickle(request: httpx2.Request) -> httpx2.Response:
            gap = gaps[request.url.path]
            return httpx2.Response(200, stream=_Trickle(gap, cut=request.url.path == "/cut"))

        http.register("trickle.sim", trickle)
        async with httpx2.AsyncClient(transport=http, timeout=5.0) as client:
            start = trio.current_time()
            response = await client.get("http://trickle.sim/pace")
            assert response.content == b"first second"
            assert trio.current_time() - start == pytest.approx(3.0)
            async with client.stream("GET", "http://trickle.sim/stall") as response:
                chunks = aiter(response.aiter_bytes())
                assert await anext(chunks) == b"first "
                stalled_at = trio.current_time()
                with pytest.raises(httpx2.ReadTimeout):
                    await anext(chunks)
                assert trio.current_time() - stalled_at == pytest.approx(5.0)
            with pytest.raises(httpx2.RemoteProtocolError):
                await client.get("http://trickle.sim/cut")

    run_virtual(main)


def test_the_transport_outlives_its_clients_and_hosts_register_once() -> None:
    """Closing a client leaves the shared transport working; a host registers once."""

    async def main() -> None:
        http, _ = world()
        for _ in range(2):
            oa, _ = sdk_clients(http)
            await ask("openai", (oa, None), [{"role": "user", "content": "hi"}], {})
            await oa.close()
        with pytest.raises(ValueError, match="already registered"):
            http.register(HOST.upper(), _slow)
        assert http.hosts == (HOST,)

    run_virtual(main)


# -- inside the simulator --------------------------------------------------------------


class _Agent:
    """A small agent loop on one node's env.http: retries what the SDK raises."""

    def __init__(self, ctx: SimContext, node: int, protocol: str) -> None:
        self.ctx = ctx
        self.env = ctx.nodes[node].env
        self.protocol = protocol
        self.errors: dict[str, int] = {}

    async def turn(self, user: str, stream: bool) -> Reply:
        clients = sdk_clients(self.env.http, timeout_s=20.0)
        messages: list[dict[str, Any]] = [{"role": "user", "content": user}]
        for _ in range(12):
            reply = await self.ask(clients, messages, stream)
            if not reply.calls or "send_message" in reply.names:
                return reply
            results = []
            for index, (_, name, _) in enumerate(reply.calls):
                try:
                    reply.arguments(index)
                    results.append("OK" if name in MEMGPT_TOOLS else f"Error: no tool {name}")
                except ValueError:
                    results.append("Error: the arguments are not JSON")
            if self.protocol == "anthropic":  # an unparseable input cannot be replayed as JSON
                reply.calls = [(i, n, a if _is_json(a) else "{}") for i, n, a in reply.calls]
            messages += assistant_turn(self.protocol, reply, results)
        raise AssertionError("the simulated LLM did not end the turn")

    async def ask(
        self,
        clients: tuple[openai.AsyncOpenAI, anthropic.AsyncAnthropic],
        messages: list[dict[str, Any]],
        stream: bool,
    ) -> Reply:
        for attempt in range(30):
            try:
                reply = await ask(
                    self.protocol,
                    clients,
                    messages,
                    MEMGPT_TOOLS,
                    system=system_prompt(),
                    stream=stream,
                )
            except (openai.APIError, anthropic.APIError, httpx2.TransportError) as exc:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
                await trio.sleep(0.1 * 2 ** min(attempt, 6) * self.env.rng.uniform(0.5, 1.5))
                continue
            if reply.finish is not None:
                return reply
            self.errors["truncated"] = self.errors.get("truncated", 0) + 1
        raise AssertionError("no answer in 30 attempts")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


_SIM_FAULTS = FaultConfig(
    llm=LLMFaults(
        hang_p=0.05,
        rate_limit_p=0.1,
        server_error_p=0.1,
        unknown_tool_p=0.1,
        malformed_arguments_p=0.1,
        bad_arguments_p=0.1,
        over_long_p=0.05,
        truncated_stream_p=0.1,
        reset_p=0.05,
    ),
    network=NetworkFaults.every(),
    pauses=PauseFaults.every(),
)


async def _agents(ctx: SimContext) -> None:
    llm = ctx.llm()
    finished: list[str] = []

    async def converse_on(node: int, protocol: str) -> None:
        agent = _Agent(ctx, node, protocol)
        for turn in range(4):
            reply = await agent.turn(f"Turn {turn}: my cat knocked over the plant.", turn % 2 == 1)
            ctx.emit("agent.reply", protocol=protocol, calls=reply.names, chars=len(reply.text))
        ctx.emit("agent.errors", protocol=protocol, **agent.errors)
        finished.append(protocol)

    async with trio.open_nursery() as nursery:
        ctx.spawn(nursery, converse_on, 0, "openai", node=ctx.nodes[0])
        ctx.spawn(nursery, converse_on, 1, "anthropic", node=ctx.nodes[1])
    assert sorted(finished) == ["anthropic", "openai"]
    ctx.emit("llm.served", requests=llm.served, **llm.injected)


def _simulate(seed: int, faults: FaultConfig = _SIM_FAULTS) -> tuple[Any, list[TraceRow]]:
    trace = io.StringIO()
    sim = Simulation(SimConfig(seed=seed, nodes=2, faults=faults), trace_sink=trace)
    with sdk_generators_left_open():
        result = sim.run(_agents)
    rows = [TraceRow.from_line(line) for line in trace.getvalue().splitlines()]
    return result, rows


def test_agents_on_simulated_nodes_call_the_sdks_under_llm_faults() -> None:
    """In a simulated run, agents on two nodes talk to ctx.llm() through the real SDKs on
    their node's env.http, under every LLM fault (and network faults and pauses): the run
    passes the sanitizer (the SDKs' uuid/time/random calls are virtualized, nothing is
    blocked), every fault fired is an llm.fault trace row on the caller's node, and the
    same seed repeats the run exactly."""
    result, rows = _simulate(11)
    assert result.ok, result.failure
    assert not [f for f in result.findings if f.action == "blocked"]
    assert {f.api for f in result.findings} >= {"uuid.uuid4"}
    faults = [row for row in rows if row.kind == "llm.fault"]
    kinds = {re.search(r"kind='(\w+)'", row.detail).group(1) for row in faults}
    assert len(kinds) >= 5, kinds
    assert {row.node for row in faults} == {"n1", "n2"}
    (served,) = [row for row in rows if row.kind == "llm.served"]
    assert int(re.search(r"requests=(\d+)", served.detail).group(1)) > len(faults)
    again, _ = _simulate(11)
    assert again.trace_hash == result.trace_hash
    other, _ = _simulate(12)
    assert other.ok, other.failure
    assert other.trace_hash != result.trace_hash


def test_a_paused_node_sends_and_reads_nothing_until_its_pause_ends() -> None:
    """SimHttp honours node pauses: a request from a paused node leaves when the pause ends."""

    async def workload(ctx: SimContext) -> None:
        ctx.http.register("echo.sim", _echo)
        ctx.pauses.pause("n1", 10.0)

        async def call() -> None:
            async with httpx2.AsyncClient(transport=ctx.env.http) as client:
                await client.get("http://echo.sim/")
            ctx.emit("answered", at=trio.current_time())

        async with trio.open_nursery() as nursery:
            ctx.spawn(nursery, call)
        assert trio.current_time() >= 10.0

    result = Simulation(SimConfig(seed=3)).run(workload)
    assert result.ok, result.failure


async def _echo(request: httpx2.Request) -> httpx2.Response:
    return httpx2.Response(200, text="echo")


def test_the_sdks_first_request_starts_a_thread_unless_the_platform_is_preset() -> None:
    """Both SDKs detect their platform on a worker thread (asyncify(get_platform)) at their
    first request unless `_platform` is already set: inside a simulation that is a thread,
    which the sanitizer blocks. Kelpie's providers preset it; if this test starts failing,
    the SDK stopped doing so and the preset can go."""

    async def workload(ctx: SimContext) -> None:
        ctx.llm()
        client = openai.AsyncOpenAI(
            api_key="k",
            base_url=f"http://{HOST}/v1",
            http_client=httpx2.AsyncClient(transport=ctx.env.http),
            max_retries=0,
        )
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )

    result = Simulation(SimConfig(seed=1)).run(workload)
    assert result.failure is not None
    assert result.failure.kind is FailureKind.SANITIZER
    assert "thread" in result.failure.message
    assert "to_thread" in result.failure.message
