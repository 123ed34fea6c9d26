"""The agent loop through `Agents` with a scripted model: memory tools, types, limits, approvals."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import trio
from _scripted import LLM_CONFIG, ManualClock, ScriptedLLM, call, embedder, make_env, reply

from kelpie.agent import LLMRequest, LLMUnavailable
from kelpie.agent._agent import AgentServices
from kelpie.agent._blocks import CORE_MEMORY_MAX_CHARS, Block, BlockError, BlockLimitExceeded
from kelpie.agent._errors import ApprovalPending, InvalidAgentRequest, NoApprovalPending
from kelpie.agent._service import Agents, open_agents
from kelpie.storage import CommitUnknownResult, MemoryStore, Store, pack

BLOCKS = [
    {"label": "human", "value": "Unknown so far.", "limit": 200, "description": "The user."},
    {"label": "persona", "value": "I am Kelp, a careful assistant.", "description": "Me."},
]


def run(
    llm: ScriptedLLM,
    body: Callable[[Agents], Awaitable[None]],
    *,
    store: Store | None = None,
    seed: int = 1,
) -> None:
    async def main() -> None:
        services = AgentServices(llm=lambda config: llm, embedder=embedder())
        async with open_agents(store or MemoryStore(), make_env(seed), services) as agents:
            await body(agents)

    trio.run(main)


def types(reply: dict[str, Any]) -> list[str]:
    return [m["message_type"] for m in reply["messages"]]


async def new_agent(agents: Agents, agent_type: str = "memgpt_agent", **extra: Any) -> str:
    spec = {"agent_type": agent_type, "llm_config": LLM_CONFIG, "memory_blocks": BLOCKS, **extra}
    return str((await agents.create(spec))["id"])


def test_memgpt_edits_memory_chains_on_heartbeat_and_replies_through_send_message() -> None:
    llm = ScriptedLLM(
        reply(
            "The user told me their name.",
            call(
                "core_memory_replace",
                label="human",
                old_content="Unknown so far.",
                new_content="Name: Ada.",
                request_heartbeat=True,
            ),
        ),
        reply("", call("send_message", message="Nice to meet you, Ada!")),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        answer = await agents.send(agent_id, [{"role": "user", "content": "I am Ada."}])
        assert answer["stop_reason"]["stop_reason"] == "end_turn"
        assert types(answer) == [
            "user_message",
            "reasoning_message",
            "tool_call_message",
            "tool_return_message",
            "assistant_message",
        ]
        assert answer["messages"][-1]["content"] == "Nice to meet you, Ada!"
        assert answer["usage"]["step_count"] == 2
        agent = await agents.get(agent_id)
        human = next(b for b in agent["blocks"] if b["label"] == "human")
        assert human["value"] == "Name: Ada."
        # The second model call saw the edited block and the whole tool-call history.
        second = llm.requests[1]
        assert "Name: Ada." in second.system and "chars_limit=200" in second.system
        roles = [m.role for m in second.messages]
        assert roles == ["user", "assistant", "tool"]
        assert second.messages[2].tool_call_id == second.messages[1].tool_calls[0].id
        assert {t.name for t in second.tools} >= {"send_message", "core_memory_append"}
        assert all(
            "request_heartbeat" in t.parameters["properties"]
            for t in second.tools
            if t.name != "send_message"
        )

    run(llm, body)


def test_an_edit_over_the_limit_is_a_tool_error_the_model_sees_and_nothing_changes() -> None:
    llm = ScriptedLLM(
        reply(
            "",
            call("core_memory_append", label="human", content="x" * 500, request_heartbeat=False),
        ),
        reply(
            "", call("core_memory_append", label="nobody", content="hi", request_heartbeat=False)
        ),
        reply("", call("send_message", message="Sorry, that did not fit.")),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        answer = await agents.send(agent_id, [{"role": "user", "content": "remember this"}])
        returns = [m for m in answer["messages"] if m["message_type"] == "tool_return_message"]
        assert [r["status"] for r in returns] == ["error", "error"]
        assert "over its limit of 200" in returns[0]["tool_return"]
        assert "no memory block labelled 'nobody'" in returns[1]["tool_return"]
        assert answer["stop_reason"]["stop_reason"] == "end_turn"  # a failure gave it a step
        agent = await agents.get(agent_id)
        assert (
            next(b for b in agent["blocks"] if b["label"] == "human")["value"] == BLOCKS[0]["value"]
        )

    run(llm, body)


def test_core_memory_total_is_enforced_across_blocks() -> None:
    big = CORE_MEMORY_MAX_CHARS - 100
    llm = ScriptedLLM(
        reply(
            "",
            call("core_memory_append", label="human", content="y" * 150, request_heartbeat=False),
        ),
        reply("", call("send_message", message="ok")),
    )

    async def body(agents: Agents) -> None:
        spec = {
            "llm_config": LLM_CONFIG,
            "memory_blocks": [
                {"label": "human", "value": "", "limit": 1000},
                {"label": "notes", "value": "n" * big, "limit": CORE_MEMORY_MAX_CHARS},
            ],
        }
        agent_id = (await agents.create(spec))["id"]
        answer = await agents.send(agent_id, [{"role": "user", "content": "hi"}])
        error = next(m for m in answer["messages"] if m["message_type"] == "tool_return_message")
        assert f"core memory of agent {agent_id} would hold 32818" in error["tool_return"]
        with pytest.raises(BlockLimitExceeded):
            await agents.create(
                {
                    "llm_config": LLM_CONFIG,
                    "memory_blocks": [{"label": "a", "value": "z" * 10, "limit": 5}],
                }
            )

    run(llm, body)


def test_the_total_holds_for_rest_edits_and_for_blocks_shared_between_agents() -> None:
    llm = ScriptedLLM(
        reply(
            "",
            call("core_memory_append", label="team", content="t" * 3000, request_heartbeat=False),
        ),
        reply("", call("send_message", message="That does not fit.")),
    )

    async def body(agents: Agents) -> None:
        team = await agents.create_block({"label": "team", "value": "", "limit": 20_000})
        x = (
            await agents.create(
                {
                    "llm_config": LLM_CONFIG,
                    "memory_blocks": [{"label": "notes", "value": "n" * 30_000, "limit": 30_000}],
                    "block_ids": [team["id"]],
                }
            )
        )["id"]
        y = await new_agent(agents, block_ids=[team["id"]])  # y has room to spare; x has not
        answer = await agents.send(y, [{"role": "user", "content": "note it"}])
        error = next(m for m in answer["messages"] if m["message_type"] == "tool_return_message")
        assert error["status"] == "error" and f"core memory of agent {x}" in error["tool_return"]
        with pytest.raises(BlockLimitExceeded, match=f"agent {x}"):
            await agents.update_block(team["id"], {"value": "u" * 3000})
        assert (await agents.get_block(team["id"]))["value"] == ""
        await agents.update_block(team["id"], {"value": "u" * 2000})  # fits both
        notes = next(b for b in (await agents.get(x))["blocks"] if b["label"] == "notes")
        with pytest.raises(BlockLimitExceeded):
            await agents.update_block(notes["id"], {"value": "n" * 30_769})
        with pytest.raises(BlockError, match="labelled 'notes'"):
            await agents.update_block(team["id"], {"label": "notes"})

    run(llm, body)


def test_letta_v1_loops_over_tools_and_answers_in_plain_text_with_archival_search() -> None:
    llm = ScriptedLLM(
        reply(
            "", call("archival_memory_insert", content="Ada's cat is called Tesla.", tags=["pets"])
        ),
        reply("", call("archival_memory_search", query="cat Tesla", tags=["pets"])),
        lambda request: reply(
            "Your cat is Tesla." if "Tesla" in request.messages[-1].content else "?"
        ),
        reply("", call("memory_insert", label="human", new_str="Has a cat.")),
        reply("Noted."),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents, "letta_v1_agent")
        tools = set((await agents.get(agent_id))["tools"])
        assert "send_message" not in tools and "memory_replace" in tools
        first = await agents.send(agent_id, [{"role": "user", "content": "My cat is Tesla."}])
        assert first["messages"][-1] == first["messages"][-1] | {
            "message_type": "assistant_message",
            "content": "Your cat is Tesla.",
        }
        assert first["usage"]["step_count"] == 3
        second = await agents.send(agent_id, [{"role": "user", "content": "remember"}])
        assert types(second)[-1] == "assistant_message"
        # Every step of the first turn is replayed to the model in the second.
        replay = llm.requests[3].messages
        assert [m.role for m in replay] == [
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "user",
        ]
        found = await agents.archival_search(agent_id, "cat", tags=["pets"])
        assert found["count"] == 1 and found["results"][0]["content"].startswith("Ada's cat")

    run(llm, body)


def test_react_agent_uses_the_classic_memory_tools_without_heartbeats() -> None:
    llm = ScriptedLLM(reply("", call("conversation_search", query="nothing")), reply("Done."))

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents, "react_agent")
        answer = await agents.send(agent_id, [{"role": "user", "content": "search"}])
        assert types(answer)[-1] == "assistant_message"
        tools = {t.name: t for t in llm.requests[0].tools}
        assert set(tools) == {
            "core_memory_append",
            "core_memory_replace",
            "conversation_search",
            "archival_memory_insert",
            "archival_memory_search",
        }
        assert "request_heartbeat" not in tools["core_memory_append"].parameters["properties"]

    run(llm, body)


def test_the_step_limit_stops_a_turn_with_max_steps() -> None:
    def forever(request: LLMRequest) -> Any:
        return reply("", call("conversation_search", query="more", request_heartbeat=True))

    llm = ScriptedLLM(*[forever] * 3)

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        answer = await agents.send(agent_id, [{"role": "user", "content": "go"}], max_steps=3)
        assert answer["stop_reason"]["stop_reason"] == "max_steps"
        assert answer["usage"]["step_count"] == 3

    run(llm, body)


def test_malformed_arguments_and_unknown_tools_are_tool_errors() -> None:
    from kelpie.agent import ToolCall

    llm = ScriptedLLM(
        reply(
            "",
            ToolCall("c1", "core_memory_append", '{"label": "human", "content": '),
            ToolCall("c2", "launch_rockets", "{}"),
        ),
        reply("", call("send_message", message="Let me try that again.")),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        answer = await agents.send(agent_id, [{"role": "user", "content": "x"}])
        errors = [m["tool_return"] for m in answer["messages"] if m.get("status") == "error"]
        assert "not valid JSON" in errors[0] and "no tool named 'launch_rockets'" in errors[1]
        assert answer["stop_reason"]["stop_reason"] == "end_turn"

    run(llm, body)


def test_llm_failure_ends_the_turn_with_llm_api_error_and_keeps_the_message() -> None:
    def fail(request: LLMRequest) -> Any:
        raise LLMUnavailable("the model is down")

    llm = ScriptedLLM(fail)

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        answer = await agents.send(agent_id, [{"role": "user", "content": "hello?"}])
        assert answer["stop_reason"]["stop_reason"] == "llm_api_error"
        assert "the model is down" in answer["stop_reason"]["detail"]
        history = await agents.messages(agent_id)
        assert [m["content"] for m in history] == ["hello?"]

    run(llm, body)


def test_client_tools_pause_the_turn_until_the_client_answers() -> None:
    shell = {
        "name": "run_shell",
        "description": "Runs a command.",
        "parameters": {
            "type": "object",
            "properties": {"command": {"type": "string"}},
            "required": ["command"],
        },
    }
    llm = ScriptedLLM(
        reply("Let me look.", call("run_shell", command="ls")),
        lambda request: reply(f"You have: {request.messages[-1].content}"),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents, "letta_v1_agent")
        first = await agents.send(
            agent_id, [{"role": "user", "content": "what files?"}], client_tools=[shell]
        )
        assert first["stop_reason"]["stop_reason"] == "requires_approval"
        request = first["messages"][-1]
        assert request["message_type"] == "approval_request_message"
        call_id = request["tool_call"]["tool_call_id"]
        with pytest.raises(ApprovalPending):
            await agents.send(agent_id, [{"role": "user", "content": "hurry"}])
        with pytest.raises(NoApprovalPending):
            await agents.answer(agent_id, [{"type": "tool", "tool_call_id": "nope"}])
        answer = await agents.answer(
            agent_id,
            [
                {
                    "type": "tool",
                    "tool_call_id": call_id,
                    "tool_return": "a.txt b.txt",
                    "status": "success",
                }
            ],
        )
        assert answer["stop_reason"]["stop_reason"] == "end_turn"
        assert answer["messages"][-1]["content"] == "You have: a.txt b.txt"
        assert "run_shell" in {t.name for t in llm.requests[1].tools}
        with pytest.raises(NoApprovalPending):
            await agents.answer(agent_id, [{"type": "tool", "tool_call_id": call_id}])

    run(llm, body)


def test_a_denied_approval_is_an_error_result_for_the_model() -> None:
    llm = ScriptedLLM(
        reply("", call("deploy")),
        lambda request: reply("Understood." if "denied" in request.messages[-1].content else "?"),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents, "letta_v1_agent")
        first = await agents.send(
            agent_id, [{"role": "user", "content": "ship it"}], client_tools=[{"name": "deploy"}]
        )
        call_id = first["messages"][-1]["tool_call"]["tool_call_id"]
        answer = await agents.answer(
            agent_id,
            [
                {
                    "type": "approval",
                    "tool_call_id": call_id,
                    "approve": False,
                    "reason": "not on Friday",
                }
            ],
        )
        assert answer["messages"][-1]["content"] == "Understood."

    run(llm, body)


def test_bad_requests_get_typed_errors() -> None:
    async def body(agents: Agents) -> None:
        with pytest.raises(InvalidAgentRequest, match="agent_type"):
            await agents.create({"agent_type": "alien", "llm_config": LLM_CONFIG})
        with pytest.raises(InvalidAgentRequest, match="llm_config"):
            await agents.create({"agent_type": "memgpt_agent"})
        agent_id = await new_agent(agents)
        with pytest.raises(InvalidAgentRequest, match="non-empty"):
            await agents.send(agent_id, [{"role": "user", "content": ""}])
        with pytest.raises(InvalidAgentRequest, match="top_k"):
            await agents.archival_search(agent_id, "q", top_k=0)

    run(ScriptedLLM(), body)


def test_working_memory_entries_expire_on_the_agents_clock() -> None:
    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        await agents.working_set(agent_id, "plan", {"step": 1}, ttl_ms=1000)
        await agents.working_set(agent_id, "forever", [1, 2])
        assert await agents.working_get(agent_id, "plan") == {"found": True, "value": {"step": 1}}
        clock = agents.runtime._env.clock  # the Env's ManualClock
        assert isinstance(clock, ManualClock)
        clock.now_ms += 1000
        assert await agents.working_get(agent_id, "plan") == {"found": False, "value": None}
        assert await agents.working_items(agent_id) == {"forever": [1, 2]}

    run(ScriptedLLM(), body)


def test_archival_filters_apply_before_top_k() -> None:
    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        clock = agents.runtime._env.clock
        assert isinstance(clock, ManualClock)
        for i in range(30):
            clock.now_ms += 86_400_000  # a day apart
            tags = ["even"] if i % 2 == 0 else ["odd"]
            await agents.archival_insert(agent_id, f"garden note number {i}", tags=tags)
        found = await agents.archival_search(agent_id, "garden note", tags=["odd"], top_k=3)
        assert found["count"] == 3 and all(r["tags"] == ["odd"] for r in found["results"])
        window = await agents.archival_search(
            agent_id,
            "garden note",
            top_k=50,
            start_datetime="2026-01-05",
            end_datetime="2026-01-07T23:59:59Z",
        )
        assert sorted(r["content"] for r in window["results"]) == [
            "garden note number 3",
            "garden note number 4",
            "garden note number 5",
        ]
        none = await agents.archival_search(
            agent_id, "x", tags=["odd", "even"], tag_match_mode="all"
        )
        assert none == {"count": 0, "results": []}

    run(ScriptedLLM(), body)


def test_a_long_conversation_is_summarised_and_stays_searchable() -> None:
    config = LLM_CONFIG | {"context_window": 1500, "max_tokens": 200}

    def answer(request: LLMRequest) -> Any:
        if not request.tools:  # the summary request
            return reply("The user listed many fruits.")
        return reply("", call("send_message", message="noted " + "!" * 40))

    llm = ScriptedLLM(*[answer] * 200)

    async def body(agents: Agents) -> None:
        spec = {"llm_config": config, "memory_blocks": BLOCKS}
        agent_id = (await agents.create(spec))["id"]
        for i in range(40):
            text = f"fruit number {i} is " + ("banana" if i == 2 else "apple") + " " * 80
            answer_ = await agents.send(agent_id, [{"role": "user", "content": text}])
            assert answer_["stop_reason"]["stop_reason"] == "end_turn"
        summaries = [r for r in llm.requests if not r.tools]
        assert summaries, "the window never needed a summary"
        last = [r for r in llm.requests if r.tools][-1]
        size = len(last.system) + sum(len(m.content) for m in last.messages)
        assert size // 4 < 1500
        assert "The user listed many fruits." in last.messages[0].content
        history = await agents.messages(agent_id, limit=1000)
        users = [m for m in history if m["message_type"] == "user_message"]
        assert len(users) == 40  # nothing lost from recall

    run(llm, body)


def test_a_call_id_reused_in_a_later_step_gets_its_own_result() -> None:
    from kelpie.agent import ToolCall

    def edit(content: str) -> ToolCall:  # servers that number calls afresh in every reply
        args = {"label": "human", "content": content, "request_heartbeat": True}
        return ToolCall("call_0", "core_memory_append", json.dumps(args))

    llm = ScriptedLLM(
        reply("", edit("likes tea")),
        reply("", edit("likes cats")),
        reply("", call("send_message", message="ok")),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        await agents.send(agent_id, [{"role": "user", "content": "hi"}])
        human = (await agents.get(agent_id))["blocks"][0]["value"]
        assert human == "Unknown so far.\nlikes tea\nlikes cats"
        last = llm.requests[-1].messages
        calls = [c.id for m in last for c in m.tool_calls]
        results = [m.tool_call_id for m in last if m.role == "tool"]
        assert len(set(calls)) == 2 and results == calls

    run(llm, body)


def test_odd_arguments_are_tool_errors_never_a_failed_turn() -> None:
    from kelpie.agent import ToolCall

    llm = ScriptedLLM(
        reply("", ToolCall("c1", "conversation_search", '{"query": "x", "limit": Infinity}')),
        reply("", ToolCall("c2", "conversation_search", "[" * 100_000 + "]" * 100_000)),
        reply("", call("send_message", message="sorry")),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents)
        answer = await agents.send(agent_id, [{"role": "user", "content": "x"}])
        assert answer["stop_reason"]["stop_reason"] == "end_turn"
        errors = [m for m in answer["messages"] if m.get("status") == "error"]
        assert len(errors) == 2 and "limit must be an integer" in errors[0]["tool_return"]

    run(llm, body)


class UnknownOnce:
    """A store whose first commit that writes a block applies, then says its outcome is unknown."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.armed = False
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def transaction(self) -> Any:
        return _UnknownOnceTransaction(self, self.inner.transaction())


