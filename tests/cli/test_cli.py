"""The `kelpie` command line, run as users run it: the installed entry point, in fresh processes."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from kelpie.env import TcpNetwork
from kelpie.runtime import ActorId, NodeClient

KELPIE = str(Path(sys.executable).with_name("kelpie"))


def kelpie(
    *args: str, dst_seed: int | None = None, timeout: float = 300, pythonpath: str | None = None
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DST_SEED", "PYTHONHASHSEED")}
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    if dst_seed is not None:
        env["DST_SEED"] = str(dst_seed)
    return subprocess.run(
        [KELPIE, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )


def first_failing_race_seed() -> int:
    import scenarios
    from kelpie.sim import run_scenario

    race = scenarios.get("race")
    return next(s for s in range(200) if not run_scenario(race, s).ok)


def test_sim_passes_a_good_seed() -> None:
    """`kelpie sim` on a passing seed prints PASS with the trace hash and exits 0."""
    done = kelpie("sim", "--scenario", "race_fixed", "--seed", "3")
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"PASS race_fixed seed 3: .* trace [0-9a-f]{32}", done.stdout)


def test_sim_failure_prints_everything_needed_to_reproduce() -> None:
    """A failing run prints seed, scenario, faults, commit, trace tail, check and command."""
    seed = first_failing_race_seed()
    done = kelpie("sim", "--scenario", "race", dst_seed=seed)
    out = done.stdout
    assert done.returncode == 1, out + done.stderr
    assert f"FAIL race seed {seed}: check" in out
    assert "acknowledged appends missing from the sealed journal" in out
    for label in ("seed", "scenario", "faults", "commit", "run"):
        assert re.search(rf"^  {label} +\S", out, re.MULTILINE), label
    assert "trace tail" in out and "journal.sealed" in out
    assert f"reproduce: DST_SEED={seed} kelpie sim --scenario race" in out


def test_reproduce_command_repeats_the_failure_and_its_hash() -> None:
    """The printed reproduce command gives the same failure and trace hash as the original run."""
    import scenarios
    from kelpie.sim import run_scenario

    seed = first_failing_race_seed()
    original = run_scenario(scenarios.get("race"), seed)
    done = kelpie("sim", "--scenario", "race", dst_seed=seed)
    assert f"trace {original.trace_hash}" in done.stdout
    assert original.failure is not None
    assert original.failure.message in done.stdout.replace("\n", "")


def test_sim_without_a_seed_draws_and_prints_one() -> None:
    """Without --seed or DST_SEED, a random seed is used and printed."""
    done = kelpie("sim", "--scenario", "race_fixed")
    assert done.returncode == 0
    assert re.search(r"no --seed or DST_SEED given: using seed \d+", done.stdout)


def test_unknown_scenario_is_a_usage_error() -> None:
    """An unknown scenario exits 2 and lists the known ones."""
    done = kelpie("sim", "--scenario", "nope", "--seed", "1")
    assert done.returncode == 2
    assert "unknown scenario nope" in done.stderr and "race_fixed" in done.stderr


def test_deadlock_scenario_report() -> None:
    """`kelpie sim` reports the planted deadlock with the blocked tasks, without hanging."""
    done = kelpie("sim", "--scenario", "deadlock", "--seed", "0", timeout=60)
    assert done.returncode == 1
    assert "FAIL deadlock seed 0: deadlock" in done.stdout
    assert "left-then-right (node n1) waits in trio _LockImpl.acquire" in done.stdout


def test_a_task_that_never_yields_is_reported_as_a_hang() -> None:
    """The watchdog ends a checkpoint-free loop, in `sim` and in a sweep, naming the line."""
    done = kelpie("sim", "--scenario", "hang", "--seed", "0", "--timeout", "1", timeout=60)
    assert done.returncode == 1
    assert "FAIL hang seed 0: hang" in done.stdout
    assert "scenarios/hang.py" in done.stdout and "while spins >= 0" in done.stdout
    swept = kelpie("sweep", "--scenario", "hang", "--seeds", "3", "--timeout", "1", timeout=60)
    assert swept.returncode == 1
    assert swept.stdout.count(": hang\n") == 3  # the fork server survives each hang
    assert "3 of 3 runs failed" in swept.stdout


def test_check_determinism_passes_and_detects_divergence() -> None:
    """Fresh-process reruns agree for real scenarios and disagree for the planted leak."""
    same = kelpie("sim", "--check-determinism", "--seeds", "3", "--scenario", "ring")
    assert same.returncode == 0, same.stdout + same.stderr
    assert "deterministic: 3 runs of ring" in same.stdout
    leak = kelpie("sim", "--check-determinism", "--seeds", "1", "--scenario", "leak")
    assert leak.returncode == 1
    assert "DIVERGED leak seed 0" in leak.stdout
    assert re.search(r"first divergent trace row: #\d+", leak.stdout)
    assert "run 1 (sweep path):" in leak.stdout and "run 2 (kelpie sim):" in leak.stdout


def test_sweep_summarises_and_lists_failures_with_their_commands() -> None:
    """A sweep that hits the race exits 1 and prints each failure's reproduce command."""
    done = kelpie("sweep", "--seeds", "30", "--scenario", "race", "--scenario", "race_fixed")
    assert done.returncode == 1, done.stdout + done.stderr
    assert "sweep summary" in done.stdout
    assert re.search(r"\d+ of 60 runs failed", done.stdout)
    failures = re.findall(
        r"FAIL (\S+) seed (\d+):.*?trace ([0-9a-f]{32}).*?reproduce: (.+?)\n",
        done.stdout,
        re.DOTALL,
    )
    assert failures and all(name == "race" for name, *_ in failures)
    for name, seed, _trace_hash, command in failures:
        assert command == f"DST_SEED={seed} kelpie sim --scenario {name}"


