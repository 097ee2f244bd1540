"""Abuse protocols (``abuse: true``): beyond the cell's ratings, never beyond the channel's.

An overcharge (UN 38.3 T7, IEC 62133-2) is started with an engineer or admin token and a
reason, and is resolved with limits past the cell's charge cut-off and current but within
the channel's; a technician token is refused (403), a missing reason too (422), the same
step without ``abuse: true`` is refused (422) as for any run, and a set point beyond the
channel's rating is refused in abuse mode too. In-process API (the ``client`` fixture of
tests/test_api.py: channel smu1/1 rated 7.35 A, 105 V), no engine; and once through the
engine on a simulated SMU over TCP (tests/engine_rig.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from labdaq.engine.group import FLAG_BREACH
from labdaq.protocol import CellLimits, InstrumentLimits, ProtocolError, parse_protocol, resolve
from labdaq.runs import RunCreate, create_run
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests import test_api
from tests.engine_rig import (
    assert_contiguous,
    channel_cell,
    nmc_18650_spec,
    plan_of,
    rows_of,
    samples,
    start_rig,
)
from tests.test_api import CELL, auth

client = test_api.client  # the in-process API fixture, shared

CHANNEL_MAX_A, CHANNEL_MAX_V = 7.35, 105.0
# The cell of tests/test_api.py (4.2 V, 4.9 A charge) with a temperature window that an
# abuse run does not take, while the protocol's own temperature limit stays.
ABUSE_CELL = {**CELL, "serial": "AB-001", "max_temperature_c": 60.0}


def overcharge(current_a: float = 7.0, until_v: float = 5.0, abuse: bool = True,
               **safety: float) -> dict[str, Any]:
    """Overcharge at 7 A (the cell allows 4.9 A) to 5 V (its cut-off is 4.2 V)."""
    return {
        "schema_version": 1,
        "name": "overcharge",
        "abuse": abuse,
        "safety": {"min_voltage_v": 2.0, "max_temperature_c": 150.0, **safety},
        "steps": [{"step": "cc", "current_a": current_a,
                   "until": {"voltage_v": until_v, "duration_s": 7200}}],
    }


def body(doc: dict[str, Any], reason: str | None = "UN 38.3 T7 overcharge, lot L-7") -> dict:
    out: dict[str, Any] = {"channel": "smu1/1", "cell": ABUSE_CELL, "protocol_document": doc}
    if reason is not None:
        out["reason"] = reason
    return out


def locs(r: Any) -> list[str]:
    return [e["loc"] for e in r.json()["errors"]]


async def test_engineer_starts_an_overcharge_past_the_cell_within_the_channel(client) -> None:
    c, tokens = client
    h = auth(tokens["engineer"])
    # The dry run shows the resolved program and limits the run would get.
    r = await c.post("/api/v1/runs?dry_run=true", json=body(overcharge()), headers=h)
    assert r.status_code == 200, r.text
    (cc,) = r.json()["program"]
    assert cc["current_a"] == 7.0 and cc["until"]["voltage_above_v"] == 5.0
    limits = r.json()["limits"]
    # Past the cell's ratings (4.2 V + margin, 4.9 A, 60 °C) ...
    assert limits["max_voltage_v"] > CELL["charge_cutoff_v"] + 0.1
    assert limits["max_charge_current_a"] > CELL["max_charge_current_a"]
    # ... but the channel's rating and the protocol's temperature limit hold.
    assert limits["max_voltage_v"] <= CHANNEL_MAX_V
    assert limits["max_charge_current_a"] <= CHANNEL_MAX_A
    assert limits["sources"]["max_voltage_v"] == "instrument"
    assert limits["sources"]["max_charge_current_a"] == "instrument"
    assert (limits["max_temperature_c"], limits["sources"]["max_temperature_c"]) == (
        150.0, "protocol")
    assert "cell" not in limits["sources"].values()

    r = await c.post("/api/v1/runs", json=body(overcharge()), headers=h)
    assert r.status_code == 201, r.text
    run = r.json()
    events = (await c.get(f"/api/v1/runs/{run['id']}/events", headers=h)).json()
    (created,) = [e for e in events if e["kind"] == "audit"]
    assert created["data"]["abuse"] is True
    assert created["data"]["reason"] == "UN 38.3 T7 overcharge, lot L-7"
    assert created["actor"] == "t-engineer"
    # The run's limits as recorded: the channel's, not the cell's.
    recorded = created["data"]["limits"]
    assert recorded["max_voltage_v"] == {"value": CHANNEL_MAX_V, "source": "instrument"}
    assert recorded["max_charge_current_a"] == {"value": CHANNEL_MAX_A, "source": "instrument"}
    # The hash-chained audit log carries the same record.
    trail = (await c.get("/api/v1/audit?limit=1000", headers=h)).json()
    (rec,) = [t for t in trail if t["data"].get("abuse") is True]
    assert rec["reason"] == "UN 38.3 T7 overcharge, lot L-7" and rec["role"] == "engineer"


async def test_admin_may_start_one_too(client) -> None:
    c, tokens = client
    r = await c.post("/api/v1/runs", json=body(overcharge()), headers=auth(tokens["admin"]))
    assert r.status_code == 201, r.text


async def test_technician_token_is_refused(client) -> None:
    c, tokens = client
    r = await c.post("/api/v1/runs", json=body(overcharge()),
                     headers=auth(tokens["technician"]))
    assert r.status_code == 403, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert "abuse" in r.json()["detail"] and "technician" in r.json()["detail"]
    runs = (await c.get("/api/v1/runs", headers=auth(tokens["engineer"]))).json()
    assert runs == []


@pytest.mark.parametrize("reason", [None, "", "   "])
async def test_no_reason_is_422_naming_reason(client, reason: str | None) -> None:
    c, tokens = client
    r = await c.post("/api/v1/runs", json=body(overcharge(), reason=reason),
                     headers=auth(tokens["engineer"]))
    assert r.status_code == 422, r.text
    assert locs(r) == ["reason"]


async def test_same_step_without_abuse_is_refused_for_the_cell(client) -> None:
    c, tokens = client
    r = await c.post("/api/v1/runs", json=body(overcharge(abuse=False), reason=None),
                     headers=auth(tokens["technician"]))
    assert r.status_code == 422, r.text
    assert {"protocol_document.steps[0].current_a",
            "protocol_document.steps[0].until.voltage_v"} <= set(locs(r)), locs(r)
    assert "cell" in r.json()["detail"]


@pytest.mark.parametrize(("doc", "field", "why"), [
    (overcharge(current_a=8.0), "steps[0].current_a", "instrument"),
    (overcharge(until_v=110.0), "steps[0].until.voltage_v", "safety window"),
    # No channel minimum, no protocol minimum: nothing would bound a forced discharge.
    ({**overcharge(), "safety": {"max_temperature_c": 150.0}}, "safety.min_voltage_v",
     "abuse"),
])
async def test_beyond_the_channel_is_refused_even_in_abuse_mode(
        client, doc: dict, field: str, why: str) -> None:
    c, tokens = client
    r = await c.post("/api/v1/runs", json=body(doc), headers=auth(tokens["engineer"]))
    assert r.status_code == 422, r.text
    assert locs(r) == [f"protocol_document.{field}"], locs(r)
    assert why in r.json()["detail"]


async def test_engineer_may_not_start_an_ordinary_run(client) -> None:
    c, tokens = client
    r = await c.post("/api/v1/runs", json=body(overcharge(current_a=2.0, until_v=4.2,
                                                          abuse=False)),
                     headers=auth(tokens["engineer"]))
    assert r.status_code == 403, r.text
    assert "ordinary" in r.json()["detail"]


def test_abuse_limits_ignore_the_cell_but_keep_protocol_and_lab() -> None:
    """resolve() itself: the cell's window and currents go, lab and protocol stay."""
    from labdaq.protocol import Safety

    cell = CellLimits(capacity_ah=4.9, charge_cutoff_v=4.2, discharge_cutoff_v=2.5,
                      max_charge_current_a=4.9, max_discharge_current_a=9.8,
                      max_temperature_c=60.0)
    channel = InstrumentLimits(max_current_a=CHANNEL_MAX_A, max_voltage_v=CHANNEL_MAX_V)
    lab = Safety(max_voltage_v=12.0, max_temperature_c=120.0)
    plan = resolve(parse_protocol(overcharge()), cell, channel, lab=lab)
    lim = plan.limits
    assert (lim.max_voltage_v, lim.sources["max_voltage_v"]) == (12.0, "lab")
    assert (lim.max_temperature_c, lim.sources["max_temperature_c"]) == (120.0, "lab")
    assert (lim.min_voltage_v, lim.sources["min_voltage_v"]) == (2.0, "protocol")
    assert lim.max_charge_current_a == CHANNEL_MAX_A
    with pytest.raises(ProtocolError) as exc:
        resolve(parse_protocol(overcharge(until_v=13.0)), cell, channel, lab=lab)
    assert [e["loc"] for e in exc.value.errors] == ["steps[0].until.voltage_v"]


