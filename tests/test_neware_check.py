"""Neware BTS at the edges of labdaq: a run whose protocol a Neware channel cannot run is
refused (422) when it is created, and ``labdaq instruments probe`` recognises a BTS server.

The API runs in-process on a migrated database (SQLite and PostgreSQL); the probe talks to
the simulated BTS server (sims/neware_bts.py) over real TCP.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.channels import upsert_instrument
from labdaq.cli import app as cli_app
from labdaq.config import Settings
from labdaq.sims.neware_bts import BtsServer, NewareBtsSim
from labdaq.storage.db import create_engine, session_scope, sessionmaker

CELL = {
    "serial": "N-001", "chemistry": "nmc811", "capacity_ah": 4.9, "charge_cutoff_v": 4.2,
    "discharge_cutoff_v": 2.5, "max_charge_current_a": 4.9, "max_discharge_current_a": 9.8,
}
RUNNABLE = [
    {"step": "cc", "rate_c": 0.5, "until": {"voltage_v": "charge_cutoff"}},
    {"step": "rest", "until": {"duration_s": 600}},
    {"step": "cc", "rate_c": -0.5, "until": {"voltage_v": "discharge_cutoff"}},
]
EIS = {"step": "eis", "start_frequency_hz": 1000.0, "stop_frequency_hz": 1.0,
       "amplitude_a": 0.1}


def _doc(steps: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema_version": 1, "name": "neware-check", "steps": steps}


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    engine = create_engine(db_url)
    async with session_scope(sessionmaker(engine)) as s:
        await upsert_instrument(s, "bts1", "neware_bts", "TCPIP::127.0.0.1::1::SOCKET", [
            # in a climate chamber: chamber steps before the program are the engine's
            {"index": 1, "name": "bts1/1-1-1", "max_current_a": 10.0, "max_voltage_v": 5.0,
             "aux": {"chamber": "chamber1"}},
            # wired to an impedance analyser: the EIS step passes the wiring check and is
            # refused because the cycler's own program cannot hold it
            {"index": 2, "name": "bts1/1-1-2", "max_current_a": 10.0, "max_voltage_v": 5.0,
             "aux": {"impedance": {"instrument": "eis1", "channel": 1}}},
        ])
        await upsert_instrument(s, "smu1", "keithley2450", "TCPIP::127.0.0.1::2::SOCKET", [
            {"index": 1, "name": "smu1/1", "max_current_a": 7.35, "max_voltage_v": 105.0}])
        tokens = {"technician": await create_token(s, "t-technician", "technician")}
    await engine.dispose()
    api = create_app(Settings(database_url=db_url))
    async with api.router.lifespan_context(api):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                     base_url="http://t") as c:
            yield c, tokens


async def _runs(c: httpx.AsyncClient, h: dict[str, str]) -> list[int]:
    r = await c.get("/api/v1/runs", headers=h)
    assert r.status_code == 200, r.text
    return sorted(run["id"] for run in r.json())


@pytest.mark.parametrize("steps, index, needle", [
    # an end condition the Neware step has no field for
    ([*RUNNABLE[:2], {"step": "cc", "rate_c": -0.5,
                      "until": {"voltage_v": "discharge_cutoff", "dvdt_below_v_per_s": 0.001}}],
     "steps[2]", "dvdt_below_v_per_s"),
    # a rest that ends on a voltage, not a time
    ([RUNNABLE[0], {"step": "rest", "until": {"voltage_below_v": 4.0}}], "steps[1]", "rest"),
    # a chamber step inside a loop: the loop would have to span two programs
    ([RUNNABLE[0], {"step": "loop", "count": 2, "body": [
        RUNNABLE[1], {"step": "set_temperature", "temperature_c": 25.0}]}],
     "steps[1].body[1]", "set_temperature"),
])
async def test_unrunnable_step_is_422_naming_it_and_nothing_is_stored(
        client, steps: list[dict[str, Any]], index: str, needle: str) -> None:
    c, tokens = client
    h = {"Authorization": f"Bearer {tokens['technician']}"}
    before = await _runs(c, h)
    body = {"channel": "bts1/1-1-1", "cell": CELL, "protocol_document": _doc(steps)}
    r = await c.post("/api/v1/runs", json=body, headers=h)
    assert r.status_code == 422, r.text
    problem = r.json()
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "neware_bts" in problem["detail"]
    assert [e["loc"] for e in problem["errors"]] == [f"protocol_document.{index}"]
    assert needle in problem["errors"][0]["msg"]
    assert await _runs(c, h) == before
    # the same document is no problem for a cycler labdaq drives sample by sample
    if needle != "set_temperature":  # (that one needs a chamber wired to the channel)
        ok = await c.post("/api/v1/runs", json={**body, "channel": "smu1/1"}, headers=h)
        assert ok.status_code == 201, ok.text


async def test_eis_on_a_wired_neware_channel_is_refused(client) -> None:
    c, tokens = client
    h = {"Authorization": f"Bearer {tokens['technician']}"}
    body = {"channel": "bts1/1-1-2", "cell": CELL,
            "protocol_document": _doc([*RUNNABLE, EIS])}
    r = await c.post("/api/v1/runs", json=body, headers=h)
    assert r.status_code == 422, r.text
    (err,) = r.json()["errors"]
    assert err["loc"] == "protocol_document.steps[3]" and "eis" in err["msg"]


async def test_runnable_protocols_are_accepted_on_a_neware_channel(client) -> None:
    c, tokens = client
    h = {"Authorization": f"Bearer {tokens['technician']}"}
    pulses_in_a_loop = {"step": "loop", "count": 3, "body": [
        {"step": "cccv", "rate_c": 0.5, "voltage_v": "charge_cutoff",
         "until": {"current_below_c": 0.05}},
        {"step": "pulse", "rate_c": -1.0, "pulse_duration_s": 10, "rest_duration_s": 40,
         "count": 2},
        *RUNNABLE[1:]]}
    # a chamber step between cycler steps: two programs with the chamber held between
    chamber_between = [*RUNNABLE, {"step": "set_temperature", "temperature_c": 10.0},
                       RUNNABLE[1]]
    for steps in (RUNNABLE, [pulses_in_a_loop], chamber_between):
        r = await c.post("/api/v1/runs", headers=h, json={
            "channel": "bts1/1-1-1", "cell": CELL, "protocol_document": _doc(steps)})
        assert r.status_code == 201, r.text


async def test_templates_starting_with_a_chamber_step_are_accepted_on_neware(client) -> None:
    """capacity_check_c3 and hppc_dcir start with set_temperature: in a delegated run the
    engine holds the chamber before it starts the program (engine/delegated.py); on a
    channel without a chamber that step is refused as on any channel."""
    c, tokens = client
    h = {"Authorization": f"Bearer {tokens['technician']}"}
    for template in ("capacity_check_c3", "hppc_dcir"):
        r = await c.post("/api/v1/runs", headers=h, json={
            "channel": "bts1/1-1-1", "cell": CELL, "template": template})
        assert r.status_code == 201, r.text
    r = await c.post("/api/v1/runs", headers=h, json={
        "channel": "bts1/1-1-2", "cell": CELL, "template": "capacity_check_c3"})
    assert r.status_code == 422, r.text
    (err,) = r.json()["errors"]
    assert err["loc"] == "template.steps[0]" and "climate chamber" in err["msg"]


# -- labdaq instruments probe ------------------------------------------------------------


@pytest.fixture
def bts_server() -> Iterator[BtsServer]:
    server = BtsServer(NewareBtsSim(channels=3)).start()
    yield server
    server.stop()


def test_probe_recognises_a_bts_server(bts_server: BtsServer) -> None:
    host, port = bts_server.address
    resource = f"TCPIP::{host}::{port}::SOCKET"
    result = CliRunner().invoke(cli_app, ["instruments", "probe", resource, "--json",
                                          "--timeout", "1"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)
    assert found == {"resource": resource, "driver": "neware_bts",
                     "idn": f"Neware,BTS 8.0 API,{host},3 channels",
                     "identified_by": "neware_bts protocol"}
    # it asked *IDN? first (no answer: the BTS frames by \n\n#\r\n), then its own protocol
    assert [r.split(b"<cmd>")[1].split(b"</cmd>")[0] for r in bts_server.requests
            if b"<cmd>" in r] == [b"connect", b"getdevinfo"]