def test_printed_reproduce_command_repeats_the_failure_and_its_hash() -> None:
    """The command a sweep prints, run through a shell, repeats the failure with the same hash."""
    swept = kelpie("sweep", "--seeds", "40", "--scenario", "race")
    seed, trace_hash, command = re.findall(
        r"FAIL race seed (\d+):.*?trace ([0-9a-f]{32}).*?reproduce: (.+?)\n",
        swept.stdout,
        re.DOTALL,
    )[0]
    env = {k: v for k, v in os.environ.items() if k not in ("DST_SEED", "PYTHONHASHSEED")}
    env["PATH"] = f"{Path(KELPIE).parent}{os.pathsep}{env.get('PATH', '')}"
    again = subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, env=env, timeout=120, check=False
    )
    assert again.returncode == 1
    assert f"FAIL race seed {seed}: check" in again.stdout
    assert f"trace {trace_hash}" in again.stdout


def test_sweep_passes_and_honours_the_budget() -> None:
    """A clean sweep exits 0; a spent budget stops new runs (after the first) and says so."""
    done = kelpie("sweep", "--seeds", "10", "--jobs", "2", "--scenario", "race_fixed")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "all passed" in done.stdout
    spent = kelpie("sweep", "--seeds", "10", "--budget", "0", "--scenario", "race_fixed")
    assert "budget spent" in spent.stdout


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes of sweeping: over the default 900 s
def test_sweep_of_1000_seeds_passes() -> None:
    """Acceptance: `kelpie sweep --seeds 1000` over the toy scenarios passes on this machine."""
    done = kelpie("sweep", "--seeds", "1000", "--jobs", "2", timeout=3000)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    print(done.stdout.split("sweep summary")[-1])


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes of sweeping: over the default 900 s
def test_determinism_holds_on_200_seeds_of_each_scenario() -> None:
    """Acceptance: 200 seeds of every deterministic scenario hash identically in fresh processes."""
    names = [
        arg
        for name in ("actors", "bank", "cluster", "cycle", "race", "race_fixed", "ring", "deadlock")
        for arg in ("--scenario", name)
    ]
    done = kelpie("sim", "--check-determinism", "--seeds", "200", *names, timeout=3000)
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "deterministic: 1600 runs" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes of sweeping: over the default 900 s
def test_determinism_holds_on_40_seeds_of_conversations() -> None:
    """Acceptance: agents talking through the SDKs replay identically in fresh processes."""
    done = kelpie(
        "sim", "--check-determinism", "--seeds", "40", "--scenario", "conversations", timeout=3000
    )
    assert done.returncode == 0, done.stdout[-5000:] + done.stderr[-5000:]
    assert "deterministic: 40 runs of conversations" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes of sweeping: over the default 900 s