class _UnknownOnceTransaction:
    def __init__(self, store: UnknownOnce, inner: Any) -> None:
        self.store = store
        self.inner = inner
        self.writes_block = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def __aenter__(self) -> _UnknownOnceTransaction:
        await self.inner.__aenter__()
        return self

    async def __aexit__(self, *exc_info: Any) -> Any:
        return await self.inner.__aexit__(*exc_info)

    def set(self, key: bytes, value: bytes) -> None:
        self.writes_block |= key.startswith(pack(("block",)))
        self.inner.set(key, value)

    async def commit(self) -> None:
        await self.inner.commit()
        if self.writes_block and self.store.armed and not self.store.fired:
            self.store.fired = True
            raise CommitUnknownResult("the commit may have applied")


def test_a_block_edit_with_an_unknown_outcome_is_settled_not_reported_as_failed() -> None:
    llm = ScriptedLLM(
        reply(
            "",
            call("core_memory_append", label="human", content="Likes tea.", request_heartbeat=True),
        ),
        reply("", call("send_message", message="noted")),
    )

    async def main() -> None:
        services = AgentServices(llm=lambda config: llm, embedder=embedder())
        async with open_agents(MemoryStore(), make_env(1), services) as agents:
            flaky = UnknownOnce(MemoryStore())
            services.blocks._store = flaky  # type: ignore[union-attr]
            assert services.blocks is not None
            await services.blocks.create(Block.new("b-tea", label="human", value="Unknown so far."))
            await services.blocks.attach("agent-tea", ["b-tea"])
            agent_id = (
                await agents.create(
                    {"llm_config": LLM_CONFIG, "block_ids": ["b-tea"]}, agent_id="agent-tea"
                )
            )["id"]
            flaky.armed = True  # from here on: the model's edit
            answer = await agents.send(agent_id, [{"role": "user", "content": "I like tea"}])
            assert flaky.fired  # the edit's commit did report an unknown outcome
            result = next(
                m for m in answer["messages"] if m["message_type"] == "tool_return_message"
            )
            assert result["status"] == "success"
            human = (await agents.get(agent_id))["blocks"][0]["value"]
            assert human == "Unknown so far.\nLikes tea."

    trio.run(main)