# -- the engine: an overcharge runs past the cell's cut-off on a simulated SMU ----------

async def test_overcharge_runs_past_the_cut_off_and_ends_at_its_voltage(
        sqlite_url: str, tmp_path: Path) -> None:
    """On a simulated Keithley 2460 over TCP (an 18650 cell: 4.2 V, 2.4 A charge), a
    2C overcharge started by an engineer runs past 4.2 V without a safety trip and stops
    on its own end condition at 4.45 V, its output off."""
    lab = SimLab(smus=1, cell_spec=nmc_18650_spec(tmp_path), soc=0.97, seed=3)
    rig = await start_rig(sqlite_url, lab, speed=200.0)
    try:
        doc = {
            "schema_version": 1, "name": "overcharge 2C", "abuse": True,
            "safety": {"min_voltage_v": 2.0, "max_temperature_c": 150.0},
            "steps": [{"step": "cc", "current_a": 4.8,
                       "until": {"voltage_v": 4.45, "duration_s": 3600}}],
        }
        async with session_scope(rig.maker) as s:
            run = await create_run(s, RunCreate(
                channel="smu1/1", cell_serial=channel_cell(rig.desc, "smu1/1"),
                protocol_document=doc, reason="IEC 62133-2 overcharge"),
                actor="t-engineer", role="engineer")
            await s.flush()
            run_id = int(run.id)
        ended = await rig.wait_end(run_id, timeout_s=60)
        assert ended.state == "completed", (ended.state, ended.end_reason)
        limits = plan_of(ended).limits
        assert limits.max_voltage_v > 4.45 and limits.sources["max_voltage_v"] == "instrument"
        got = await samples(rig.maker, run_id)
        assert_contiguous(got["seq"])
        assert (got["flags"] & FLAG_BREACH == 0).all()
        # Past the cell's charge cut-off for a while, and stopped at the protocol's end.
        assert (got["voltage_v"] > 4.2 + 0.1).sum() >= 2, got["voltage_v"][-10:]
        assert got["voltage_v"].max() >= 4.45
        assert got["voltage_v"].max() < limits.max_voltage_v
        assert got["current_a"].max() > 2.4  # the cell's charge rating, exceeded
        (step,) = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
        assert "voltage" in (step.end_reason or ""), step.end_reason
        assert not rig.lab.by_name("smu1").sim.output_on
    finally:
        await rig.stop()


