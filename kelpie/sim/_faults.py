"""The simulator's faults: their configuration and the seeded BUGGIFY twin of `kelpie.env.Faults`.

Fault model (what this module injects, and what it does not):

- BUGGIFY sites (`env.faults.buggify("site.name")`): each site is *enabled* for
  the whole run with probability `buggify_enable_p` (0.25) the first time it is
  reached, and an enabled site then *fires* with probability `buggify_fire_p`
  (0.25) at each call. Both draws come from streams derived from the run's seed
  and the site's name, so whether a site fires does not depend on which other
  sites exist or were reached first. Every firing is a trace row; every site
  reached is in the run's report, enabled or not.
- Clock faults (`ClockFaults`): each node's wall clock is offset by a skew drawn
  in [-skew_max_ms, skew_max_ms], runs fast or slow by a drift drawn in
  [-drift_max_ppm, drift_max_ppm], and jumps forward or back (see
  kelpie/sim/_clock.py). Monotonic time is never faulted.
- Storage faults (`StorageFaults`, injected by the simulated store; its fault
  model is the docstring of kelpie/sim/_storage.py).
- Network faults (`NetworkFaults`, injected by the simulated node network:
  delay and reordering, loss, duplication, partitions and clogs; its fault
  model is the docstring of kelpie/sim/_network.py).
- Node pauses (`PauseFaults`: a node's process stops for a while and does no
  storage or network I/O; see kelpie/sim/_pauses.py).
- Crashes are not a configured fault: a scenario crashes a node by cancelling
  its tasks (and restarts it by starting them again); what survives is what the
  store committed.
- LLM faults (`LLMFaults`, injected by the simulated LLM behind the run's
  simulated HTTP: hangs, 429s with Retry-After, 5xx, unknown tools, malformed
  and refusable tool arguments, over-long replies, truncated and cut streams;
  its fault model is the docstring of kelpie/sim/_llm.py).
- Not injected yet: MCP and sandbox faults: each arrives with its simulated
  component in a later issue and is listed in docs/SIMULATION.md when it does.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs

from kelpie.env import Rng, check_site_name
from kelpie.sim._llm import LLMFaults
from kelpie.sim._network import NetworkFaults
from kelpie.sim._pauses import PauseFaults
from kelpie.sim._storage import StorageFaults


@attrs.frozen
class ClockFaults:
    """Per-node wall-clock faults. All zero: perfectly synchronised clocks."""

    skew_max_ms: int = 0
    drift_max_ppm: int = 0
    jump_rate_per_s: float = 0.0
    jump_max_ms: int = 0

    def describe(self) -> str:
        if self == ClockFaults():
            return "off"
        return (
            f"skew<={self.skew_max_ms}ms drift<={self.drift_max_ppm}ppm "
            f"jumps={self.jump_rate_per_s:g}/s of <={self.jump_max_ms}ms"
        )


@attrs.frozen
class FaultConfig:
    """The faults a run injects. Printed with every failure."""

    buggify: bool = True
    buggify_enable_p: float = 0.25
    buggify_fire_p: float = 0.25
    clock: ClockFaults = attrs.Factory(ClockFaults)
    storage: StorageFaults = attrs.Factory(StorageFaults)
    network: NetworkFaults = attrs.Factory(NetworkFaults)
    pauses: PauseFaults = attrs.Factory(PauseFaults)
    llm: LLMFaults = attrs.Factory(LLMFaults)

    def describe(self) -> str:
        """One line naming every fault setting."""
        bug = (
            f"buggify(enable={self.buggify_enable_p:g}, fire={self.buggify_fire_p:g})"
            if self.buggify
            else "buggify(off)"
        )
        return (
            f"{bug} clock({self.clock.describe()}) storage({self.storage.describe()}) "
            f"llm({self.llm.describe()}) network({self.network.describe()}) "
            f"pauses({self.pauses.describe()})"
        )


@attrs.define
class SiteRecord:
    """What one BUGGIFY site did during a run."""

    site: str
    enabled: bool
    reached: int = 0
    fired: int = 0


class SimFaults:
    """Seeded BUGGIFY: the simulator's implementation of `kelpie.env.Faults`."""

    __slots__ = ("_config", "_fire_rngs", "_on_fire", "_rng", "_sites")

    def __init__(
        self,
        rng: Rng,
        config: FaultConfig,
        on_fire: Callable[[str], None] | None = None,
    ) -> None:
        self._rng = rng
        self._config = config
        self._on_fire = on_fire
        self._sites: dict[str, SiteRecord] = {}
        self._fire_rngs: dict[str, Rng] = {}

    def buggify(self, site: str) -> bool:
        record = self._sites.get(site)
        if record is None:
            check_site_name(site)
            enabled = self._config.buggify and self._rng.fork(f"enable:{site}").chance(
                self._config.buggify_enable_p
            )
            record = self._sites[site] = SiteRecord(site, enabled)
            self._fire_rngs[site] = self._rng.fork(f"fire:{site}")
        record.reached += 1
        if not record.enabled:
            return False
        if not self._fire_rngs[site].chance(self._config.buggify_fire_p):
            return False
        record.fired += 1
        if self._on_fire is not None:
            self._on_fire(site)
        return True

    def report(self) -> list[SiteRecord]:
        """Every site reached in this run, by name."""
        return [self._sites[name] for name in sorted(self._sites)]

    def __repr__(self) -> str:
        return f"SimFaults({self._config.describe()})"