def test_the_answer_to_an_approval_holds_only_what_followed_it() -> None:
    llm = ScriptedLLM(reply("", call("deploy")), reply("Deployed."))

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents, "letta_v1_agent")
        first = await agents.send(
            agent_id, [{"role": "user", "content": "ship it"}], client_tools=[{"name": "deploy"}]
        )
        call_id = first["messages"][-1]["tool_call"]["tool_call_id"]
        answer = await agents.answer(
            agent_id, [{"type": "tool", "tool_call_id": call_id, "tool_return": "done"}]
        )
        assert types(answer) == ["tool_return_message", "assistant_message"]

    run(llm, body)


def test_long_messages_are_kept_whole_and_too_long_ones_refused_or_cut() -> None:
    long_text = "é" * 150_000  # 300 kB of JSON: stored over several rows
    llm = ScriptedLLM(
        lambda request: reply(request.messages[-1].content[:10] + "z" * 2_000_000),
    )

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents, "letta_v1_agent")
        with pytest.raises(InvalidAgentRequest, match="over the limit"):
            await agents.send(agent_id, [{"role": "user", "content": "x" * 2_000_000}])
        answer = await agents.send(agent_id, [{"role": "user", "content": long_text}])
        history = await agents.messages(agent_id)
        assert history[0]["content"] == long_text
        reply_text = answer["messages"][-1]["content"]
        assert reply_text.startswith("é" * 10 + "zzz") and "characters over the message limit" in (
            reply_text
        )
        assert len(reply_text) < 1_100_000

    run(llm, body)


