"""What forwarding between nodes costs: two `kelpie node` processes, called through `NodeClient`.

Prints figures; asserts nothing about speed (the machines are shared).

Starts two nodes (`kelpie node --store sqlite:FILE --actor _bench_actors:Counter
--lease-ms 2000`, with bench/ on PYTHONPATH) sharing one SQLite file, and calls
actors from this process through a `NodeClient` over a `TcpNetwork`. Each
actor is first placed by a "where" call, through each node in turn (the
default least-loaded placement puts it on either node), whose reply names the
node it runs on. Then every call is sent either

- direct: to the node that hosts the actor, which delivers it to the actor's
  mailbox; or
- forwarded: to the other node, which looks the owner up in the store and
  forwards the call over TCP to the host, then relays the reply.

Measured for a no-op ("get": the state does not change, nothing is
committed; this is the forwarding overhead) and for a committing "increment",
as latency p50/p99 with one caller, and as throughput with `--callers`
concurrent callers spread over `--actors` actors. Direct and forwarded runs
alternate in `--rounds` slices each, so a busy neighbour slows them alike.
All three processes share this machine's cores, and the client's own time is
included in every figure. At the end, each actor must still be on its node and
hold exactly the increments that were acknowledged; then each node's resident
memory (VmRSS, and its peak VmHWM, from /proc) is printed.

The node processes are stopped at the end, always: SIGTERM (they drain), then
SIGKILL if they have not exited within 10 s.

Usage: python bench/actors_cluster.py [--seconds S] [--rounds R] [--callers N] [--actors N]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio
from _report import Report, ms, p50_p99, per_s

from kelpie.env import TcpNetwork
from kelpie.runtime import ActorId, NodeClient

BENCH_DIR = Path(__file__).resolve().parent
NAMES = ("bench-a", "bench-b")
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0


def memory_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of process `pid` in MiB, from /proc (Linux); NaN where unreadable."""
    found = {"VmRSS": math.nan, "VmHWM": math.nan}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as lines:
        for line in lines:
            name, _, rest = line.partition(":")
            if name in found:
                found[name] = int(rest.split()[0]) / 1024  # reported in kB
    return found["VmRSS"], found["VmHWM"]


@attrs.frozen
class Node:
    name: str
    address: str
    epoch: int
    process: trio.Process


@attrs.define
class Sample:
    """Latencies and time spent, accumulated over the slices of one configuration."""

    latencies_s: list[float] = attrs.Factory(list)
    elapsed_s: float = 0.0

    def rate(self) -> float:
        return len(self.latencies_s) / self.elapsed_s


async def start_node(name: str, store: str, lease_ms: int, log: Path) -> Node:
    """Starts `kelpie node` and waits for its ready line; kills it if it never comes."""
    env = dict(os.environ, PYTHONHASHSEED="0")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH_DIR), env.get("PYTHONPATH")]))
    command = [
        sys.executable,
        "-m",
        "kelpie.cli",
        "node",
        "--store",
        store,
        "--actor",
        "_bench_actors:Counter",
        "--listen",
        "127.0.0.1:0",
        "--name",
        name,
        "--lease-ms",
        str(lease_ms),
    ]
    with open(log, "wb") as stderr:
        process = await trio.lowlevel.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, env=env
        )
    try:
        return await read_ready(process, name, log)
    except BaseException:
        await stop(process)
        raise


async def read_ready(process: trio.Process, name: str, log: Path) -> Node:
    """The node's ready line, read from its stdout; RuntimeError if it does not come in time."""
    assert process.stdout is not None
    line = b""
    with trio.move_on_after(START_TIMEOUT_S):
        while not line.endswith(b"\n"):
            chunk = await process.stdout.receive_some(1)
            if not chunk:
                break
            line += chunk
    if not line.endswith(b"\n"):
        raise RuntimeError(
            f"node {name} did not report ready within {START_TIMEOUT_S:g} s "
            f"(exit code {process.poll()}); its log:\n{log.read_text()[-2000:]}"
        )
    ready = json.loads(line)
    return Node(ready["node"], ready["address"], ready["epoch"], process)


