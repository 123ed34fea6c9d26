"""One node's actor runtime: invocations per second, and cold activation latency.

Prints figures; asserts nothing about speed (the machines are shared). Every
call goes through `runtime.invoke`, the public path.

- no-op invocations (the actor's state does not change, so nothing is
  committed), sequentially on one actor and from 64 concurrent callers spread
  over 1,000 actors, on the memory store and on SQLite (the target is at least
  20,000/s on the memory store);
- the same with an increment that commits its state each time, on the memory
  store and on SQLite (fsync on);
- cold activation: the first invocation of actors whose state is in SQLite,
  p50 and p99, on a node that has just joined (it takes each actor over from
  the node that created it: a committed ownership change) and, on that node
  again, after each was deactivated (it still owns them).

Usage: python bench/actors_runtime.py [--seconds S]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import trio
from _bench_actors import Counter
from _report import Report, ms, p50_p99, per_s

from kelpie.env import Env
from kelpie.runtime import ActorId, RuntimeConfig, open_runtime
from kelpie.storage import MemoryStore, SqliteStore, Store

ENV = Env.production(seed=7)


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


async def cold(path: Path, count: int) -> tuple[list[float], list[float]]:
    """First-call latencies of `count` actors stored in SQLite: taken over, then owned."""
    store = await SqliteStore.open(path)
    ids = [ActorId("cold", f"a{i}") for i in range(count)]
    try:
        async with open_runtime(store, ENV, Counter) as runtime:
            for actor in ids:
                await runtime.invoke(actor, "increment")
        # A new node: it takes each actor over. active_max=1: each call deactivates the
        # actor before it, so the second pass activates every actor again, still owned.
        passes: tuple[list[float], list[float]] = ([], [])
        async with open_runtime(store, ENV, Counter, RuntimeConfig(active_max=1)) as runtime:
            for latencies in passes:
                for actor in ids:
                    began = time.perf_counter()
                    await runtime.invoke(actor, "get")
                    latencies.append(time.perf_counter() - began)
            if runtime.activations != 2 * count:
                raise AssertionError(f"{runtime.activations} activations, not {2 * count}")
        return passes
    finally:
        await store.aclose()


RATES = [
    # (what, store, message, callers, actors)
    ("no-op, 1 caller, 1 actor", "memory", "get", 1, 1),
    ("no-op, 64 callers, 1,000 actors", "memory", "get", 64, 1000),
    ("increment (commits), 1 caller, 1 actor", "memory", "increment", 1, 1),
    ("increment (commits), 64 callers, 1,000 actors", "memory", "increment", 64, 1000),
    ("no-op, 1 caller, 1 actor", "sqlite", "get", 1, 1),
    ("no-op, 64 callers, 1,000 actors", "sqlite", "get", 64, 1000),
    ("increment (commits), 1 caller, 1 actor", "sqlite", "increment", 1, 1),
    ("increment (commits), 16 callers, 100 actors", "sqlite", "increment", 16, 100),
]
COLD_ACTORS = 500


async def main(seconds: float) -> None:
    rates = Report(
        f"actor runtime, one node: runtime.invoke calls per second ({seconds:g} s per figure)",
        ["what", "store", "calls/s"],
    )
    with tempfile.TemporaryDirectory(prefix="kelpie-bench-") as tmp:
        sqlite = await SqliteStore.open(Path(tmp) / "rate.db")
        try:
            for what, store_name, message, callers, actors in RATES:
                store = MemoryStore() if store_name == "memory" else sqlite
                rate_s = await rate(store, message, callers, actors, seconds)
                kind = "noop" if message == "get" else "increment"
                rates.add(
                    f"actors.runtime.{kind}.{store_name}.callers_{callers}.actors_{actors}",
                    [what, store_name, per_s(rate_s)],
                    per_s=rate_s,
                )
        finally:
            await sqlite.aclose()
        taken, owned = await cold(Path(tmp) / "cold.db", COLD_ACTORS)
    rates.print()
    activations = Report(
        f"cold activation from SQLite: the first call to each of {COLD_ACTORS} stored actors",
        ["on a node that", "p50 ms", "p99 ms"],
    )
    for key, what, latencies in (
        ("takeover", "takes the actor over (ownership commit)", taken),
        ("owned", "already owns it (it was deactivated)", owned),
    ):
        p50, p99 = p50_p99(latencies)
        activations.add(
            f"actors.runtime.cold.{key}",
            [what, ms(p50), ms(p99)],
            p50_ms=p50 * 1e3,
            p99_ms=p99 * 1e3,
        )
    activations.print()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=2.0, help="time per calls/s figure")
    trio.run(main, parser.parse_args().seconds)
