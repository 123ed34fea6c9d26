"""A scripted model (no HTTP) and a settable clock, for tests of the agent loop."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from kelpie.agent import LLMClient, LLMRequest, LLMResponse, ToolCall, Usage
from kelpie.agent._embedding import FakeEmbedder
from kelpie.agent._llm import TextSink
from kelpie.env import Clock, Env, LoggingEventSink, NoFaults, Rng

LLM_CONFIG = {
    "model": "scripted",
    "model_endpoint_type": "openai",
    "model_endpoint": "http://scripted.invalid/v1",
    "context_window": 100_000,
    "max_tokens": 1000,
}


class ManualClock(Clock):
    def __init__(self, wall_ms: int = 1_767_225_600_000) -> None:  # 2026-01-01
        self.now_ms = wall_ms

    def wall_ns(self) -> int:
        return self.now_ms * 1_000_000


def make_env(seed: int = 1) -> Env:
    return Env(clock=ManualClock(), rng=Rng(seed), faults=NoFaults(), events=LoggingEventSink())


def call(name: str, counter: list[int] = [0], **args: Any) -> ToolCall:  # noqa: B006
    counter[0] += 1
    return ToolCall(f"call_{counter[0]}", name, json.dumps(args))


def reply(text: str = "", *calls: ToolCall, finish: str = "") -> LLMResponse:
    return LLMResponse(
        content=text,
        tool_calls=tuple(calls),
        finish=finish or ("tool_calls" if calls else "stop"),  # type: ignore[arg-type]
        usage=Usage(10, 5),
    )


class ScriptedLLM(LLMClient):
    """Answers each request with the next scripted response (or `script(request)`)."""

    endpoint_type = "openai"

    def __init__(self, *responses: LLMResponse | Callable[[LLMRequest], LLMResponse]) -> None:
        self.responses = list(responses)
        self.requests: list[LLMRequest] = []
        self.streamed: list[bool] = []

    async def complete(
        self, request: LLMRequest, *, stream: bool = False, on_text: TextSink | None = None
    ) -> LLMResponse:
        self.requests.append(request)
        self.streamed.append(stream)
        assert self.responses, f"the script ran out at request {len(self.requests)}"
        nxt = self.responses.pop(0)
        response = nxt(request) if callable(nxt) else nxt
        if stream and on_text is not None and response.content:
            await on_text(response.content)
        return response


def embedder() -> FakeEmbedder:
    return FakeEmbedder()
