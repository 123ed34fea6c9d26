"""The agent actor: one agent's memory and its turns, one message at a time.

An agent is an actor of kind "agent" (kelpie.runtime), so it is active on one
node at a time and handles one request at a time: one turn at a time per
agent. Its state (`dump_state`) is its configuration, its block ids, its prompt
window and the turn in progress; its history (recall), passages (archival) and
working memory are rows of its working memory (kelpie/agent/_recall.py,
_archival.py, _working.py); its core-memory blocks are records of the store,
edited in transactions that keep every attached agent within its total
(kelpie/agent/_blocks.py).

A turn (kelpie/agent/_loop.py) persists every step with `ctx.checkpoint()`:
the user's messages before the first model call, each model reply, each
step's tool results. A crash loses at most the step under way. When the same request is
delivered again (the caller retries with the same `request_id`), the turn
resumes from its last checkpoint and stores nothing twice; when a different
request comes first, the interrupted turn is closed (its unanswered tool calls
get an error result, its stop reason is `error`) and the new one starts.

Requests are JSON objects with an "op" (`AgentActor.handle`); `Agents`
(kelpie/agent/_service.py) is the typed way to send them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

import attrs

from kelpie.agent._archival import (
    TOP_K_MAX,
    ArchivalIndex,
    Passage,
    TagMatch,
    as_matrix,
    check_passage,
    delete_passage,
    get_passage,
    list_passages,
    passages_by_seq,
    store_passage,
)
from kelpie.agent._blocks import Block, BlockNotFound, BlockStore
from kelpie.agent._embedding import Embedder
from kelpie.agent._errors import (
    AgentExists,
    AgentNotFound,
    ApprovalPending,
    InvalidAgentRequest,
    NoApprovalPending,
)
from kelpie.agent._letta import iso_ms, parse_iso_ms, to_letta
from kelpie.agent._llm import (
    LLMClient,
    LLMConfig,
    LLMError,
    LLMRequest,
    PromptMessage,
    ToolCall,
    ToolSpec,
)
from kelpie.agent._loop import (
    MAX_STEPS_DEFAULT,
    AwaitClient,
    CallModel,
    Finish,
    RunTools,
    ToolOutcome,
    Turn,
    wants_heartbeat,
)
from kelpie.agent._prompt import (
    CHARS_PER_TOKEN,
    SUMMARIZE_AT,
    SUMMARIZE_TO,
    build_request,
    estimate_tokens,
    fixed_chars,
    room_tokens,
    system_prompt,
)
from kelpie.agent._recall import (
    MESSAGE_MAX_BYTES,
    Message,
    encoded_size,
    messages_from,
    page_messages,
    search_messages,
    store_message,
)
from kelpie.agent._tools import (
    AGENT_TYPES,
    BUILTIN_TOOLS,
    HEARTBEAT_ARG,
    base_tools,
    builtin_spec,
    client_spec,
)
from kelpie.agent._working import working_delete, working_get, working_items, working_set
from kelpie.core import KelpieError
from kelpie.runtime import Actor, ActorContext, ActorId
from kelpie.storage import StorageError

AGENT_KIND = "agent"

DEFAULT_SYSTEM = (
    "You are a helpful assistant with a persistent memory. Your core memory is below and is "
    "always visible to you; edit it with your memory tools to remember what matters. Older "
    "messages and facts can be found with conversation_search and archival_memory_search."
)

SUMMARY_SYSTEM = (
    "Summarise the conversation below for your own future reference: keep names, facts, "
    "decisions and open questions; drop small talk. Answer with the summary only."
)


@attrs.define
class AgentServices:
    """What the agents of one node share."""

    #: The model client for an agent's LLM settings (made once per distinct settings).
    llm: Callable[[LLMConfig], LLMClient]
    embedder: Embedder
    #: The cluster's blocks (set by `open_agents`).
    blocks: BlockStore | None = None
    #: run_id -> where to send that run's streamed text (kelpie/agent/_service.py).
    streams: dict[str, Callable[[dict[str, Any]], Awaitable[None]]] = attrs.Factory(dict)
    #: TESTING ONLY. False: a repeat of an interrupted request starts a new turn instead of
    #: resuming it (stores the user's message again): a planted bug the conversations
    #: scenario must catch. Never turn it off in production.
    resume_turns: bool = True

    def need_blocks(self) -> BlockStore:
        assert self.blocks is not None, "open_agents sets the blocks before any agent runs"
        return self.blocks


def agent_actor_id(agent_id: str) -> ActorId:
    return ActorId(AGENT_KIND, agent_id)


def derived_id(prefix: str, *parts: str) -> str:
    """A stable id made from `parts` (so a retried creation makes the same ids)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).hexdigest()
    return f"{prefix}-{digest[:8]}-{digest[8:12]}-{digest[12:16]}-{digest[16:20]}-{digest[20:32]}"


