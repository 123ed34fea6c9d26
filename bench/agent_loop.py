"""The agent loop without the model: step overhead, archival search, prompt build.

Prints figures; asserts nothing about speed (the machines are shared).

- Step overhead: CPU time per step (process time, so waiting on fsync does not
  count) of whole turns through `Agents.send`, with a model that answers at
  once (the target is under 2 ms of CPU per step): a memgpt turn of two steps
  (a core-memory edit with a heartbeat, then send_message), on the memory store
  and on SQLite (fsync on). Each step checkpoints (commits) its messages.
- Archival search at 100,000 passages of 384 dimensions (MiniLM's size): p50
  and p99 of `ArchivalIndex.search`, the exact search every archival query
  runs, unfiltered and with a tag filter (target: p50 under 5 ms).
- Prompt build with 32 KiB of core memory and a long history: the system
  prompt and request (`system_prompt` + `build_request`) for a window of 500
  and of 2,000 messages.

Usage: python bench/agent_loop.py [--turns N]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import trio
from _report import Report, ms, p50_p99, per_s

from kelpie.agent import LLMClient, LLMConfig, LLMRequest, LLMResponse, ToolCall
from kelpie.agent._agent import AgentServices
from kelpie.agent._archival import ArchivalIndex, Passage
from kelpie.agent._blocks import CORE_MEMORY_MAX_CHARS, Block
from kelpie.agent._embedding import FakeEmbedder
from kelpie.agent._llm import TextSink
from kelpie.agent._prompt import build_request, system_prompt
from kelpie.agent._recall import Message
from kelpie.agent._service import open_agents
from kelpie.agent._tools import base_tools, builtin_spec
from kelpie.env import Env
from kelpie.storage import MemoryStore, SqliteStore, Store

ENV = Env.production(seed=11)
CONFIG = {
    "model": "instant",
    "model_endpoint_type": "openai",
    "model_endpoint": "http://instant.invalid/v1",
    "context_window": 1_000_000,
}


class InstantLLM(LLMClient):
    """A memgpt model that answers at once: an edit with a heartbeat, then send_message."""

    endpoint_type = "openai"

    def __init__(self) -> None:
        self.calls = 0

    async def complete(
        self, request: LLMRequest, *, stream: bool = False, on_text: TextSink | None = None
    ) -> LLMResponse:
        self.calls += 1
        if request.messages[-1].role == "user":
            args = {"label": "human", "content": "x", "request_heartbeat": True}
            call = ToolCall(f"c{self.calls}", "core_memory_append", json.dumps(args))
        else:
            call = ToolCall(f"c{self.calls}", "send_message", '{"message": "ok"}')
        return LLMResponse("", (call,), "tool_calls")


async def step_cpu(store: Store, turns: int) -> tuple[float, float]:
    llm = InstantLLM()
    services = AgentServices(llm=lambda config: llm, embedder=FakeEmbedder())
    async with open_agents(store, ENV, services) as agents:
        spec = {
            "llm_config": CONFIG,
            "memory_blocks": [{"label": "human", "value": "", "limit": CORE_MEMORY_MAX_CHARS}],
        }
        agent_id = (await agents.create(spec))["id"]
        await agents.send(agent_id, [{"role": "user", "content": "warm up"}])
        steps_before = llm.calls
        cpu, wall = time.process_time(), time.perf_counter()
        for i in range(turns):
            await agents.send(agent_id, [{"role": "user", "content": f"message {i}"}])
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        steps = llm.calls - steps_before
    return cpu / steps, steps / wall


async def step_cpu_sqlite(path: Path, turns: int) -> tuple[float, float]:
    store = await SqliteStore.open(path)
    try:
        return await step_cpu(store, turns)
    finally:
        await store.aclose()


def archival(passages: int, queries: int) -> tuple[list[float], list[float]]:
    rng = np.random.default_rng(5)
    index = ArchivalIndex("bench", 384)
    vectors = rng.standard_normal((passages, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for i in range(passages):
        tags = ("even",) if i % 2 == 0 else ("odd",)
        index.add(Passage(f"p{i}", i, "text", tags, i, "bench"), vectors[i])
    asks = rng.standard_normal((queries, 384)).astype(np.float32)
    asks /= np.linalg.norm(asks, axis=1, keepdims=True)
    index.search(asks[0], top_k=5)  # builds the matrix once
    plain, tagged = [], []
    for query in asks:
        t = time.perf_counter()
        index.search(query, top_k=5)
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        index.search(query, top_k=5, tags=["odd"])
        tagged.append(time.perf_counter() - t)
    return plain, tagged


def prompt_build(window_len: int, repeats: int) -> list[float]:
    per_block = CORE_MEMORY_MAX_CHARS // 4
    blocks = [
        Block.new(f"b{i}", label=f"block{i}", value="m" * per_block, limit=per_block)
        for i in range(4)
    ]
    config = LLMConfig(**CONFIG)
    tools = [builtin_spec(name, "memgpt_agent") for name in base_tools("memgpt_agent")]
    times = []
    for _ in range(repeats):
        # Fresh messages each time: nothing cached (an agent caches each message's prompt
        # form, so its later steps are cheaper than this).
        window = [
            Message(
                f"m{i}", i, "user" if i % 2 == 0 else "assistant", "word " * 40, created_at_ms=i
            )
            for i in range(window_len)
        ]
        t = time.perf_counter()
        system = system_prompt("You are a bench.", blocks, now_ms=0, in_recall=0, passages=0)
        build_request(config, system, tools, "", window)
        times.append(time.perf_counter() - t)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--turns", type=int, default=300)
    args = parser.parse_args()

    report = Report(
        "Agent step overhead (no model time)", ["store", "CPU per step", "steps/s (wall)"]
    )
    cpu, rate = trio.run(step_cpu, MemoryStore(), args.turns)
    report.add(
        "agent.step.memory", ["memory", ms(cpu), per_s(rate)], cpu_ms=cpu * 1000, steps_s=rate
    )
    with tempfile.TemporaryDirectory(prefix="kelpie-bench-") as tmp:
        cpu, rate = trio.run(step_cpu_sqlite, Path(tmp) / "bench.db", args.turns)
    report.add(
        "agent.step.sqlite", ["sqlite", ms(cpu), per_s(rate)], cpu_ms=cpu * 1000, steps_s=rate
    )
    report.print()

    report = Report("Archival search, 100,000 passages x 384 dims", ["query", "p50", "p99"])
    plain, tagged = archival(100_000, 200)
    for name, times in (("unfiltered", plain), ("tag filter (half)", tagged)):
        p50, p99 = p50_p99(times)
        report.add(
            f"agent.archival.{name.split()[0]}",
            [name, ms(p50), ms(p99)],
            p50_ms=p50 * 1000,
            p99_ms=p99 * 1000,
        )
    report.print()

    report = Report("Prompt build, 32 KiB core memory", ["window", "p50", "p99"])
    for window in (500, 2_000):
        p50, p99 = p50_p99(prompt_build(window, 100))
        report.add(
            f"agent.prompt.{window}",
            [f"{window} messages", ms(p50), ms(p99)],
            p50_ms=p50 * 1000,
            p99_ms=p99 * 1000,
        )
    report.print()


if __name__ == "__main__":
    main()
