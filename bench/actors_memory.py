"""Memory of one node whose store knows many actors while few are active (SQLite).

Prints figures; asserts nothing about speed or size (the machines are shared).

1. Create `--actors` actors (100,000 by default) in a SQLite file: each gets
   one committing "increment" (so the store holds its state and its activation
   record), from `--callers` concurrent callers. The runtime keeps at most
   about `--active` of them active (`active_max`), deactivating the least
   recently used, so the rest are only known to the store.
2. Hold `--active` actors (1,000; spread evenly over the created ones) active:
   each is activated again from the store by a no-op call, then called once
   more while active.
3. Read this process's memory: the current resident set (VmRSS), its peak
   (VmHWM, and getrusage's ru_maxrss), before creating, after creating, and
   while holding. The target is under 300 MB while holding.

Also prints the time the creation took, the SQLite file's size, and how fast
the held actors were activated again. Creating 100,000 actors takes about two
minutes on a 2-core machine (each new actor is two fsynced commits); pass a
smaller `--actors` for a quick look.

Usage: python bench/actors_memory.py [--actors N] [--active N] [--callers N] [--dir DIR]
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

import attrs
import trio
from _bench_actors import Counter
from _report import Report, mib, ms, p50_p99, per_s

from kelpie.env import Env
from kelpie.runtime import ActorId, ActorRuntime, RuntimeConfig, open_runtime
from kelpie.storage import SqliteStore

ENV = Env.production(seed=11)
TARGET_MB = 300


@attrs.frozen
class Memory:
    """This process's memory at one moment, in bytes."""

    rss: int
    peak: int
    maxrss: int

    @classmethod
    def now(cls) -> Memory:
        status: dict[str, int] = {}
        with open("/proc/self/status") as lines:
            for line in lines:
                name, _, rest = line.partition(":")
                if name in ("VmRSS", "VmHWM"):
                    status[name] = int(rest.split()[0]) * 1024  # reported in kB
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
        return cls(status["VmRSS"], status["VmHWM"], maxrss)


@attrs.define
class Creation:
    seconds: float = 0.0
    active_most: int = 0


def actor(i: int) -> ActorId:
    return ActorId("mem", f"a{i}")


