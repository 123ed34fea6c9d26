"""The simulated node network passes the public network conformance suite, with faults off."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from kelpie.env import NodeNetwork, Rng
from kelpie.env.conformance import NetworkConformance, NetworkFactory
from kelpie.sim import NetworkFaults, SimNetwork


class TestSimNetwork(NetworkConformance):
    """Endpoints of one perfect `SimNetwork`, in virtual time (a MockClock that autojumps)."""

    @pytest.fixture
    def network_factory(self) -> NetworkFactory:
        async def make(count: int) -> list[NodeNetwork]:
            network = SimNetwork(Rng(7), NetworkFaults())
            return [network.endpoint(f"n{index + 1}") for index in range(count)]

        return make

    def trio_clock(self) -> trio.abc.Clock | None:
        return trio.testing.MockClock(autojump_threshold=0)


class TestDelayedSimNetwork(TestSimNetwork):
    """The same, with message delays (and so reordering) on: still within the contract."""

    @pytest.fixture
    def network_factory(self) -> NetworkFactory:
        async def make(count: int) -> list[NodeNetwork]:
            network = SimNetwork(Rng(7), NetworkFaults(delay_max_ms=20))
            return [network.endpoint(f"n{index + 1}") for index in range(count)]

        return make
