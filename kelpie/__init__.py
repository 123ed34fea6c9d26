"""Kelpie: an agent runtime whose production code runs inside a deterministic simulator.

The package is layered (DESIGN.md §2); dependencies point downwards only:

    kelpie.core     errors and value types
    kelpie.env      the injectable world: clock, randomness, faults, events
    kelpie.runtime  virtual actors
    kelpie.sim      the simulator (imported only by the CLI and tests)
"""

__version__ = "0.1.0"
