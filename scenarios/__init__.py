"""Simulation scenarios: workloads with setup, run and check phases (kelpie.sim.Scenario).

Every module in this package may define `SCENARIOS`, a tuple of `Scenario`s;
`all_scenarios()` collects them in module-name order. To add one, write a module
here (see docs/SIMULATION.md, "Writing a scenario"); the sweep picks it up. A
scenario defined in any importable module can also be named as
`package.module:NAME` wherever a scenario name is taken.
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
    """The scenario called `name`, or `package.module:NAME` for one defined elsewhere.

    A KeyError lists the known names.
    """
    if ":" in name:
        return _load(name)
    scenarios = all_scenarios()
    try:
        return scenarios[name]
    except KeyError:
        raise KeyError(f"no scenario named {name!r}; known: {', '.join(scenarios)}") from None


def _load(spec: str) -> Scenario:
    module_name, _, attribute = spec.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as exc:
        raise KeyError(f"cannot load scenario {spec!r}: {exc}") from None
    if not isinstance(found, Scenario):
        raise KeyError(f"{spec!r} is a {type(found).__name__}, not a kelpie.sim.Scenario")
    return found


def default_names() -> list[str]:
    """The scenarios a sweep runs when none is named: all but those with planted bugs."""
    return [name for name, s in all_scenarios().items() if s.planted_bug is None]