def test_recall_is_searchable_by_text_role_and_date() -> None:
    llm = ScriptedLLM(*[reply("Noted.")] * 3)

    async def body(agents: Agents) -> None:
        agent_id = await new_agent(agents, "letta_v1_agent")
        clock = agents.runtime._env.clock
        assert isinstance(clock, ManualClock)
        for text in ("The lighthouse is red.", "Pears are ripe.", "The lighthouse moved."):
            clock.now_ms += 86_400_000
            await agents.send(agent_id, [{"role": "user", "content": text}])
        found = await agents.search_messages(agent_id, "LIGHTHOUSE", roles=["user"])
        assert found["total"] == 2
        assert [m["content"] for m in found["messages"]] == [
            "The lighthouse moved.",
            "The lighthouse is red.",
        ]
        dated = await agents.search_messages(
            agent_id, "lighthouse", start_date="2026-01-03", end_date="2026-01-03T23:59:59"
        )
        assert dated["total"] == 0
        dated = await agents.search_messages(agent_id, "", start_date="2026-01-04")
        assert [m["content"] for m in dated["messages"]] == ["Noted.", "The lighthouse moved."]
        with pytest.raises(InvalidAgentRequest, match="ISO 8601"):
            await agents.search_messages(agent_id, "x", start_date="yesterday")

    run(llm, body)
