"""A run's cycle summaries read on a plain DB-API connection (:mod:`labdaq.read_pool`).

``GET /runs/{id}/cycles`` is among the most frequently polled reads (notebooks and
dashboards refresh it while a run acquires). Through the ORM session it was several
round trips to aiosqlite's thread per request plus ORM objects for every row; here it is
one query on a worker thread's kept connection, and the run is looked up only when it has
no cycles (to tell an empty run from a missing one).
"""

from __future__ import annotations

from typing import Any

from labdaq.storage import models as m

#: The cycle summary's columns, as stored (the API shows them under these names).
CYCLE_COLUMNS = tuple(c.name for c in m.Cycle.__table__.columns if c.name not in ("id", "run_id"))


def _mark(style: str) -> str:
    return "?" if style == "qmark" else "$1"


def cycles_on(conn: Any, style: str, run_id: int) -> list[dict[str, Any]] | None:
    """The run's cycles in order, or None if there is no such run."""
    cur = conn.cursor()
    try:
        cur.execute(f"SELECT {', '.join(CYCLE_COLUMNS)} FROM cycles WHERE run_id = "
                    f"{_mark(style)} ORDER BY cycle_index", (run_id,))
        rows = cur.fetchall()
        if not rows:
            cur.execute(f"SELECT id FROM runs WHERE id = {_mark(style)}", (run_id,))
            if cur.fetchone() is None:
                return None
    finally:
        cur.close()
    return [dict(zip(CYCLE_COLUMNS, r, strict=True)) for r in rows]
