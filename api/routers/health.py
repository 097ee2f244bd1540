"""Liveness (/health: the API and its database answer) and readiness (/ready: the whole
service can acquire — database, every node's heartbeat, instruments)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from sqlalchemy import text

import labdaq
from labdaq.api.deps import Session
from labdaq.api.problems import responses
from labdaq.api.schemas import Health
from labdaq.heartbeat import as_utc, latest, not_ready_reasons
from labdaq.nodes import db_now, is_down
from labdaq.storage.db import session_scope

router = APIRouter(tags=["health"])

# A database that does not answer a SELECT within this is not ready (wall seconds).
_DB_TIMEOUT_S = 3.0


@router.get("/health", response_model=Health, responses=responses(503))
async def health(session: Session) -> Health:
    await session.execute(text("SELECT 1"))
    return Health(status="ok", version=labdaq.__version__, database=session.bind.dialect.name)


class EngineStatus(BaseModel):
    node: str
    pid: int
    state: str
    heartbeat_age_s: float = Field(description="wall seconds since the node's last beat")
    active_runs: int


class NodeStatus(EngineStatus):
    down: bool = Field(description="its heartbeat is older than node_down_after_s (database "
                                   "clock) or it stopped: its runs show node_down")


class Ready(BaseModel):
    """Readiness: ``ready`` is true only when ``reasons`` is empty."""

    ready: bool
    reasons: list[str] = Field(description="why the service is not ready; empty when it is")
    database: str = Field(description='"ok" or why the database did not answer')
    engine: EngineStatus | None = Field(
        description="the last heartbeat of the node that beat most recently")
    nodes: list[NodeStatus] = Field(default=[], description="every node's last heartbeat, "
                                    "newest first; each one is judged")
    down_nodes: list[str] = Field(default=[], description="the nodes that are down")
    instruments: dict[str, str] = Field(
        description='instrument name -> "ok" | "lost: <reason>" | "not connected: <reason>", '
                    "of every node")


@router.get("/ready", response_model=Ready,
            responses={503: {"model": Ready, "description": "not ready; `reasons` says why"}})
async def ready(request: Request) -> Any:
    """200 when the database answers, every acquisition node beat recently and every
    instrument they opened answers; 503 with the reasons otherwise."""
    settings = request.app.state.settings
    database = "ok"
    beats: list[Any] = []
    clock: list[datetime] = []

    async def probe() -> None:
        async with session_scope(request.app.state.sessionmaker) as s:
            await s.execute(text("SELECT 1"))
            beats.extend(await latest(s))
            # Beats are on the database's clock on PostgreSQL (labdaq.nodes).
            clock.append(await db_now(s))

    try:
        await asyncio.wait_for(probe(), _DB_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - any failure to read is "not ready", said why
        database = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    now = clock[0] if clock else datetime.now(UTC)
    nodes = [NodeStatus(
        node=b.node, pid=b.pid, state=b.state,
        heartbeat_age_s=round((now - as_utc(b.beat_at)).total_seconds(), 3),
        active_runs=b.active_runs, down=is_down(b, now, settings.node_down_after_s),
    ) for b in beats]
    if database != "ok":
        reasons = [f"database: {database}"]
    elif not beats:
        reasons = not_ready_reasons(None, now, settings.ready_heartbeat_max_age_s)
    else:
        # Every node is judged: one node down is a lab that cannot run all its channels.
        reasons = [r for b in beats
                   for r in not_ready_reasons(b, now, settings.ready_heartbeat_max_age_s)]
    instruments: dict[str, str] = {}
    for b in reversed(beats):  # the newest beat wins a name two nodes report
        instruments.update(b.instruments or {})
    body = Ready(
        ready=not reasons,
        reasons=reasons,
        database=database,
        engine=EngineStatus(**nodes[0].model_dump(exclude={"down"})) if nodes else None,
        nodes=nodes,
        down_nodes=[n.node for n in nodes if n.down],
        instruments=instruments,
    )
    return JSONResponse(body.model_dump(mode="json"), status_code=200 if body.ready else 503)
