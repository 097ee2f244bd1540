"""Read a run's stored samples into numpy columns, the input of every analysis.

One query ordered by ``seq`` on the driver-level path (plain tuples, no ORM objects):
the analysis must be recomputable from the samples alone, and this is how it gets them.
Sync on purpose — an async caller runs it with ``await session.run_sync(...)``.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from labdaq.storage import models as m

__all__ = ["SAMPLE_COLUMNS", "read_samples"]

SAMPLE_COLUMNS = ("seq", "t_s", "step_index", "cycle_index", "voltage_v", "current_a",
                  "temperature_c", "step_capacity_ah", "flags")
_INT = {"seq", "step_index", "cycle_index", "flags"}


def read_samples(conn: Connection | Session, run_id: int,
                 cycles: Collection[int] | None = None) -> dict[str, NDArray[np.generic]]:
    """Every stored sample of ``run_id`` (only those of ``cycles`` if given) as numpy
    columns (``SAMPLE_COLUMNS``), ordered by ``seq``. A missing temperature is NaN."""
    cols = [getattr(m.Sample, c) for c in SAMPLE_COLUMNS]
    stmt = select(*cols).where(m.Sample.run_id == run_id).order_by(m.Sample.seq)
    if cycles is not None:
        stmt = stmt.where(m.Sample.cycle_index.in_(list(cycles)))
    if isinstance(conn, Session):
        # The session's own connection: a Core statement executed through the Session
        # goes through the ORM's row loading, 1.6x the CPU for the same tuples.
        conn = conn.connection()
    rows = conn.execute(stmt).all()
    out: dict[str, NDArray[np.generic]] = {}
    if not rows:
        for c in SAMPLE_COLUMNS:
            out[c] = np.zeros(0, np.int64 if c in _INT else np.float64)
        return out
    # dtype=float turns a NULL temperature (None) into NaN.
    for c, col in zip(SAMPLE_COLUMNS, zip(*rows, strict=True), strict=True):
        out[c] = np.array(col, dtype=np.int64 if c in _INT else np.float64)
    return out
