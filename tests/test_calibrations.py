"""Calibration records (labdaq.calibrations): admins record certificates through the API,
and the evaluation reports each run's channel as calibrated, expired or missing on the
day the run started, taking a certificate's accuracy as the channel's."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import date, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine as sync_engine
from sqlalchemy.orm import Session

from labdaq import auth
from labdaq.api.app import create_app
from labdaq.benchmarks.rundata import load_run_data
from labdaq.calibrations import status_of_run
from labdaq.channels import upsert_instrument
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

CELL = {"serial": "CAL-CELL", "chemistry": "nmc811", "capacity_ah": 4.9,
        "charge_cutoff_v": 4.2, "discharge_cutoff_v": 2.5, "max_charge_current_a": 4.9,
        "max_discharge_current_a": 9.8}
PROTOCOL = {"charge_current_a": 2.45, "charge_voltage_v": 4.2, "discharge_current_a": 2.45,
            "discharge_cutoff_v": 2.5}
TODAY = date.today()


@pytest.fixture
async def lab(sqlite_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str], int,
                                                      str]]:
    engine = create_engine(sqlite_url)
    tokens: dict[str, str] = {}
    try:
        async with session_scope(sessionmaker(engine)) as s:
            await upsert_instrument(s, "smu1", "keithley2450", "TCPIP::127.0.0.1::1::SOCKET",
                                    [{"index": i, "name": f"smu1/{i}", "max_current_a": 7.35,
                                      "max_voltage_v": 105.0} for i in (1, 2)])
            for role in ("technician", "admin"):
                user = await auth.create_user(s, f"{role}-user", role, actor="seed")
                _, secret = await auth.issue_token(s, user, "t", "seed", None)
                tokens[role] = f"Bearer {secret}"
    finally:
        await engine.dispose()
    app = create_app(Settings(database_url=sqlite_url))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            r = await c.post("/api/v1/runs", headers={"Authorization": tokens["technician"]},
                             json={"channel": "smu1/1", "cell": CELL, "protocol": PROTOCOL})
            assert r.status_code == 201, r.text
            yield c, tokens, r.json()["id"], sqlite_url


def _cert(**over: Any) -> dict[str, Any]:
    return {"instrument": "smu1", "certificate_id": "CAL-2026-001", "lab": "NABL lab",
            "calibrated_on": str(TODAY - timedelta(days=30)),
            "due_on": str(TODAY + timedelta(days=335)),
            "accuracy": {"voltage_rel": 0.001, "current_rel": 0.01, "temperature_c": 2.0},
            **over}


def _status(url: str, run_id: int) -> tuple[str, str, Any]:
    eng = sync_engine(url)
    try:
        with Session(eng) as s:
            run = s.get(m.Run, run_id)
            assert run is not None
            st = status_of_run(s, run)
            data = load_run_data(s, run_id)
            return st.status, st.text, (data.calibration, data.accuracy)
    finally:
        eng.dispose()


async def test_missing_without_records(lab: Any) -> None:
    _, _, run_id, url = lab
    status, text, (reported, accuracy) = _status(url, run_id)
    assert status == "missing" and reported == text and text.startswith("not_evaluable")
    assert accuracy is None


async def test_calibrated_by_a_certificate_in_force(lab: Any) -> None:
    c, tok, run_id, url = lab
    r = await c.post("/api/v1/calibrations", json=_cert(), headers={"Authorization": tok["admin"]})
    assert r.status_code == 201, r.text
    status, text, (reported, accuracy) = _status(url, run_id)
    assert status == "calibrated" and "CAL-2026-001" in text and reported == text
    assert (accuracy.voltage_rel, accuracy.current_rel, accuracy.temperature_c) == (
        0.001, 0.01, 2.0)
    ev = (await c.get(f"/api/v1/runs/{run_id}/evaluation",
                      headers={"Authorization": tok["admin"]})).json()
    assert ev["entries"] and all(e["calibration"] == text for e in ev["entries"]), ev
    listed = (await c.get("/api/v1/calibrations", headers={"Authorization": tok["admin"]}))
    assert [x["certificate_id"] for x in listed.json()] == ["CAL-2026-001"]
    # An RFC 3339 date-time, as the OpenAPI says: with its zone, on SQLite too.
    recorded_at = datetime.fromisoformat(listed.json()[0]["recorded_at"])
    assert recorded_at.utcoffset() == timedelta(0)
    r = await c.get("/api/v1/calibrations", headers={"Authorization": tok["technician"]})
    assert r.status_code == 403


async def test_expired_when_none_is_in_force(lab: Any) -> None:
    c, tok, run_id, url = lab
    h = {"Authorization": tok["admin"]}
    old = _cert(calibrated_on=str(TODAY - timedelta(days=400)),
                due_on=str(TODAY - timedelta(days=35)), certificate_id="CAL-OLD")
    assert (await c.post("/api/v1/calibrations", json=old, headers=h)).status_code == 201
    # Another channel's certificate does not cover smu1/1.
    other = _cert(channel="smu1/2", certificate_id="CAL-CH2")
    assert (await c.post("/api/v1/calibrations", json=other, headers=h)).status_code == 201
    status, text, (reported, accuracy) = _status(url, run_id)
    assert status == "expired" and "CAL-OLD" in text and "was due" in text
    assert reported == text and accuracy is None
    bad = _cert(due_on=str(TODAY - timedelta(days=60)))
    assert (await c.post("/api/v1/calibrations", json=bad, headers=h)).status_code == 422
