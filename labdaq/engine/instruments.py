"""The instruments a node has open: driver and the worker thread that keeps its commands
in order (labdaq.drivers.transport.InstrumentWorker)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from labdaq.drivers.errors import InstrumentReportedError


@dataclass
class OpenInstrument:
    row_id: int
    name: str
    driver: Any
    worker: Any  # labdaq.drivers.transport.InstrumentWorker


def answers(driver: Any) -> None:
    """Reconnect and get a reply. An accepted connection alone does not show that the
    instrument is back: a peer may accept and close at once (so may a port server in
    front of a dead instrument)."""
    driver.reconnect()
    try:
        driver.check_errors()
    except InstrumentReportedError:
        pass  # an error entry is a reply: it answers
