"""The API the dashboard adds, in-process on SQLite and PostgreSQL: a run request's dry run,
who a token is, the lab at a glance, safety alarms and their audited acknowledgement, and
the newest samples on the lab stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import func, select

from labdaq import live
from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.channels import upsert_instrument
from labdaq.config import Settings
from labdaq.dashboard import progress
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.dashboard_seed import EIS_PARAMS, SeededRun, seed_finished_run

CELL = {"serial": "D-001", "chemistry": "nmc811", "capacity_ah": 4.9, "charge_cutoff_v": 4.2,
        "discharge_cutoff_v": 2.5, "max_charge_current_a": 4.9, "max_discharge_current_a": 9.8}
PROTOCOL = {"charge_current_a": 2.45, "charge_voltage_v": 4.2, "discharge_current_a": 2.45,
            "discharge_cutoff_v": 2.5, "cycles": 2}


class Api:
    def __init__(self, client: httpx.AsyncClient, tokens: dict[str, str], url: str) -> None:
        self.c, self.tokens, self.url = client, tokens, url

    def h(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def db(self) -> Any:
        return create_engine(self.url)


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[Api]:
    engine = create_engine(db_url)
    async with session_scope(sessionmaker(engine)) as s:
        await upsert_instrument(s, "cab1", "cabinet", "TCPIP::127.0.0.1::1::SOCKET", [
            {"index": i, "name": f"cab1/{i}", "max_current_a": 10.0, "max_voltage_v": 5.0}
            for i in (1, 2, 3)])
        tokens = {role: await create_token(s, f"t-{role}", role)
                  for role in ("technician", "engineer", "admin")}
    await engine.dispose()
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield Api(c, tokens, db_url)


async def _count(url: str, model: Any) -> int:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            return int(await s.scalar(select(func.count()).select_from(model)) or 0)
    finally:
        await engine.dispose()


async def test_dry_run_resolves_and_stores_nothing(api: Api) -> None:
    body = {"channel": "cab1/1", "cell": CELL, "protocol": PROTOCOL, "sample_period_s": 2}
    r = await api.c.post("/api/v1/runs", params={"dry_run": "true"}, json=body,
                         headers=api.h("technician"))
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["dry_run"] is True and out["channel"] == "cab1/1"
    assert out["cell"]["serial"] == "D-001" and out["cell"]["id"] is None  # not registered
    currents = [st["current_a"] for st in out["program"] if "current_a" in st]
    assert currents == [2.45, -2.45]
    assert out["limits"]["max_voltage_v"] == pytest.approx(4.3)  # cut-off + margin
    assert await _count(api.url, m.Run) == 0
    assert await _count(api.url, m.Cell) == 0
    assert await _count(api.url, m.Protocol) == 0
    # The same checks as a real request: a field error names the field ...
    bad = {**body, "protocol": {**PROTOCOL, "charge_voltage_v": 4.5}}
    r = await api.c.post("/api/v1/runs?dry_run=true", json=bad, headers=api.h("technician"))
    assert r.status_code == 422
    assert [e["loc"] for e in r.json()["errors"]] == ["protocol.charge_voltage_v"]
    # ... a busy channel is refused (409) by the dry run exactly when by the request, and
    # an engineer may not start runs (403).
    created = await api.c.post("/api/v1/runs", json=body, headers=api.h("technician"))
    assert created.status_code == 201
    dry = await api.c.post("/api/v1/runs?dry_run=true", json=body, headers=api.h("technician"))
    assert await _count(api.url, m.Run) == 1
    real = await api.c.post("/api/v1/runs", json=body, headers=api.h("technician"))
    assert (dry.status_code, real.status_code) in ((409, 409), (200, 201)), (dry, real)
    r = await api.c.post("/api/v1/runs?dry_run=true", json={**body, "channel": "cab1/2"},
                         headers=api.h("engineer"))
    assert r.status_code == 403


async def test_whoami_names_role_and_grants(api: Api) -> None:
    got = {}
    for role in ("technician", "engineer", "admin"):
        r = await api.c.get("/api/v1/whoami", headers=api.h(role))
        assert r.status_code == 200
        assert r.json()["role"] == role and r.json()["name"] == f"t-{role}"
        got[role] = set(r.json()["grants"])
    assert got["technician"] == {"read", "operate"}
    assert got["engineer"] == {"read", "evaluate", "abuse"}
    assert got["admin"] == {"read", "operate", "evaluate", "abuse", "admin"}
    assert (await api.c.get("/api/v1/whoami")).status_code == 401


async def _run(api: Api, channel: str, serial: str) -> int:
    r = await api.c.post("/api/v1/runs", headers=api.h("technician"), json={
        "channel": channel, "cell": {**CELL, "serial": serial}, "protocol": PROTOCOL})
    assert r.status_code == 201, r.text
    return int(r.json()["id"])


async def test_lab_overview_states_progress_and_latest_values(api: Api) -> None:
    running = await _run(api, "cab1/1", "D-101")
    tripped = await _run(api, "cab1/2", "D-102")
    engine = create_engine(api.url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            run = await s.get(m.Run, running)
            assert run is not None
            run.state, run.step_index, run.cycle_index, run.last_seq = "running", 3, 2, 2
            for seq, v in ((1, 3.70), (2, 3.81)):
                s.add(m.Sample(run_id=running, seq=seq, t_s=float(seq), ts_utc=0.0,
                               step_index=3, cycle_index=2, voltage_v=v, current_a=-2.45,
                               temperature_c=26.5, step_capacity_ah=0.0, step_energy_wh=0.0))
            other = await s.get(m.Run, tripped)
            assert other is not None
            other.state, other.end_reason = "aborted_safety", "max_voltage_v"
    finally:
        await engine.dispose()
    r = await api.c.get("/api/v1/lab", headers=api.h("engineer"))
    assert r.status_code == 200
    rows = {x["channel"]: x for x in r.json()}
    assert list(rows) == ["cab1/1", "cab1/2", "cab1/3"]
    a = rows["cab1/1"]
    assert a["state"] == "running" and a["run"]["id"] == running
    assert (a["voltage_v"], a["current_a"], a["temperature_c"]) == (3.81, -2.45, 26.5)
    # A 6-entry program whose loop body (4 steps and the loop's end) runs twice:
    # 6 + 5 = 11 entries; at pc 3 of the second iteration, 3 + 5 are done.
    assert a["run"]["progress"] == pytest.approx(8 / 11)
    assert rows["cab1/2"]["state"] == "safety_stop"
    assert rows["cab1/2"]["run"]["end_reason"] == "max_voltage_v"
    assert rows["cab1/3"]["state"] == "idle" and rows["cab1/3"]["run"] is None


async def test_lab_overview_and_run_show_node_down(api: Api) -> None:
    """A running run whose node stopped beating (labdaq.nodes) shows as node_down on the
    overview (channel and run) and on the run page's run; it is running again once the
    node beats. The dashboard's script renders that state (its run page names the node)."""
    from datetime import UTC, datetime, timedelta

    run_id = await _run(api, "cab1/1", "D-201")
    engine = create_engine(api.url)

    async def beat(age_s: float) -> None:
        async with session_scope(sessionmaker(engine)) as s:
            row = await s.get(m.NodeHeartbeat, "bench-a")
            at = datetime.now(UTC) - timedelta(seconds=age_s)
            if row is None:
                s.add(m.NodeHeartbeat(node="bench-a", pid=1, started_at=at, beat_at=at,
                                      state="running", active_runs=1))
            else:
                row.beat_at = at

    try:
        async with session_scope(sessionmaker(engine)) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            run.state, run.node = "running", "bench-a"
        await beat(age_s=3600)

        async def shown() -> tuple[str, str, str]:
            r = await api.c.get("/api/v1/lab", headers=api.h("technician"))
            assert r.status_code == 200, r.text
            row = next(x for x in r.json() if x["channel"] == "cab1/1")
            one = await api.c.get(f"/api/v1/runs/{run_id}", headers=api.h("technician"))
            assert row["run"]["id"] == run_id and row["run"]["node"] == "bench-a"
            return row["state"], row["run"]["state"], one.json()["state"]

        assert await shown() == ("node_down", "node_down", "node_down")
        await beat(age_s=0)
        assert await shown() == ("running", "running", "running")
    finally:
        await engine.dispose()
    js = (await api.c.get("/ui/static/dashboard.js")).text
    assert 'run.state === "node_down"' in js and 'c.state === "node_down"' in js


