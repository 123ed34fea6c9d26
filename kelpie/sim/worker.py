"""One simulated run in a fresh process: `python -m kelpie.sim.worker --scenario S --seed N`.

Sweeps and the determinism check start one of these per seed, with
`PYTHONHASHSEED=0`, so every run starts from a fresh heap and fresh module state
(DESIGN.md §4, item 6). It prints the run's `RunResult` as one line of JSON and
exits 0 whether the run passed or failed; any other exit means the worker itself
broke. It imports neither click nor rich, to start fast.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kelpie.sim.worker")
    parser.add_argument("--scenario", required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--trace-out", help="write every trace row to this file")
    parser.add_argument("--tail", type=int, default=40, help="trace rows kept for the report")
    args = parser.parse_args(argv)

    import scenarios
    from kelpie.sim import run_scenario

    scenario = scenarios.get(args.scenario)
    if args.trace_out:
        with open(args.trace_out, "w", encoding="utf-8") as sink:
            result = run_scenario(scenario, args.seed, trace_sink=sink, trace_tail_len=args.tail)
    else:
        result = run_scenario(scenario, args.seed, trace_tail_len=args.tail)
    sys.stdout.write(result.to_json() + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
