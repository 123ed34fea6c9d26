"""Application events: what production code reports about itself.

Code reports notable steps (`env.emit("storage.commit", version=12)`) to the
environment's `EventSink`. In production the sink is a logger at DEBUG level; in
simulation every event becomes a row of the run's trace and so part of its hash,
which is how the determinism check sees application behaviour and not only the
scheduler's. Field values should be small and have a deterministic `repr`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Protocol


class EventSink(Protocol):
    """Receives application events."""

    def emit(self, kind: str, fields: Mapping[str, object]) -> None:
        """Records one event named `kind` with its fields."""
        ...


class LoggingEventSink:
    """Production sink: each event is a DEBUG record on the `kelpie.events` logger."""

    __slots__ = ("_logger",)

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._logger = logger or logging.getLogger("kelpie.events")

    def emit(self, kind: str, fields: Mapping[str, object]) -> None:
        if self._logger.isEnabledFor(logging.DEBUG):
            rendered = " ".join(f"{k}={v!r}" for k, v in sorted(fields.items()))
            self._logger.debug("%s %s", kind, rendered)

    def __repr__(self) -> str:
        return "LoggingEventSink()"
