"""The acquisition node's heartbeat: one small row per node, overwritten about once a second.

The engine writes it from its scheduler round (so a stalled scheduler or a database it
cannot write shows as a stale beat); ``GET /ready`` reads it. The row carries what
readiness needs and nothing else: when the node last beat, whether it is running or going
down (and why), how many runs it acquires and the state of each of its instruments.
``beat_at`` is the database's clock on PostgreSQL (several nodes on several machines,
labdaq.nodes) and the writer's wall clock in UTC on SQLite (one machine).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.storage import models as m

#: How often a node beats (wall seconds).
HEARTBEAT_PERIOD_S = 1.0
#: Instrument state in a heartbeat that counts as ready.
INSTRUMENT_OK = "ok"


def as_utc(ts: datetime) -> datetime:
    """SQLite hands DateTime(timezone=True) back naive; it was written in UTC."""
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


@dataclass
class Heartbeat:
    """What one node reports; ``write`` upserts it (portable: UPDATE, then INSERT)."""

    node: str
    pid: int = field(default_factory=os.getpid)
    started_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    # Instrument name -> "ok" | "lost: <reason>" | "not connected: <reason>".
    instruments: dict[str, str] = field(default_factory=dict)

    async def write(self, session: AsyncSession, active_runs: int,
                    state: str = "running", metrics: dict[str, Any] | None = None) -> None:
        values: dict[str, Any] = {
            "pid": self.pid, "started_at": self.started_at,
            # PostgreSQL's clock: nodes on several machines are judged on one clock
            # (labdaq.nodes); SQLite is one machine.
            "beat_at": func.now() if session.get_bind().dialect.name == "postgresql"
            else datetime.now(UTC),
            "state": state[:40], "active_runs": active_runs,
            "instruments": dict(self.instruments),
            # The engine's counters for /metrics (labdaq.engine.stats).
            "metrics": dict(metrics or {}),
        }
        res = await session.execute(
            update(m.NodeHeartbeat).where(m.NodeHeartbeat.node == self.node).values(values)
        )
        if getattr(res, "rowcount", 0) == 0:
            session.add(m.NodeHeartbeat(node=self.node, **values))


async def latest(session: AsyncSession) -> list[m.NodeHeartbeat]:
    """Every node's last heartbeat, newest first."""
    rows = (await session.scalars(
        select(m.NodeHeartbeat).order_by(m.NodeHeartbeat.beat_at.desc()))).all()
    return list(rows)


def not_ready_reasons(beat: m.NodeHeartbeat | None, now: datetime,
                      max_age_s: float) -> list[str]:
    """Why the node of ``beat`` is not ready to acquire (empty: it is)."""
    if beat is None:
        return ["engine: no acquisition node has reported a heartbeat"]
    reasons = []
    age_s = (now - as_utc(beat.beat_at)).total_seconds()
    if beat.state != "running":
        reasons.append(f"engine: node {beat.node} is {beat.state}")
    elif age_s > max_age_s:
        reasons.append(f"engine: last heartbeat of node {beat.node} was {age_s:.1f} s ago "
                       f"(more than {max_age_s:g} s)")
    for name, state in sorted((beat.instruments or {}).items()):
        if state != INSTRUMENT_OK:
            reasons.append(f"instrument {name}: {state}")
    return reasons
