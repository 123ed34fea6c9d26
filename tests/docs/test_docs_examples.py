"""The code in docs/ runs as written."""

from __future__ import annotations

import re
from pathlib import Path

from kelpie.sim import Scenario, run_scenario

DOCS = Path(__file__).resolve().parents[2] / "docs"


def test_the_scenario_example_in_simulation_md_runs() -> None:
    """The 'Writing a scenario' example defines a scenario that passes on every seed tried."""
    text = (DOCS / "SIMULATION.md").read_text()
    match = re.search(r"## Writing a scenario.*?```python\n(.*?)```", text, re.DOTALL)
    assert match, "docs/SIMULATION.md lost its scenario example"
    namespace: dict[str, object] = {}
    exec(compile(match.group(1), "docs/SIMULATION.md", "exec"), namespace)
    [scenario] = namespace["SCENARIOS"]  # type: ignore[misc]
    assert isinstance(scenario, Scenario)
    for seed in range(10):
        result = run_scenario(scenario, seed)
        assert result.ok, result.failure
    assert [site.site for site in result.buggify] == ["counter.add.stall"]
