"""Stored and lost sample periods of a trial, counted in its database
(docs/architecture.md, Definitions): inside the measured window, with where the losses
come from, and over every run's whole life after the runs ended.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Sample periods with no stored row, per run: the due samples (edge samples, flag 8, taken
# right after a set point changes, are extra) between its first and last one in a time
# range should be one per period. Counting rather than looking at single gaps keeps a late
# sample followed by an early one (jitter) from counting as a loss; a gap of two periods
# with no catch-up is one lost sample. Its blind spot: a row stored off the grid without
# the edge flag (the tick a phase ends or a limit breaches) is counted as due, so it can
# hide one missed period of the same run (docs/performance.md, 10 Hz).
_COUNT_SQL = (
    "SELECT run_id, COUNT(*), MIN(t_s), MAX(t_s) FROM samples "
    "WHERE run_id BETWEEN :lo AND :hi AND (flags & 8) = 0 AND ts_utc BETWEEN :w0 AND :w1 "
    "GROUP BY run_id"
)


def _lost(rows: list[tuple[int, int, float, float]], period: float) -> int:
    return sum(max(0, round((t1 - t0) / period) - (n - 1)) for _, n, t0, t1 in rows)


# Gaps that lost a period: at least 1.5 periods, and not a late sample that the next one
# makes up for (the two gaps together span at least 2.5 periods).
_GAPS_SQL = """
WITH g AS (
  SELECT run_id, ts_utc, t_s - LAG(t_s) OVER w AS gap, LEAD(t_s) OVER w - t_s AS next_gap
  FROM samples WHERE run_id BETWEEN :lo AND :hi AND (flags & 8) = 0
  WINDOW w AS (PARTITION BY run_id ORDER BY seq)
)
SELECT c.instrument_id, g.ts_utc FROM g JOIN runs r ON r.id = g.run_id
JOIN channels c ON c.id = r.channel_id
WHERE g.gap >= 1.5 * :p AND (g.next_gap IS NULL OR g.gap + g.next_gap >= 2.5 * :p)
  AND g.ts_utc BETWEEN :w0 AND :w1
"""
# Phase changes (edge samples after the first of a run) and active runs, per cabinet.
_EDGES_SQL = """
SELECT c.instrument_id, s.ts_utc FROM samples s JOIN runs r ON r.id = s.run_id
JOIN channels c ON c.id = r.channel_id
WHERE s.run_id BETWEEN :lo AND :hi AND (s.flags & 8) != 0 AND s.seq > 1
  AND s.ts_utc BETWEEN :w0 - 3 * :p AND :w1
"""
_ACTIVE_SQL = """
SELECT c.instrument_id, COUNT(DISTINCT s.run_id) FROM samples s JOIN runs r ON r.id = s.run_id
JOIN channels c ON c.id = r.channel_id
WHERE s.run_id BETWEEN :lo AND :hi AND s.ts_utc BETWEEN :w0 AND :w1 GROUP BY c.instrument_id
"""


def window_losses(db_path: Path, lo: int, hi: int, period: float, w0: float, w1: float
                  ) -> dict[str, int]:
    """Due rows measured in [w0, w1] and sample periods lost in it, plus where the losses
    come from: ``cabinet_wide`` counts ticks that at least half of a cabinet's runs missed
    together (the loop or the instrument stalled for a period or more;
    ``cabinet_wide_at_phase_change`` when a set point changed on that cabinet just
    before); ``partial`` counts gaps of runs missing a period that most runs of their
    cabinet did not miss (runs whose due time sits within a few ms of the tick time lose
    a sample on small lateness or jitter). The scans run inside SQLite, which releases the
    GIL the engine in this process needs."""
    args = {"lo": lo, "hi": hi, "p": period, "w0": w0, "w1": w1}
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        rows = con.execute(_COUNT_SQL, args).fetchall()
        gaps = con.execute(_GAPS_SQL, args).fetchall()
        edges = con.execute(_EDGES_SQL, args).fetchall()
        active = dict(con.execute(_ACTIVE_SQL, args).fetchall())
    finally:
        con.close()
    wide = at_change = partial = 0
    for inst in {i for i, _ in gaps}:
        ts = sorted(t for i, t in gaps if i == inst)
        changes = [t for i, t in edges if i == inst]
        clusters: list[list[float]] = []
        for t in ts:
            if clusters and t - clusters[-1][-1] <= period / 2:
                clusters[-1].append(t)
            else:
                clusters.append([t])
        for c in clusters:
            if len(c) >= 0.5 * active.get(inst, 1):
                wide += 1
                at_change += any(c[0] - 3 * period <= e <= c[-1] for e in changes)
            else:
                partial += len(c)
    return {"rows": sum(r[1] for r in rows), "lost": _lost(rows, period),
            "cabinet_wide": wide, "cabinet_wide_at_phase_change": at_change,
            "partial": partial, "phase_changes": len(edges)}


def final_check(db_path: Path, lo: int, hi: int, period: float, breach_ids: set[int],
                ends: list[float]) -> dict[str, Any]:
    """Whole-life check of a session's runs after they ended: sample periods lost from
    each run's start up to each of ``ends``, seq holes against the engine's own last_seq,
    end states."""
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        lost = [_lost(con.execute(_COUNT_SQL, {"lo": lo, "hi": hi, "w0": 0.0, "w1": w1}
                                  ).fetchall(), period) for w1 in ends]
        per_run = con.execute(
            "SELECT r.id, r.state, r.last_seq, r.ended_at, r.end_reason, "
            "COUNT(s.seq), MIN(s.seq), MAX(s.seq) FROM runs r "
            "LEFT JOIN samples s ON s.run_id = r.id WHERE r.id BETWEEN ? AND ? "
            "GROUP BY r.id", (lo, hi)).fetchall()
        safety = con.execute(
            "SELECT COUNT(*) FROM events WHERE kind = 'safety' AND run_id BETWEEN ? AND ?",
            (lo, hi)).fetchone()[0]
    finally:
        con.close()
    holes = 0
    bad: list[tuple[float, str]] = []  # (when, why) for runs that did not end as asked
    untripped = 0
    rows = 0
    for rid, state, last_seq, ended_at, reason, n, smin, smax in per_run:
        rows += int(n)
        # Rows the engine numbered (its own last_seq) that the database does not hold.
        h = max(int(last_seq or 0), int(smax or 0)) - int(n)
        if n and int(smin) != 1:
            h = max(h, 1)
        holes += h
        if rid in breach_ids and state == "stopped":
            untripped += 1  # stopped before its planned breach: a plan miss, not a loss
        elif state != ("aborted_safety" if rid in breach_ids else "stopped"):
            when = (datetime.fromisoformat(ended_at).replace(tzinfo=UTC).timestamp()
                    if ended_at else 0.0)
            bad.append((when, f"run {rid} ended {state}: {reason}"))
    return {"lost": lost, "holes": holes, "bad": bad, "untripped": untripped,
            "safety_events": int(safety), "rows": rows}


