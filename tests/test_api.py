"""API behaviour in-process (no instruments): auth, validation errors, 404, 409."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.channels import upsert_instrument
from labdaq.config import Settings
from labdaq.storage.db import create_engine, session_scope, sessionmaker

CELL = {
    "serial": "T-001",
    "chemistry": "nmc811",
    "capacity_ah": 4.9,
    "charge_cutoff_v": 4.2,
    "discharge_cutoff_v": 2.5,
    "max_charge_current_a": 4.9,
    "max_discharge_current_a": 9.8,
}
PROTOCOL = {
    "charge_current_a": 2.45,
    "charge_voltage_v": 4.2,
    "discharge_current_a": 2.45,
    "discharge_cutoff_v": 2.5,
}


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    engine = create_engine(db_url)
    async with session_scope(sessionmaker(engine)) as s:
        await upsert_instrument(
            s,
            "smu1",
            "keithley2450",
            "TCPIP::127.0.0.1::1::SOCKET",
            [{"index": 1, "name": "smu1/1", "max_current_a": 7.35, "max_voltage_v": 105.0}],
        )
        tokens = {
            role: await create_token(s, f"t-{role}", role)
            for role in ("technician", "engineer", "admin")
        }
    await engine.dispose()
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, tokens


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_health_needs_no_token(client) -> None:
    c, _ = client
    r = await c.get("/health")
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


async def test_tokens_and_roles(client) -> None:
    c, tokens = client
    assert (await c.get("/api/v1/channels")).status_code == 401
    bad = await c.get("/api/v1/channels", headers=auth("ldq_nope"))
    assert bad.status_code == 401
    ok = await c.get("/api/v1/channels", headers=auth(tokens["engineer"]))
    assert ok.status_code == 200
    assert ok.json()[0]["name"] == "smu1/1" and ok.json()[0]["state"] == "idle"
    body = {"channel": "smu1/1", "cell": CELL, "protocol": PROTOCOL}
    # An engineer reads but may not operate runs.
    r = await c.post("/api/v1/runs", json=body, headers=auth(tokens["engineer"]))
    assert r.status_code == 403


async def test_create_run_then_busy_channel_is_409(client) -> None:
    c, tokens = client
    h = auth(tokens["technician"])
    body = {"channel": "smu1/1", "cell": CELL, "protocol": PROTOCOL}
    r = await c.post("/api/v1/runs", json=body, headers=h)
    assert r.status_code == 201, r.text
    run = r.json()
    # loop_start, cccv, rest, cc, rest, loop_end
    assert run["state"] == "queued" and run["step_count"] == 6
    # "queue": false refuses a busy channel (without it the run would wait in its queue).
    r2 = await c.post("/api/v1/runs", json={**body, "queue": False}, headers=h)
    assert r2.status_code == 409
    assert "busy" in r2.json()["detail"]
    got = await c.get(f"/api/v1/runs/{run['id']}", headers=h)
    assert got.json()["id"] == run["id"]
    ch = (await c.get("/api/v1/channels", headers=h)).json()[0]
    assert ch["state"] == "busy" and ch["active_run_id"] == run["id"]
    # Stopping a queued run ends it at once and frees the channel.
    stopped = await c.post(f"/api/v1/runs/{run['id']}/stop", headers=h)
    assert stopped.json()["state"] == "stopped"
    assert (await c.post("/api/v1/runs", json=body, headers=h)).status_code == 201


async def test_unknown_run_is_404(client) -> None:
    c, tokens = client
    h = auth(tokens["engineer"])
    for path in ("/api/v1/runs/999", "/api/v1/runs/999/samples", "/api/v1/runs/999/cycles"):
        r = await c.get(path, headers=h)
        assert r.status_code == 404, path
        assert "999" in r.json()["detail"]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"protocol": {**PROTOCOL, "charge_current_a": -1}}, "protocol.charge_current_a"),
        ({"protocol": {**PROTOCOL, "charge_voltage_v": 4.5}}, "protocol.charge_voltage_v"),
        ({"protocol": {**PROTOCOL, "discharge_current_a": 20}}, "protocol.discharge_current_a"),
        ({"protocol": {**PROTOCOL, "bogus": 1}}, "protocol.bogus"),
        ({"sample_period_s": 0}, "sample_period_s"),
        ({"channel": "nope/9"}, "channel"),
    ],
)
async def test_bad_input_is_422_naming_the_field(client, change: dict, field: str) -> None:
    c, tokens = client
    body = {"channel": "smu1/1", "cell": CELL, "protocol": PROTOCOL, **change}
    r = await c.post("/api/v1/runs", json=body, headers=auth(tokens["technician"]))
    assert r.status_code == 422, r.text
    locs = [e["loc"] for e in r.json()["errors"]]
    assert field in locs, locs
    assert field.split(".")[-1] in r.json()["detail"]


async def test_templates_listed_and_runnable_by_name(client) -> None:
    c, tokens = client
    h = auth(tokens["engineer"])
    names = [t["name"] for t in (await c.get("/api/v1/protocols/templates", headers=h)).json()]
    assert "capacity_check_c3" in names and "basic_cycle" in names
    one = (await c.get("/api/v1/protocols/templates/basic_cycle", headers=h)).json()
    assert one["content_hash"].startswith("sha256:")
    assert (await c.get("/api/v1/protocols/templates/nope", headers=h)).status_code == 404
    t = auth(tokens["technician"])
    body = {"channel": "smu1/1", "cell": CELL, "template": "basic_cycle"}
    r = await c.post("/api/v1/runs", json=body, headers=t)
    assert r.status_code == 201, r.text
    # A template that needs a chamber is refused on a channel without one, naming the step.
    await c.post(f"/api/v1/runs/{r.json()['id']}/stop", headers=t)
    body = {"channel": "smu1/1", "cell": CELL, "template": "capacity_check_c3"}
    r = await c.post("/api/v1/runs", json=body, headers=t)
    assert r.status_code == 422
    assert r.json()["errors"][0]["loc"].startswith("template.steps[")
    assert "chamber" in r.json()["detail"]


async def test_protocol_document_errors_name_the_step(client) -> None:
    c, tokens = client
    doc = {
        "schema_version": 1,
        "name": "bad",
        "steps": [
            {"step": "rest", "until": {"duration_s": 10}},
            {"step": "cc", "current_a": 50.0, "until": {"voltage_v": 4.2}},
            {"step": "warp"},
        ],
    }
    body = {"channel": "smu1/1", "cell": CELL, "protocol_document": doc}
    r = await c.post("/api/v1/runs", json=body, headers=auth(tokens["technician"]))
    assert r.status_code == 422
    locs = [e["loc"] for e in r.json()["errors"]]
    assert any(loc.startswith("protocol_document.steps[2]") for loc in locs), locs


async def test_admin_configures_instruments_with_audit(client) -> None:
    c, tokens = client
    cfg = {
        "name": "cab1",
        "driver": "cabinet",
        "resource": "TCPIP::127.0.0.1::5025::SOCKET",
        "channels": [{"index": 1, "max_current_a": 10}, {"index": 2}],
    }
    r = await c.put("/api/v1/instruments", json=cfg, headers=auth(tokens["technician"]))
    assert r.status_code == 403
    r = await c.put("/api/v1/instruments", json=cfg, headers=auth(tokens["admin"]))
    assert r.status_code == 200, r.text
    assert r.json()["channels"] == ["cab1/1", "cab1/2"]
    bad = {**cfg, "driver": "nonesuch"}
    r = await c.put("/api/v1/instruments", json=bad, headers=auth(tokens["admin"]))
    assert r.status_code == 422 and "nonesuch" in r.json()["detail"]
    listed = (await c.get("/api/v1/instruments", headers=auth(tokens["engineer"]))).json()
    assert [i["name"] for i in listed] == ["smu1", "cab1"]