def test_sweep_catches_the_cluster_without_its_commit_fence() -> None:
    """Acceptance: a 200-seed sweep of `cluster_unfenced` (fencing switched off) fails."""
    done = kelpie("sweep", "--seeds", "200", "--scenario", "cluster_unfenced", timeout=3000)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "single activation violated" in done.stdout
    assert "reproduce: DST_SEED=" in done.stdout


@pytest.mark.slow
@pytest.mark.timeout(3000)  # minutes of sweeping: over the default 900 s
def test_sweep_finds_the_planted_race_within_200_seeds() -> None:
    """Acceptance: a 200-seed sweep of the planted race fails, with reproduce commands."""
    done = kelpie("sweep", "--seeds", "200", "--scenario", "race", timeout=3000)
    assert done.returncode == 1
    seeds = re.findall(r"reproduce: DST_SEED=(\d+) kelpie sim --scenario race", done.stdout)
    assert seeds
    again = kelpie("sim", "--scenario", "race", dst_seed=int(seeds[0]))
    assert again.returncode == 1


NOISY_SCENARIO = """
import trio
from kelpie.sim import Scenario, SimContext, Workload


class Noisy(Workload):
    async def run(self, ctx: SimContext) -> None:
        for index in range(400):
            print("a line of output that is not part of any protocol", index)
            await trio.lowlevel.checkpoint()


NOISY = Scenario(name="noisy", summary="prints a lot", workload=Noisy)
"""


def test_scenarios_from_other_modules_may_print(tmp_path: Path) -> None:
    """`module:NAME` scenarios run in sim and sweep; their output never breaks a sweep."""
    (tmp_path / "kelpie_noisy_probe.py").write_text(NOISY_SCENARIO)
    spec = "kelpie_noisy_probe:NOISY"
    single = kelpie("sim", "--scenario", spec, "--seed", "1", pythonpath=str(tmp_path))
    assert single.returncode == 0, single.stdout + single.stderr
    swept = kelpie("sweep", "--scenario", spec, "--seeds", "6", pythonpath=str(tmp_path))
    assert swept.returncode == 0, swept.stdout[-3000:] + swept.stderr[-3000:]
    assert "all passed" in swept.stdout
    missing = kelpie("sim", "--scenario", "kelpie_no_such_module:X", "--seed", "1")
    assert missing.returncode == 2 and "cannot load scenario" in missing.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--actor", "no_such_module:X"], "cannot load 'no_such_module:X'"),
        (["--actor", "json"], "is not module:attribute"),
        (["--actor", "json:decoder", "--listen", "localhost"], "is not callable"),
        (["--actor", "json:loads", "--listen", "localhost"], "is not host:port"),
        (["--actor", "json:loads", "--store", "redis://x"], "unknown storage"),
    ],
)
def test_node_refuses_bad_options_with_a_clear_message(args: list[str], message: str) -> None:
    options = {"--store": "memory", **dict(zip(args[::2], args[1::2], strict=True))}
    done = kelpie("node", *[part for item in options.items() for part in item], timeout=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr


def test_node_serves_until_sigterm_then_drains(tmp_path: Path) -> None:
    """`kelpie node` prints where it serves, answers a client, and exits 0 on SIGTERM."""
    actor_module = tmp_path / "echo_actor.py"
    actor_module.write_text(
        "from kelpie.runtime import Actor\n"
        "class Echo(Actor):\n"
        "    def __init__(self, actor_id):\n"
        "        pass\n"
        "    async def handle(self, ctx, message):\n"
        "        return [ctx.env.node, message]\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    store = f"sqlite:{tmp_path / 'db'}"
    args = [KELPIE, "node", "--store", store, "--actor", "echo_actor:Echo", "--name", "solo"]
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["node"] == "solo" and ready["epoch"] == 1

        async def ask() -> Any:
            network = TcpNetwork()
            try:
                client = NodeClient(network, [ready["address"]])
                return await client.invoke(ActorId("echo", "e1"), {"hi": 1})
            finally:
                await network.aclose()

        assert trio.run(ask) == ["solo", {"hi": 1}]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
