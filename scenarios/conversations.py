"""Agents holding conversations through the real SDKs and providers, under every fault.

A few agents of every type (memgpt_agent, letta_v1_agent, react_agent), each
thinking through the simulated LLM (kelpie/sim/_llm.py) over the OpenAI or the
Anthropic wire protocol, streaming or not, behind the official SDKs and
Kelpie's providers. One client per agent sends its user messages through the
nodes (one or two) and answers approval requests for its client tool. Faults:
every LLM fault (hangs, 429 with Retry-After, 5xx, malformed and bad tool
arguments, unknown tools, over-long replies, truncated streams, reset
connections), every storage fault, BUGGIFY, and a nemesis that crashes nodes
(their tasks are cancelled; they restart) in the middle of turns.

A client retries a message with the same request id until it gets an answer
(the agent resumes an interrupted turn; it never stores a message twice).
Phase 2 (liveness) stops every fault and restarts every node; each client's
last message must then be answered, and every agent must answer one more.

Invariants:
- every acknowledged user message is in the agent's recall exactly once, and
  no user message is there twice;
- every block holds at most its limit, and each agent's blocks at most the
  core-memory total;
- every answered turn ends with a known stop reason within its step limit, and
  an `end_turn` has a reply for the user;
- the history is well formed: every tool call has exactly one result, after it.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any

import attrs
import trio

from kelpie.agent._agent import AgentServices
from kelpie.agent._blocks import CORE_MEMORY_MAX_CHARS
from kelpie.agent._embedding import FakeEmbedder
from kelpie.agent._letta import parse_iso_ms
from kelpie.agent._retry import LLMRetryPolicy
from kelpie.agent._service import Agents, llm_clients, open_agents
from kelpie.core import KelpieError
from kelpie.runtime import RuntimeConfig
from kelpie.sim import (
    CheckFailed,
    FaultConfig,
    LLMFaults,
    Scenario,
    SimContext,
    SimNode,
    StorageFaults,
    Workload,
)
from kelpie.storage import RetryPolicy, StorageError

LIVENESS_BOUND_S = 600.0
KEYS = {"openai": "sim-key", "anthropic": "sim-key"}
LEASE_MS = 2_000
STOP_REASONS = {"end_turn", "max_steps", "max_tokens_exceeded", "llm_api_error"}
AGENT_TYPES = ("memgpt_agent", "letta_v1_agent", "react_agent")
CLIENT_TOOL = {
    "name": "read_file",
    "description": "Reads a file on the user's machine.",
    "parameters": {
        "type": "object",
        "properties": {"path": {"type": "string", "description": "The file's path."}},
        "required": ["path"],
    },
}


class NodeDown(Exception):
    """The node is not running (crashed, not yet restarted)."""


class NodeCrashed(Exception):
    """The node crashed while it had the request: it may have been applied."""


@attrs.define
class _Node:
    sim: SimNode
    agents: Agents | None = None
    calls: trio.Nursery | None = None
    scope: trio.CancelScope | None = None
    stop: trio.Event = attrs.Factory(trio.Event)
    crashes: int = 0

    async def call(self, fn: str, *args: Any, **kwargs: Any) -> Any:
        """Runs `Agents.<fn>` in this node's process: a crash loses the answer."""
        agents, calls = self.agents, self.calls
        if agents is None or calls is None:
            raise NodeDown(f"{self.sim.name} is down")
        box: list[tuple[str, Any]] = []
        done = trio.Event()

        async def run() -> None:
            try:
                box.append(("ok", await getattr(agents, fn)(*args, **kwargs)))
            except KelpieError as exc:
                box.append(("error", exc))
            finally:
                done.set()

        self.sim.start_soon(calls, run)
        await done.wait()
        if not box:
            raise NodeCrashed(f"{self.sim.name} crashed during {fn}")
        kind, value = box[0]
        if kind == "error":
            raise value
        return value


