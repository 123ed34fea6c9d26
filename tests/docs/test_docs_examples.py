"""The code in docs/ runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import trio

from kelpie.env import Env
from kelpie.runtime import ActorId, open_runtime
from kelpie.sim import Scenario, run_scenario
from kelpie.storage import MemoryStore

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


def test_the_actor_example_in_actors_md_runs() -> None:
    """The 'Writing an actor' example defines an actor that counts, and runs as shown."""
    text = (DOCS / "ACTORS.md").read_text()
    match = re.search(r"## Writing an actor.*?```python\n(.*?)```", text, re.DOTALL)
    assert match, "docs/ACTORS.md lost its actor example"
    definitions, _, usage = match.group(1).partition("async with open_runtime")
    namespace: dict[str, object] = {}
    exec(compile(definitions, "docs/ACTORS.md", "exec"), namespace)
    body = "async def main(store, env):\n    async with open_runtime" + usage.replace(
        "\n    ", "\n        "
    )
    exec(compile(body, "docs/ACTORS.md", "exec"), namespace)
    store = MemoryStore()
    trio.run(namespace["main"], store, Env.production(seed=1))  # type: ignore[arg-type]
    trio.run(namespace["main"], store, Env.production(seed=1))  # type: ignore[arg-type]

    async def check() -> None:
        async with open_runtime(store, Env.production(seed=1), namespace["Counter"]) as rt:  # type: ignore[arg-type]
            assert await rt.invoke(ActorId("counter", "a"), "get") == 2

    trio.run(check)
