"""A locked or unreachable database gives 503 problem+json with Retry-After, never 500."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import update

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.channels import upsert_instrument
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.test_api import CELL, PROTOCOL, auth


@pytest.fixture
async def sqlite_app(sqlite_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, str, Path]]:
    url = sqlite_url
    path = Path(url.removeprefix("sqlite:///"))
    engine = create_engine(url)
    async with session_scope(sessionmaker(engine)) as s:
        await upsert_instrument(
            s, "smu1", "keithley2450", "TCPIP::127.0.0.1::1::SOCKET",
            [{"index": 1, "name": "smu1/1", "max_current_a": 7.35, "max_voltage_v": 105.0}],
        )
        token = await create_token(s, "tech", "technician")
    await engine.dispose()
    # A short wait for the lock keeps the test quick; the outcome does not depend on it.
    app = create_app(Settings(database_url=url, api_db_busy_timeout_s=0.2, api_retry_after_s=3))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, token, path


async def test_pause_while_sqlite_is_locked_is_503_then_succeeds(sqlite_app) -> None:
    c, token, path = sqlite_app
    h = auth(token)
    r = await c.post("/api/v1/runs", json={"channel": "smu1/1", "cell": CELL,
                                           "protocol": PROTOCOL}, headers=h)
    assert r.status_code == 201, r.text
    run_id = r.json()["id"]
    # The engine would have started it; pause needs a running run.
    engine = create_engine(f"sqlite:///{path}")
    async with session_scope(sessionmaker(engine)) as s:
        await s.execute(update(m.Run).where(m.Run.id == run_id).values(state="running"))
    await engine.dispose()

    lock = sqlite3.connect(path, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        locked = await c.post(f"/api/v1/runs/{run_id}/pause", headers=h)
        assert locked.status_code == 503, locked.text
        assert locked.headers["content-type"] == "application/problem+json"
        assert locked.headers["retry-after"] == "3"
        assert locked.json()["status"] == 503
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    retried = await c.post(f"/api/v1/runs/{run_id}/pause", headers=h)
    assert retried.status_code == 200, retried.text
    assert retried.json()["requested_action"] == "pause"
    # The refused attempt left nothing behind: one pause request in the audit trail.
    events = (await c.get(f"/api/v1/runs/{run_id}/events", headers=h)).json()
    assert [e["message"] for e in events].count("pause requested") == 1


async def test_unreachable_postgresql_is_503() -> None:
    # Port 1 on localhost: nothing listens, the connection is refused at once.
    app = create_app(Settings(database_url="postgresql://postgres@127.0.0.1:1/none"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            for path in ("/health", "/api/v1/runs"):
                r = await c.get(path, headers=auth("ldq_x"))
                assert r.status_code == 503, (path, r.text)
                assert r.headers["content-type"] == "application/problem+json"
                assert "retry-after" in r.headers


async def test_unmigrated_database_is_503_saying_what_to_run(tmp_path: Path) -> None:
    app = create_app(Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}"))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/api/v1/runs", headers=auth("ldq_x"))
    assert r.status_code == 503, r.text
    assert "labdaq db upgrade" in r.json()["detail"]