@attrs.define
class _Agent:
    id: str
    agent_type: str
    endpoint: str
    streams: bool
    max_steps: int
    client_tool: bool
    #: otid -> acknowledged (the send that carried it returned).
    sent: dict[str, bool] = attrs.Factory(dict)
    answers: int = 0
    #: Until when (wall ms) the agent's heartbeats are paused, as far as the client saw.
    paused_until_ms: int = 0


class ConversationsWorkload(Workload):
    def __init__(self, *, resume_turns: bool = True) -> None:
        self.resume_turns = resume_turns

    async def setup(self, ctx: SimContext) -> None:
        rng = ctx.rng
        self.ctx = ctx
        self.nodes = [_Node(node) for node in ctx.nodes[: rng.randint(1, len(ctx.nodes))]]
        self.phase1_s = rng.uniform(20.0, 90.0)
        rates = [0.0, 0.02, 0.05] if self.resume_turns else [0.05, 0.1]
        self.crash_rate_per_s = rng.choice(rates)
        self.messages_max = rng.randint(3, 8)
        self.faults_on = True
        self.agents = [
            _Agent(
                id=f"agent-{i}",
                agent_type=rng.choice(AGENT_TYPES),
                endpoint=rng.choice(["openai", "anthropic"]),
                streams=rng.chance(0.5),
                max_steps=rng.randint(2, 8),
                client_tool=rng.chance(0.4),
            )
            for i in range(rng.randint(1, 4))
        ]
        self.config = RuntimeConfig(
            invocation_timeout_ms=600_000,
            lease_duration_ms=LEASE_MS,
            lease_renew_ms=LEASE_MS // 5,
            forward_timeout_ms=700_000,
            load_retry=RetryPolicy(attempts_max=10, backoff_initial_ms=1, backoff_max_ms=20),
            commit_retry=RetryPolicy(attempts_max=5, backoff_initial_ms=1, backoff_max_ms=20),
            membership_retry=RetryPolicy(attempts_max=5, backoff_initial_ms=1, backoff_max_ms=20),
            route_retry=RetryPolicy(attempts_max=10, backoff_initial_ms=5, backoff_max_ms=200),
        )
        self.policy = LLMRetryPolicy(
            attempts_max=4, backoff_initial_ms=200, backoff_max_ms=5_000, attempt_timeout_ms=60_000
        )
        self.llm = ctx.llm("llm.sim")
        self.pending: dict[str, str] = {}
        self.errors: dict[str, int] = {}
        self.stops: dict[str, int] = {}

    # -- nodes ------------------------------------------------------------------------

    async def life(self, ctx: SimContext, node: _Node) -> None:
        rng = ctx.rng.fork(f"life:{node.sim.name}")
        env = node.sim.env
        while not node.stop.is_set():
            services = AgentServices(
                llm=llm_clients(env, KEYS, policy=self.policy),
                embedder=FakeEmbedder(),
                resume_turns=self.resume_turns,
            )
            with trio.CancelScope() as scope:
                node.scope = scope
                try:
                    async with (
                        open_agents(ctx.store, env, services, self.config) as agents,
                        trio.open_nursery() as calls,
                    ):
                        node.agents, node.calls = agents, calls
                        await node.stop.wait()
                        node.agents = None
                except StorageError as exc:
                    ctx.emit("conv.start_failed", node=node.sim.name, error=type(exc).__name__)
            node.agents = node.calls = node.scope = None
            if node.stop.is_set():
                return
            if scope.cancelled_caught:
                node.crashes += 1
            await trio.sleep(rng.uniform(0.0, 3.0) if self.faults_on else 0.0)

    async def nemesis(self, ctx: SimContext) -> None:
        rng = ctx.rng.fork("nemesis")
        if not self.crash_rate_per_s:
            return
        while True:
            await trio.sleep(rng.expovariate(self.crash_rate_per_s))
            node = rng.choice(self.nodes)
            if node.scope is not None:
                ctx.emit("conv.crash", node=node.sim.name)
                node.scope.cancel()

    # -- clients ----------------------------------------------------------------------

    async def until_done(self, rng: Any, label: str, fn: str, *args: Any, **kw: Any) -> Any:
        """Sends the same request (same request id) until some node answers it."""
        self.pending[label] = fn
        while True:
            node = rng.choice(self.nodes)
            try:
                result = await node.call(fn, *args, **kw)
            except (KelpieError, NodeDown, NodeCrashed) as exc:
                name = type(exc).__name__
                self.errors[name] = self.errors.get(name, 0) + 1
                if isinstance(exc, KelpieError) and _is_bad_request(exc):
                    raise CheckFailed(f"{label}: a correct request was refused: {exc!r}") from exc
                await trio.sleep(rng.uniform(0.05, 1.0))
                continue
            del self.pending[label]
            return result

    async def client(self, ctx: SimContext, agent: _Agent, until_s: float) -> None:
        rng = ctx.rng.fork(f"client:{agent.id}")
        await self.create(rng, agent)
        n = 0
        while n < self.messages_max and trio.current_time() < until_s:
            await self.converse(rng, agent, n)
            n += 1
            await trio.sleep(rng.uniform(0, 3.0))

    async def create(self, rng: Any, agent: _Agent) -> None:
        endpoint = "http://llm.sim/v1" if agent.endpoint == "openai" else "http://llm.sim"
        spec = {
            "agent_type": agent.agent_type,
            "llm_config": {
                "model": f"sim-{agent.endpoint}",
                "model_endpoint_type": agent.endpoint,
                "model_endpoint": endpoint,
                "context_window": rng.choice([3_000, 8_000, 128_000]),
                "max_tokens": 512,
            },
            "memory_blocks": [
                {"label": "human", "value": "The user.", "limit": 300, "description": "The user"},
                {"label": "persona", "value": "A helpful agent.", "limit": 600},
            ],
            "max_steps": agent.max_steps,
        }
        await self.until_done(rng, f"create {agent.id}", "create", spec, agent_id=agent.id)

    async def converse(self, rng: Any, agent: _Agent, n: int) -> None:
        otid = f"otid-{agent.id}-{n}"
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12)))
        message = {"role": "user", "content": f"{words} (message {n})", "otid": otid}
        agent.sent[otid] = False
        answer = await self.until_done(
            rng,
            f"send {otid}",
            "send",
            agent.id,
            [message],
            request_id=f"req-{otid}",
            client_tools=[CLIENT_TOOL] if agent.client_tool else None,
            stream=agent.streams,
        )
        agent.sent[otid] = True
        rounds = 0
        while answer["stop_reason"]["stop_reason"] == "requires_approval":
            _note_pauses(agent, answer["messages"])
            rounds += 1
            if rounds > agent.max_steps:
                raise CheckFailed(f"{agent.id}: more approval rounds than steps in one turn")
            answers = [
                {
                    "type": "tool",
                    "tool_call_id": call_id,
                    "tool_return": "file contents",
                    "status": "success",
                }
                for call_id in _unanswered(answer)
            ]
            answer = await self.until_done(
                rng,
                f"answer {otid} #{rounds}",
                "answer",
                agent.id,
                answers,
                request_id=f"req-{otid}-answer-{rounds}",
                stream=agent.streams,
            )
        self.check_answer(agent, answer)

    def check_answer(self, agent: _Agent, answer: dict[str, Any]) -> None:
        stop = answer["stop_reason"]["stop_reason"]
        self.stops[stop] = self.stops.get(stop, 0) + 1
        agent.answers += 1
        if stop not in STOP_REASONS:
            raise CheckFailed(f"{agent.id}: a turn stopped with {stop!r}: {answer['stop_reason']}")
        if answer["usage"]["step_count"] > agent.max_steps:
            raise CheckFailed(
                f"{agent.id}: a turn took {answer['usage']['step_count']} steps, over its "
                f"limit of {agent.max_steps}"
            )
        _note_pauses(agent, answer["messages"])
        if stop == "end_turn" and not _final_word(agent, answer["messages"]):
            kinds = [m["message_type"] for m in answer["messages"]]
            raise CheckFailed(f"{agent.id}: a turn ended (end_turn) early: {kinds}: {answer}")

    # -- phases -----------------------------------------------------------------------

    async def run(self, ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            for node in self.nodes:
                ctx.spawn(
                    nursery, self.life, ctx, node, node=node.sim, name=f"life {node.sim.name}"
                )
            nemesis = trio.CancelScope()
            nursery.start_soon(self.run_nemesis, nemesis, name="nemesis")
            until_s = trio.current_time() + self.phase1_s
            async with trio.open_nursery() as clients:
                for i, agent in enumerate(self.agents):
                    home = self.nodes[i % len(self.nodes)].sim
                    name = f"client {agent.id}"
                    ctx.spawn(clients, self.client, ctx, agent, until_s, node=home, name=name)
                await trio.sleep(self.phase1_s)
                nemesis.cancel()
                self.quiesce(ctx)
                await self.within_bound(clients_done(clients))
            await self.within_bound(self.all_answer(ctx))
            await self.check_memory(ctx)
            for node in self.nodes:
                node.stop.set()

    async def run_nemesis(self, scope: trio.CancelScope) -> None:
        with scope:
            await self.nemesis(self.ctx)

    def quiesce(self, ctx: SimContext) -> None:
        ctx.phase("liveness")
        self.faults_on = False
        self.llm.faults = LLMFaults()
        ctx.store.quiesce()
        ctx.pauses.quiesce()

    async def within_bound(self, phase: Awaitable[None]) -> None:
        with trio.move_on_after(LIVENESS_BOUND_S) as bound:
            await phase
        if bound.cancelled_caught:
            raise CheckFailed(
                f"liveness: {LIVENESS_BOUND_S:g} s after the faults stopped, still waiting "
                f"for: {sorted(self.pending.items())}"
            )

    async def all_answer(self, ctx: SimContext) -> None:
        rng = ctx.rng.fork("liveness")
        for agent in self.agents:
            await self.converse(rng, agent, 1_000)

    async def check_memory(self, ctx: SimContext) -> None:
        rng = ctx.rng.fork("check")
        for agent in self.agents:
            description = await self.until_done(rng, f"get {agent.id}", "get", agent.id)
            total = 0
            for block in description["blocks"]:
                total += len(block["value"])
                if len(block["value"]) > block["limit"]:
                    raise CheckFailed(
                        f"{agent.id}: block {block['label']!r} holds {len(block['value'])} "
                        f"characters, over its limit of {block['limit']}"
                    )
            if total > CORE_MEMORY_MAX_CHARS:
                raise CheckFailed(f"{agent.id}: core memory holds {total} characters")
            history = await self.history(rng, agent)
            self.check_history(agent, history)
        ctx.emit(
            "conv.summary",
            agents=len(self.agents),
            answers=sum(a.answers for a in self.agents),
            stops=sorted(self.stops.items()),
            errors=sorted(self.errors.items()),
            crashes=sum(n.crashes for n in self.nodes),
            llm_requests=self.llm.served,
            llm_faults=sorted(self.llm.injected.items()),
        )

    async def history(self, rng: Any, agent: _Agent) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            page = await self.until_done(
                rng, f"history {agent.id}", "messages", agent.id, after=after, limit=500
            )
            if not page:
                return out
            out += page
            after = page[-1]["id"]

    def check_history(self, agent: _Agent, history: list[dict[str, Any]]) -> None:
        seen: dict[str, int] = {}
        for message in history:
            if message["message_type"] == "user_message" and "otid" in message:
                seen[message["otid"]] = seen.get(message["otid"], 0) + 1
        for otid, count in seen.items():
            if count > 1:
                raise CheckFailed(f"{agent.id}: user message {otid} is in recall {count} times")
        for otid, acked in agent.sent.items():
            if acked and seen.get(otid) != 1:
                raise CheckFailed(
                    f"{agent.id}: acknowledged user message {otid} is in recall "
                    f"{seen.get(otid, 0)} times"
                )
        calls: dict[str, int] = {}
        results: dict[str, int] = {}
        for message in history:
            if message["message_type"] in ("tool_call_message", "approval_request_message"):
                calls[message["tool_call"]["tool_call_id"]] = len(calls)
            elif message["message_type"] == "tool_return_message":
                call_id = message["tool_call_id"]
                if call_id not in calls:
                    raise CheckFailed(f"{agent.id}: a tool result for unknown call {call_id}")
                results[call_id] = results.get(call_id, 0) + 1
        for call_id in calls:
            if results.get(call_id, 0) != 1:
                raise CheckFailed(
                    f"{agent.id}: tool call {call_id} has {results.get(call_id, 0)} results"
                )

    async def check(self, ctx: SimContext) -> None:
        """Everything was checked while the nodes were up (see `run`)."""


async def clients_done(clients: trio.Nursery) -> None:
    while clients.child_tasks:
        await trio.sleep(0.1)


def _final_word(agent: _Agent, messages: list[dict[str, Any]]) -> bool:
    """Whether a turn that ended (end_turn) ended where the model said it was done.

    That is a reply to the user; or, for a memgpt agent, a tool call that
    succeeded and did not ask for another step (its heartbeat is the model's
    way of saying it wants to go on).
    """
    last = messages[-1]
    if last["message_type"] == "assistant_message":
        return True
    if agent.agent_type != "memgpt_agent" or last["message_type"] != "tool_return_message":
        return False
    calls = {
        m["tool_call"]["tool_call_id"]: m["tool_call"]
        for m in messages
        if m["message_type"] == "tool_call_message"
    }
    call = calls.get(last["tool_call_id"])
    if call is None or last["status"] != "success":
        return False
    try:
        args = json.loads(call["arguments"])
    except ValueError:
        return False
    asked = isinstance(args, dict) and args.get("request_heartbeat") is True
    return not asked or parse_iso_ms(last["date"]) < agent.paused_until_ms


def _note_pauses(agent: _Agent, messages: list[dict[str, Any]]) -> None:
    """Follows the agent's `pause_heartbeats` calls: while paused, a heartbeat is ignored."""
    calls = {
        m["tool_call"]["tool_call_id"]: m["tool_call"]
        for m in messages
        if m["message_type"] == "tool_call_message"
    }
    for m in messages:
        if m["message_type"] == "tool_return_message" and m["status"] == "success":
            call = calls.get(m["tool_call_id"])
            if call is not None and call["name"] == "pause_heartbeats":
                minutes = json.loads(call["arguments"])["minutes"]
                agent.paused_until_ms = parse_iso_ms(m["date"]) + minutes * 60_000


def _unanswered(answer: dict[str, Any]) -> list[str]:
    """The ids of the approval requests of this turn the client has not answered yet."""
    messages = answer["messages"]
    returned = {m["tool_call_id"] for m in messages if m["message_type"] == "tool_return_message"}
    return [
        m["tool_call"]["tool_call_id"]
        for m in messages
        if m["message_type"] == "approval_request_message"
        and m["tool_call"]["tool_call_id"] not in returned
    ]


def _is_bad_request(exc: KelpieError) -> bool:
    from kelpie.agent._errors import InvalidAgentRequest, NoApprovalPending

    return isinstance(exc, InvalidAgentRequest | NoApprovalPending)


WORDS = (
    "garden", "river", "piano", "sister", "coffee", "mountain", "train", "letter", "winter",
    "bicycle", "orange", "library", "storm", "kitchen", "violin", "harbour", "lantern",
)  # fmt: skip


SCENARIOS = (
    Scenario(
        name="conversations",
        summary="agents of every type talk through the SDKs under LLM, storage and crash faults",
        faults=FaultConfig(storage=StorageFaults.every(), llm=LLMFaults.every()),
        workload=ConversationsWorkload,
        nodes=2,
        max_time_s=3_600.0,
    ),
    Scenario(
        name="conversations_unresumed",
        summary="conversations whose agents restart an interrupted turn instead of resuming it",
        faults=FaultConfig(storage=StorageFaults.every(), llm=LLMFaults.every()),
        workload=lambda: ConversationsWorkload(resume_turns=False),
        nodes=2,
        max_time_s=3_600.0,
        planted_bug="a repeated request after a crash stores the user's message again",
    ),
)
