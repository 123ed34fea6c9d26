"""Imports follow the layers of DESIGN.md §2: dependencies point downwards only.

A module in kelpie/<layer>/ imports only its own layer and the layers below it;
kelpie/core, at the bottom, imports nothing else from Kelpie. kelpie/sim, the
simulator, may import anything, but only the simulation side (SIM_SIDE) may
import it or the scenarios: production code never knows whether it runs in a
simulation, because the simulator differs only in the `Env` it passes in.

Every kind of import counts: `import kelpie.sim`, `from kelpie.sim import X`,
`from kelpie import sim`, relative imports (`from .. import sim`), imports inside
functions or under `if TYPE_CHECKING:`, and constant-string dynamic imports.
"""

from __future__ import annotations

import pytest
from _ast_rules import (
    Violation,
    imports,
    matches,
    module_name,
    parse_source,
    python_files,
    read_source,
    report,
)

#: DESIGN.md §2, bottom to top: a layer may import itself and the layers before it.
#: `cli` (kelpie/cli.py) sits on top of the server, which it starts.
LAYERS = ("core", "env", "storage", "runtime", "agent", "server", "cli")

#: The simulator: outside the stack, it may import every layer (and is imported by few).
SIM = "sim"

#: The root package (kelpie/__init__.py and its dunders such as `__version__`): below
#: every layer, so anything may import it and it imports nothing from Kelpie.
ROOT = "<root>"

#: The files of the simulation side (pattern, `*` crosses `/`) -> what they are.
SIM_SIDE = {
    "kelpie/sim/*": "the simulator itself",
    "kelpie/cli.py": "the CLI: `kelpie sim` and `kelpie sweep`",
    "scenarios/*": "simulation workloads",
    "tests/*": "the test suite",
    "bench/*": "simulator benchmarks",
}

#: Packages only the simulation side may import -> why.
SIM_ONLY = {
    "kelpie.sim": "the simulator: production code never asks whether it is simulated",
    "scenarios": "simulation workloads, loaded by the simulator's CLI and workers",
}

_RANK = {ROOT: -1} | {layer: rank for rank, layer in enumerate(LAYERS)}


def layer_of(module: str) -> str | None:
    """The layer of a Kelpie module (possibly one no layer knows), or None outside Kelpie."""
    parts = module.split(".")
    if parts[0] != "kelpie":
        return None
    if len(parts) == 1 or (parts[1].startswith("__") and parts[1].endswith("__")):
        return ROOT
    return parts[1]


