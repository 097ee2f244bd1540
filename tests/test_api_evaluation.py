"""Evaluation, observations and the test report through HTTP (api/routers/evaluations.py).

One simulated capacity check (the engine rig over real TCP, as
tests/test_benchmark_evaluate.py runs it) is judged through the API and compared with
labdaq.benchmarks called directly on the same stored run: the API adds transport, roles,
storage and audit, never its own arithmetic.
"""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pypdf import PdfReader

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.benchmarks.evaluate import (
    GUARDED,
    OBSERVED,
    SIMPLE,
    ChannelAccuracy,
    evaluate_run,
    ocv_of,
)
from labdaq.benchmarks.store import _jsonable, catalogue_sha256, data_sha256
from labdaq.config import Settings
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.test_benchmark_evaluate import _Page, check_report, load, run_template
from tests.test_dashboard import CHROMIUM_ARGS, _ensure_chromium

ENTRIES = {"iec62660-1-capacity", "ais156-cell-precycle", "lab-rated-capacity"}


async def make_tokens(url: str) -> dict[str, str]:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            return {role: await create_token(s, f"t-{role}", role)
                    for role in ("technician", "engineer", "admin")}
    finally:
        await engine.dispose()


async def serve(url: str) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(Settings(database_url=url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c


@pytest.fixture
async def evaluated_run(sqlite_url: str, tmp_path: Path
                        ) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str], int]]:
    run_id = await run_template(sqlite_url, tmp_path, "capacity_check_c3")
    tokens = await make_tokens(sqlite_url)
    async for c in serve(sqlite_url):
        yield c, tokens, run_id


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def by_id(entries: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {e["entry_id"]: e for e in entries}


def criterion(entry: dict[str, Any], metric: str) -> dict[str, Any]:
    (c,) = [c for c in entry["criteria"] if c["metric"] == metric]
    return c


async def test_evaluation_of_a_simulated_run(sqlite_url: str, evaluated_run) -> None:
    c, tokens, run_id = evaluated_run
    url = f"/api/v1/runs/{run_id}/evaluation"
    eng, tech = auth(tokens["engineer"]), auth(tokens["technician"])

    assert (await c.get(url)).status_code == 401
    assert (await c.get(url, headers=tech)).status_code == 403
    assert (await c.post(url, headers=tech)).status_code == 403

    r = await c.get(url, headers=eng)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["stored"] is False and body["rule"] == "simple"
    assert body["report_url"] == f"/api/v1/runs/{run_id}/report"
    data = load(sqlite_url, run_id)
    assert body["data_sha256"] == data_sha256(data.samples)
    assert body["catalogue_sha256"] == catalogue_sha256()
    got = by_id(body["entries"])
    assert set(got) == ENTRIES
    # The same verdicts, values, rules and evidence as the library on the same run.
    assert body["entries"] == _jsonable([x.as_dict() for x in evaluate_run(data)])
    pre = got["ais156-cell-precycle"]
    assert pre["verdict"] == "pass" and pre["jurisdictions"] == ["IN"]
    cyc = criterion(pre, "cycles_at_c3_recorded")
    assert cyc["value"] == 1 and cyc["decision_rule"] == SIMPLE and cyc["evidence"]
    cap = criterion(got["iec62660-1-capacity"], "discharge_capacity_ah")
    assert cap["verdict"] == "reported" and 0.9 * 2.4 < cap["value"] < 1.05 * 2.4
    assert got["lab-rated-capacity"]["calibration"].startswith("not_evaluable")

    # The decision rule is a query parameter; the guard band needs the channel's accuracy.
    def rules(entries: list[dict[str, Any]]) -> set[str]:
        return {cr["decision_rule"] for e in entries for cr in e["criteria"]
                if cr["decision_rule"] and cr["kind"] != "observation"}

    acc = {"voltage_accuracy_rel": 0.001, "current_accuracy_rel": 0.01,
           "temperature_accuracy_c": 2.0}
    r = await c.get(url, params={"rule": "guarded", **acc}, headers=eng)
    assert r.status_code == 200, r.text
    guarded = r.json()["entries"]
    lib = evaluate_run(load(sqlite_url, run_id, accuracy=ChannelAccuracy(0.001, 0.01, 2.0)),
                       rule="guarded")
    assert guarded == _jsonable([x.as_dict() for x in lib])
    # Judged with a guard band where the value has an uncertainty (a count has none).
    cap_u = criterion(by_id(guarded)["lab-rated-capacity"], "capacity_over_rated")
    assert cap_u["decision_rule"] == GUARDED and cap_u["uncertainty"] > 0
    assert GUARDED in rules(guarded)
    # Without the accuracy nothing is known to guard by: judged (and named) simple.
    r = await c.get(url, params={"rule": "guarded"}, headers=eng)
    assert rules(r.json()["entries"]) == {SIMPLE}
    r = await c.get(url, params={"rule": "guarded", "current_accuracy_rel": 0.01},
                    headers=eng)
    assert r.status_code == 422 and "voltage_accuracy_rel" in r.json()["detail"]
    r = await c.get(url, params={"rule": "lenient"}, headers=eng)
    assert r.status_code == 422 and "rule" in r.json()["detail"]
    r = await c.get(url, params={"entries": "no-such-entry"}, headers=eng)
    assert r.status_code == 422 and "no-such-entry" in r.json()["detail"]

    # Nothing stored yet; storing is audited and then served as stored.
    assert (await c.get(url, params={"stored": True}, headers=eng)).status_code == 404
    r = await c.post(url, json={"rule": "simple"}, headers=eng)
    assert r.status_code == 201, r.text
    assert r.json()["stored"] is True
    r = await c.get(url, params={"stored": True}, headers=eng)
    assert r.status_code == 200
    kept = r.json()
    assert kept["stored"] is True and kept["data_sha256"] == body["data_sha256"]
    assert {e["entry_id"]: e["verdict"] for e in kept["entries"]} == {
        k: e["verdict"] for k, e in got.items()}
    events = (await c.get(f"/api/v1/runs/{run_id}/events", headers=eng)).json()
    (audit,) = [e for e in events if e["message"].startswith("evaluation stored")]
    assert audit["kind"] == "audit" and audit["actor"] == "t-engineer"

    # Per cell: each of its runs judged, the same result as the run's own.
    cell_id = (await c.get(f"/api/v1/runs/{run_id}", headers=eng)).json()["cell_id"]
    r = await c.get(f"/api/v1/cells/{cell_id}/evaluation", headers=eng)
    assert r.status_code == 200, r.text
    (per_run,) = r.json()
    assert per_run["run_id"] == run_id and per_run["entries"] == body["entries"]
    assert (await c.get(f"/api/v1/cells/{cell_id}/evaluation", headers=tech)).status_code == 403
    assert (await c.get(f"/api/v1/cells/{cell_id + 100}/evaluation",
                        headers=eng)).status_code == 404

    for path in ("evaluation", "report", "observations"):
        r = await c.get(f"/api/v1/runs/{run_id + 100}/{path}", headers=eng)
        assert r.status_code == 404, path
    r = await c.post(f"/api/v1/runs/{run_id + 100}/evaluation", headers=eng)
    assert r.status_code == 404


async def test_observations_combine_with_measured_criteria(evaluated_run) -> None:
    c, tokens, run_id = evaluated_run
    eng, tech = auth(tokens["engineer"]), auth(tokens["technician"])
    url = f"/api/v1/runs/{run_id}/evaluation"
    # IEC 62133-2 7.2.1: two conditions measured from the samples, one observation.
    q = {"entries": "iec62133-2-7.2.1"}

    (entry,) = (await c.get(url, params=q, headers=eng)).json()["entries"]
    obs = criterion(entry, "no_fire_explosion_leakage")
    assert obs["verdict"] == "not_evaluable" and obs["reason"]
    measured_before = [cr for cr in entry["criteria"] if cr["kind"] != "observation"]
    assert measured_before and all(cr["metric"] != obs["metric"] for cr in measured_before)

    obs_url = f"/api/v1/runs/{run_id}/observations"
    body = {"values": {"no_fire_explosion_leakage": True}, "note": "checked after 7 d"}
    assert (await c.post(obs_url, json=body)).status_code == 401
    assert (await c.post(obs_url, json=body, headers=eng)).status_code == 403
    r = await c.post(obs_url, json={"values": {"no_smoke": True}}, headers=tech)
    assert r.status_code == 422 and "no_smoke" in r.json()["detail"]
    r = await c.post(obs_url, json={"values": {}}, headers=tech)
    assert r.status_code == 422
    # A yes/no is JSON true/false, not a string that looks like one.
    r = await c.post(obs_url, json={"values": {"no_fire_explosion_leakage": "yes"}},
                     headers=tech)
    assert r.status_code == 422 and "no_fire_explosion_leakage" in r.json()["detail"]
    r = await c.post(obs_url, json=body, headers=tech)
    assert r.status_code == 201, r.text
    (row,) = r.json()
    assert (row["metric"], row["value_flag"], row["value_number"]) == (
        "no_fire_explosion_leakage", True, None)
    assert row["observed_by"] == "t-technician" and row["note"] == "checked after 7 d"
    listed = (await c.get(obs_url, headers=tech)).json()
    assert [o["id"] for o in listed] == [row["id"]]
    events = (await c.get(f"/api/v1/runs/{run_id}/events", headers=eng)).json()
    (audit,) = [e for e in events if e["message"].startswith("observations recorded")]
    assert audit["actor"] == "t-technician"

    (entry,) = (await c.get(url, params=q, headers=eng)).json()["entries"]
    obs = criterion(entry, "no_fire_explosion_leakage")
    assert (obs["verdict"], obs["value"], obs["decision_rule"]) == ("pass", True, OBSERVED)
    # The measured criteria are unchanged by the observation.
    assert [cr for cr in entry["criteria"] if cr["kind"] != "observation"] == measured_before

    # A later observation supersedes the earlier one.
    r = await c.post(obs_url, json={"values": {"no_fire_explosion_leakage": False},
                                    "observed_by": "technician B"}, headers=tech)
    assert r.status_code == 201 and r.json()[0]["observed_by"] == "technician B"
    (entry,) = (await c.get(url, params=q, headers=eng)).json()["entries"]
    assert criterion(entry, "no_fire_explosion_leakage")["verdict"] == "fail"
    assert entry["verdict"] == "fail"


async def test_report_html_and_pdf(sqlite_url: str, evaluated_run) -> None:
    c, tokens, run_id = evaluated_run
    eng = auth(tokens["engineer"])
    url = f"/api/v1/runs/{run_id}/report"
    assert (await c.get(url)).status_code == 401
    assert (await c.get(url, headers=auth(tokens["technician"]))).status_code == 403

    r = await c.get(url, headers=eng)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    page = r.text
    data = load(sqlite_url, run_id)
    results = evaluate_run(data)
    check_report(page, results)  # verdict table rows, designations, PNG plots
    p = _Page()
    p.feed(page)
    assert len(p.images) >= 2  # V/I/T against time, capacity and efficiency per cycle
    assert data_sha256(data.samples) in page

    r = await c.get(url, params={"format": "pdf"}, headers=eng)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/pdf"
    assert r.content.startswith(b"%PDF-")
    pdf = PdfReader(io.BytesIO(r.content))
    text = " ".join((pg.extract_text() or "") for pg in pdf.pages)
    flat = "".join(text.split())
    for res in results:
        assert res.entry_id.replace(" ", "") in flat
        assert res.verdict in flat
    assert data_sha256(data.samples)[:16] in flat
    # The plots are in it (pypdf also lists each PNG's alpha mask, hence >=), with their
    # captions.
    assert sum(len(pg.images) for pg in pdf.pages) >= len(p.images)
    for caption in ("Voltage, current and temperature", "Capacity and efficiency per cycle"):
        assert caption in page and "".join(caption.split()) in flat

    r = await c.get(url, params={"format": "docx"}, headers=eng)
    assert r.status_code == 422


async def test_un383_ocv_pair_named_by_query(sqlite_url: str, tmp_path: Path) -> None:
    """UN 38.3 T.1-T.4: two simulated OCV check runs; the one after is judged with the one
    before named by ``ocv_before_run``, as ``labdaq evaluate --ocv-before-run`` does."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    before = await run_template(sqlite_url, tmp_path / "a", "un383_ocv_check")
    after = await run_template(sqlite_url, tmp_path / "b", "un383_ocv_check")
    tokens = await make_tokens(sqlite_url)
    eng = auth(tokens["engineer"])
    url = f"/api/v1/runs/{after}/evaluation"
    async for c in serve(sqlite_url):
        alone = (await c.get(url, headers=eng)).json()["entries"]
        paired = (await c.get(url, params={"ocv_before_run": before}, headers=eng)).json()
        r = await c.get(url, params={"ocv_before_run": after + 100}, headers=eng)
        assert r.status_code == 422 and "ocv_before_run" in r.json()["detail"]
    ratio_alone = [cr for e in alone for cr in e["criteria"]
                   if cr["metric"] == "ocv_ratio_after_before"]
    assert ratio_alone and all(cr["verdict"] == "not_evaluable" for cr in ratio_alone)
    ref = load(sqlite_url, after, ocv_before_v=ocv_of(load(sqlite_url, before)))
    assert paired["entries"] == _jsonable([x.as_dict() for x in evaluate_run(ref)])
    ratios = [cr for e in paired["entries"] for cr in e["criteria"]
              if cr["metric"] == "ocv_ratio_after_before"]
    assert ratios and all(cr["verdict"] in ("pass", "provisional") for cr in ratios)
    # A fresh simulated cell at rest twice: the same OCV within a few mV.
    assert all(0.99 < cr["value"] < 1.01 for cr in ratios)

@pytest.mark.slow  # a browser: `make test-slow`
async def test_report_renders_in_headless_chromium(sqlite_url: str, tmp_path: Path) -> None:
    """The report served by a real server on 127.0.0.1, opened by Chromium: the verdict
    table is visible, every plot decoded, and no request left 127.0.0.1."""
    import asyncio
    import socket
    from urllib.parse import urlsplit

    import uvicorn
    from playwright.async_api import async_playwright

    run_id = await run_template(sqlite_url, tmp_path, "capacity_check_c3")
    tokens = await make_tokens(sqlite_url)
    app = create_app(Settings(database_url=sqlite_url))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        async with asyncio.timeout(60):
            while not server.started:
                await asyncio.sleep(0.05)
        hosts: list[str] = []
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=str(_ensure_chromium()),
                                               args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page(
                    extra_http_headers=auth(tokens["engineer"]))
                page.on("request", lambda req: hosts.append(urlsplit(req.url).hostname or
                                                            req.url.split(":", 1)[0]))
                resp = await page.goto(f"http://127.0.0.1:{port}/api/v1/runs/{run_id}/report",
                                       timeout=120_000)
                assert resp is not None and resp.status == 200
                table = page.locator("table#verdicts")
                await table.wait_for(state="visible", timeout=60_000)
                rows = await table.locator("tr").count()
                expected = evaluate_run(load(sqlite_url, run_id))
                assert rows == len(expected) + 1  # header row
                for res in expected:
                    row = table.locator("tr", has_text=res.entry_id)
                    assert await row.is_visible()
                    assert (await row.locator("td.v").inner_text()).strip() == res.verdict
                widths = await page.eval_on_selector_all(
                    "img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
                assert len(widths) >= 2 and all(w > 0 for w in widths)
            finally:
                await browser.close()
        # data: URIs (the embedded plots) have no host; everything else went to us.
        assert hosts and set(hosts) <= {"127.0.0.1", "data"}, hosts
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 60)
