"""Simulator throughput: task steps per second and seeds per minute, for each toy scenario.

Prints figures; asserts nothing about speed (the machines are shared and noisy).

- in-process: runs seeds back to back in this process (what tests and shrinking see);
  steps/s counts scheduled task steps per second of real time;
- sweep: one fresh worker process per seed, as `kelpie sweep` runs them, in parallel
  across every core; seeds/min is what a CI sweep achieves.

Usage: python bench/sim_throughput.py [--seeds N] [--sweep-seeds M] [--jobs J]
"""

from __future__ import annotations

import argparse
import time

import trio

import scenarios
from kelpie.sim import run_scenario
from kelpie.sim._sweep import Job, default_jobs, run_jobs


def in_process(name: str, seeds: int) -> tuple[float, float, float]:
    scenario = scenarios.get(name)
    steps = 0
    started = time.perf_counter()
    for seed in range(seeds):
        steps += run_scenario(scenario, seed).steps
    elapsed = time.perf_counter() - started
    return steps / elapsed, seeds / elapsed * 60, steps / seeds


def swept(name: str, seeds: int, jobs: int) -> float:
    work = [Job(name, seed) for seed in range(seeds)]
    started = time.perf_counter()
    outcomes = trio.run(lambda: run_jobs(work, parallel=jobs, timeout_s=300))
    elapsed = time.perf_counter() - started
    assert len(outcomes) == seeds
    return seeds / elapsed * 60


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=300, help="in-process seeds per scenario")
    parser.add_argument("--sweep-seeds", type=int, default=60, help="swept seeds per scenario")
    parser.add_argument("--jobs", type=int, default=default_jobs())
    args = parser.parse_args()
    names = ["cycle", "race", "race_fixed", "ring"]
    print(
        f"simulator throughput ({args.seeds} in-process seeds, {args.sweep_seeds} swept "
        f"seeds with {args.jobs} jobs, per scenario)"
    )
    header = (
        f"{'scenario':<11} {'steps/run':>10} {'steps/s':>10} "
        f"{'seeds/min in-process':>21} {'seeds/min swept':>16}"
    )
    print(header)
    print("-" * len(header))
    for name in names:
        steps_per_s, runs_per_min, steps_per_run = in_process(name, args.seeds)
        sweep_per_min = swept(name, args.sweep_seeds, args.jobs)
        print(
            f"{name:<11} {steps_per_run:>10,.0f} {steps_per_s:>10,.0f} "
            f"{runs_per_min:>21,.0f} {sweep_per_min:>16,.0f}"
        )


if __name__ == "__main__":
    main()
