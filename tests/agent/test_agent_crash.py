"""A crash in the middle of a turn: the acknowledged message is kept once; the turn resumes."""

from __future__ import annotations

import trio
import trio.testing
from _scripted import LLM_CONFIG, ScriptedLLM, call, embedder, make_env, reply

from kelpie.agent import LLMRequest, LLMResponse
from kelpie.agent._agent import AgentServices
from kelpie.agent._llm import TextSink
from kelpie.agent._service import open_agents
from kelpie.runtime import RuntimeConfig
from kelpie.storage import MemoryStore

FAST = RuntimeConfig(lease_duration_ms=1_000, lease_renew_ms=200)
TEA = [{"role": "user", "content": "I like tea."}]


class HangsOnSecondCall(ScriptedLLM):
    def __init__(self) -> None:
        super().__init__(
            reply(
                "",
                call(
                    "core_memory_append",
                    label="human",
                    content="Likes tea.",
                    request_heartbeat=True,
                ),
            )
        )
        self.hanging = trio.Event()

    async def complete(
        self, request: LLMRequest, *, stream: bool = False, on_text: TextSink | None = None
    ) -> LLMResponse:
        if self.responses:
            return await super().complete(request, stream=stream, on_text=on_text)
        self.hanging.set()
        await trio.sleep_forever()
        raise AssertionError("unreachable")


async def crash_mid_turn(store: MemoryStore) -> str:
    llm = HangsOnSecondCall()
    services = AgentServices(llm=lambda config: llm, embedder=embedder())
    with trio.CancelScope() as crash:
        async with open_agents(store, make_env(1), services, FAST) as agents:
            spec = {"llm_config": LLM_CONFIG, "memory_blocks": [{"label": "human", "value": ""}]}
            agent_id = str((await agents.create(spec, agent_id="agent-tea"))["id"])
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lambda: agents.send(agent_id, TEA, request_id="r1"))
                await llm.hanging.wait()
                crash.cancel()  # the node dies while the model thinks about step 2
    await trio.sleep(2)  # its lease lapses (the next node cannot reach it: no network here)
    return agent_id


def test_the_same_request_again_resumes_the_turn_and_stores_nothing_twice() -> None:
    async def main() -> None:
        store = MemoryStore()
        agent_id = await crash_mid_turn(store)
        llm = ScriptedLLM(reply("", call("send_message", message="Tea it is.")))
        services = AgentServices(llm=lambda config: llm, embedder=embedder())
        async with open_agents(store, make_env(2), services, FAST) as agents:
            answer = await agents.send(agent_id, TEA, request_id="r1")
            assert answer["stop_reason"]["stop_reason"] == "end_turn"
            kinds = [m["message_type"] for m in answer["messages"]]
            assert kinds == [
                "user_message",
                "tool_call_message",
                "tool_return_message",
                "assistant_message",
            ]
            # The resumed step saw the steps made before the crash.
            assert [m.role for m in llm.requests[0].messages] == ["user", "assistant", "tool"]
            agent = await agents.get(agent_id)
            assert agent["blocks"][0]["value"] == "Likes tea."
            history = await agents.messages(agent_id)
            assert [m["content"] for m in history if m["message_type"] == "user_message"] == [
                "I like tea."
            ]
            again = await agents.send(agent_id, TEA, request_id="r1")  # a late duplicate
            assert again == answer

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


def test_a_different_request_first_closes_the_interrupted_turn() -> None:
    async def main() -> None:
        store = MemoryStore()
        agent_id = await crash_mid_turn(store)
        llm = ScriptedLLM(reply("", call("send_message", message="Hello again.")))
        services = AgentServices(llm=lambda config: llm, embedder=embedder())
        async with open_agents(store, make_env(3), services, FAST) as agents:
            answer = await agents.send(agent_id, [{"role": "user", "content": "hi"}])
            assert answer["stop_reason"]["stop_reason"] == "end_turn"
            assert [m["message_type"] for m in answer["messages"]] == [
                "user_message",
                "assistant_message",
            ]
            roles = [m.role for m in llm.requests[0].messages]
            assert roles == ["user", "assistant", "tool", "user"]
            history = await agents.messages(agent_id)
            users = [m["content"] for m in history if m["message_type"] == "user_message"]
            assert users == ["I like tea.", "hi"]

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
