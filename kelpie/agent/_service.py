"""`open_agents` runs a node of agents; `Agents` is the typed way to talk to them.

    async with open_agents(store, env, services) as agents:
        agent = await agents.create({"llm_config": {...}, "memory_blocks": [...]})
        reply = await agents.send(agent["id"], [{"role": "user", "content": "hi"}])

Every agent is an actor on the runtime this opens (one node of the cluster
sharing `store`); blocks are records of the store (kelpie/agent/_blocks.py).

`send` delivers a request with an idempotency key (its `request_id`): if the
outcome of a delivery is unknown (a crash, a commit whose result is unknown, a
timeout), it delivers the same request again, and the agent resumes the
interrupted turn instead of storing anything twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

from kelpie.agent._agent import AGENT_KIND, AgentActor, AgentServices, agent_actor_id
from kelpie.agent._blocks import Block, BlockStore
from kelpie.agent._delivery import RESEND, invoke_until_known
from kelpie.agent._errors import InvalidAgentRequest
from kelpie.agent._llm import LLMClient, LLMConfig
from kelpie.agent._providers import make_llm_client
from kelpie.agent._retry import LLMRetryPolicy
from kelpie.env import Env
from kelpie.runtime import (
    Actor,
    ActorId,
    ActorRuntime,
    InvalidActorId,
    RuntimeConfig,
    open_runtime,
)
from kelpie.storage import RetryPolicy, Store

#: An agent turn calls a model several times: it may take minutes.
AGENT_RUNTIME_CONFIG = RuntimeConfig(invocation_timeout_ms=15 * 60_000)


def llm_clients(
    env: Env, api_keys: Mapping[str, str], *, policy: LLMRetryPolicy | None = None
) -> Callable[[LLMConfig], LLMClient]:
    """`AgentServices.llm` for real providers: one retrying client per distinct settings.

    `api_keys` maps an endpoint type ("openai", "anthropic") to its key; a type
    with no key gets an empty one (servers such as a local vLLM need none).
    """
    clients: dict[tuple[str, str], LLMClient] = {}

    def client(config: LLMConfig) -> LLMClient:
        key = (config.model_endpoint_type, config.model_endpoint)
        made = clients.get(key)
        if made is None:
            api_key = api_keys.get(config.model_endpoint_type, "")
            made = clients[key] = make_llm_client(env, config, api_key=api_key, policy=policy)
        return made

    return client


def agent_factory(services: AgentServices) -> Callable[[ActorId], Actor]:
    def factory(actor_id: ActorId) -> Actor:
        if actor_id.namespace == AGENT_KIND:
            return AgentActor(actor_id, services)
        raise InvalidActorId(f"this node runs agents, not {actor_id.namespace!r}")

    return factory


@contextlib.asynccontextmanager
async def open_agents(
    store: Store,
    env: Env,
    services: AgentServices,
    config: RuntimeConfig = AGENT_RUNTIME_CONFIG,
) -> AsyncIterator[Agents]:
    """Runs a node of agents until the block ends (then drains it, like `open_runtime`)."""
    async with open_runtime(store, env, agent_factory(services), config) as runtime:
        services.blocks = BlockStore(store, env.rng.fork("blocks"))
        yield Agents(runtime, env, services)


class Agents:
    """Requests to agents and blocks, wherever in the cluster they are active."""

    def __init__(
        self,
        runtime: ActorRuntime,
        env: Env,
        services: AgentServices,
        *,
        resend: RetryPolicy = RESEND,
    ) -> None:
        self.runtime = runtime
        self._env = env
        self._services = services
        self._resend = resend

    async def _call(self, agent_id: str, message: Mapping[str, Any], key: str | None) -> Any:
        actor = agent_actor_id(agent_id)
        return await invoke_until_known(
            self.runtime, self._env, actor, dict(message), key, self._resend
        )

    # -- agents -------------------------------------------------------------------------

    async def create(self, spec: Mapping[str, Any], *, agent_id: str | None = None) -> Any:
        """Creates an agent (Letta's CreateAgent fields); returns its description."""
        agent_id = agent_id or self._env.rng.make_id("agent")
        key = f"create/{agent_id}"
        return await self._call(agent_id, {"op": "create", "agent": dict(spec)}, key)

    async def get(self, agent_id: str) -> Any:
        return await self._call(agent_id, {"op": "get"}, None)

    async def send(
        self,
        agent_id: str,
        messages: Sequence[Mapping[str, Any]],
        *,
        request_id: str | None = None,
        client_tools: Sequence[Mapping[str, Any]] | None = None,
        max_steps: int | None = None,
        stream: bool = False,
        on_event: Callable[[dict[str, Any]], Awaitable[None]] | None = None,
    ) -> Any:
        """Runs one turn; returns {messages, stop_reason, usage, run_id} (Letta's LettaResponse).

        `on_event` gets the model's text as it streams (`stream=True`), when the
        agent is active on this node.
        """
        request_id = request_id or self._env.rng.make_id("request")
        run_id = f"run-{request_id}"
        message: dict[str, Any] = {
            "op": "send",
            "request_id": request_id,
            "run_id": run_id,
            "messages": [dict(m) for m in messages],
            "stream": stream,
        }
        if client_tools is not None:
            message["client_tools"] = [dict(t) for t in client_tools]
        if max_steps is not None:
            message["max_steps"] = max_steps
        if on_event is not None:
            self._services.streams[run_id] = on_event
        try:
            return await self._call(agent_id, message, f"send/{request_id}")
        finally:
            self._services.streams.pop(run_id, None)

    async def answer(
        self,
        agent_id: str,
        approvals: Sequence[Mapping[str, Any]],
        *,
        request_id: str | None = None,
        stream: bool = False,
    ) -> Any:
        """The client's results for the tool calls a turn waits for; the turn goes on."""
        if not approvals:
            raise InvalidAgentRequest("approvals must not be empty")
        request_id = request_id or self._env.rng.make_id("request")
        message = {
            "op": "send",
            "request_id": request_id,
            "approvals": [dict(a) for a in approvals],
            "stream": stream,
        }
        return await self._call(agent_id, message, f"send/{request_id}")

    async def messages(self, agent_id: str, **page: Any) -> Any:
        """A page of the history (after, before, limit, order) as Letta messages."""
        return await self._call(agent_id, {"op": "messages", **page}, None)

    async def search_messages(self, agent_id: str, query: str = "", **filters: Any) -> Any:
        """Recall search: {total, messages} whose text holds every word of `query`, newest
        first (filters: roles, start_date, end_date as ISO 8601, limit)."""
        return await self._call(
            agent_id, {"op": "messages_search", "query": query, **filters}, None
        )

    # -- archival and working memory ----------------------------------------------------

    async def archival_insert(
        self, agent_id: str, text: str, *, tags: Sequence[str] = (), request_id: str | None = None
    ) -> Any:
        key = f"archival/{request_id or self._env.rng.make_id('request')}"
        return await self._call(
            agent_id, {"op": "archival_insert", "text": text, "tags": list(tags)}, key
        )

    async def archival_search(self, agent_id: str, query: str, **filters: Any) -> Any:
        return await self._call(
            agent_id, {"op": "archival_search", "query": query, **filters}, None
        )

    async def archival_list(self, agent_id: str, **page: Any) -> Any:
        return await self._call(agent_id, {"op": "archival_list", **page}, None)

    async def archival_delete(self, agent_id: str, passage_id: str) -> Any:
        return await self._call(
            agent_id, {"op": "archival_delete", "passage_id": passage_id}, f"delete/{passage_id}"
        )

    async def working_set(
        self, agent_id: str, key: str, value: Any, *, ttl_ms: int | None = None
    ) -> Any:
        message = {"op": "working_set", "key": key, "value": value, "ttl_ms": ttl_ms}
        return await self._call(agent_id, message, None)

    async def working_get(self, agent_id: str, key: str) -> Any:
        return await self._call(agent_id, {"op": "working_get", "key": key}, None)

    async def working_items(self, agent_id: str) -> Any:
        return await self._call(agent_id, {"op": "working_items"}, None)

    # -- blocks -------------------------------------------------------------------------

    async def create_block(self, fields: Mapping[str, Any], *, block_id: str | None = None) -> Any:
        """A standalone block (attach it to agents with `block_ids` when creating them)."""
        block = Block.new(block_id or self._env.rng.make_id("block"), **dict(fields))
        return (await self._services.need_blocks().create(block)).to_json()

    async def get_block(self, block_id: str) -> Any:
        block = await self._services.need_blocks().get(block_id)
        return None if block is None else block.to_json()

    async def update_block(self, block_id: str, fields: Mapping[str, Any]) -> Any:
        """A user's edit: the block's limit and every attached agent's total are enforced."""
        return (await self._services.need_blocks().update(block_id, fields)).to_json()
