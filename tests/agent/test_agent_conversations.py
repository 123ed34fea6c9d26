"""Every agent type holds a conversation through the real SDKs against fake servers over HTTP.

The fake OpenAI and Anthropic servers (tests/agent/_fake_llm_servers.py) are real
HTTP servers on 127.0.0.1; the agents reach them through Kelpie's providers and
the official `openai` and `anthropic` SDKs, streaming and not. Each conversation
has three turns: a core-memory edit, an archival insert, an archival search whose
result the model gets back.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from _fake_llm_servers import FakeLLMServer, Reply
from _scripted import embedder

from kelpie.agent._agent import AgentServices
from kelpie.agent._retry import LLMRetryPolicy
from kelpie.agent._service import llm_clients, open_agents
from kelpie.env import Env
from kelpie.storage import MemoryStore

ENV = Env.production(seed=5)


def tool(call_id: str, name: str, heartbeat: bool, **args: Any) -> tuple[str, str, str]:
    if heartbeat:
        args["request_heartbeat"] = True
    return (call_id, name, json.dumps(args))


def script(agent_type: str) -> list[Reply]:
    """Three turns: remember a name, store a fact, find the fact."""
    memgpt = agent_type == "memgpt_agent"
    edit = (
        tool("c1", "memory_insert", False, label="human", new_str="Name: Ada.")
        if agent_type == "letta_v1_agent"
        else tool("c1", "core_memory_append", memgpt, label="human", content="Name: Ada.")
    )
    steps = [
        edit,
        tool("c3", "archival_memory_insert", memgpt, content="Ada's cat is called Tesla."),
        tool("c5", "archival_memory_search", memgpt, query="what is the cat called"),
    ]
    replies = ["Nice to meet you, Ada.", "I will remember that.", "Your cat is Tesla."]
    out = []
    for i, (step, text) in enumerate(zip(steps, replies, strict=True)):
        out.append(Reply(pieces=("Let me note that.",) if not memgpt else (), tool_calls=(step,)))
        if memgpt:
            say = json.dumps({"message": text})
            out.append(Reply(tool_calls=((f"s{i}", "send_message", say),)))
        else:
            words = text.split(" ")
            out.append(Reply(pieces=(*tuple(w + " " for w in words[:-1]), words[-1])))
    return out


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("protocol", ["openai", "anthropic"])
@pytest.mark.parametrize("agent_type", ["memgpt_agent", "letta_v1_agent", "react_agent"])
def test_a_three_turn_conversation(agent_type: str, protocol: str, stream: bool) -> None:
    with FakeLLMServer(protocol) as server:  # type: ignore[arg-type]
        server.script(*script(agent_type))

        async def main() -> None:
            policy = LLMRetryPolicy(attempts_max=1, attempt_timeout_ms=20_000)
            services = AgentServices(
                llm=llm_clients(ENV, {protocol: "test-key"}, policy=policy), embedder=embedder()
            )
            async with open_agents(MemoryStore(), ENV, services) as agents:
                spec = {
                    "agent_type": agent_type,
                    "llm_config": {
                        "model": "fake-model-1",
                        "model_endpoint_type": protocol,
                        "model_endpoint": server.base_url,
                    },
                    "memory_blocks": [{"label": "human", "value": "", "limit": 500}],
                }
                agent_id = (await agents.create(spec))["id"]
                streamed: list[str] = []

                async def on_event(event: dict[str, Any]) -> None:
                    streamed.append(event["content"])

                answers = []
                for text in ("I am Ada.", "My cat is Tesla.", "What is my cat called?"):
                    answer = await agents.send(
                        agent_id,
                        [{"role": "user", "content": text}],
                        stream=stream,
                        on_event=on_event,
                    )
                    assert answer["stop_reason"]["stop_reason"] == "end_turn", answer
                    answers.append(answer)
                replies = [
                    [
                        m["content"]
                        for m in a["messages"]
                        if m["message_type"] == "assistant_message"
                    ]
                    for a in answers
                ]
                assert replies[-1][-1] == "Your cat is Tesla."
                if stream and agent_type != "memgpt_agent":
                    assert "".join(streamed).endswith("Your cat is Tesla.")
                elif not stream:
                    assert streamed == []
                agent = await agents.get(agent_id)
                assert agent["blocks"][0]["value"] == "Name: Ada."
                passages = await agents.archival_list(agent_id)
                assert [p["text"] for p in passages] == ["Ada's cat is called Tesla."]

        trio.run(main)
        assert server.unused == 0
        bodies = [r.body for r in server.requests]
        assert all(b.get("stream", False) is stream for b in bodies)
        # The last request carries the whole history: every call with its result, the
        # archival search's result included, and the edited block in the system prompt.
        last = json.dumps(bodies[-1])
        calls = (
            ["c1", "s0", "c3", "s1", "c5"] if agent_type == "memgpt_agent" else ["c1", "c3", "c5"]
        )
        assert "Ada's cat is called Tesla." in last and "Name: Ada." in last
        if protocol == "openai":
            tool_messages = [m for m in bodies[-1]["messages"] if m["role"] == "tool"]
            assert [m["tool_call_id"] for m in tool_messages] == calls
        else:
            results = [
                block["tool_use_id"]
                for m in bodies[-1]["messages"]
                if isinstance(m["content"], list)
                for block in m["content"]
                if block.get("type") == "tool_result"
            ]
            assert results == calls