async def create(runtime: ActorRuntime, count: int, callers: int) -> Creation:
    """Gives `count` new actors one committing call each, `callers` at a time."""
    result = Creation()
    pending = iter(range(count))
    step = max(count // 10, 1)
    started = time.perf_counter()

    async def caller() -> None:
        for i in pending:  # the callers share one iterator: each index goes to one of them
            reply = await runtime.invoke(actor(i), "increment")
            if reply != 1:
                raise AssertionError(f"{actor(i)} answered {reply}, not 1: not a new actor")
            result.active_most = max(result.active_most, runtime.active_count)
            if (i + 1) % step == 0:
                elapsed = time.perf_counter() - started
                print(
                    f"  created {i + 1:,} in {elapsed:.0f} s "
                    f"({runtime.active_count:,} active, rss {mib(Memory.now().rss)} MiB)",
                    flush=True,
                )

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    result.seconds = time.perf_counter() - started
    return result


async def hold(runtime: ActorRuntime, held: list[ActorId], callers: int) -> list[float]:
    """Activates each of `held` again (a no-op call); returns those calls' latencies."""
    latencies: list[float] = []
    pending = iter(held)

    async def caller() -> None:
        for actor_id in pending:
            began = time.perf_counter()
            reply = await runtime.invoke(actor_id, "get")
            latencies.append(time.perf_counter() - began)
            if reply != 1:
                raise AssertionError(f"{actor_id} answered {reply}, not its stored 1")

    async with trio.open_nursery() as nursery:
        for _ in range(callers):
            nursery.start_soon(caller)
    for actor_id in held:  # a second, warm call: they are all active now
        await runtime.invoke(actor_id, "get")
    return latencies


async def measure(path: Path, count: int, active: int, callers: int) -> None:
    config = RuntimeConfig(active_max=active, idle_timeout_ms=120_000)
    held = [actor(i * count // active) for i in range(active)]
    report = Report(
        f"{count:,} actors known to a SQLite store, {active:,} active, one node",
        ["figure", "value", "unit"],
    )
    store = await SqliteStore.open(path)
    try:
        async with open_runtime(store, ENV, Counter, config) as runtime:
            before = Memory.now()
            print(f"creating {count:,} actors with {callers} callers, active_max {active:,}")
            created = await create(runtime, count, callers)
            after_create = Memory.now()
            activations = runtime.activations
            began = time.perf_counter()
            latencies = await hold(runtime, held, callers)
            hold_s = time.perf_counter() - began
            await trio.sleep(0.2)  # let the evicted ones finish deactivating
            holding = Memory.now()
            held_active = sum(runtime.is_active(actor_id) for actor_id in held)
            active_now = runtime.active_count
            reactivated = runtime.activations - activations
        commits = store.commits
    finally:
        await store.aclose()
    file_bytes = sum(os.path.getsize(f) for f in (path, Path(f"{path}-wal")) if os.path.exists(f))
    p50, p99 = p50_p99(latencies)
    rows: list[tuple[str, str, str, str, int | float]] = [
        ("create.seconds", "time to create them", f"{created.seconds:.1f}", "s", created.seconds),
        (
            "create.per_s",
            "actors created per second",
            per_s(count / created.seconds),
            "/s",
            count / created.seconds,
        ),
        (
            "create.active_most",
            "most active at once while creating",
            f"{created.active_most:,}",
            "actors",
            created.active_most,
        ),
        ("store.commits", "commits to the store (all phases)", f"{commits:,}", "", commits),
        (
            "store.file_mb",
            "SQLite file size (with its WAL)",
            mib(file_bytes),
            "MiB",
            file_bytes / 2**20,
        ),
        (
            "hold.active",
            "held actors active (of those asked)",
            f"{held_active:,}/{active:,}",
            "actors",
            held_active,
        ),
        ("hold.active_total", "actors active on the node", f"{active_now:,}", "actors", active_now),
        ("hold.reactivations", "activations while holding", f"{reactivated:,}", "", reactivated),
        (
            "hold.activate_p50_ms",
            f"activating a held actor again, p50 ({callers} callers)",
            ms(p50),
            "ms",
            p50 * 1e3,
        ),
        (
            "hold.activate_p99_ms",
            f"activating a held actor again, p99 ({callers} callers)",
            ms(p99),
            "ms",
            p99 * 1e3,
        ),
        (
            "hold.seconds",
            "time to hold them (activate + 1 warm call each)",
            f"{hold_s:.2f}",
            "s",
            hold_s,
        ),
        ("rss.before_mb", "RSS before creating", mib(before.rss), "MiB", before.rss / 2**20),
        (
            "rss.created_mb",
            "RSS after creating",
            mib(after_create.rss),
            "MiB",
            after_create.rss / 2**20,
        ),
        (
            "rss.holding_mb",
            f"RSS holding {active:,} active",
            mib(holding.rss),
            "MiB",
            holding.rss / 2**20,
        ),
        ("rss.peak_mb", "peak RSS (VmHWM)", mib(holding.peak), "MiB", holding.peak / 2**20),
        (
            "rss.maxrss_mb",
            "peak RSS (getrusage ru_maxrss)",
            mib(holding.maxrss),
            "MiB",
            holding.maxrss / 2**20,
        ),
    ]
    for key, label, shown, unit, value in rows:
        report.add(f"actors.memory.{key}", [label, shown, unit], value=value)
    report.print()
    peak_mb = holding.peak / 1e6
    verdict = "under" if peak_mb < TARGET_MB else "OVER"
    print(
        f"peak RSS {mib(holding.peak)} MiB ({peak_mb:.0f} MB) is {verdict} the "
        f"{TARGET_MB} MB target"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="See the module docstring for what is measured."
    )
    parser.add_argument("--actors", type=int, default=100_000, help="actors to create")
    parser.add_argument("--active", type=int, default=1_000, help="actors to hold active")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers")
    parser.add_argument("--dir", default=None, help="where the SQLite file goes (default: /tmp)")
    args = parser.parse_args()
    if not 1 <= args.active <= args.actors or args.callers < 1 or args.active < 2:
        parser.error("need 2 <= --active <= --actors and --callers >= 1")
    with tempfile.TemporaryDirectory(dir=args.dir, prefix="kelpie-bench-") as tmp:
        trio.run(measure, Path(tmp) / "actors.db", args.actors, args.active, args.callers)


if __name__ == "__main__":
    main()