def test_progress_counts_loop_iterations() -> None:
    plan = {"program": [
        {"step": "loop_start", "end_index": 3, "max_iterations": 4},
        {"step": "cc"}, {"step": "rest"},
        {"step": "loop_end"},
        {"step": "rest"},
    ]}
    # 5 entries, the 3-entry body (1..3) runs 4 times: 5 + 3 * 3 = 14.
    assert progress(plan, 0, 1) == 0.0
    assert progress(plan, 1, 1) == pytest.approx(1 / 14)
    assert progress(plan, 2, 4) == pytest.approx((2 + 9) / 14)
    assert progress(plan, 4, 4) == pytest.approx((4 + 9) / 14)
    assert progress({"program": []}, 0, 0) is None


async def _safety_event(url: str, run_id: int) -> int:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            ev = m.Event(run_id=run_id, kind="safety", severity="critical",
                         message="safety limit crossed, output turned off: max_voltage_v",
                         data={"limit": "max_voltage_v"})
            s.add(ev)
            await s.flush()
            return int(ev.id)
    finally:
        await engine.dispose()


async def test_alarm_stays_until_acknowledged_and_the_ack_is_audited(api: Api) -> None:
    run_id = await _run(api, "cab1/1", "D-201")
    alarm = await _safety_event(api.url, run_id)
    for role in ("technician", "engineer"):
        r = await api.c.get("/api/v1/alarms", headers=api.h(role))
        assert [a["id"] for a in r.json()] == [alarm]
    r = await api.c.post(f"/api/v1/alarms/{alarm}/ack", headers=api.h("engineer"))
    assert r.status_code == 403
    assert [a["id"] for a in (await api.c.get("/api/v1/alarms",
                                              headers=api.h("engineer"))).json()] == [alarm]
    r = await api.c.post(f"/api/v1/alarms/{alarm}/ack", json={"note": "cell removed"},
                         headers=api.h("technician"))
    assert r.status_code == 201, r.text
    assert r.json()["actor"] == "t-technician" and r.json()["run_id"] == run_id
    assert (await api.c.get("/api/v1/alarms", headers=api.h("technician"))).json() == []
    events = (await api.c.get(f"/api/v1/runs/{run_id}/events",
                              headers=api.h("technician"))).json()
    audit = [e for e in events if e["kind"] == "audit" and e["data"].get("acknowledges")]
    assert len(audit) == 1
    assert audit[0]["data"] == {
        "acknowledges": alarm, "note": "cell removed",
        # Before and after, like every audited change.
        "before": {"alarm_id": alarm, "acknowledged": False,
                   "alarm": audit[0]["data"]["before"]["alarm"]},
        "after": {"alarm_id": alarm, "acknowledged": True, "note": "cell removed"}}
    assert audit[0]["actor"] == "t-technician"
    r = await api.c.post(f"/api/v1/alarms/{alarm}/ack", headers=api.h("technician"))
    assert r.status_code == 409
    # Only safety events are alarms: the run's creation event is not.
    created = next(e["id"] for e in events if e["message"].startswith("run created"))
    r = await api.c.post(f"/api/v1/alarms/{created}/ack", headers=api.h("technician"))
    assert r.status_code == 404


