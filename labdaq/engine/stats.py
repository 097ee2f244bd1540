"""The engine's own counters for ``/metrics``, carried by its heartbeat row.

The engine is a process of its own and the API serves ``/metrics``; rather than share
files between them (prometheus-client's multiprocess mode, which needs a directory both
agree on and cleaned between starts), the node puts a small snapshot of its counters into
its heartbeat row about once a second (``node_heartbeats.metrics``, labdaq.heartbeat) and
the API turns the newest row of each node into metrics (labdaq.metrics). Counters count
from the engine process's start, as Prometheus counters do (a restart is a reset).
Durable totals (samples stored, missed periods, runs by state) the API reads from the
runs table itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

#: Lateness figures cover at most this many of each loop's latest ticks.
_LATENESS_WINDOW = 1000


class _Group(Protocol):
    name: str
    ticks: int
    lateness_s: list[float]


class EngineStats:
    """Counts what the node sees besides its sink's own counters; :meth:`snapshot` is
    what goes into the heartbeat."""

    def __init__(self) -> None:
        # Instrument name -> times it stopped answering or could not be opened.
        self.instrument_errors: dict[str, int] = {}
        self._ticks_seen: dict[str, int] = {}

    def instrument_error(self, name: str) -> None:
        self.instrument_errors[name] = self.instrument_errors.get(name, 0) + 1

    def snapshot(self, writer: Any, groups: Iterable[_Group]) -> dict[str, Any]:
        """Counters now; loop lateness over the ticks since the last snapshot (wall
        seconds: p99 and max over every loop, 0 when none ticked)."""
        late: list[float] = []
        ticks = 0
        for g in groups:
            ticks += g.ticks
            new = g.ticks - self._ticks_seen.get(g.name, 0)
            self._ticks_seen[g.name] = g.ticks
            if new > 0 and g.lateness_s:
                late += g.lateness_s[-min(new, _LATENESS_WINDOW):]
        arr = np.asarray(late, float)
        return {
            "samples_written": int(writer.rows_written),
            "samples_dropped": int(writer.rows_dropped),
            "writer_backlog_rows": int(getattr(writer, "pending_rows", 0)),
            "journal_rows": int(writer.journal_pending_rows),
            "ticks": ticks,
            "loop_lateness_p99_s": float(np.percentile(arr, 99)) if arr.size else 0.0,
            "loop_lateness_max_s": float(arr.max()) if arr.size else 0.0,
            "instrument_errors": dict(self.instrument_errors),
        }
