"""Named fault sites (FoundationDB's BUGGIFY), as production code sees them.

Code marks a risky point with a named site and takes the rare path when it fires:

    if env.faults.buggify("actor.commit.delay"):
        await trio.sleep(env.rng.uniform(0, 0.5))

Site names are dotted, lower-case and unique (`layer.component.what`), so a
grep finds every site and the simulator's coverage report can name the ones no
scenario reached. In production `NoFaults` answers False, always. The simulator
passes its own `Faults` (kelpie/sim/_faults.py), which enables each site once
per run with p=0.25 and then fires an enabled site with p=0.25, every draw taken
from the run's seed and recorded.
"""

from __future__ import annotations

import re
from typing import Protocol

SITE_NAME = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")


class Faults(Protocol):
    """Decides whether a named fault site fires now."""

    def buggify(self, site: str) -> bool:
        """True when the fault at `site` should be injected at this call."""
        ...


class NoFaults:
    """Production faults: no site ever fires."""

    __slots__ = ()

    def buggify(self, site: str) -> bool:
        return False

    def __repr__(self) -> str:
        return "NoFaults()"


def check_site_name(site: str) -> str:
    """Returns `site` when it is a well-formed site name, else raises ValueError."""
    if not SITE_NAME.match(site):
        raise ValueError(
            f"fault site {site!r} is not a dotted lower-case name such as 'actor.commit.delay'"
        )
    return site