async def test_lab_stream_latest_sends_newest_sample_once_per_change(api: Api) -> None:
    run_id = await _run(api, "cab1/1", "D-301")
    engine = create_engine(api.url)
    try:
        maker = sessionmaker(engine)
        async with session_scope(maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            run.state, run.last_seq = "running", 1
            s.add(m.Sample(run_id=run_id, seq=1, t_s=1.0, ts_utc=0.0, step_index=1,
                           cycle_index=1, voltage_v=3.6, current_a=2.45, temperature_c=25.0,
                           step_capacity_ah=0.0, step_energy_wh=0.0))
        seen: dict[int, int] = {}
        async with session_scope(maker) as s:
            first = await live.poll_latest(s, seen)
            again = await live.poll_latest(s, seen)
        assert [(x["run_id"], x["seq"], x["voltage_v"]) for x in first] == [(run_id, 1, 3.6)]
        assert again == []
        async with session_scope(maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            run.last_seq = 2
            s.add(m.Sample(run_id=run_id, seq=2, t_s=2.0, ts_utc=0.0, step_index=1,
                           cycle_index=1, voltage_v=3.7, current_a=2.45, temperature_c=25.1,
                           step_capacity_ah=0.0, step_energy_wh=0.0))
        async with session_scope(maker) as s:
            moved = await live.poll_latest(s, seen)
        assert [(x["seq"], x["voltage_v"]) for x in moved] == [(2, 3.7)]
    finally:
        await engine.dispose()


async def test_pages_and_assets_are_served_locally(api: Api) -> None:
    # Pages need a browser session (tests/test_web_sessions.py): an admin's sees them all.
    r = await api.c.post("/api/v1/session", json={"token": api.tokens["admin"]})
    assert r.status_code == 201, r.text
    for path in ("/", "/signin", "/runs/new", "/runs/1", "/cells/1", "/admin", "/imports/new"):
        r = await api.c.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        # Every script and stylesheet is ours: nothing is fetched from elsewhere.
        assert "http://" not in r.text and "https://" not in r.text, path
    # The admin page's content is rendered for admins only.
    r = await api.c.get("/ui/admin/instruments", headers=api.h("admin"))
    assert r.status_code == 200 and "cab1/3" in r.text
    # With the users and the active tokens, never a secret.
    assert 'data-token="t-engineer"' in r.text
    assert all(t not in r.text for t in api.tokens.values())
    for role in ("technician", "engineer"):
        r = await api.c.get("/ui/admin/instruments", headers=api.h(role))
        assert r.status_code == 403
    api.c.cookies.clear()
    assert (await api.c.get("/ui/admin/instruments")).status_code == 401
    js = await api.c.get("/ui/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert (await api.c.get("/ui/static/dashboard.js")).status_code == 200
    assert (await api.c.get("/ui/static/../app.py")).status_code == 404
    assert (await api.c.get("/ui/static/app.py")).status_code == 404


ABUSE_YAML = """\
schema_version: 1
name: overcharge
abuse: true
safety: {min_voltage_v: 2.0, max_temperature_c: 150.0}
steps:
  - {step: cc, current_a: 7.0, until: {voltage_v: 4.6, duration_s: 7200}}
"""


async def test_an_engineer_starts_an_abuse_run_from_the_start_form(api: Api) -> None:
    """The start page offers an engineer (the ``abuse`` grant) the form and a reason
    field; the request the form sends (an uploaded document, a registered cell, the
    reason) is checked, then started; without the reason the error lands in its slot."""
    signed = await api.c.post("/api/v1/session", json={"token": api.tokens["engineer"]})
    assert signed.status_code == 201, signed.text
    page = (await api.c.get("/runs/new")).text
    api.c.cookies.clear()  # the rest speaks as each role's bearer token
    assert 'id="reason-field" data-grant="abuse"' in page
    assert 'id="f-reason"' in page and 'data-for="reason"' in page
    assert 'href="/runs/new" data-grant="operate abuse"' in page  # the nav link
    cell = await api.c.post("/api/v1/cells", json=CELL, headers=api.h("technician"))
    assert cell.status_code == 201, cell.text
    form = {"channel": "cab1/1", "sample_period_s": 1, "cell_id": cell.json()["id"],
            "protocol_document": ABUSE_YAML, "reason": "UN 38.3 T7 overcharge, lot L-7"}
    dry = await api.c.post("/api/v1/runs?dry_run=true", json=form, headers=api.h("engineer"))
    assert dry.status_code == 200, dry.text
    limits = dry.json()["limits"]
    # Past the cell's 4.2 V and 4.9 A, within the channel's 5 V and 10 A.
    assert limits["max_voltage_v"] == 5.0 and limits["sources"]["max_voltage_v"] == "instrument"
    assert limits["max_charge_current_a"] == 10.0
    no_reason = {k: v for k, v in form.items() if k != "reason"}
    r = await api.c.post("/api/v1/runs?dry_run=true", json=no_reason, headers=api.h("engineer"))
    assert r.status_code == 422 and [e["loc"] for e in r.json()["errors"]] == ["reason"]
    r = await api.c.post("/api/v1/runs", json=form, headers=api.h("technician"))
    assert r.status_code == 403 and "abuse" in r.json()["detail"]
    r = await api.c.post("/api/v1/runs", json=form, headers=api.h("engineer"))
    assert r.status_code == 201, r.text
    events = (await api.c.get(f"/api/v1/runs/{r.json()['id']}/events",
                              headers=api.h("engineer"))).json()
    (created,) = [e for e in events if e["kind"] == "audit"]
    assert created["actor"] == "t-engineer" and created["data"]["abuse"] is True
    assert created["data"]["reason"] == "UN 38.3 T7 overcharge, lot L-7"


async def _seed_run(url: str, cycles: int = 3) -> SeededRun:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            cell = m.Cell(**CELL)
            s.add(cell)
            await s.flush()
            channel = await s.scalar(select(m.Channel).where(m.Channel.name == "cab1/1"))
            assert channel is not None
            return await seed_finished_run(s, channel, cell, cycles=cycles)
    finally:
        await engine.dispose()


async def test_dqdv_of_the_first_and_last_cycle_and_of_chosen_ones(api: Api) -> None:
    run = await _seed_run(api.url)
    r = await api.c.get(f"/api/v1/runs/{run.run_id}/dqdv", headers=api.h("technician"))
    assert r.status_code == 200, r.text
    curves = r.json()
    assert [c["cycle_index"] for c in curves] == [1, run.cycles]
    for c in curves:
        assert c["direction"] == "charge" and c["note"] is None
        v, q = c["voltage_v"], c["dqdv_ah_per_v"]
        assert len(v) == len(q) > 20 and v == sorted(v)
        assert min(q) >= 0 and max(q) > 0
    # The seeded capacity fades 2 % a cycle: the curve integrates to what moved.
    first, last = (np.trapezoid(c["dqdv_ah_per_v"], c["voltage_v"]) for c in curves)
    assert last < first
    assert curves[0]["capacity_ah"] == pytest.approx(CELL["capacity_ah"], rel=0.02)
    r = await api.c.get(f"/api/v1/runs/{run.run_id}/dqdv", headers=api.h("engineer"),
                        params={"cycle": [2], "direction": "discharge"})
    assert [(c["cycle_index"], c["direction"]) for c in r.json()] == [(2, "discharge")]
    # A cycle with no samples has no curve and says why.
    r = await api.c.get(f"/api/v1/runs/{run.run_id}/dqdv", headers=api.h("engineer"),
                        params={"cycle": [99]})
    (c,) = r.json()
    assert c["voltage_v"] == [] and c["note"]
    assert (await api.c.get("/api/v1/runs/999999/dqdv",
                            headers=api.h("engineer"))).status_code == 404
    assert (await api.c.get(f"/api/v1/runs/{run.run_id}/dqdv")).status_code == 401


async def test_eis_fits_recover_the_circuit_of_each_spectrum(api: Api) -> None:
    run = await _seed_run(api.url, cycles=2)
    r = await api.c.get(f"/api/v1/runs/{run.run_id}/eis/fits", headers=api.h("technician"))
    assert r.status_code == 200, r.text
    fits = r.json()
    assert [f["spectrum_id"] for f in fits] == run.spectra
    for k, f in enumerate(fits):
        assert f["fitted"] and f["rmse_rel"] < 0.01
        assert f["params"]["r0_ohm"] == pytest.approx(EIS_PARAMS["r0_ohm"], rel=0.05)
        # The seeded charge-transfer arc grows 5 % a cycle.
        assert f["params"]["r2_ohm"] == pytest.approx(
            EIS_PARAMS["r2_ohm"] * (1 + 0.05 * k), rel=0.1)
        assert len(f["frequency_hz"]) == len(f["z_real_ohm"]) == len(f["z_imag_ohm"]) > 50
    newest = (await api.c.get(f"/api/v1/runs/{run.run_id}/eis/fits", params={"newest": 1},
                              headers=api.h("engineer"))).json()
    assert [f["spectrum_id"] for f in newest] == run.spectra[-1:]
