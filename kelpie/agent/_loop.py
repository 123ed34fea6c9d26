"""The agent loop as a sans-IO state machine (like h11): events in, the next action out.

A *turn* starts with new input (user messages, or the client's answers to an
approval request) and runs *steps*: each step is one model call, then the tool
calls it asked for. `Turn` holds no I/O and no clock: the driver
(kelpie/agent/_agent.py) asks `next_action()`, carries it out, and reports what
happened (`model_replied`, `model_failed`, `tools_done`, `client_answered`).
Its state is a small JSON object the driver persists with every step, so a
turn interrupted by a crash continues from its last persisted step.

When a turn goes on, by agent type:
- `memgpt_agent`: the model talks through `send_message`. After its tool calls,
  another step runs if a call asked for one (`request_heartbeat: true`, unless
  heartbeats are paused) or a call failed (the model gets to react); otherwise
  the turn ends. A plain-text answer with no tool call ends the turn too (the
  text is the reply).
- `letta_v1_agent` and `react_agent`: no heartbeats; after tool calls there is
  always another step, and the turn ends when the model answers without calling
  a tool.
- Any type: a call to a client tool suspends the turn (stop reason
  `requires_approval`) after the server-side calls of the same step ran; the
  client's answers resume it with another step.

Every turn ends with a stop reason (Letta's `StopReasonType`): `end_turn`,
`max_steps` (the per-turn step limit), `max_tokens_exceeded` (the model's reply
was cut at its token limit), `llm_api_error` (the model failed after retries),
`requires_approval` (suspended), `error` (interrupted and not resumed).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Literal

import attrs

from kelpie.agent._llm import LLMError, LLMResponse, ToolCall
from kelpie.agent._tools import HEARTBEAT_ARG, uses_heartbeats

Phase = Literal["model", "tools", "approval", "done"]

#: Letta's default per-turn step limit.
MAX_STEPS_DEFAULT = 50


@attrs.frozen
class CallModel:
    """Build the prompt and call the model (step number `step`, from 1)."""

    step: int


@attrs.frozen
class RunTools:
    """Run these server-side tool calls, in order, and report each outcome."""

    calls: tuple[ToolCall, ...]


@attrs.frozen
class AwaitClient:
    """Suspend the turn: the client must run (or approve) these calls."""

    calls: tuple[ToolCall, ...]


@attrs.frozen
class Finish:
    stop_reason: str
    detail: str = ""


Action = CallModel | RunTools | AwaitClient | Finish


@attrs.frozen
class ToolOutcome:
    """How one tool call went: whether it succeeded, and whether it asked for another step."""

    call_id: str
    ok: bool
    heartbeat: bool = False


def wants_heartbeat(call: ToolCall) -> bool:
    """Whether the call's arguments ask for another step (`request_heartbeat: true`)."""
    try:
        args = json.loads(call.arguments)
    except (ValueError, RecursionError):
        return False
    return isinstance(args, dict) and args.get(HEARTBEAT_ARG) is True


@attrs.define
class Turn:
    """One turn's progress. `to_json`/`from_json` carry it across steps and crashes."""

    run_id: str
    #: The request that started the turn (a repeat of it resumes the turn).
    request_id: str
    agent_type: str
    max_steps: int = MAX_STEPS_DEFAULT
    client_tools: tuple[str, ...] = ()
    stream: bool = False
    step: int = 0
    phase: Phase = "model"
    #: The current step's calls still to run here, and those waiting for the client.
    server_calls: list[ToolCall] = attrs.field(factory=list)
    client_calls: list[ToolCall] = attrs.field(factory=list)
    #: The seq of the turn's first message.
    first_seq: int = 0
    #: The seq from which the current request's answer is made (the turn's first message,
    #: or the client's first approval result when a paused turn goes on).
    reply_seq: int = 0
    #: The seq of the model message whose tool calls the current step runs.
    step_seq: int = 0
    stop_reason: str = ""
    detail: str = ""
    heartbeats_paused: bool = False
    prompt_tokens: int = 0
    completion_tokens: int = 0

    # -- what to do next --------------------------------------------------------------

    def next_action(self) -> Action:
        if self.phase == "done":
            return Finish(self.stop_reason, self.detail)
        if self.phase == "model":
            if self.step >= self.max_steps:
                return self._finish("max_steps", f"the turn reached its limit of {self.step} steps")
            return CallModel(self.step + 1)
        if self.phase == "tools":
            if self.server_calls:
                return RunTools(tuple(self.server_calls))
            self.phase = "approval"
        return AwaitClient(tuple(self.client_calls))

    # -- events -----------------------------------------------------------------------

    def model_replied(self, response: LLMResponse) -> None:
        assert self.phase == "model", self.phase
        self.step += 1
        self.prompt_tokens += response.usage.prompt_tokens
        self.completion_tokens += response.usage.completion_tokens
        if not response.tool_calls:
            if response.finish == "length":
                self._finish("max_tokens_exceeded", "the model's reply was cut at its token limit")
            else:
                self._finish("end_turn")
            return
        client = set(self.client_tools)
        self.server_calls = [c for c in response.tool_calls if c.name not in client]
        self.client_calls = [c for c in response.tool_calls if c.name in client]
        self.phase = "tools"

    def model_failed(self, error: LLMError) -> None:
        assert self.phase == "model", self.phase
        self._finish("llm_api_error", f"{type(error).__name__}: {error}")

    def tools_done(self, outcomes: Sequence[ToolOutcome]) -> None:
        """The server-side calls ran (every one of `server_calls`, in order)."""
        assert self.phase == "tools", self.phase
        assert [o.call_id for o in outcomes] == [c.id for c in self.server_calls], outcomes
        self.server_calls = []
        if self.client_calls:
            self.phase = "approval"
            return
        if not uses_heartbeats(self.agent_type):
            self.phase = "model"
            return
        failed = any(not o.ok for o in outcomes)
        heartbeat = any(o.heartbeat for o in outcomes) and not self.heartbeats_paused
        if failed or heartbeat:
            self.phase = "model"
        else:  # send_message without a heartbeat, or nothing more to do
            self._finish("end_turn")

    def client_answered(self) -> None:
        """The client answered every pending call: the model sees the results next."""
        assert self.phase == "approval", self.phase
        self.client_calls = []
        self.phase = "model"

    def interrupted(self, detail: str) -> None:
        """The turn cannot go on (a crash, and a different request came first)."""
        self._finish("error", detail)

    def _finish(self, reason: str, detail: str = "") -> Finish:
        self.phase = "done"
        self.stop_reason = reason
        self.detail = detail
        return Finish(reason, detail)

    # -- persistence ------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        data = attrs.asdict(self, recurse=False)
        data["client_tools"] = list(self.client_tools)
        data["server_calls"] = [[c.id, c.name, c.arguments] for c in self.server_calls]
        data["client_calls"] = [[c.id, c.name, c.arguments] for c in self.client_calls]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Turn:
        fields = dict(data)
        fields["client_tools"] = tuple(fields["client_tools"])
        fields["server_calls"] = [ToolCall(*c) for c in fields["server_calls"]]
        fields["client_calls"] = [ToolCall(*c) for c in fields["client_calls"]]
        return cls(**fields)
