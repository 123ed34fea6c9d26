"""The simulated node network and node pauses: every fault, inside simulated runs."""

from __future__ import annotations

import io
import itertools
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from kelpie.core import ConfigError
from kelpie.env import DeliveryUnknown, FrameTooLarge, Handler, RemoteFailure, Rng, Unreachable
from kelpie.sim import (
    FaultConfig,
    NetworkFaults,
    NodePauses,
    PauseFaults,
    RunResult,
    SimConfig,
    SimContext,
    SimEndpoint,
    SimNetwork,
    Simulation,
    StorageFaults,
)

Workload = Callable[[SimContext], Awaitable[None]]


def simulate(
    workload: Workload,
    *,
    nodes: int = 2,
    network: NetworkFaults | None = None,
    pauses: PauseFaults | None = None,
    storage: StorageFaults | None = None,
    seed: int = 1,
    trace: io.StringIO | None = None,
) -> RunResult:
    faults = FaultConfig(
        buggify=False,
        network=network or NetworkFaults(),
        pauses=pauses or PauseFaults(),
        storage=storage or StorageFaults(),
    )
    sim = Simulation(SimConfig(seed=seed, nodes=nodes, faults=faults), trace_sink=trace)
    return sim.run(workload)


def check(workload: Workload, **kwargs: object) -> RunResult:
    result = simulate(workload, **kwargs)  # type: ignore[arg-type]
    assert result.ok, result.failure
    return result


def endpoint(ctx: SimContext, name: str) -> SimEndpoint:
    network = ctx.node(name).env.network
    assert isinstance(network, SimEndpoint)
    return network


async def serving(
    ctx: SimContext, nursery: trio.Nursery, name: str, handler: Handler
) -> trio.CancelScope:
    """Starts `handler` serving on node `name` (as a task of that node); cancel the scope to
    crash the server."""
    scope = trio.CancelScope()
    up = trio.Event()

    async def serve() -> None:
        with scope:
            async with trio.open_nursery() as inner:
                assert await inner.start(endpoint(ctx, name).serve, handler) == name
                up.set()

    ctx.spawn(nursery, serve, node=ctx.node(name), name=f"serve-{name}")
    await up.wait()
    return scope


