"""Simulation scenarios: workloads with setup, run and check phases (kelpie.sim.Scenario).

Every module in this package may define `SCENARIOS`, a tuple of `Scenario`s;
`all_scenarios()` collects them in module-name order. To add one, write a module
here (see docs/SIMULATION.md, "Writing a scenario"); the sweep picks it up.
"""

from __future__ import annotations

import importlib
import pkgutil

from kelpie.sim import Scenario


def all_scenarios() -> dict[str, Scenario]:
    """Every scenario, by name."""
    found: dict[str, Scenario] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        for scenario in getattr(module, "SCENARIOS", ()):
            if scenario.name in found:
                raise ValueError(f"two scenarios are named {scenario.name!r}")
            found[scenario.name] = scenario
    return found


def get(name: str) -> Scenario:
    """The scenario called `name`; a KeyError lists the known names."""
    scenarios = all_scenarios()
    try:
        return scenarios[name]
    except KeyError:
        raise KeyError(f"no scenario named {name!r}; known: {', '.join(scenarios)}") from None


def default_names() -> list[str]:
    """The scenarios a sweep runs when none is named: all but those with planted bugs."""
    return [name for name, s in all_scenarios().items() if s.planted_bug is None]
