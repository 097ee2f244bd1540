"""GET /ready: 200 only with a database that answers, a fresh engine heartbeat and every
instrument answering; 503 with the reasons otherwise. The heartbeat rows are written with
labdaq.heartbeat, as the engine writes them (tests/test_supervision.py reads a real
engine's through a running service)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from labdaq.api.app import create_app
from labdaq.config import Settings
from labdaq.heartbeat import Heartbeat
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker


@pytest.fixture
async def ready(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
    app = create_app(Settings(database_url=db_url, ready_heartbeat_max_age_s=10.0))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, db_url


async def _beat(url: str, hb: Heartbeat, state: str = "running", age_s: float = 0.0) -> None:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            await hb.write(s, active_runs=2, state=state)
        if age_s:
            async with session_scope(sessionmaker(engine)) as s:
                await s.execute(update(m.NodeHeartbeat).values(
                    beat_at=datetime.now(UTC) - timedelta(seconds=age_s)))
    finally:
        await engine.dispose()


async def test_not_ready_without_a_heartbeat(ready) -> None:
    c, _ = ready
    r = await c.get("/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["database"] == "ok" and body["engine"] is None
    assert body["reasons"] == ["engine: no acquisition node has reported a heartbeat"]


async def test_ready_with_a_fresh_heartbeat_and_instruments_answering(ready) -> None:
    c, url = ready
    hb = Heartbeat("node-a", pid=4242, instruments={"smu1": "ok", "cabinet1": "ok"})
    await _beat(url, hb)
    r = await c.get("/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ready"] is True and body["reasons"] == []
    assert body["engine"]["node"] == "node-a" and body["engine"]["pid"] == 4242
    assert body["engine"]["active_runs"] == 2 and body["engine"]["state"] == "running"
    assert body["instruments"] == {"smu1": "ok", "cabinet1": "ok"}
    # The next beat overwrites the row (one per node), it does not add one.
    hb.instruments["smu1"] = "lost: ConnectionFailed: refused"
    await _beat(url, hb)
    r = await c.get("/ready")
    assert r.status_code == 503
    assert r.json()["reasons"] == ["instrument smu1: lost: ConnectionFailed: refused"]


async def test_stale_or_stopped_engine_is_not_ready(ready) -> None:
    c, url = ready
    hb = Heartbeat("node-a", instruments={"smu1": "ok"})
    await _beat(url, hb, age_s=60.0)
    r = await c.get("/ready")
    assert r.status_code == 503
    (reason,) = r.json()["reasons"]
    assert reason.startswith("engine: last heartbeat of node node-a was ")
    assert "more than 10 s" in reason
    await _beat(url, hb, state="writer process died")
    r = await c.get("/ready")
    assert r.status_code == 503
    assert r.json()["reasons"] == ["engine: node node-a is writer process died"]


async def test_not_ready_when_the_database_does_not_answer(tmp_path: Path) -> None:
    bad = tmp_path / "labdaq.db"
    bad.write_bytes(b"this is not an SQLite database" * 100)
    app = create_app(Settings(database_url=f"sqlite:///{bad}"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["ready"] is False and body["engine"] is None
    assert body["database"] != "ok" and body["reasons"] == [f"database: {body['database']}"]


async def test_every_node_is_judged_and_the_down_ones_named(ready) -> None:
    """Several nodes (labdaq.nodes): /ready judges each one's heartbeat, not only the
    newest, and lists the nodes that are down."""
    c, url = ready
    await _beat(url, Heartbeat("node-a", pid=1, instruments={"smu1": "ok"}))
    await _beat(url, Heartbeat("node-b", pid=2, instruments={"smu2": "ok"}))
    r = await c.get("/ready")
    assert r.status_code == 200, r.text
    body = r.json()
    assert {n["node"] for n in body["nodes"]} == {"node-a", "node-b"}
    assert body["down_nodes"] == [] and body["instruments"] == {"smu1": "ok", "smu2": "ok"}

    # Node b stops beating; node a goes on (its beat is the newest).
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            await s.execute(update(m.NodeHeartbeat).where(m.NodeHeartbeat.node == "node-b")
                            .values(beat_at=datetime.now(UTC) - timedelta(seconds=60)))
    finally:
        await engine.dispose()
    await _beat(url, Heartbeat("node-a", pid=1, instruments={"smu1": "ok"}))
    r = await c.get("/ready")
    assert r.status_code == 503
    body = r.json()
    assert body["engine"]["node"] == "node-a"
    assert body["down_nodes"] == ["node-b"]
    [reason] = body["reasons"]
    assert reason.startswith("engine: last heartbeat of node node-b was ")
    assert {n["node"]: n["down"] for n in body["nodes"]} == {"node-a": False, "node-b": True}