class Recorder:
    """A handler that records what it received and when, and echoes it back."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.received: list[bytes] = []
        self.times: list[float] = []

    async def __call__(self, payload: bytes) -> bytes:
        self.received.append(payload)
        self.times.append(trio.current_time())
        if self.delay_s:
            await trio.sleep(self.delay_s)
        return b"re:" + payload


async def elapsed(fn: Callable[[], Awaitable[object]]) -> tuple[object, float]:
    """What `fn()` returned or raised, and the virtual time it took."""
    start = trio.current_time()
    try:
        outcome: object = await fn()
    except Exception as exc:
        outcome = exc
    return outcome, trio.current_time() - start


def ask(
    ctx: SimContext, src: str, dst: str, payload: bytes, timeout_ms: float = 1000
) -> Callable[[], Awaitable[bytes]]:
    return lambda: endpoint(ctx, src).request(dst, payload, timeout_ms=timeout_ms)


# -- a perfect network ------------------------------------------------------------------------


def test_a_perfect_network_answers_at_once() -> None:
    """No faults: requests are answered in no virtual time, also a node's own requests."""

    async def workload(ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            handler = Recorder()
            scope = await serving(ctx, nursery, "n2", handler)
            for src in ("n1", "n2"):
                reply, took = await elapsed(ask(ctx, src, "n2", b"hi"))
                assert (reply, took) == (b"re:hi", 0)
            assert ctx.network.injected == {}
            assert ctx.network.serving("n2") and not ctx.network.serving("n1")
            scope.cancel()

    check(workload)


def test_the_handler_runs_on_the_server_node() -> None:
    """Each request runs in a task of the serving node, not of the requester."""

    async def workload(ctx: SimContext) -> None:
        seen: list[str] = []

        async def handler(payload: bytes) -> bytes:
            ctx.emit("handled")
            seen.append(trio.lowlevel.current_task().name)
            return payload

        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            await endpoint(ctx, "n1").request("n2", b"x", timeout_ms=100)
            scope.cancel()
        assert seen == ["net.deliver n1->n2 #1"]

    trace = io.StringIO()
    check(workload, trace=trace)
    [row] = [line for line in trace.getvalue().splitlines() if "\thandled\t" in line]
    assert row.split("\t")[2] == "n2"


# -- delay and reordering ---------------------------------------------------------------------


def test_delays_reorder_messages() -> None:
    """Each message takes its own delay: concurrent requests arrive out of their send order,
    and each round trip takes at most two maximal delays."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        sent: list[bytes] = []
        took: list[float] = []

        async def one(index: int) -> None:
            payload = str(index).encode()
            sent.append(payload)
            reply, seconds = await elapsed(ask(ctx, "n1", "n2", payload))
            assert reply == b"re:" + payload
            took.append(seconds)

        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            async with trio.open_nursery() as requests:
                for index in range(20):
                    ctx.spawn(requests, one, index, node=ctx.node("n1"))
            scope.cancel()
        assert sorted(handler.received) == sorted(sent)
        assert handler.received != sent
        assert all(0 < t <= 0.1 for t in took)
        assert len(set(took)) == len(took)

    check(workload, network=NetworkFaults(delay_max_ms=50))


# -- loss and duplication ---------------------------------------------------------------------


def test_a_lost_request_is_delivery_unknown_at_the_timeout() -> None:
    """loss_p=1: the request never arrives, and the caller hears so exactly at its timeout."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            error, took = await elapsed(ask(ctx, "n1", "n2", b"x", timeout_ms=250))
            assert isinstance(error, DeliveryUnknown)
            assert error.maybe_delivered
            assert took == pytest.approx(0.25)
            assert handler.received == []
            assert ctx.network.injected == {"loss": 1}
            scope.cancel()

    check(workload, network=NetworkFaults(loss_p=1.0))


def test_partial_loss_fails_some_requests() -> None:
    """loss_p=0.3 loses requests and replies: some calls fail, most succeed."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        outcomes = []
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            for index in range(60):
                reply, _ = await elapsed(ask(ctx, "n1", "n2", b"%d" % index, timeout_ms=50))
                outcomes.append(isinstance(reply, bytes))
            scope.cancel()
        assert 20 < sum(outcomes) < 55
        # A lost reply still ran the handler: more requests were handled than answered.
        assert len(handler.received) > sum(outcomes)
        assert ctx.network.injected["loss"] == 60 - sum(outcomes)

    check(workload, network=NetworkFaults(loss_p=0.3))


def test_a_duplicated_request_runs_the_handler_twice() -> None:
    """duplicate_p=1: every request is handled twice; the caller gets one reply."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            assert await ask(ctx, "n1", "n2", b"once")() == b"re:once"
            await trio.sleep(1)  # the copy arrives after its own delay
            assert handler.received == [b"once", b"once"]
            assert ctx.network.injected == {"duplicate": 1}
            scope.cancel()

    check(workload, network=NetworkFaults(duplicate_p=1.0, delay_max_ms=20))


def test_a_late_copy_runs_after_the_caller_gave_up() -> None:
    """Messages outlive their caller: a request slower than the caller's timeout still runs."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            ctx.network.clog("n1", "n2", 300)
            error, _ = await elapsed(ask(ctx, "n1", "n2", b"late", timeout_ms=100))
            assert isinstance(error, DeliveryUnknown)
            assert handler.received == []
            await trio.sleep(1)
            assert handler.received == [b"late"]
            assert handler.times == [pytest.approx(0.3)]
            scope.cancel()

    check(workload)


# -- partitions -------------------------------------------------------------------------------


def test_a_one_way_partition_cuts_one_direction() -> None:
    """n1->n2 cut, n2->n1 working: n1's requests to n2 are lost before the handler; n2's
    requests reach n1's handler, but n1's replies are lost."""

    async def workload(ctx: SimContext) -> None:
        on1, on2 = Recorder(), Recorder()
        net = ctx.network
        async with trio.open_nursery() as nursery:
            scopes = [
                await serving(ctx, nursery, "n1", on1),
                await serving(ctx, nursery, "n2", on2),
            ]
            net.partition("n1", "n2", one_way=True)
            error, took = await elapsed(ask(ctx, "n1", "n2", b"a", timeout_ms=200))
            assert isinstance(error, DeliveryUnknown)
            assert took == pytest.approx(0.2)
            assert on2.received == []
            assert net.injected["partition_loss"] == 1

            error, _ = await elapsed(ask(ctx, "n2", "n1", b"b", timeout_ms=200))
            assert isinstance(error, DeliveryUnknown)
            assert on1.received == [b"b"]  # the handler ran; its reply was lost
            assert net.injected["partition_loss"] == 2
            assert await ask(ctx, "n2", "n2", b"c")() == b"re:c"

            net.heal()
            assert await ask(ctx, "n1", "n2", b"d")() == b"re:d"
            assert await ask(ctx, "n2", "n1", b"e")() == b"re:e"
            assert net.injected["partition"] == net.injected["partition_end"] == 1
            for scope in scopes:
                scope.cancel()

    check(workload)


def test_a_two_way_partition_cuts_both_directions_until_healed() -> None:
    """A partition between sides cuts every link between them, both ways; heal() ends it."""

    async def workload(ctx: SimContext) -> None:
        handlers = {name: Recorder() for name in ("n1", "n2", "n3")}
        async with trio.open_nursery() as nursery:
            scopes = [await serving(ctx, nursery, n, h) for n, h in handlers.items()]
            ctx.network.partition("n1", ["n2", "n3"])
            for src, dst in itertools.permutations(handlers, 2):
                reply, _ = await elapsed(ask(ctx, src, dst, b"x", timeout_ms=100))
                assert (reply == b"re:x") == ("n1" not in (src, dst)), (src, dst, reply)
            ctx.network.heal()
            for src, dst in itertools.permutations(handlers, 2):
                assert await ask(ctx, src, dst, b"y")() == b"re:y"
            for scope in scopes:
                scope.cancel()

    check(workload, nodes=3)


def test_random_partitions_and_clogs_come_and_go() -> None:
    """Random partitions (one-way and two-way) and clogs start and end in virtual time, and
    after heal(quiet=True) every node reaches every other."""

    async def workload(ctx: SimContext) -> None:
        names = [node.name for node in ctx.nodes]
        async with trio.open_nursery() as nursery:
            scopes = [await serving(ctx, nursery, name, Recorder()) for name in names]
            failures = 0
            for _ in range(200):
                for src, dst in itertools.permutations(names, 2):
                    reply, _ = await elapsed(ask(ctx, src, dst, b"x", timeout_ms=20))
                    failures += not isinstance(reply, bytes)
                await trio.sleep(0.02)
            injected = ctx.network.injected
            assert failures > 0
            assert injected["partition"] >= 3 and injected["clog"] >= 3
            assert injected["partition_end"] >= 1 and injected["clog_end"] >= 1
            assert injected["partition_loss"] > 0 and injected["clog_hold"] > 0
            ctx.network.heal(quiet=True)
            for _ in range(20):
                for src, dst in itertools.permutations(names, 2):
                    assert await ask(ctx, src, dst, b"y", timeout_ms=20)() == b"re:y"
                await trio.sleep(1)
            for scope in scopes:
                scope.cancel()

    trace = io.StringIO()
    check(
        workload,
        nodes=3,
        network=NetworkFaults(
            partition_rate_per_s=2, partition_max_ms=500, clog_rate_per_s=2, clog_max_ms=300
        ),
        trace=trace,
    )
    rows = [line for line in trace.getvalue().splitlines() if "\tnetwork.fault\t" in line]
    starts = [row for row in rows if "kind='partition'" in row]
    assert any("one_way=True" in row for row in starts)
    assert any("one_way=False" in row for row in starts)


def test_quiesce_stops_loss_and_duplication() -> None:
    """After quiesce() no message is lost or duplicated; delays remain."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            ctx.network.quiesce()
            before = dict(ctx.network.injected)
            for index in range(30):
                reply, took = await elapsed(ask(ctx, "n1", "n2", b"%d" % index))
                assert reply == b"re:%d" % index
                assert took > 0
            await trio.sleep(1)
            assert len(handler.received) == 30
            assert ctx.network.injected == before
            scope.cancel()

    check(workload, network=NetworkFaults(loss_p=0.5, duplicate_p=0.5, delay_max_ms=10))


# -- clogs ------------------------------------------------------------------------------------


def test_a_clog_holds_messages_then_delivers_them() -> None:
    """A clogged link delivers nothing until the clog ends, then everything it held."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            ctx.network.clog("n1", "n2", 500, one_way=True)
            replies: list[bytes] = []

            async def one(index: int) -> None:
                replies.append(await ask(ctx, "n1", "n2", b"%d" % index, timeout_ms=2000)())

            async with trio.open_nursery() as requests:
                for index in range(3):
                    ctx.spawn(requests, one, index, node=ctx.node("n1"))
                # The other direction is not clogged.
                assert await ask(ctx, "n2", "n2", b"self")() == b"re:self"
            assert sorted(replies) == [b"re:0", b"re:1", b"re:2"]
            assert handler.times[1:] == [0.5, 0.5, 0.5]  # the first was n2's own request
            assert ctx.network.injected["clog_hold"] == 3
            assert ctx.network.injected["clog_end"] == 1
            scope.cancel()

    check(workload)


def test_heal_releases_what_a_clog_held() -> None:
    """heal() ends a clog early: the held request is delivered at once."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            ctx.network.clog("n1", "n2", 10_000)

            async def healer() -> None:
                await trio.sleep(1)
                ctx.network.heal()

            nursery.start_soon(healer)
            reply, took = await elapsed(ask(ctx, "n1", "n2", b"x", timeout_ms=5000))
            assert (reply, took) == (b"re:x", 1)
            scope.cancel()

    check(workload)


# -- unreachable nodes and crashes ------------------------------------------------------------


def test_unknown_and_silent_nodes_are_unreachable_after_the_link_delay() -> None:
    """An address that names no node, and a node that is not serving, are Unreachable, once
    the connection attempt (and the refusal) crossed the link."""

    async def workload(ctx: SimContext) -> None:
        for address in ("n9", "n2"):
            error, took = await elapsed(ask(ctx, "n1", address, b"x"))
            assert isinstance(error, Unreachable), error
            assert not error.maybe_delivered
            assert 0 < took <= 0.2

    check(workload, network=NetworkFaults(delay_max_ms=100))


def test_a_lost_connection_attempt_is_unreachable_at_the_timeout() -> None:
    """A connection attempt to a node that is not serving, lost on the way: nothing can have
    been delivered, so the timeout is Unreachable (as a TCP connect timeout is)."""

    async def workload(ctx: SimContext) -> None:
        error, took = await elapsed(ask(ctx, "n1", "n2", b"x", timeout_ms=300))
        assert isinstance(error, Unreachable)
        assert took == pytest.approx(0.3)

    check(workload, network=NetworkFaults(loss_p=1.0))


def test_a_node_that_starts_serving_in_time_gets_the_request() -> None:
    """The 'not serving' verdict is taken when the attempt arrives, not when it is sent."""

    async def workload(ctx: SimContext) -> None:
        handler = Recorder()
        async with trio.open_nursery() as nursery:
            ctx.network.clog("n1", "n2", 200)
            got: list[object] = []

            async def call() -> None:
                got.append(await ask(ctx, "n1", "n2", b"x")())

            ctx.spawn(nursery, call, node=ctx.node("n1"))
            await trio.sleep(0.1)
            scope = await serving(ctx, nursery, "n2", handler)
            await trio.sleep(0.2)
            assert got == [b"re:x"]
            scope.cancel()

    check(workload)


def test_a_crash_mid_handler_is_delivery_unknown_and_cancels_the_handler() -> None:
    """Cancelling serve (a crash) cancels its handlers; their callers see DeliveryUnknown once
    the reset crosses back, new callers Unreachable; the node can serve again afterwards."""

    async def workload(ctx: SimContext) -> None:
        cancelled: list[bool] = []

        async def slow(payload: bytes) -> bytes:
            try:
                await trio.sleep(10)
            except trio.Cancelled:
                cancelled.append(True)
                raise
            return payload

        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", slow)

            async def crash() -> None:
                await trio.sleep(0.5)
                scope.cancel()

            nursery.start_soon(crash)
            error, took = await elapsed(ask(ctx, "n1", "n2", b"x", timeout_ms=2000))
            assert isinstance(error, DeliveryUnknown)
            assert "broke" in str(error)
            assert 0.5 <= took <= 0.52  # the reset crossed back, well before the timeout
            assert cancelled == [True]
            assert not ctx.network.serving("n2")
            assert isinstance((await elapsed(ask(ctx, "n1", "n2", b"x")))[0], Unreachable)
            again = await serving(ctx, nursery, "n2", Recorder())
            assert await ask(ctx, "n1", "n2", b"y")() == b"re:y"
            again.cancel()

    check(workload, network=NetworkFaults(delay_max_ms=10))


def test_one_serve_per_node_at_a_time() -> None:
    """A second concurrent serve on one node is a clear error."""

    async def workload(ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n1", Recorder())
            with pytest.raises(RuntimeError, match="already serving"):
                await nursery.start(endpoint(ctx, "n1").serve, Recorder())
            scope.cancel()

    check(workload, nodes=1)


# -- failures, frames and arguments -----------------------------------------------------------


def test_handler_errors_and_frame_limits() -> None:
    """A handler's exception is RemoteFailure with its type and message; a request over the
    frame limit is FrameTooLarge (nothing sent); a reply over it is RemoteFailure."""

    async def workload(ctx: SimContext) -> None:
        handled: list[bytes] = []

        async def handler(payload: bytes) -> bytes:
            handled.append(payload)
            if payload == b"boom":
                raise ValueError("boom")
            return payload * 100

        client = endpoint(ctx, "n1")
        client.frame_size_max_bytes = 64
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", handler)
            with pytest.raises(RemoteFailure, match="ValueError: boom") as failed:
                await client.request("n2", b"boom", timeout_ms=100)
            assert failed.value.maybe_delivered
            with pytest.raises(FrameTooLarge, match="nothing was sent") as large:
                await client.request("n2", b"x" * 65, timeout_ms=100)
            assert not large.value.maybe_delivered
            with pytest.raises(RemoteFailure, match="exceeds the frame limit of 64"):
                await client.request("n2", b"xy", timeout_ms=100)
            assert handled == [b"boom", b"xy"]
            scope.cancel()

    check(workload)


@pytest.mark.parametrize("timeout_ms", [0, -1, float("nan"), float("inf")])
def test_a_timeout_must_be_a_positive_finite_number(timeout_ms: float) -> None:
    async def workload(ctx: SimContext) -> None:
        with pytest.raises(ConfigError, match="timeout_ms"):
            await endpoint(ctx, "n1").request("n2", b"x", timeout_ms=timeout_ms)

    check(workload)


def test_a_closed_endpoint_cannot_send() -> None:
    async def workload(ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", Recorder())
            await endpoint(ctx, "n1").aclose()
            with pytest.raises(Unreachable, match="closed"):
                await ask(ctx, "n1", "n2", b"x")()
            assert await ask(ctx, "n2", "n2", b"x")() == b"re:x"
            scope.cancel()

    check(workload)


def test_explicit_faults_name_known_nodes() -> None:
    async def workload(ctx: SimContext) -> None:
        with pytest.raises(ValueError, match="n7"):
            ctx.network.partition("n1", "n7")
        with pytest.raises(ValueError, match="non-negative"):
            ctx.network.clog("n1", "n2", -1)

    check(workload)


# -- pauses -----------------------------------------------------------------------------------


def test_a_pause_delays_the_paused_nodes_store_reads_only() -> None:
    async def workload(ctx: SimContext) -> None:
        store = ctx.store
        took: dict[str, float] = {}

        async def read(name: str) -> None:
            async def get() -> bytes | None:
                async with store.transaction() as tr:
                    return await tr.get(b"k")

            took[name] = (await elapsed(get))[1]

        ctx.pauses.pause("n1", 2.0)
        async with trio.open_nursery() as nursery:
            for node in ctx.nodes:
                ctx.spawn(nursery, read, node.name, node=node)
        assert took == {"n1": 2.0, "n2": 0.0}
        assert ctx.pauses.injected == {"pause": 1}

    check(workload)


def test_a_pause_after_the_commit_point_holds_a_committed_transaction() -> None:
    """A node paused while its commit is in flight: the commit applies, others see it, and the
    node learns of it only when the pause ends."""

    async def workload(ctx: SimContext) -> None:
        store = ctx.store
        done: list[float] = []

        async def write() -> None:
            async with store.transaction() as tr:
                tr.set(b"k", b"v")
                await tr.commit()
            done.append(trio.current_time())

        async with trio.open_nursery() as nursery:
            ctx.spawn(nursery, write, node=ctx.node("n1"))
            await trio.testing.wait_all_tasks_blocked()  # n1 is inside its commit's latency
            ctx.pauses.pause("n1", 1.0)
            await trio.sleep(0.5)
            assert store.snapshot() == {b"k": b"v"}
            assert done == []
        assert len(done) == 1
        assert 1.0 <= done[0] <= 1.05  # the pause, then the rest of the commit's latency

    check(workload, storage=StorageFaults(latency_max_ms=100))


def test_pauses_hold_the_paused_nodes_network_io_only() -> None:
    """A paused server answers late (its caller may time out); a paused sender sends nothing
    (Unreachable if the pause outlasts the timeout); other nodes are unaffected."""

    async def workload(ctx: SimContext) -> None:
        on2, on3 = Recorder(), Recorder()
        async with trio.open_nursery() as nursery:
            scopes = [
                await serving(ctx, nursery, "n2", on2),
                await serving(ctx, nursery, "n3", on3),
            ]
            ctx.pauses.pause("n2", 1.0)
            assert await elapsed(ask(ctx, "n1", "n3", b"a")) == (b"re:a", 0)
            assert await elapsed(ask(ctx, "n1", "n2", b"b", timeout_ms=5000)) == (b"re:b", 1)
            ctx.pauses.pause("n2", 1.0)
            error, _ = await elapsed(ask(ctx, "n1", "n2", b"c", timeout_ms=500))
            assert isinstance(error, DeliveryUnknown)
            await trio.sleep(1)
            assert on2.received == [b"b", b"c"]  # the handler ran once the pause ended
            ctx.pauses.pause("n1", 1.0)
            error, took = await elapsed(ask(ctx, "n1", "n3", b"d", timeout_ms=500))
            assert isinstance(error, Unreachable)
            assert took == 0.5
            assert on3.received == [b"a"]
            for scope in scopes:
                scope.cancel()

    check(workload, nodes=3)


def test_a_pause_during_the_handler_holds_the_reply() -> None:
    async def workload(ctx: SimContext) -> None:
        async with trio.open_nursery() as nursery:
            scope = await serving(ctx, nursery, "n2", Recorder(delay_s=0.1))

            async def pauser() -> None:
                await trio.sleep(0.05)
                ctx.pauses.pause("n2", 1.0)

            nursery.start_soon(pauser)
            assert await elapsed(ask(ctx, "n1", "n2", b"x", timeout_ms=5000)) == (b"re:x", 1.05)
            scope.cancel()

    check(workload)


def test_random_pauses_are_per_node_and_stop_when_quiesced() -> None:
    """Each node's pauses depend on its own stream only; quiesce() stops new ones."""

    def schedule(nodes: list[str], quiet_at: float = float("inf")) -> dict[str, list[object]]:
        seen: dict[str, list[object]] = {node: [] for node in nodes}

        def on_fault(kind: str, fields: dict[str, object]) -> None:
            seen[str(fields["node"])].append(fields["at"])

        pauses = NodePauses(Rng(3), PauseFaults(rate_per_s=2, max_ms=100), on_fault)

        async def main() -> None:
            while trio.current_time() < 10:
                if trio.current_time() >= quiet_at:
                    pauses.quiesce()
                for node in nodes:
                    await pauses.gate(node)
                await trio.sleep(0.01)

        trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
        return seen

    alone = schedule(["a"])
    together = schedule(["a", "b", "c"])
    assert len(alone["a"]) > 5
    assert together["a"] == alone["a"]
    assert together["b"] != together["a"]
    quiet = schedule(["a"], quiet_at=5)
    assert quiet["a"] == [at for at in alone["a"] if isinstance(at, float) and at < 5]


def test_random_pauses_stretch_store_operations() -> None:
    async def workload(ctx: SimContext) -> None:
        async def reader(name: str) -> None:
            for _ in range(100):
                async with ctx.store.transaction() as tr:
                    await tr.get(b"k")
                await trio.sleep(0.05)

        async with trio.open_nursery() as nursery:
            for node in ctx.nodes:
                ctx.spawn(nursery, reader, node.name, node=node)
        if ctx.pauses.faults.rate_per_s:
            assert ctx.pauses.injected["pause"] > 2

    quiet = check(workload)
    paused = check(workload, pauses=PauseFaults(rate_per_s=1, max_ms=500))
    assert paused.sim_time_s > quiet.sim_time_s


# -- determinism and configuration ------------------------------------------------------------


async def busy_cluster(ctx: SimContext) -> None:
    """Every node calls every other for a while, under whatever faults the run injects."""
    names = [node.name for node in ctx.nodes]

    async def client(name: str) -> None:
        rng = ctx.rng.fork(name)
        for index in range(30):
            dst = rng.choice(names)
            reply, _ = await elapsed(ask(ctx, name, dst, b"%s:%d" % (name.encode(), index), 50))
            ctx.emit("call", dst=dst, ok=isinstance(reply, bytes))
            async with ctx.store.transaction() as tr:
                tr.set(name.encode(), b"%d" % index)
                try:
                    await tr.commit()
                except Exception as exc:
                    ctx.emit("commit", error=type(exc).__name__)
            await trio.sleep(0.3)

    async with trio.open_nursery() as nursery:
        scopes = [await serving(ctx, nursery, name, Recorder(0.001)) for name in names]
        async with trio.open_nursery() as clients:
            for node in ctx.nodes:
                ctx.spawn(clients, client, node.name, node=node)
        for scope in scopes:
            scope.cancel()


def test_the_same_seed_gives_the_same_trace() -> None:
    """Under every network fault and random pauses, a seed replays exactly; another differs."""
    every = {"network": NetworkFaults.every(), "pauses": PauseFaults(rate_per_s=1, max_ms=200)}
    trace = io.StringIO()
    first = check(busy_cluster, nodes=3, seed=5, trace=trace, **every)
    assert first.trace_rows > 500
    for kind in ("partition", "partition_end", "clog", "clog_end", "loss", "duplicate"):
        assert f"kind='{kind}'" in trace.getvalue(), kind
    assert "\tnode.pause\t" in trace.getvalue()
    assert check(busy_cluster, nodes=3, seed=5, **every).trace_hash == first.trace_hash
    assert check(busy_cluster, nodes=3, seed=6, **every).trace_hash != first.trace_hash
    assert check(busy_cluster, nodes=3, seed=5).trace_hash != first.trace_hash


def test_fault_config_describes_network_and_pauses() -> None:
    assert FaultConfig().describe().endswith("network(off) pauses(off)")
    described = FaultConfig(
        network=NetworkFaults(loss_p=0.1, delay_max_ms=5), pauses=PauseFaults(1, 200)
    ).describe()
    assert "network(delay_max_ms=5 loss_p=0.1)" in described
    assert "pauses(rate_per_s=1 max_ms=200)" in described
    assert NetworkFaults.every().describe().count("=") == 7


def test_a_network_outside_a_simulation_works_on_plain_trio() -> None:
    """SimNetwork needs only trio (a MockClock here), not the simulator."""

    async def main() -> None:
        net = SimNetwork(Rng(1), NetworkFaults(delay_max_ms=10))
        a, b = net.endpoint("a"), net.endpoint("b")
        assert net.endpoint("a") is a and net.nodes == ("a", "b")
        async with trio.open_nursery() as nursery:
            assert await nursery.start(b.serve, Recorder()) == "b"
            assert await a.request("b", b"x", timeout_ms=100) == b"re:x"
            nursery.cancel_scope.cancel()

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))
