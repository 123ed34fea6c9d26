"""Three `kelpie node` processes on 127.0.0.1 sharing one store; one is SIGKILLed mid-load.

Clients call `increment` on a set of counter actors through random nodes over
the real TCP node network (`NodeClient`), each call with its own idempotency
key, retried with the same key through another node after any error, until it
is acknowledged. A third of the way in, one node is killed with SIGKILL. Then
every actor must answer through each surviving node, with a value equal to the
number of acknowledged increments, whose replies must be exactly 1..n: nothing
lost, nothing doubled. Each store (a SQLite file; PostgreSQL) runs it 10 times.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from kelpie.core import KelpieError
from kelpie.env import Rng, TcpNetwork
from kelpie.runtime import ActorId, NodeClient

HERE = Path(__file__).resolve().parent
NODES = 3
ACTORS = [ActorId("counter", f"c{i}") for i in range(8)]
CLIENTS = 12
CALLS_PER_CLIENT = 15
LEASE_MS = 1_000
START_TIMEOUT_S = 30.0


class Node:
    """One `kelpie node` process."""

    def __init__(self, name: str, store: str) -> None:
        self.name = name
        env = dict(os.environ, PYTHONPATH=f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kelpie.cli",
                "node",
                "--store",
                store,
                "--actor",
                "_cluster_counter:Counter",
                "--name",
                name,
                "--lease-ms",
                str(LEASE_MS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
        )
        self.address = ""

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            _, err = self.proc.communicate(timeout=START_TIMEOUT_S)
            raise AssertionError(f"node {self.name} did not start:\n{err}")
        ready = json.loads(line)
        assert ready["node"] == self.name and ready["epoch"] >= 1
        self.address = ready["address"]

    def stop(self) -> tuple[int | None, str]:
        """SIGTERM (a graceful drain), SIGKILL if that takes too long; (exit code, stderr)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


@pytest.fixture
def nodes() -> Iterator[Callable[[str], list[Node]]]:
    started: list[Node] = []

    def start(store: str) -> list[Node]:
        group = [Node(f"n{i + 1}", store) for i in range(NODES)]
        started.extend(group)
        for node in group:
            node.wait_ready()
        return group

    yield start
    for node in started:
        node.stop()


async def load_with_a_kill(group: list[Node], seed: int) -> dict[str, Any]:
    """Runs the load, SIGKILLs one node a third of the way in; returns what was acknowledged."""
    rng = Rng(seed)
    victim = rng.choice(group)
    alive = [node for node in group if node is not victim]
    acked: dict[ActorId, list[int]] = {actor: [] for actor in ACTORS}
    errors: dict[str, int] = {}
    total = CLIENTS * CALLS_PER_CLIENT
    kill_at = total // 3
    killed = trio.Event()
    network = TcpNetwork()

    async def call(client: NodeClient, crng: Rng, actor: ActorId, key: str) -> int:
        while True:
            targets = alive if killed.is_set() else group
            address = crng.choice(targets).address
            try:
                return int(
                    await client.invoke(actor, "increment", idempotency_key=key, address=address)
                )
            except KelpieError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                await trio.sleep(crng.uniform(0, 0.05))

    async def run_client(n: int) -> None:
        crng = rng.fork(f"client {n}")
        client = NodeClient(network, [node.address for node in group], timeout_ms=10_000)
        for i in range(CALLS_PER_CLIENT):
            actor = crng.choice(ACTORS)
            acked[actor].append(await call(client, crng, actor, f"c{n}-{i}"))
            if sum(len(v) for v in acked.values()) >= kill_at and not killed.is_set():
                victim.proc.send_signal(signal.SIGKILL)
                killed.set()

    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                for n in range(CLIENTS):
                    nursery.start_soon(run_client, n)
            answers: dict[tuple[str, ActorId], int] = {}
            survivors = NodeClient(network, [node.address for node in alive], timeout_ms=10_000)
            for actor in ACTORS:
                for node in alive:
                    while True:
                        try:
                            answers[node.name, actor] = int(
                                await survivors.invoke(actor, "get", address=node.address)
                            )
                            break
                        except KelpieError:
                            await trio.sleep(0.05)
    finally:
        await network.aclose()
    return {"acked": acked, "answers": answers, "victim": victim, "alive": alive, "errors": errors}


def check_round(group: list[Node], seed: int) -> None:
    outcome = trio.run(load_with_a_kill, group, seed)
    victim, alive = outcome["victim"], outcome["alive"]
    assert victim.proc.wait(timeout=10) == -signal.SIGKILL
    for actor, replies in outcome["acked"].items():
        n = len(replies)
        assert sorted(replies) == list(range(1, n + 1)), (
            f"{actor}: acknowledged replies {sorted(replies)} are not 1..{n} "
            f"(errors seen: {outcome['errors']})"
        )
        for node in alive:
            assert outcome["answers"][node.name, actor] == n, (
                f"{actor} answers {outcome['answers'][node.name, actor]} through {node.name}, "
                f"but {n} increments were acknowledged"
            )
    assert sum(len(r) for r in outcome["acked"].values()) == CLIENTS * CALLS_PER_CLIENT
    for node in alive:
        code, err = node.stop()
        assert code == 0, f"{node.name} did not drain cleanly (exit {code}):\n{err[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(10))
def test_sigkill_one_of_three_sqlite_nodes(
    round_: int, tmp_path: Path, nodes: Callable[[str], list[Node]]
) -> None:
    check_round(nodes(f"sqlite:{tmp_path / 'cluster.db'}"), seed=round_)


@pytest.mark.slow
@pytest.mark.parametrize("round_", range(10))
def test_sigkill_one_of_three_postgres_nodes(
    round_: int,
    postgres_url: str,
    postgres_new_table: Callable[[], str],
    nodes: Callable[[str], list[Node]],
) -> None:
    sep = "&" if "?" in postgres_url else "?"
    check_round(nodes(f"{postgres_url}{sep}kelpie_table={postgres_new_table()}"), seed=100 + round_)