def _need(message: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = message.get(name)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise InvalidAgentRequest(f"{name!r} is required and must be {_kind_name(kind)}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


class ToolFailed(Exception):
    """A tool call failed; the message is what the model sees."""


class AgentActor(Actor):
    """One agent. See the module docstring; requests are in `handle`."""

    def __init__(self, actor_id: ActorId, services: AgentServices) -> None:
        self.actor_id = actor_id
        self.services = services
        self.state: dict[str, Any] | None = None
        self.turn: Turn | None = None
        #: Messages from the prompt window's start on (loaded on first use).
        self._window: list[Message] | None = None
        self._index: ArchivalIndex | None = None

    # -- state --------------------------------------------------------------------------

    def dump_state(self) -> bytes | None:
        if self.state is None:
            return None
        state = self.state | {"turn": None if self.turn is None else self.turn.to_json()}
        return json.dumps(state).encode()

    def load_state(self, data: bytes | None) -> None:
        self.state = None if data is None else json.loads(data)
        turn = None if self.state is None else self.state.get("turn")
        self.turn = None if turn is None else Turn.from_json(turn)
        self._window = None  # caches follow the store: reload on next use
        self._index = None

    def _agent(self) -> dict[str, Any]:
        if self.state is None:
            raise AgentNotFound(f"agent {self.actor_id.id} does not exist")
        return self.state

    # -- requests -----------------------------------------------------------------------

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if not isinstance(message, dict) or not isinstance(message.get("op"), str):
            raise InvalidAgentRequest("an agent request is a JSON object with an 'op'")
        op = message["op"]
        if op == "create":
            return await self._create(ctx, message)
        self._agent()
        handler = getattr(self, f"_op_{op}", None)
        if handler is None:
            raise InvalidAgentRequest(f"unknown agent request {op!r}")
        return await handler(ctx, message)

    async def _op_get(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        return await self._describe(self._agent())

    async def _op_send(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        return await self._send(ctx, message)

    async def _op_messages(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        page = await page_messages(
            ctx,
            after=message.get("after"),
            before=message.get("before"),
            limit=_limit(message),
            ascending=message.get("order", "asc") == "asc",
        )
        return self._letta(page)

    async def _op_messages_search(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        """Recall search: messages containing every word of `query`, newest first, with
        optional `roles` and an ISO 8601 `start_date`/`end_date` range."""
        query = message.get("query") or ""
        roles = message.get("roles") or []
        if not isinstance(roles, list) or not all(
            r in ("user", "assistant", "tool") for r in roles
        ):
            raise InvalidAgentRequest("roles must be a list of 'user', 'assistant', 'tool'")
        page, total = await search_messages(
            ctx,
            query=_str(query, "query"),
            roles=roles,
            start_ms=_time_arg(message, "start_date"),
            end_ms=_time_arg(message, "end_date"),
            limit=_limit(message),
        )
        return {"total": total, "messages": self._letta(page)}

    async def _op_archival_insert(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        return [await self._insert_passage(ctx, message.get("text"), message.get("tags"))]

    async def _op_archival_search(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        return await self._search_archival(ctx, message)

    async def _op_archival_list(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        passages = await list_passages(
            ctx,
            after=message.get("after"),
            limit=_limit(message),
            ascending=message.get("order", "asc") == "asc",
        )
        return [self._passage_json(p) for p in passages]

    async def _op_archival_delete(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        passage = await get_passage(ctx, _need(message, "passage_id", str))
        delete_passage(ctx, passage)
        self._agent()["passages"] -= 1
        if self._index is not None:
            self._index.remove(passage.seq)
        return {}

    async def _op_working_set(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        ttl = message.get("ttl_ms")
        working_set(ctx, _need(message, "key", str), message.get("value"), ttl_ms=ttl)
        return {}

    async def _op_working_get(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        found, value = await working_get(ctx, _need(message, "key", str))
        return {"found": found, "value": value}

    async def _op_working_delete(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        working_delete(ctx, _need(message, "key", str))
        return {}

    async def _op_working_items(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        return await working_items(ctx)

    # -- creation -----------------------------------------------------------------------

    async def _create(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        if self.state is not None:
            raise AgentExists(f"agent {self.actor_id.id} exists already")
        spec = message.get("agent")
        if not isinstance(spec, dict):
            raise InvalidAgentRequest("'agent' is required: the new agent's settings")
        agent_type, llm_config, tools, max_steps = _check_agent_spec(spec)
        block_ids = await self._create_blocks(spec)
        self.state = {
            "id": self.actor_id.id,
            "name": spec.get("name") or self.actor_id.id,
            "agent_type": agent_type,
            "system": spec.get("system") or DEFAULT_SYSTEM,
            "description": spec.get("description") or "",
            "tags": list(spec.get("tags") or []),
            "metadata": dict(spec.get("metadata") or {}),
            "llm": attrs.asdict(llm_config),
            "embedding": self.services.embedder.model_id,
            "tools": tools,
            "blocks": block_ids,
            "max_steps": max_steps,
            "created_at_ms": ctx.env.clock.wall_ms(),
            "seq": 0,
            "pseq": 0,
            "passages": 0,
            "window_start": 0,
            "summary": "",
            "paused_until_ms": 0,
        }
        self.turn = None
        self._window = []
        return await self._describe(self.state)

    async def _create_blocks(self, spec: Mapping[str, Any]) -> list[str]:
        """Makes the new agent's blocks and attaches them, with the shared ones it names."""
        blocks = self.services.need_blocks()
        new_blocks = spec.get("memory_blocks") or []
        if not isinstance(new_blocks, list):
            raise InvalidAgentRequest("memory_blocks must be a list of blocks (label, value, ...)")
        made = []
        for i, fields in enumerate(new_blocks):
            if not isinstance(fields, dict):
                raise InvalidAgentRequest("each of memory_blocks is an object (label, value, ...)")
            try:
                made.append(Block.new(derived_id("block", self.actor_id.id, str(i)), **fields))
            except TypeError as exc:
                raise InvalidAgentRequest(f"memory_blocks[{i}]: {exc}") from None
        shared = spec.get("block_ids") or []
        if not isinstance(shared, list):
            raise InvalidAgentRequest("block_ids must be a list of block ids")
        block_ids = [b.id for b in made] + [_str(b, "block_ids") for b in shared]
        labels = [b.label for b in made]
        if len(set(labels)) != len(labels):
            raise InvalidAgentRequest(f"an agent's blocks need distinct labels, got {labels}")
        for block in made:
            await blocks.create(block)
        await blocks.attach(self.actor_id.id, block_ids)
        return block_ids

    async def _describe(self, agent: Mapping[str, Any]) -> dict[str, Any]:
        blocks = [b.to_json() for b in await self._blocks()]
        return {
            "id": agent["id"],
            "name": agent["name"],
            "agent_type": agent["agent_type"],
            "system": agent["system"],
            "description": agent["description"],
            "tags": agent["tags"],
            "metadata": agent["metadata"],
            "llm_config": agent["llm"],
            "embedding_model": agent["embedding"],
            "tools": agent["tools"],
            "max_steps": agent["max_steps"],
            "blocks": blocks,
            "memory": {"blocks": blocks},
            "created_at": iso_ms(agent["created_at_ms"]),
            "message_count": agent["seq"],
        }

    async def _blocks(self) -> list[Block]:
        """The agent's blocks now (a shared block deleted elsewhere drops out)."""
        return await self.services.need_blocks().get_many(self._agent()["blocks"])

    # -- turns --------------------------------------------------------------------------

    async def _send(self, ctx: ActorContext, message: Mapping[str, Any]) -> Any:
        request_id = _need(message, "request_id", str)
        approvals = message.get("approvals")
        turn = self.turn
        if turn is not None and turn.phase != "done":
            if turn.request_id == request_id and self.services.resume_turns:
                return await self._run(ctx, turn)  # a repeat of the interrupted request
            if turn.phase == "approval":
                if approvals is None:
                    raise ApprovalPending(
                        f"agent {self.actor_id.id} waits for the results of tool calls "
                        f"{', '.join(c.id for c in turn.client_calls)}; send them (approvals) first"
                    )
                await self._take_approvals(ctx, turn, approvals, request_id)
                return await self._run(ctx, turn)
            await self._close_interrupted(ctx, turn)
        elif turn is not None and turn.request_id == request_id:
            return await self._reply(ctx, turn)  # done already: the same answer again
        if approvals is not None:
            raise NoApprovalPending(f"agent {self.actor_id.id} is not waiting for any tool results")
        inputs = message.get("messages")
        if not isinstance(inputs, list) or not inputs:
            raise InvalidAgentRequest("'messages' must be a non-empty list of messages")
        texts = [_user_text(m) for m in inputs]
        client_tools = _client_tools(message.get("client_tools"))
        max_steps = message.get("max_steps") or self._agent()["max_steps"]
        if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
            raise InvalidAgentRequest(f"max_steps must be a positive integer, got {max_steps!r}")
        agent = self._agent()
        turn = Turn(
            run_id=message.get("run_id") or ctx.env.rng.make_id("run"),
            request_id=request_id,
            agent_type=agent["agent_type"],
            max_steps=max_steps,
            client_tools=tuple(t.name for t in client_tools),
            stream=bool(message.get("stream")),
            first_seq=agent["seq"],
            reply_seq=agent["seq"],
            heartbeats_paused=agent["paused_until_ms"] > ctx.env.clock.wall_ms(),
        )
        agent["client_tools"] = [[t.name, t.description, dict(t.parameters)] for t in client_tools]
        window = await self._load_window(ctx)
        for raw, (text, otid) in zip(inputs, texts, strict=True):
            name = raw.get("name") if isinstance(raw, dict) else None
            window.append(self._store(ctx, turn.run_id, "user", text, otid=otid, name=name or ""))
        self.turn = turn
        await ctx.checkpoint()  # the user's messages are acknowledged from here on
        return await self._run(ctx, turn)

    async def _run(self, ctx: ActorContext, turn: Turn) -> Any:
        while True:
            action = turn.next_action()
            if isinstance(action, CallModel):
                await self._model_step(ctx, turn)
            elif isinstance(action, RunTools):
                await self._tool_step(ctx, turn, action.calls)
            elif isinstance(action, AwaitClient):  # the invocation's own commit stores the rest
                return await self._reply(ctx, turn, stop_reason="requires_approval")
            else:
                assert isinstance(action, Finish)
                return await self._reply(ctx, turn)

    async def _model_step(self, ctx: ActorContext, turn: Turn) -> None:
        agent = self._agent()
        llm = self.services.llm(LLMConfig(**agent["llm"]))
        request = await self._prompt(ctx, turn, llm)
        sink = self.services.streams.get(turn.run_id)

        async def on_text(text: str) -> None:
            if sink is not None:
                await sink({"message_type": "assistant_message", "content": text})

        try:
            response = await llm.complete(request, stream=turn.stream, on_text=on_text)
        except LLMError as exc:
            turn.model_failed(exc)
            ctx.env.emit("agent.llm_error", agent=self.actor_id.id, error=type(exc).__name__)
            await ctx.checkpoint()
            return
        # The model's call ids are kept (its results answer them) unless missing or already
        # used in the window: some servers number calls afresh in every reply.
        used = {c.id for m in await self._load_window(ctx) for c in m.tool_calls}
        calls = []
        for made in response.tool_calls:
            call = made
            if not call.id or call.id in used:
                call = attrs.evolve(made, id=ctx.env.rng.make_id("call"))
            used.add(call.id)
            calls.append(call)
        response = attrs.evolve(response, tool_calls=tuple(calls))
        stored = self._store(
            ctx, turn.run_id, "assistant", response.content, tool_calls=tuple(calls)
        )
        self._window_add(stored)
        turn.step_seq = stored.seq
        turn.model_replied(response)
        await ctx.checkpoint()

    async def _tool_step(self, ctx: ActorContext, turn: Turn, calls: Sequence[ToolCall]) -> None:
        window = await self._load_window(ctx)
        done = {m.tool_call_id: m for m in window if m.role == "tool" and m.seq > turn.step_seq}
        outcomes = []
        for call in calls:
            result = done.get(call.id)
            if result is None:  # not run yet (a resumed turn skips the calls it made)
                try:
                    text, ok = await self._run_tool(ctx, turn, call), True
                except ToolFailed as exc:
                    text, ok = str(exc), False
                result = self._store(
                    ctx,
                    turn.run_id,
                    "tool",
                    text,
                    tool_call_id=call.id,
                    name=call.name,
                    status="success" if ok else "error",
                )
                self._window_add(result)
            outcomes.append(
                ToolOutcome(call.id, result.status == "success", heartbeat=wants_heartbeat(call))
            )
        turn.tools_done(outcomes)
        await ctx.checkpoint()

    async def _take_approvals(
        self, ctx: ActorContext, turn: Turn, approvals: Any, request_id: str
    ) -> None:
        if not isinstance(approvals, list) or not approvals:
            raise InvalidAgentRequest("'approvals' must be a non-empty list")
        pending = {c.id: c for c in turn.client_calls}
        answers: dict[str, tuple[str, str]] = {}
        for answer in approvals:
            if not isinstance(answer, dict) or not isinstance(answer.get("tool_call_id"), str):
                raise InvalidAgentRequest("each approval names its 'tool_call_id'")
            call_id = answer["tool_call_id"]
            if call_id not in pending:
                raise NoApprovalPending(
                    f"tool call {call_id!r} is not waiting for a result; pending: "
                    f"{', '.join(pending) or 'none'}"
                )
            if answer.get("type", "approval") == "tool":
                status = answer.get("status") or "success"
                if status not in ("success", "error"):
                    raise InvalidAgentRequest(f"status is 'success' or 'error', got {status!r}")
                answers[call_id] = (_result_text(answer.get("tool_return")), status)
            elif answer.get("approve") is False:
                reason = answer.get("reason") or "no reason given"
                answers[call_id] = (f"Error: the user denied this tool call: {reason}", "error")
            else:
                answers[call_id] = (
                    "Error: the call was approved, but the client sent no result for it",
                    "error",
                )
        missing = [c for c in pending if c not in answers]
        if missing:
            raise InvalidAgentRequest(
                f"answer every pending tool call; missing: {', '.join(missing)}"
            )
        turn.reply_seq = self._agent()["seq"]
        for call_id, (text, status) in answers.items():
            self._window_add(
                self._store(
                    ctx,
                    turn.run_id,
                    "tool",
                    text,
                    tool_call_id=call_id,
                    name=pending[call_id].name,
                    status=status,
                    kind="approval",
                )
            )
        turn.client_answered()
        turn.request_id = request_id  # a repeat of the approval request resumes from here
        await ctx.checkpoint()

    async def _close_interrupted(self, ctx: ActorContext, turn: Turn) -> None:
        """Ends a turn a crash interrupted: every unanswered call gets an error result."""
        window = await self._load_window(ctx)
        answered = {m.tool_call_id for m in window if m.role == "tool"}
        for message in window:
            for call in message.tool_calls:
                if message.seq >= turn.first_seq and call.id not in answered:
                    self._window_add(
                        self._store(
                            ctx,
                            turn.run_id,
                            "tool",
                            "Error: the turn was interrupted before this call finished",
                            tool_call_id=call.id,
                            name=call.name,
                            status="error",
                        )
                    )
        turn.interrupted("the turn was interrupted (a crash) and not resumed")
        ctx.env.emit("agent.turn_interrupted", agent=self.actor_id.id, run=turn.run_id)
        await ctx.checkpoint()

    async def _reply(
        self, ctx: ActorContext, turn: Turn, stop_reason: str | None = None
    ) -> dict[str, Any]:
        messages = await messages_from(ctx, turn.reply_seq)
        stop: dict[str, Any] = {
            "message_type": "stop_reason",
            "stop_reason": stop_reason or turn.stop_reason,
        }
        if turn.detail:
            stop["detail"] = turn.detail
        return {
            "messages": self._letta(messages, turn.client_tools),
            "stop_reason": stop,
            "usage": {
                "message_type": "usage_statistics",
                "completion_tokens": turn.completion_tokens,
                "prompt_tokens": turn.prompt_tokens,
                "total_tokens": turn.prompt_tokens + turn.completion_tokens,
                "step_count": turn.step,
                "run_ids": [turn.run_id],
            },
            "run_id": turn.run_id,
        }

    def _letta(self, messages: Sequence[Message], client_tools: Sequence[str] = ()) -> list[Any]:
        agent_type = self._agent()["agent_type"]
        return [m for message in messages for m in to_letta(message, agent_type, client_tools)]

    # -- the prompt ---------------------------------------------------------------------

    async def _prompt(self, ctx: ActorContext, turn: Turn, llm: LLMClient) -> LLMRequest:
        agent = self._agent()
        config = LLMConfig(**agent["llm"])
        tools = self._tool_specs()
        system = system_prompt(
            agent["system"],
            await self._blocks(),
            now_ms=ctx.env.clock.wall_ms(),
            in_recall=agent["window_start"],
            passages=agent["passages"],
        )
        window = await self._load_window(ctx)
        fixed = fixed_chars(system, tools)
        budget = room_tokens(config)
        if estimate_tokens(fixed, agent["summary"], window) > budget * SUMMARIZE_AT:
            await self._summarise(ctx, llm, config, budget, fixed, turn)
            window = await self._load_window(ctx)
        return build_request(config, system, tools, agent["summary"], window)

    def _tool_specs(self) -> tuple[ToolSpec, ...]:
        agent = self._agent()
        specs = [builtin_spec(name, agent["agent_type"]) for name in agent["tools"]]
        for name, description, parameters in agent.get("client_tools") or []:
            specs.append(client_spec(name, description, parameters))
        return tuple(specs)

    async def _summarise(
        self,
        ctx: ActorContext,
        llm: LLMClient,
        config: LLMConfig,
        budget: int,
        fixed: int,
        turn: Turn,
    ) -> None:
        """Moves the oldest turns out of the prompt window into a summary (they stay in recall)."""
        agent = self._agent()
        window = await self._load_window(ctx)
        target = budget * SUMMARIZE_TO * CHARS_PER_TOKEN - fixed - len(agent["summary"])
        # Cut only before a user's message, so a tool call and its result stay together,
        # and never inside the current turn.
        cuts = [
            i
            for i, m in enumerate(window)
            if i > 0 and m.role == "user" and m.kind == "" and m.seq <= turn.first_seq
        ]
        if not cuts:
            return
        cut = cuts[-1]
        suffix = sum(m.size for m in window)  # the size of window[i:] as i moves right
        start = 0
        for i in cuts:
            suffix -= sum(m.size for m in window[start:i])
            start = i
            if suffix <= target:
                cut = i
                break
        evicted = window[:cut]
        transcript = "\n".join(f"{m.role}: {_transcript_line(m)}" for m in evicted)
        previous = agent["summary"]
        if previous:
            transcript = f"(summary so far) {previous}\n{transcript}"
        try:
            response = await llm.complete(
                LLMRequest(
                    model=config.model,
                    system=SUMMARY_SYSTEM,
                    messages=(PromptMessage("user", transcript[-budget * CHARS_PER_TOKEN // 2 :]),),
                    max_tokens=min(config.max_tokens, 1024),
                )
            )
            summary = response.content.strip()
        except LLMError as exc:
            ctx.env.emit("agent.summary_failed", agent=self.actor_id.id, error=type(exc).__name__)
            summary = ""
        if not summary:  # no summary: the prompt still says where the evicted turns are
            summary = previous
        self._store(ctx, turn.run_id, "user", summary, kind="summary")
        agent["summary"] = summary
        agent["window_start"] = window[cut].seq
        self._window = window[cut:]
        ctx.env.emit("agent.summarised", agent=self.actor_id.id, evicted=len(evicted))
        await ctx.checkpoint()

    async def _load_window(self, ctx: ActorContext) -> list[Message]:
        if self._window is None:
            window = await messages_from(ctx, self._agent()["window_start"])
            self._window = [m for m in window if m.kind != "summary"]
        return self._window

    def _window_add(self, message: Message) -> None:
        """Keeps the loaded window up to date (unloaded, it reads the message when it loads)."""
        if self._window is not None:
            self._window.append(message)

    def _store(
        self,
        ctx: ActorContext,
        run_id: str,
        role: Any,
        content: str,
        **fields: Any,
    ) -> Message:
        agent = self._agent()
        message = Message(
            id=ctx.env.rng.make_id("message"),
            seq=agent["seq"],
            role=role,
            content=content,
            created_at_ms=ctx.env.clock.wall_ms(),
            run_id=run_id,
            **fields,
        )
        size = encoded_size(message)
        if size > MESSAGE_MAX_BYTES:
            if role == "user" or message.kind == "approval":  # the client's: refuse it
                raise InvalidAgentRequest(
                    f"a message of {size} bytes is over the limit of {MESSAGE_MAX_BYTES}; "
                    "send less (split it, or put a document in archival memory)"
                )
            message = _cut_to_fit(message, size)  # the model's or a tool's: cut, and say so
        agent["seq"] += 1
        store_message(ctx, message)
        return message

    # -- tools --------------------------------------------------------------------------

    async def _run_tool(self, ctx: ActorContext, turn: Turn, call: ToolCall) -> str:
        agent = self._agent()
        if call.name not in agent["tools"]:
            available = ", ".join(agent["tools"])
            raise ToolFailed(f"Error: there is no tool named {call.name!r}. Tools: {available}")
        try:
            args = json.loads(call.arguments or "{}")
        except (ValueError, RecursionError) as exc:
            raise ToolFailed(
                f"Error: the arguments of {call.name} are not valid JSON ({exc}); "
                "call it again with a JSON object"
            ) from None
        if not isinstance(args, dict):
            raise ToolFailed(f"Error: the arguments of {call.name} must be a JSON object")
        args.pop(HEARTBEAT_ARG, None)
        spec = builtin_spec(call.name, agent["agent_type"]).parameters
        missing = [p for p in spec["required"] if p != HEARTBEAT_ARG and p not in args]
        unknown = sorted(set(args) - set(spec["properties"]))
        if missing or unknown:
            raise ToolFailed(
                f"Error: {call.name} takes {', '.join(spec['properties'])}"
                + (f"; missing: {', '.join(missing)}" if missing else "")
                + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            )
        try:
            return await self._builtin(ctx, turn, call, args)
        except StorageError:
            raise  # not the tool's failure: the step runs again and settles it (same key)
        except (ToolFailed, AssertionError):
            raise
        except KelpieError as exc:
            raise ToolFailed(f"Error: {exc}") from None
        except Exception as exc:  # whatever odd arguments made the tool raise
            ctx.env.emit("agent.tool_error", tool=call.name, error=type(exc).__name__)
            raise ToolFailed(f"Error: {call.name} failed ({type(exc).__name__}): {exc}") from None

    async def _builtin(
        self, ctx: ActorContext, turn: Turn, call: ToolCall, args: dict[str, Any]
    ) -> str:
        name = call.name
        if name == "send_message":
            _str(args["message"], "message")
            return "Sent message successfully."
        if name in (
            "core_memory_append",
            "core_memory_replace",
            "memory_insert",
            "memory_replace",
            "memory_rethink",
        ):
            edit = _block_edit(name, args)
            key = f"{self.actor_id.id}/{turn.step_seq}/{call.id}"
            block = await self._edit_block(args["label"], edit, key=key)
            return (
                f"Block {block.label!r} now holds {len(block.value)} of {block.limit} characters."
            )
        if name == "archival_memory_insert":
            passage = await self._insert_passage(ctx, args["content"], args.get("tags"))
            return f"Stored as passage {passage['id']}."
        if name == "archival_memory_search":
            found = await self._search_archival(ctx, args)
            return json.dumps(
                [
                    {"timestamp": r["timestamp"], "content": r["content"], "tags": r["tags"]}
                    for r in found["results"]
                ]
            )
        if name == "conversation_search":
            limit = 10 if args.get("limit") is None else args["limit"]
            if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 50:
                raise ToolFailed("Error: limit must be an integer from 1 to 50")
            page, total = await search_messages(
                ctx,
                query=_str(args["query"], "query"),
                roles=args.get("roles") or (),
                start_ms=_time_arg(args, "start_date"),
                end_ms=_time_arg(args, "end_date"),
                limit=limit,
            )
            return json.dumps(
                {
                    "total": total,
                    "results": [
                        {"timestamp": iso_ms(m.created_at_ms), "role": m.role, "content": m.content}
                        for m in page
                    ],
                }
            )
        if name == "pause_heartbeats":
            minutes = args["minutes"]
            if not isinstance(minutes, int) or isinstance(minutes, bool) or not 0 < minutes <= 360:
                raise ToolFailed("Error: minutes must be an integer from 1 to 360")
            self._agent()["paused_until_ms"] = ctx.env.clock.wall_ms() + minutes * 60_000
            turn.heartbeats_paused = True
            return f"Heartbeats paused for {minutes} minutes."
        raise ToolFailed(f"Error: {name} cannot run here")  # a builtin without an executor

    async def _edit_block(self, label: Any, edit: dict[str, Any], *, key: str) -> Block:
        label = _str(label, "label")
        blocks = await self._blocks()
        target = next((b for b in blocks if b.label == label), None)
        if target is None:
            labels = ", ".join(b.label for b in blocks) or "none"
            raise BlockNotFound(f"there is no memory block labelled {label!r}; blocks: {labels}")
        return await self.services.need_blocks().edit(target.id, edit, key=key)

    # -- archival -----------------------------------------------------------------------

    async def _archival(self, ctx: ActorContext) -> ArchivalIndex:
        if self._index is None:
            embedder = self.services.embedder
            self._index = await ArchivalIndex.load(ctx, embedder.model_id, embedder.dimension)
        return self._index

    async def _insert_passage(self, ctx: ActorContext, text: Any, tags: Any) -> dict[str, Any]:
        text, tags = check_passage(text, tags)
        index = await self._archival(ctx)
        embedder = self.services.embedder
        vector = as_matrix(await embedder.embed_documents([text]), embedder.dimension)[0]
        agent = self._agent()
        passage = Passage(
            id=ctx.env.rng.make_id("passage"),
            seq=agent["pseq"],
            text=text,
            tags=tags,
            created_at_ms=ctx.env.clock.wall_ms(),
            model_id=embedder.model_id,
        )
        agent["pseq"] += 1
        agent["passages"] += 1
        store_passage(ctx, passage, vector)
        index.add(passage, vector)
        return self._passage_json(passage)

    async def _search_archival(self, ctx: ActorContext, args: Mapping[str, Any]) -> dict[str, Any]:
        query = _str(args.get("query"), "query")
        top_k = 5 if args.get("top_k") is None else args["top_k"]
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= TOP_K_MAX:
            raise InvalidAgentRequest(f"top_k must be an integer from 1 to {TOP_K_MAX}")
        tags = args.get("tags") or ()
        if not isinstance(tags, list | tuple) or not all(isinstance(t, str) for t in tags):
            raise InvalidAgentRequest("tags must be a list of strings")
        mode: TagMatch = "all" if args.get("tag_match_mode") == "all" else "any"
        if args.get("tag_match_mode") not in (None, "any", "all"):
            raise InvalidAgentRequest(
                f"tag_match_mode is 'any' or 'all', got {args.get('tag_match_mode')!r}"
            )
        index = await self._archival(ctx)
        embedder = self.services.embedder
        vector = as_matrix(await embedder.embed_query(query), embedder.dimension)[0]
        hits = index.search(
            vector,
            top_k=top_k,
            tags=tags,
            tag_match=mode,
            start_ms=_time_arg(args, "start_datetime"),
            end_ms=_time_arg(args, "end_datetime"),
        )
        scores = dict(hits)
        passages = await passages_by_seq(ctx, [seq for seq, _ in hits])
        results = [
            {
                "id": p.id,
                "timestamp": iso_ms(p.created_at_ms),
                "content": p.text,
                "tags": list(p.tags),
                "score": round(scores[p.seq], 6),
            }
            for p in passages
        ]
        return {"count": len(results), "results": results}

    def _passage_json(self, passage: Passage) -> dict[str, Any]:
        return {
            "id": passage.id,
            "text": passage.text,
            "tags": list(passage.tags),
            "created_at": iso_ms(passage.created_at_ms),
            "agent_id": self.actor_id.id,
            "embedding_model": passage.model_id,
        }


def _cut_to_fit(message: Message, size: int) -> Message:
    """`message` with its longest texts cut, each with a note saying so, to fit a row."""
    excess = size - MESSAGE_MAX_BYTES + 4096  # room for the notes and JSON escapes

    def cut(text: str) -> str:
        nonlocal excess
        if excess <= 0 or not text:
            return text
        keep = max(0, len(text) - excess)
        excess -= len(text) - keep
        return f"{text[:keep]}...[cut: {len(text) - keep} characters over the message limit]"

    while encoded_size(message) > MESSAGE_MAX_BYTES:
        calls = tuple(attrs.evolve(c, arguments=cut(c.arguments)) for c in message.tool_calls)
        message = attrs.evolve(message, content=cut(message.content), tool_calls=calls)
        excess = max(excess, encoded_size(message) - MESSAGE_MAX_BYTES + 4096)
    return message


def _str(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise InvalidAgentRequest(f"{name} must be a string, got {type(value).__name__}")
    return value


def _time_arg(args: Mapping[str, Any], name: str) -> int | None:
    value = args.get(name)
    if value is None or value == "":
        return None
    try:
        return parse_iso_ms(_str(value, name))
    except ValueError:
        raise InvalidAgentRequest(
            f"{name} must be an ISO 8601 date or time, got {value!r}"
        ) from None


def _block_edit(name: str, args: Mapping[str, Any]) -> dict[str, Any]:
    if name == "core_memory_append":
        return {"op": "append", "content": args["content"]}
    if name == "core_memory_replace":
        return {
            "op": "replace",
            "old": args["old_content"],
            "new": args["new_content"],
            "all": True,
        }
    if name == "memory_insert":
        return {"op": "insert", "content": args["new_str"], "line": args.get("insert_line", -1)}
    if name == "memory_replace":
        return {"op": "replace", "old": args["old_str"], "new": args["new_str"]}
    return {"op": "rewrite", "value": args["new_memory"]}


def _user_text(message: Any) -> tuple[str, str]:
    """(text, otid) of one input message: {"role": "user", "content": str | [parts]}."""
    if not isinstance(message, dict):
        raise InvalidAgentRequest("each message is an object with 'role' and 'content'")
    role = message.get("role", "user")
    if role not in ("user", "system"):
        raise InvalidAgentRequest(
            f"a message to an agent has role 'user' or 'system', got {role!r}"
        )
    content = message.get("content")
    if isinstance(content, list):  # Letta's content parts: [{"type": "text", "text": ...}]
        parts = [p.get("text") for p in content if isinstance(p, dict)]
        if not all(isinstance(p, str) for p in parts) or not parts:
            raise InvalidAgentRequest("content parts must be text parts: {'type': 'text', 'text'}")
        content = "\n".join(parts)  # type: ignore[arg-type]
    if not isinstance(content, str) or not content:
        raise InvalidAgentRequest("a message's content must be a non-empty string (or text parts)")
    otid = message.get("otid") or ""
    return content, _str(otid, "otid")


def _client_tools(raw: Any) -> list[ToolSpec]:
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise InvalidAgentRequest("client_tools must be a list of {name, description, parameters}")
    out = []
    for tool in raw:
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str) or not tool["name"]:
            raise InvalidAgentRequest("each client tool needs a 'name'")
        parameters = tool.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidAgentRequest(f"client tool {tool['name']!r}: parameters must be an object")
        out.append(client_spec(tool["name"], tool.get("description") or "", parameters))
    return out


def _result_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value)


def _transcript_line(message: Message) -> str:
    calls = " ".join(f"[{c.name} {c.arguments}]" for c in message.tool_calls)
    return f"{message.content} {calls}".strip()


def _check_agent_spec(spec: Mapping[str, Any]) -> tuple[str, LLMConfig, list[str], int]:
    agent_type = spec.get("agent_type") or "memgpt_agent"
    if agent_type not in AGENT_TYPES:
        raise InvalidAgentRequest(
            f"agent_type {agent_type!r} is not supported; use one of {', '.join(AGENT_TYPES)}"
        )
    llm = spec.get("llm_config")
    if not isinstance(llm, dict):
        raise InvalidAgentRequest("llm_config is required (model, model_endpoint_type, ...)")
    try:
        llm_config = LLMConfig(**llm)
    except TypeError as exc:
        raise InvalidAgentRequest(f"llm_config: {exc}") from None
    tools = spec.get("tools")
    if tools is None:
        tools = list(base_tools(agent_type))
    if not isinstance(tools, list):
        raise InvalidAgentRequest("tools must be a list of tool names")
    unknown = [t for t in tools if t not in BUILTIN_TOOLS]
    if unknown:
        raise InvalidAgentRequest(f"unknown tools: {', '.join(map(str, unknown))}")
    max_steps = spec.get("max_steps", MAX_STEPS_DEFAULT)
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise InvalidAgentRequest(f"max_steps must be a positive integer, got {max_steps!r}")
    return agent_type, llm_config, list(tools), max_steps


def _add_label(labels: set[str], label: str) -> set[str]:
    if label in labels:
        raise InvalidAgentRequest(f"two blocks are labelled {label!r}")
    return labels | {label}


def _limit(message: Mapping[str, Any]) -> int:
    limit = 50 if message.get("limit") is None else message["limit"]
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= 1000:
        raise InvalidAgentRequest(f"limit must be an integer from 1 to 1000, got {limit!r}")
    return limit