async def stop(process: trio.Process) -> int | None:
    """SIGTERM (the node drains), then SIGKILL after STOP_TIMEOUT_S; returns the exit code."""
    with trio.CancelScope(shield=True):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            with trio.move_on_after(STOP_TIMEOUT_S):
                await process.wait()
            if process.poll() is None:
                print(f"a node (pid {process.pid}) ignored SIGTERM for {STOP_TIMEOUT_S:g} s")
                process.kill()
                await process.wait()
    return process.returncode


@contextlib.asynccontextmanager
async def two_nodes(tmp: Path, lease_ms: int) -> AsyncIterator[list[Node]]:
    """Two nodes sharing one SQLite store, stopped (always) when the block ends."""
    store = f"sqlite:{tmp / 'cluster.db'}"
    started: list[Node] = []
    try:
        for name in NAMES:  # one after the other: both create the file otherwise
            started.append(await start_node(name, store, lease_ms, tmp / f"{name}.log"))
        yield started
    finally:
        codes = [await stop(node.process) for node in started]
        if any(code != 0 for code in codes):
            print(f"node exit codes: {codes} (0: drained after SIGTERM)")


async def place(
    client: NodeClient, nodes: Sequence[Node], count: int
) -> list[tuple[ActorId, Node, Node]]:
    """Places `count` actors, through each node in turn: (actor, its host, the other node)."""
    by_name = {node.name: node for node in nodes}
    placed = []
    for i in range(count):
        actor_id = ActorId("cluster", f"a{i}")
        through = nodes[i % len(nodes)].address
        host = by_name[await client.invoke(actor_id, "where", address=through)]
        other = next(node for node in nodes if node is not host)
        await client.invoke(actor_id, "get", address=other.address)  # warms the forwarding path
        placed.append((actor_id, host, other))
    return placed


async def run_slice(
    client: NodeClient,
    calls: Sequence[tuple[ActorId, str]],
    message: Any,
    callers: int,
    seconds: float,
    sample: Sample,
) -> None:
    """`callers` callers, each on its own (actor, address) pairs, for `seconds`."""
    started = time.perf_counter()
    deadline = started + seconds

    async def caller(n: int) -> None:
        mine = calls[n::callers]
        i = 0
        while time.perf_counter() < deadline:
            actor_id, address = mine[i % len(mine)]
            began = time.perf_counter()
            await client.invoke(actor_id, message, address=address)
            sample.latencies_s.append(time.perf_counter() - began)
            i += 1

    async with trio.open_nursery() as nursery:
        for n in range(callers):
            nursery.start_soon(caller, n)
    sample.elapsed_s += time.perf_counter() - started


@attrs.frozen
class Config:
    message: str
    callers: int


async def check(
    client: NodeClient,
    placed: Sequence[tuple[ActorId, Node, Node]],
    samples: dict[tuple[Config, str], Sample],
) -> None:
    """Every actor is where it was placed, and the counters hold every acknowledged increment."""
    total = 0
    for actor_id, host, _ in placed:
        where = await client.invoke(actor_id, "where", address=host.address)
        if where != host.name:
            raise AssertionError(f"{actor_id} moved from {host.name} to {where} during the run")
        total += await client.invoke(actor_id, "get", address=host.address)
    acknowledged = sum(
        len(sample.latencies_s)
        for (config, _), sample in samples.items()
        if config.message == "increment"
    )
    if total != acknowledged:
        raise AssertionError(f"the counters hold {total} increments, not {acknowledged}")