def _under(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def layer_violations(source: str, path: str) -> list[Violation]:
    """Every import in `source` (the file at `path`) that breaks the layering."""
    own = layer_of(module_name(path)[0])
    found = []
    if own is not None and own not in _RANK and own != SIM:
        message = f"kelpie.{own} is in no layer: add it to LAYERS (DESIGN.md §2)"
        found.append(Violation(path, 1, f"kelpie.{own}", message))
    for imp in imports(parse_source(source, path), path):
        for package, reason in SIM_ONLY.items():
            if _under(imp.name, package) and not matches(path, SIM_SIDE):
                message = f"imports {imp.name}, which only the simulation side may ({reason})"
                found.append(Violation(path, imp.line, imp.name, message))
        target = layer_of(imp.name)
        if own is None or target is None or SIM in (own, target):
            continue
        if target not in _RANK:
            message = f"imports {imp.name}, which is in no layer: add kelpie.{target} to LAYERS"
            found.append(Violation(path, imp.line, imp.name, message))
        elif own in _RANK and _RANK[target] > _RANK[own]:
            message = f"the {own} layer imports {imp.name} from the {target} layer above it"
            found.append(Violation(path, imp.line, imp.name, message))
    return sorted(found, key=lambda v: (v.line, v.subject))


# -- the repository ----------------------------------------------------------------------


def test_imports_point_down_the_layers() -> None:
    """Finds every Kelpie module in a layer, importing only its own layer and those below."""
    files = python_files()
    assert "kelpie/core/_errors.py" in files, files
    violations = [v for p in files for v in layer_violations(read_source(p), p)]
    if violations:
        pytest.fail(report(violations, "imports follow the layers of DESIGN.md §2"), pytrace=False)


# -- the checker itself ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "source", "expected"),
    [
        ("kelpie/core/_x.py", "import kelpie.env\n", ["kelpie.env"]),
        ("kelpie/core/_x.py", "from kelpie.env import Env\n", ["kelpie.env.Env"]),
        ("kelpie/core/_x.py", "from kelpie import env\n", ["kelpie.env"]),
        ("kelpie/core/_x.py", "from .. import env\n", ["kelpie.env"]),
        ("kelpie/core/__init__.py", "from ..env import Env\n", ["kelpie.env.Env"]),
        ("kelpie/env/_x.py", "from kelpie.runtime import Actor\n", ["kelpie.runtime.Actor"]),
        ("kelpie/storage/_x.py", "import kelpie.agent.loop\n", ["kelpie.agent.loop"]),
        ("kelpie/runtime/_x.py", "from kelpie.server import app\n", ["kelpie.server.app"]),
        ("kelpie/server/_x.py", "import kelpie.cli\n", ["kelpie.cli"]),
        ("kelpie/env/_x.py", "def f():\n    from kelpie import storage\n", ["kelpie.storage"]),
        (
            "kelpie/env/_x.py",
            "import importlib\nimportlib.import_module('kelpie.agent')\n",
            ["kelpie.agent"],
        ),
        ("kelpie/runtime/_x.py", "import kelpie.sim\n", ["kelpie.sim"]),
        ("kelpie/runtime/_x.py", "from kelpie.sim import Simulation\n", ["kelpie.sim.Simulation"]),
        ("kelpie/server/_x.py", "from kelpie import sim\n", ["kelpie.sim"]),
        ("kelpie/agent/_x.py", "from ..sim import _clock\n", ["kelpie.sim._clock"]),
        ("kelpie/agent/_x.py", "from .. import sim as simulator\n", ["kelpie.sim"]),
        (
            "kelpie/env/_x.py",
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import kelpie.sim\n",
            ["kelpie.sim"],
        ),
        ("kelpie/server/_x.py", "import scenarios\n", ["scenarios"]),
        ("kelpie/__init__.py", "from kelpie import env\n", ["kelpie.env"]),
        ("tools/x.py", "from kelpie.sim import run_scenario\n", ["kelpie.sim.run_scenario"]),
        ("kelpie/utils.py", "", ["kelpie.utils"]),
        ("kelpie/helpers/_x.py", "import os\n", ["kelpie.helpers"]),
        ("kelpie/env/_x.py", "import kelpie.misc\n", ["kelpie.misc"]),
    ],
)
def test_checker_flags_imports_against_the_layers(
    path: str, source: str, expected: list[str]
) -> None:
    """Flags upward imports, imports of the simulator from production, and unlayered modules."""
    found = layer_violations(source, path)
    assert [v.subject for v in found] == expected, [str(v) for v in found]


@pytest.mark.parametrize(
    ("path", "source"),
    [
        ("kelpie/core/_x.py", "from kelpie.core._errors import KelpieError\n"),
        ("kelpie/core/_x.py", "from . import _errors\nfrom ._errors import ConfigError\n"),
        ("kelpie/core/_x.py", "import attrs\nimport trio\n"),
        ("kelpie/env/_x.py", "from kelpie.core import KelpieError\n"),
        ("kelpie/runtime/_x.py", "from kelpie.env import Env\nfrom kelpie.storage import Db\n"),
        ("kelpie/server/_x.py", "from kelpie.agent import Agent\nfrom kelpie import __version__\n"),
        ("kelpie/server/_x.py", "from ..runtime import Cluster\nfrom .. import core\n"),
        ("kelpie/cli.py", "from kelpie.server import serve\nfrom kelpie.sim import run_scenario\n"),
        ("kelpie/cli.py", "import scenarios\n"),
        ("kelpie/sim/_x.py", "from kelpie.server import app\nfrom . import _trio_hooks\n"),
        ("kelpie/sim/worker.py", "import scenarios\nfrom kelpie.sim import run_scenario\n"),
        ("scenarios/x.py", "from kelpie.sim import Scenario\nfrom kelpie.runtime import Actor\n"),
        ("tests/sim/test_x.py", "from kelpie.sim._clock import VirtualClock\nimport scenarios\n"),
        ("bench/sim_throughput.py", "import kelpie.sim\n"),
        ("kelpie/env/_x.py", "import simulation\nimport kelpie_sim\n"),
    ],
)
def test_checker_accepts_downward_imports_and_the_simulation_side(path: str, source: str) -> None:
    """Accepts imports of the same or lower layers, and the simulator from the simulation side."""
    assert layer_violations(source, path) == []
