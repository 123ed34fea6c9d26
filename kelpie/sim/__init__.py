"""The deterministic simulator. Imported only by the CLI, scenarios and tests.

Production code never imports this package: the simulator differs from
production only in the `Env` it passes in (DESIGN.md §2). See
docs/SIMULATION.md for how to run, reproduce and read a simulated run.
"""

from kelpie.sim._clock import NodeWallClock, VirtualClock
from kelpie.sim._faults import ClockFaults, FaultConfig, SimFaults, SiteRecord
from kelpie.sim._http import HttpHandler, SimHttp
from kelpie.sim._llm import LLMFaults, SimLLM
from kelpie.sim._network import NetworkFaults, SimEndpoint, SimNetwork
from kelpie.sim._nodes import SimNode
from kelpie.sim._pauses import NodePauses, PauseFaults
from kelpie.sim._result import Failure, FailureKind, RunResult
from kelpie.sim._sanitizer import DeterminismViolation, Finding, Sanitizer
from kelpie.sim._scenario import Scenario, Workload, run_scenario
from kelpie.sim._scheduler import (
    ChoiceSource,
    FifoChoices,
    RandomChoices,
    ReplayChoices,
    SchedulingController,
)
from kelpie.sim._simulation import (
    CheckFailed,
    Schedule,
    SimConfig,
    SimContext,
    Simulation,
    SimulationAborted,
)
from kelpie.sim._storage import (
    RecordedTransaction,
    SimStore,
    SimTransaction,
    StorageFaults,
)
from kelpie.sim._trace import Trace, TraceRow, first_divergence

__all__ = [
    "CheckFailed",
    "ChoiceSource",
    "ClockFaults",
    "DeterminismViolation",
    "Failure",
    "FailureKind",
    "FaultConfig",
    "FifoChoices",
    "Finding",
    "HttpHandler",
    "LLMFaults",
    "NetworkFaults",
    "NodePauses",
    "NodeWallClock",
    "PauseFaults",
    "RandomChoices",
    "RecordedTransaction",
    "ReplayChoices",
    "RunResult",
    "Sanitizer",
    "Scenario",
    "Schedule",
    "SchedulingController",
    "SimConfig",
    "SimContext",
    "SimEndpoint",
    "SimFaults",
    "SimHttp",
    "SimLLM",
    "SimNetwork",
    "SimNode",
    "SimStore",
    "SimTransaction",
    "Simulation",
    "SimulationAborted",
    "SiteRecord",
    "StorageFaults",
    "Trace",
    "TraceRow",
    "VirtualClock",
    "Workload",
    "first_divergence",
    "run_scenario",
]
