"""The role matrix: every mutating endpoint in the OpenAPI document refuses no token (401),
a revoked or expired token (401) and a role it does not admit (403) without writing
anything to the audit log, and accepts the role it admits, writing an audit record that
names the user and their role.

Endpoints are enumerated from ``/openapi.json`` (their admitted roles are the security
requirement's role list), so a route added later is in the matrix at once; a valid call
for it is one entry in ``CALLS`` below, and the test fails naming any route without one.
In-process (httpx over ASGI), no engine.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq import auth
from labdaq.api.app import create_app
from labdaq.channels import upsert_instrument
from labdaq.config import Settings
from labdaq.imports.store import import_file
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

ROLES = ("technician", "engineer", "admin")
MUTATING = ("post", "put", "patch", "delete")
CELL = {
    "serial": "RM-001", "chemistry": "nmc811", "capacity_ah": 4.9, "charge_cutoff_v": 4.2,
    "discharge_cutoff_v": 2.5, "max_charge_current_a": 4.9, "max_discharge_current_a": 9.8,
}
PROTOCOL = {
    "charge_current_a": 2.45, "charge_voltage_v": 4.2, "discharge_current_a": 2.45,
    "discharge_cutoff_v": 2.5,
}


@dataclass
class Lab:
    """What the calls act on, made fresh for each test."""

    tokens: dict[str, str] = field(default_factory=dict)  # role -> secret (user <role>-user)
    bad: dict[str, str] = field(default_factory=dict)  # "revoked"/"expired" -> admin secret
    runs: dict[str, int] = field(default_factory=dict)  # queued / running / paused
    cell_id: int = 0
    user_id: int = 0
    spare_token_id: int = 0
    safety_event_id: int = 0
    import_id: int = 0
    subscription_id: int = 0


@dataclass(frozen=True)
class Upload:
    """A multipart/form-data body: files and form fields."""

    files: dict[str, tuple[str, bytes]]
    data: dict[str, str] = field(default_factory=dict)


# A minimal Battery Data Format file for POST /api/v1/imports.
BDF_FILE = (b"Test Time / s,Voltage / V,Current / A\n0,3.6,0\n10,3.7,1.0\n20,3.8,1.0\n"
            b"30,3.7,-1.0\n")

Call = tuple[str, dict[str, Any] | Upload | None]  # URL, JSON body (or multipart)
CALLS: dict[tuple[str, str], Callable[[Lab], Call]] = {
    ("post", "/api/v1/runs"): lambda lab: (
        "/api/v1/runs", {"channel": "smu1/1", "cell": CELL, "protocol": PROTOCOL}),
    ("post", "/api/v1/runs/{run_id}/stop"): lambda lab: (
        f"/api/v1/runs/{lab.runs['queued']}/stop", None),
    ("post", "/api/v1/runs/{run_id}/pause"): lambda lab: (
        f"/api/v1/runs/{lab.runs['running']}/pause", None),
    ("post", "/api/v1/runs/{run_id}/resume"): lambda lab: (
        f"/api/v1/runs/{lab.runs['paused']}/resume", None),
    ("put", "/api/v1/instruments"): lambda lab: ("/api/v1/instruments", {
        "name": "cab1", "driver": "cabinet", "resource": "TCPIP::127.0.0.1::5025::SOCKET",
        "channels": [{"index": 1}]}),
    ("post", "/api/v1/cells"): lambda lab: (
        "/api/v1/cells", {"serial": "RM-NEW", "spec": "lfp"}),
    ("patch", "/api/v1/cells/{cell_id}"): lambda lab: (
        f"/api/v1/cells/{lab.cell_id}", {"lot": "L-2"}),
    ("post", "/api/v1/runs/{run_id}/evaluation"): lambda lab: (
        f"/api/v1/runs/{lab.runs['queued']}/evaluation", {"rule": "simple"}),
    ("post", "/api/v1/runs/{run_id}/observations"): lambda lab: (
        f"/api/v1/runs/{lab.runs['queued']}/observations",
        {"values": {"no_fire_explosion_leakage": True}}),
    ("post", "/api/v1/users"): lambda lab: ("/api/v1/users", {"name": "bob", "role": "engineer"}),
    ("patch", "/api/v1/users/{user_id}"): lambda lab: (
        f"/api/v1/users/{lab.user_id}", {"role": "engineer", "reason": "moved team"}),
    ("post", "/api/v1/tokens"): lambda lab: (
        "/api/v1/tokens", {"user": "technician-user", "name": "laptop", "expires_in_days": 30}),
    ("post", "/api/v1/tokens/{token_id}/revoke"): lambda lab: (
        f"/api/v1/tokens/{lab.spare_token_id}/revoke", {"reason": "lost laptop"}),
    # The run queue's routes (when merged): move a waiting run, confirm a run's cell.
    ("patch", "/api/v1/runs/{run_id}"): lambda lab: (
        f"/api/v1/runs/{lab.runs['waiting']}", {"queue_position": 1}),
    ("post", "/api/v1/runs/{run_id}/confirm-cell"): lambda lab: (
        f"/api/v1/runs/{lab.runs['awaiting_cell']}/confirm-cell", None),
    # Another lab's file imported as a read-only run; a calibration certificate.
    ("post", "/api/v1/imports"): lambda lab: (
        "/api/v1/imports", Upload({"file": ("cell.bdf.csv", BDF_FILE)})),
    ("patch", "/api/v1/imports/{import_id}"): lambda lab: (
        f"/api/v1/imports/{lab.import_id}", {"template": "basic_cycle"}),
    ("post", "/api/v1/calibrations"): lambda lab: ("/api/v1/calibrations", {
        "instrument": "smu1", "channel": "smu1/1", "certificate_id": "CAL-1",
        "lab": "NABL lab", "calibrated_on": "2026-01-05", "due_on": "2027-01-05",
        "accuracy": {"voltage_rel": 0.001, "current_rel": 0.01, "temperature_c": 2.0}}),
    # A run's alert subscriptions (labdaq.run_alerts).
    ("post", "/api/v1/runs/{run_id}/subscriptions"): lambda lab: (
        f"/api/v1/runs/{lab.runs['queued']}/subscriptions",
        {"email": "owner@lab.example", "kinds": ["aborted_safety"]}),
    ("delete", "/api/v1/runs/{run_id}/subscriptions/{subscription_id}"): lambda lab: (
        f"/api/v1/runs/{lab.runs['running']}/subscriptions/{lab.subscription_id}", None),
    # The dashboard's alarm acknowledgement (when merged).
    ("post", "/api/v1/alarms/{event_id}/ack"): lambda lab: (
        f"/api/v1/alarms/{lab.safety_event_id}/ack", None),
}


async def _seed(url: str) -> Lab:
    lab = Lab()
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            await upsert_instrument(
                s, "smu1", "keithley2450", "TCPIP::127.0.0.1::1::SOCKET",
                [{"index": i, "name": f"smu1/{i}", "max_current_a": 7.35,
                  "max_voltage_v": 105.0} for i in range(1, 8)],
            )
            for role in ROLES:
                user = await auth.create_user(s, f"{role}-user", role, actor="seed")
                _, lab.tokens[role] = await auth.issue_token(s, user, "t", "seed", None)
            admin = await auth.get_user(s, "admin-user")
            row, lab.bad["revoked"] = await auth.issue_token(s, admin, "old", "seed", None)
            await auth.revoke_token(s, row.id, actor="seed")
            row, lab.bad["expired"] = await auth.issue_token(
                s, admin, "short", "seed", timedelta(days=1))
            row.expires_at = m.utcnow() - timedelta(seconds=1)
            spare, _ = await auth.issue_token(s, admin, "spare", "seed", None)
            lab.spare_token_id = spare.id
            lab.user_id = (await auth.create_user(s, "carol", "technician", actor="seed")).id
            # An import for PATCH /api/v1/imports/{id} (another file than POST's).
            with tempfile.TemporaryDirectory() as tmp:
                seeded = Path(tmp) / "seeded.bdf.csv"
                seeded.write_bytes(BDF_FILE + b"40,3.6,0\n")
                lab.import_id = (await s.run_sync(
                    lambda ss: import_file(ss, seeded, actor="seed"))).import_id
    finally:
        await engine.dispose()
    return lab


# Runs the calls act on, each on its own channel, and the state each is put in. Made
# through the API (whatever the run service's signature becomes); "awaiting_cell" only
# where the run queue exists.
RUN_STATES = ("queued", "running", "paused", "waiting", "awaiting_cell")


async def _runs(c: httpx.AsyncClient, lab: Lab, engine: AsyncEngine) -> None:
    states = [s for s in RUN_STATES if s != "awaiting_cell" or s in m.RunState.__members__]
    for i, state in enumerate(states, start=2):
        r = await c.post("/api/v1/runs", headers=_h(lab.tokens["technician"]), json={
            "channel": f"smu1/{i}", "protocol": PROTOCOL,
            "cell": {**CELL, "serial": f"RM-{i}"}})
        assert r.status_code == 201, r.text
        lab.runs[state] = r.json()["id"]
        lab.cell_id = r.json()["cell_id"]
    async with session_scope(sessionmaker(engine)) as s:
        for state, run_id in lab.runs.items():
            run = await s.get(m.Run, run_id)
            assert run is not None
            run.state = "queued" if state == "waiting" else state
        alarm = m.Event(run_id=lab.runs["running"], kind="safety", severity="error",
                        message="voltage above limit")
        s.add(alarm)
        sub = m.RunSubscription(run_id=lab.runs["running"], channel="webhook",
                                target="http://127.0.0.1:9/hook", kinds=["completed"],
                                created_by="seed")
        s.add(sub)
        await s.flush()
        lab.safety_event_id = alarm.id
        lab.subscription_id = sub.id


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, Lab, AsyncEngine]]:
    lab = await _seed(db_url)
    app = create_app(Settings(database_url=db_url))
    engine = create_engine(db_url)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await _runs(c, lab, engine)
            yield c, lab, engine
    await engine.dispose()


async def _audit(engine: AsyncEngine) -> tuple[int, m.AuditRecord | None]:
    async with session_scope(sessionmaker(engine)) as s:
        n = await s.scalar(select(func.count()).select_from(m.AuditRecord))
        last = await s.scalar(select(m.AuditRecord).order_by(m.AuditRecord.seq.desc()))
        return int(n or 0), last


def _h(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _send(c: httpx.AsyncClient, method: str, call: Call,
                headers: dict[str, str]) -> httpx.Response:
    url, body = call
    if isinstance(body, Upload):
        return await c.request(method.upper(), url, files=body.files, data=body.data,
                               headers=headers)
    return await c.request(method.upper(), url, json=body, headers=headers)


def _admitted(op: dict[str, Any]) -> list[str]:
    reqs = op.get("security") or []
    return sorted({role for req in reqs for roles in req.values() for role in roles})


async def test_every_mutating_endpoint_follows_the_role_matrix(api) -> None:
    c, lab, url = api
    doc = (await c.get("/openapi.json")).json()
    ops = [(meth, path, op) for path, item in doc["paths"].items()
           for meth, op in item.items() if meth in MUTATING]
    assert len(ops) >= 13, ops  # runs, cells, instruments, evaluations, users, tokens
    missing = [f"{meth.upper()} {path}" for meth, path, _ in ops if (meth, path) not in CALLS]
    assert not missing, f"add a valid call to CALLS in {__file__} for: {missing}"
    checked: list[str] = []
    for meth, path, op in ops:
        name = f"{meth.upper()} {path}"
        admitted = _admitted(op)
        assert admitted, f"{name} changes something but admits any caller"
        call = CALLS[(meth, path)](lab)
        before, _ = await _audit(url)

        r = await _send(c, meth, call, {})
        assert r.status_code == 401, (name, r.text)
        assert r.headers["content-type"] == "application/problem+json"
        for why, secret in lab.bad.items():  # admin tokens: admitted everywhere but for this
            r = await _send(c, meth, call, _h(secret))
            assert r.status_code == 401, (name, why, r.text)
            assert why in r.json()["detail"], (name, r.json())
            assert r.headers["content-type"] == "application/problem+json"
        for role in ROLES:
            if role not in admitted:
                r = await _send(c, meth, call, _h(lab.tokens[role]))
                assert r.status_code == 403, (name, role, r.text)
                assert r.headers["content-type"] == "application/problem+json"
        assert (await _audit(url))[0] == before, f"{name}: a refused call left an audit record"

        role = next(r for r in ROLES if r in admitted)  # the least privileged admitted
        r = await _send(c, meth, call, _h(lab.tokens[role]))
        assert 200 <= r.status_code < 300, (name, role, r.status_code, r.text)
        after, last = await _audit(url)
        assert after > before and last is not None, f"{name} wrote no audit record"
        assert (last.actor, last.role) == (f"{role}-user", role), (name, last.actor, last.role)
        assert last.data.get("token_id") is not None, (name, last.data)
        if path.endswith("/pause"):  # a run command records the run's change
            assert (last.before, last.after) == (
                {"requested_action": None}, {"requested_action": "pause"}), last
        if (meth, path) == ("post", "/api/v1/runs"):  # nothing before, the new run after
            assert last.before is None and last.after is not None, last
            assert last.after["run_id"] == r.json()["id"], (last.after, r.json())
            assert last.after["state"] == "queued" and last.after["channel"] == "smu1/1"
            assert last.after["protocol_hash"].startswith("sha256:"), last.after
        if path.endswith("/ack"):  # the alarm unacknowledged before, acknowledged after
            assert last.before == {"alarm_id": lab.safety_event_id, "acknowledged": False,
                                   "alarm": last.before["alarm"]}, last.before
            assert last.after == {"alarm_id": lab.safety_event_id, "acknowledged": True,
                                  "note": None}, last.after
        checked.append(name)
    assert len(checked) == len(ops)


async def test_token_lifecycle_through_the_api(api) -> None:
    """Issued once with its secret, listed without it, refused once revoked or expired."""
    c, lab, _ = api
    admin = _h(lab.tokens["admin"])
    r = await c.post("/api/v1/tokens", json={"user": "engineer-user", "name": "nb"},
                     headers=admin)
    assert r.status_code == 201, r.text
    issued = r.json()
    assert issued["token"].startswith("ldq_") and issued["role"] == "engineer"
    assert issued["state"] == "active" and issued["expires_at"] is not None
    assert (await c.get("/api/v1/channels", headers=_h(issued["token"]))).status_code == 200
    listed = (await c.get("/api/v1/tokens", headers=admin)).json()
    assert issued["token"] not in str(listed)
    assert {t["state"] for t in listed} == {"active", "revoked", "expired"}
    assert all("token" not in t and "token_sha256" not in t for t in listed)
    active = (await c.get("/api/v1/tokens?active=true", headers=admin)).json()
    assert {t["state"] for t in active} == {"active"}
    r = await c.post(f"/api/v1/tokens/{issued['id']}/revoke", headers=admin)
    assert r.json()["state"] == "revoked"
    r = await c.get("/api/v1/channels", headers=_h(issued["token"]))
    assert r.status_code == 401 and "revoked" in r.json()["detail"]
    # A disabled user's tokens are refused too; enabling them again restores them.
    eng = await c.get("/api/v1/users", headers=admin)
    (eng_user,) = [u for u in eng.json() if u["name"] == "engineer-user"]
    # 0 and 1 are numbers, not booleans (schemathesis's deep run had 0 accepted).
    for number in (0, 1):
        r = await c.patch(f"/api/v1/users/{eng_user['id']}", json={"disabled": number},
                          headers=admin)
        assert r.status_code == 422 and "disabled" in r.text, r.text
    r = await c.patch(f"/api/v1/users/{eng_user['id']}", json={"disabled": True}, headers=admin)
    assert r.json()["disabled_at"] is not None
    r = await c.get("/api/v1/channels", headers=_h(lab.tokens["engineer"]))
    assert r.status_code == 401 and "disabled" in r.json()["detail"]
    await c.patch(f"/api/v1/users/{eng_user['id']}", json={"disabled": False}, headers=admin)
    assert (await c.get("/api/v1/channels", headers=_h(lab.tokens["engineer"]))).status_code == 200
    # The last active admin cannot lock everyone out of user management.
    (adm,) = [u for u in eng.json() if u["name"] == "admin-user"]
    for change in ({"disabled": True}, {"role": "engineer"}):
        r = await c.patch(f"/api/v1/users/{adm['id']}", json=change, headers=admin)
        assert r.status_code == 409 and "last active admin" in r.json()["detail"], r.text
    # Everything above is in the audit trail, readable by engineers, chained.
    trail = (await c.get("/api/v1/audit?limit=1000", headers=_h(lab.tokens["engineer"]))).json()
    actions = [t["action"] for t in trail]
    assert any("issued to 'engineer-user'" in a for a in actions), actions
    assert any(a.startswith(f"token {issued['id']} ") and "revoked" in a for a in actions)
    assert [t["prev_sha256"] for t in trail[1:]] == [t["sha256"] for t in trail[:-1]]
    head = (await c.get("/api/v1/audit/head", headers=admin)).json()
    assert head["seq"] == trail[-1]["seq"] and head["sha256"] == trail[-1]["sha256"]
    r = await c.get("/api/v1/audit", headers=_h(lab.tokens["technician"]))
    assert r.status_code == 403