async def measure(args: argparse.Namespace, tmp: Path) -> None:
    network = TcpNetwork(idle_connections_per_peer=max(args.callers, 8))
    try:
        async with two_nodes(tmp, args.lease_ms) as nodes:
            client = NodeClient(network, [node.address for node in nodes])
            # A node learns of the others when it renews its lease (every fifth of it):
            # wait two renewals, so that placement sees both nodes.
            await trio.sleep(2 * args.lease_ms / 5 / 1000)
            placed = await place(client, nodes, args.actors)
            hosts = {node.name: sum(host is node for _, host, _ in placed) for node in nodes}
            print(
                "nodes: "
                + ", ".join(f"{n.name} at {n.address} (epoch {n.epoch})" for n in nodes)
                + "; actors placed: "
                + ", ".join(f"{count} on {name}" for name, count in hosts.items())
            )
            routes = {
                "direct": [(actor_id, host.address) for actor_id, host, _ in placed],
                "forwarded": [(actor_id, other.address) for actor_id, _, other in placed],
            }
            configs = [
                Config(message, callers)
                for message in ("get", "increment")
                for callers in (1, args.callers)
            ]
            samples = {(c, route): Sample() for c in configs for route in routes}
            for _ in range(args.rounds):
                for config in configs:
                    for route, calls in routes.items():
                        # One caller calls one actor: the latency of a lone call.
                        chosen = calls[:1] if config.callers == 1 else calls
                        await run_slice(
                            client,
                            chosen,
                            config.message,
                            config.callers,
                            args.seconds / args.rounds,
                            samples[config, route],
                        )
            await check(client, placed, samples)
            memory = {node.name: memory_mib(node.process.pid) for node in nodes}
    finally:
        await network.aclose()
    report = Report(
        f"calls through NodeClient to 2 kelpie node processes (sqlite store), "
        f"{args.seconds:g} s per figure",
        ["message", "sent to", "callers", "calls/s", "p50 ms", "p99 ms", "p50 overhead"],
    )
    for config in configs:
        direct_p50, _ = p50_p99(samples[config, "direct"].latencies_s)
        for route in routes:
            sample = samples[config, route]
            p50, p99 = p50_p99(sample.latencies_s)
            what = "no-op" if config.message == "get" else "increment (commits)"
            overhead = "" if route == "direct" else f"+{ms(p50 - direct_p50)} ms"
            report.add(
                f"actors.cluster.{'noop' if config.message == 'get' else 'increment'}"
                f".{route}.callers_{config.callers}",
                [
                    what,
                    f"{route} ({'host' if route == 'direct' else 'other node'})",
                    str(config.callers),
                    per_s(sample.rate()),
                    ms(p50),
                    ms(p99),
                    overhead,
                ],
                per_s=sample.rate(),
                p50_ms=p50 * 1e3,
                p99_ms=p99 * 1e3,
                calls=len(sample.latencies_s),
            )
    report.print()
    forwarded = sum(len(s.latencies_s) for (_, route), s in samples.items() if route != "direct")
    nodes_report = Report(
        f"node processes after the run ({forwarded:,} forwarded calls in all)",
        ["node", "RSS MiB", "peak RSS MiB"],
    )
    for name, (rss, peak) in memory.items():
        nodes_report.add(
            f"actors.cluster.node_memory.{name}",
            [name, f"{rss:,.1f}", f"{peak:,.1f}"],
            rss_mb=rss,
            peak_mb=peak,
        )
    nodes_report.print()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], epilog="See the module docstring for what is measured."
    )
    parser.add_argument("--seconds", type=float, default=2.0, help="time per figure")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved slices of each")
    parser.add_argument("--callers", type=int, default=16, help="concurrent callers (throughput)")
    parser.add_argument("--actors", type=int, default=32, help="actors the callers spread over")
    parser.add_argument("--lease-ms", type=int, default=2000, help="the nodes' --lease-ms")
    args = parser.parse_args()
    if args.seconds <= 0 or args.rounds < 1 or args.callers < 1 or args.actors < args.callers:
        parser.error("need --seconds > 0, --rounds >= 1, 1 <= --callers <= --actors")
    with tempfile.TemporaryDirectory(prefix="kelpie-bench-") as tmp:
        trio.run(measure, args, Path(tmp))


if __name__ == "__main__":
    main()