# -- gas, venting, fire observed on an acquiring run: a safety stop ----------------------

async def _set_state(db_url: str, run_id: int, state: str) -> None:
    """As the engine does when it claims the run (no engine in the API tests)."""
    from sqlalchemy import update

    from labdaq.storage.db import create_engine, sessionmaker

    engine = create_engine(db_url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            await s.execute(update(m.Run).where(m.Run.id == run_id).values(state=state))
    finally:
        await engine.dispose()


async def _requested(db_url: str, run_id: int) -> str | None:
    from labdaq.storage.db import create_engine, sessionmaker

    engine = create_engine(db_url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            return run.requested_action
    finally:
        await engine.dispose()


async def test_venting_observed_on_a_running_abuse_run_raises_an_alarm_and_stops_it(
        client, db_url: str) -> None:
    c, tokens = client
    eng, tech = auth(tokens["engineer"]), auth(tokens["technician"])
    run_id = (await c.post("/api/v1/runs", json=body(overcharge()), headers=eng)).json()["id"]
    await _set_state(db_url, run_id, "running")
    obs_url = f"/api/v1/runs/{run_id}/observations"
    # Nothing seen: recorded, nothing else happens.
    r = await c.post(obs_url, json={"values": {"no_fire_explosion": True}}, headers=tech)
    assert r.status_code == 201, r.text
    assert await _requested(db_url, run_id) is None
    assert (await c.get("/api/v1/alarms", headers=tech)).json() == []
    # The cell vents: a safety event (an alarm until acknowledged) and a safety stop the
    # engine carries out.
    r = await c.post(obs_url, json={"values": {"no_leak_vent_disassembly_rupture_fire": False},
                                    "note": "white smoke from the vent"}, headers=tech)
    assert r.status_code == 201, r.text
    assert await _requested(db_url, run_id) == "safety_stop"
    events = (await c.get(f"/api/v1/runs/{run_id}/events", headers=eng)).json()
    (safety,) = [e for e in events if e["kind"] == "safety"]
    assert safety["severity"] == "critical" and safety["actor"] == "t-technician"
    assert safety["data"]["observations"] == ["no_leak_vent_disassembly_rupture_fire"]
    assert safety["data"]["abuse"] is True and safety["data"]["limit"] == "observation"
    assert "venting" in safety["message"] and "stopped for safety" in safety["message"]
    assert any(e["message"] == "safety stop requested: no_leak_vent_disassembly_rupture_fire "
               "observed" and e["actor"] == "t-technician" for e in events)
    alarms = (await c.get("/api/v1/alarms", headers=tech)).json()
    assert [a["id"] for a in alarms] == [safety["id"]]


async def test_a_hazard_observed_after_the_run_ended_stops_nothing(client, db_url: str) -> None:
    """The observation period after an abuse test: recorded for the verdict only."""
    c, tokens = client
    eng, tech = auth(tokens["engineer"]), auth(tokens["technician"])
    run_id = (await c.post("/api/v1/runs", json=body(overcharge()), headers=eng)).json()["id"]
    await _set_state(db_url, run_id, "completed")
    r = await c.post(f"/api/v1/runs/{run_id}/observations",
                     json={"values": {"no_disassembly_fire": False}}, headers=tech)
    assert r.status_code == 201, r.text
    assert await _requested(db_url, run_id) is None
    events = (await c.get(f"/api/v1/runs/{run_id}/events", headers=eng)).json()
    assert [e for e in events if e["kind"] == "safety"] == []


async def test_fire_observed_stops_an_overcharge_on_the_engine(
        sqlite_url: str, tmp_path: Path) -> None:
    """On a simulated Keithley 2460: the technician's observation ends the abuse run
    ``aborted_safety`` with its output off (the engine acts on the safety stop)."""
    from labdaq.benchmarks.service import add_observations
    from labdaq.run_states import SAFETY_STOP_REASON

    lab = SimLab(smus=1, cell_spec=nmc_18650_spec(tmp_path), soc=0.5, seed=3)
    rig = await start_rig(sqlite_url, lab, speed=20.0)
    try:
        doc = {"schema_version": 1, "name": "overcharge", "abuse": True,
               "safety": {"min_voltage_v": 2.0, "max_temperature_c": 150.0},
               "steps": [{"step": "cc", "current_a": 4.8,
                          "until": {"voltage_v": 4.8, "duration_s": 36000}}]}
        async with session_scope(rig.maker) as s:
            run = await create_run(s, RunCreate(
                channel="smu1/1", cell_serial=channel_cell(rig.desc, "smu1/1"),
                protocol_document=doc, reason="UN 38.3 T7"), actor="t-engineer",
                role="engineer")
            await s.flush()
            run_id = int(run.id)
        smu = rig.lab.by_name("smu1").sim
        for _ in range(600):
            if len((await samples(rig.maker, run_id))["seq"]) >= 3:
                break
            await asyncio.sleep(0.05)
        assert smu.output_on
        async with session_scope(rig.maker) as s:
            await add_observations(s, run_id, {"no_fire_explosion": False}, "t-technician",
                                   "flames at the positive terminal", actor="t-technician")
        ended = await rig.wait_end(run_id, timeout_s=60)
        assert ended.state == "aborted_safety" and ended.end_reason == SAFETY_STOP_REASON
        assert not smu.output_on
        states = [e for e in await rows_of(rig.maker, m.Event, run_id, m.Event.id)
                  if e.kind == "state"]
        assert "aborted_safety" in states[-1].message
    finally:
        await rig.stop()
