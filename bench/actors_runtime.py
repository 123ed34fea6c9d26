"""One node's actor runtime: invocations per second, and cold activation latency.

Prints figures; asserts nothing about speed (the machines are shared).

- no-op invocations (the actor's state does not change, so nothing is
  committed) through `runtime.invoke`, sequentially on one actor and from 64
  concurrent callers spread over 1,000 actors, on the memory store;
- the same with an increment that commits its state each time, on the memory
  store and on SQLite (fsync on);
- cold activation: the first invocation of actors whose state is in SQLite,
  p50 and p99.

Usage: python bench/actors_runtime.py [--seconds S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

from kelpie.env import Env
from kelpie.runtime import Actor, ActorContext, ActorId, RuntimeConfig, open_runtime
from kelpie.storage import MemoryStore, SqliteStore, Store

ENV = Env.production(seed=7)


class Counter(Actor):
    def __init__(self, actor_id: ActorId) -> None:
        self.value = 0

    def dump_state(self) -> bytes | None:
        return json.dumps(self.value).encode()

    def load_state(self, data: bytes | None) -> None:
        self.value = 0 if data is None else json.loads(data)

    async def handle(self, ctx: ActorContext, message: Any) -> Any:
        if message == "increment":
            self.value += 1
        return self.value


async def rate(store: Store, message: str, callers: int, actors: int, seconds: float) -> float:
    ids = [ActorId("bench", f"a{i}") for i in range(actors)]
    done = 0
    config = RuntimeConfig(active_max=max(actors, 1))
    async with open_runtime(store, ENV, Counter, config) as runtime:
        for actor in ids:  # warm: every actor active
            await runtime.invoke(actor, "get")
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()

        async def caller(n: int) -> None:
            nonlocal done
            i = n
            while time.perf_counter() < deadline:
                await runtime.invoke(ids[i % actors], message)
                i += callers
                done += 1

        async with trio.open_nursery() as nursery:
            for n in range(callers):
                nursery.start_soon(caller, n)
        elapsed = time.perf_counter() - started
    return done / elapsed


async def cold(path: Path, count: int) -> list[float]:
    store = await SqliteStore.open(path)
    ids = [ActorId("cold", f"a{i}") for i in range(count)]
    try:
        async with open_runtime(store, ENV, Counter) as runtime:
            for actor in ids:
                await runtime.invoke(actor, "increment")
        latencies = []
        async with open_runtime(store, ENV, Counter) as runtime:
            for actor in ids:
                began = time.perf_counter()
                await runtime.invoke(actor, "get")
                latencies.append(time.perf_counter() - began)
        return latencies
    finally:
        await store.aclose()


async def main(seconds: float) -> None:
    print(f"actor runtime, one node ({seconds:g} s per figure)")
    print(f"{'what':<46} {'store':<7} {'per s':>9}")
    figures = [
        ("no-op, 1 caller, 1 actor", "memory", "get", 1, 1),
        ("no-op, 64 callers, 1,000 actors", "memory", "get", 64, 1000),
        ("increment (commits), 1 caller, 1 actor", "memory", "increment", 1, 1),
        ("increment (commits), 64 callers, 1,000 actors", "memory", "increment", 64, 1000),
    ]
    for what, store_name, message, callers, actors in figures:
        per_s = await rate(MemoryStore(), message, callers, actors, seconds)
        print(f"{what:<46} {store_name:<7} {per_s:>9,.0f}")
    with tempfile.TemporaryDirectory(prefix="kelpie-bench-") as tmp:
        store = await SqliteStore.open(Path(tmp) / "rate.db")
        try:
            for what, callers, actors in (
                ("increment (commits), 1 caller, 1 actor", 1, 1),
                ("increment (commits), 16 callers, 100 actors", 16, 100),
            ):
                per_s = await rate(store, "increment", callers, actors, seconds)
                print(f"{what:<46} {'sqlite':<7} {per_s:>9,.0f}")
        finally:
            await store.aclose()
        latencies = await cold(Path(tmp) / "cold.db", 500)
    cuts = statistics.quantiles(latencies, n=100, method="inclusive")
    print(
        f"cold activation from sqlite (500 actors): p50 {cuts[49] * 1000:.2f} ms, "
        f"p99 {cuts[98] * 1000:.2f} ms"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0)
    trio.run(main, parser.parse_args().seconds)
