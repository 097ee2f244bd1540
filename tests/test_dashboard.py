"""The web dashboard in a real browser: headless Chromium (Debian's, driven by Playwright's
Python package) against `labdaq serve --sim` on 127.0.0.1, one service and one browser for
the module. Each page has its own flow; every test checks that no request left 127.0.0.1.

Flows that look at stored data (the run page's plots, exports, dQ/dV and the Nyquist fit,
the cell page, the queue page, the layout at two sizes) use runs written straight into the
service's database (tests/dashboard_seed.py); only the flows that need an acquisition (the
overview's live values, starting a run and watching it, the safety stop) run one on the
simulated lab. Pages are driven by waiting for what they show, never for a fixed time.

Chromium is installed with apt-get when /usr/bin/chromium is missing (as tests/test_deploy.py
installs its tools); where that cannot run the tests skip, and under CI they fail instead.
Screenshots of every page go to tests/artifacts/ (git-ignored).

The flows stay in one module (about 800 lines) because they share that one service and
browser: its start-up (20-40 s under load) is paid once, not once per file.
"""

from __future__ import annotations

import asyncio
import http.server
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pyarrow.parquet as pq
import pytest
from sqlalchemy import select

from labdaq.auth import create_token
from labdaq.config import Settings
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.dashboard_seed import EIS_PARAMS, seed_finished_run, seed_queue
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update"]
# The service's work grows with the speed: the engine ticks every simulated second and
# the simulators step their cells over every simulated second. At 500x, at a load
# average of 30, the simulated lab fell behind wall time and its cabinet went 60 s
# without answering; 100x still finishes the start form's first step within seconds.
SPEED = 100
# An external short on the last cabinet channel from the start: a run there reads ~0 V
# at its first sample and the engine's safety check stops it.
FAULT = "external_short:cabinet1/8:resistance_ohm=0.01"
SIZES = {"desktop": (1280, 800), "tablet": (768, 1024)}
# How long the engine waits for a simulated instrument's reply. The lab shares the CPU
# with everything else: at a load average of 30 its cabinet went 2 s (the drivers'
# default) without answering, the engine declared it lost again and again, and the
# overview's live values never came (a run interrupted and resumed stores nothing
# meanwhile). A reply that takes this long is still a hang.
SIM_REPLY_TIMEOUT_S = 60
# Every wait of a page is for what it shows; these bound only a hang (a request at load
# 30 took 2-4 s, a page's start several of them), never a performance figure.
TIMEOUT_MS = 300_000
# Each test's limit, the first one's including the service's start-up (~20 s quiet, 40 s
# seen under heavy load): only a hang fails.
pytestmark = pytest.mark.timeout(900)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI must run the browser tests)")
    pytest.skip(reason)


def _ensure_chromium() -> Path:
    if CHROMIUM.exists():
        return CHROMIUM
    if not shutil.which("apt-get") or os.geteuid() != 0:
        _unavailable("/usr/bin/chromium is missing and apt-get cannot run here")
    lock = ["-o", "DPkg::Lock::Timeout=600"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", *lock, "update"], check=True, capture_output=True, env=env)
    proc = subprocess.run(
        ["apt-get", *lock, "install", "-y", "--no-install-recommends", "chromium"],
        capture_output=True, text=True, env=env,
    )
    assert proc.returncode == 0, f"apt-get install chromium failed:\n{proc.stderr[-2000:]}"
    assert CHROMIUM.exists(), "chromium installed but /usr/bin/chromium is missing"
    return CHROMIUM


class Lab:
    """The running service: its URL, database, a token per role, and an API client per
    role."""

    def __init__(self, base: str, tokens: dict[str, str], db_url: str) -> None:
        self.base = base
        self.tokens = tokens
        self.db_url = db_url

    def api(self, role: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, timeout=120,  # a hang guard
                            headers={"Authorization": f"Bearer {self.tokens[role]}"})

    def cell_id(self, serial: str) -> int:
        with self.api("technician") as c:
            return int(c.get("/api/v1/cells", params={"serial": serial}).json()[0]["id"])


async def _tokens(url: str, roles: tuple[str, ...]) -> dict[str, str]:
    """Tokens created as `labdaq token create` does, in this process (no CLI start-up)."""
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            return {role: await create_token(s, f"dash-{role}", role) for role in roles}
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    data = tmp_path_factory.mktemp("dashboard") / "data"
    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("LABDAQ_DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "labdaq.cli", "serve", "--sim", "--speed", str(SPEED),
         "--port", str(port), "--data-dir", str(data), "--sim-fault", FAULT,
         "--sim-reply-timeout", str(SIM_REPLY_TIMEOUT_S)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    try:
        assert proc.stdout is not None
        token, lines = None, []
        while token is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if m := re.search(r"token \(shown once\): (\S+)", line):
                token = m.group(1)
        assert token, "serve did not print a token:\n" + "".join(lines)
        # Keep reading its output so a full pipe never blocks the service, into a file a
        # failed wait can be explained from (the service's own log of each request).
        ARTIFACTS.mkdir(exist_ok=True)
        with open(ARTIFACTS / "dashboard-serve.log", "w") as log_file:
            log_file.writelines(lines)
            log_file.flush()
            drain = subprocess.Popen(["cat"], stdin=proc.stdout, stdout=log_file)
        db_url = Settings(data_dir=data).resolved_database_url
        tokens = {"technician": token, **asyncio.run(_tokens(db_url, ("engineer", "admin")))}
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300  # a hang guard
        while True:
            assert time.monotonic() < deadline, "the service never answered /health"
            assert proc.poll() is None, "labdaq serve exited"
            try:
                if httpx.get(f"{base}/health", timeout=10).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield Lab(base, tokens, db_url)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if "drain" in locals():
            drain.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(lab: Lab) -> Iterator[Any]:
    chromium = _ensure_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=str(chromium), args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


class Seeded:
    """What the module's seeding wrote: two finished runs of one cell on smu1/1 (each with
    three cycles and an impedance spectrum per cycle) and a queue on cabinet1/5."""

    def __init__(self, cell_id: int, runs: list[int], queue: list[int],
                 queue_channel_id: int) -> None:
        self.cell_id, self.runs, self.queue = cell_id, runs, queue
        self.queue_channel_id = queue_channel_id


async def _seed(url: str) -> Seeded:
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            channels = {c.name: c for c in await s.scalars(select(m.Channel))}
            cell = m.Cell(serial="DASH-SEED-001", chemistry="nmc811", capacity_ah=4.9,
                          charge_cutoff_v=4.2, discharge_cutoff_v=2.5)
            queued_cell = m.Cell(serial="DASH-QUEUE-001", chemistry="nmc811",
                                 capacity_ah=4.9, charge_cutoff_v=4.2, discharge_cutoff_v=2.5)
            s.add_all([cell, queued_cell])
            await s.flush()
            now = datetime.now(UTC)
            runs = [(await seed_finished_run(s, channels["smu1/1"], cell, cycles=3,
                                             first_cycle_capacity=1.0 - 0.06 * k,
                                             started=now - timedelta(days=2 - k))).run_id
                    for k in range(2)]
            queue = await seed_queue(s, channels["cabinet1/5"], queued_cell)
            return Seeded(cell.id, runs, queue, channels["cabinet1/5"].id)
    finally:
        await engine.dispose()


@pytest.fixture(scope="module")
def seeded(lab: Lab) -> Seeded:
    # In a thread of its own: Playwright's sync API keeps an event loop running in this one.
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _seed(lab.db_url)).result()


@pytest.fixture(scope="module")
def background_run(lab: Lab) -> int:
    """A run that keeps going on cabinet1/2 for the overview, cell and export flows."""
    with lab.api("technician") as c:
        r = c.post("/api/v1/runs", json={
            "channel": "cabinet1/2", "cell_serial": "SIM-NMC811-C1-002",
            "protocol": {"charge_current_a": 2.45, "charge_voltage_v": 4.2, "rest_s": 60,
                         "discharge_current_a": 2.45, "discharge_cutoff_v": 3.0,
                         "cycles": 50},
            # Few samples: the overview needs a live value, not a dense record.
            "sample_period_s": 10,
        })
        assert r.status_code == 201, r.text
        run_id = int(r.json()["id"])
        # Wait for stored samples (the engine claims it within a scheduler round; the
        # bound is a hang guard).
        deadline = time.monotonic() + 600
        while c.get(f"/api/v1/runs/{run_id}").json()["last_seq"] < 2:
            assert time.monotonic() < deadline, "the background run stored no samples"
            time.sleep(0.2)
    return run_id


class Session:
    """One browser context signed in as a role (the sign-in request the form makes, sent
    from the context so the session cookie lands in it), recording every request it
    makes."""

    def __init__(self, browser: Any, lab: Lab, role: str | None, size: str = "desktop"):
        w, h = SIZES[size]
        self.lab = lab
        self.ctx = browser.new_context(viewport={"width": w, "height": h},
                                       accept_downloads=True)
        self.ctx.set_default_timeout(TIMEOUT_MS)
        self.urls: list[str] = []
        self.ctx.on("request", lambda req: self.urls.append(req.url))
        if role is not None:
            r = self.ctx.request.post(lab.base + "/api/v1/session",
                                      data={"token": lab.tokens[role]}, timeout=TIMEOUT_MS)
            assert r.status == 201, r.text()
        self.page = self.ctx.new_page()
        self.errors: list[str] = []
        self.page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def open(self, path: str) -> Any:
        self.page.goto(self.lab.base + path)
        self.page.wait_for_selector("body[data-ready='true']")
        return self.page

    def shot(self, name: str) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        self.page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    def close(self) -> None:
        self.ctx.close()
        # blob: URLs are downloads made in the page; everything else must be ours.
        outside = [u for u in self.urls
                   if urlsplit(u).scheme not in ("blob", "data")
                   and urlsplit(u).hostname != "127.0.0.1"]
        assert not outside, f"requests left 127.0.0.1: {outside}"
        assert self.urls, "no request recorded"
        assert not self.errors, f"JavaScript errors: {self.errors}"


@pytest.fixture
def session(browser: Any, lab: Lab) -> Iterator[Any]:
    opened: list[Session] = []

    def make(role: str | None, size: str = "desktop") -> Session:
        s = Session(browser, lab, role, size)
        opened.append(s)
        return s

    yield make
    for s in opened:
        s.close()


def _axis_titles(page: Any, selector: str) -> list[str]:
    """Titles of every axis a plotly chart shows."""
    return page.eval_on_selector(selector, """div => Object.entries(div._fullLayout)
        .filter(([k, v]) => /^[xy]axis\\d*$/.test(k) && v.visible !== false)
        .map(([k, v]) => (v.title && v.title.text) || '')""")


def test_sign_in_shows_role_and_hides_what_it_cannot_do(session, lab: Lab) -> None:
    s = session(None)
    page = s.page
    page.goto(lab.base + "/")  # without a session the page sends the browser to sign in
    page.wait_for_url("**/signin?next=%2F")
    page.fill("#token", "ldq_not-a-token")
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("#signin-error:has-text('Unknown or revoked token')")
    page.fill("#token", lab.tokens["technician"])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("body[data-page='overview'][data-ready='true']")
    assert page.inner_text("#who-role") == "technician"
    # The page's script holds neither the token nor the session id (HttpOnly cookie).
    assert "labdaq_session" not in page.evaluate("document.cookie")
    assert lab.tokens["technician"] not in page.evaluate(
        "JSON.stringify(sessionStorage) + JSON.stringify(localStorage)")
    (cookie,) = [c for c in s.ctx.cookies() if c["name"] == "labdaq_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.is_visible("nav a[href='/runs/new']")
    assert not page.is_visible("nav a[href='/admin']")
    s.shot("signin-overview-technician")
    # An engineer starts abuse runs only: the start link is there, the admin one is not.
    e = session("engineer")
    e.open("/")
    assert e.page.inner_text("#who-role") == "engineer"
    assert e.page.is_visible("nav a[href='/runs/new']")
    assert not e.page.is_visible("nav a[href='/admin']")


def test_overview_lists_every_channel_with_live_values(session, lab: Lab,
                                                       background_run: int) -> None:
    s = session("technician")
    page = s.open("/")
    rows = page.locator("#channels tbody tr")
    names = [rows.nth(i).get_attribute("data-channel") for i in range(rows.count())]
    assert names == ["smu1/1", *[f"cabinet1/{i}" for i in range(1, 9)]]
    row = page.locator("#channels tr[data-channel='cabinet1/2']")
    assert row.get_attribute("data-run-id") == str(background_run)
    assert row.get_attribute("data-state") in ("running", "paused")
    # Live V/I/T from the lab stream: the row is updated by `latest` messages.
    page.wait_for_selector("#lab-live[data-connected='true']")
    page.wait_for_function(
        "document.querySelector(\"#channels tr[data-channel='cabinet1/2']\")"
        "?.dataset.updates >= 2")
    row = page.locator("#channels tr[data-channel='cabinet1/2']")
    voltage = float(row.locator("td.v").inner_text())
    assert 2.5 < voltage < 4.3
    assert page.locator("#channels tr[data-channel='cabinet1/3']").get_attribute(
        "data-state") == "idle"
    s.shot("overview")


def test_start_run_from_form_watch_live_plot_pause_resume_stop(session, lab: Lab) -> None:
    s = session("technician")
    page = s.open("/runs/new?channel=cabinet1/1")
    assert page.input_value("#f-channel") == "cabinet1/1"
    # Register a cell from the form: an unknown specification is named beside its field.
    page.click("#new-cell summary")
    page.fill("#c-serial", "DASH-NEW-001")
    page.fill("#c-spec", "no-such-spec")
    page.click("#register-cell")
    page.wait_for_selector("[data-cell-for='spec']:has-text('nmc811')")
    page.fill("#c-spec", "nmc811")
    page.click("#register-cell")
    page.wait_for_function("document.querySelector('#f-cell').selectedOptions[0]"
                           ".textContent.startsWith('DASH-NEW-001')")
    with lab.api("technician") as c:
        assert c.get("/api/v1/cells", params={"serial": "DASH-NEW-001"}).json()
    page.select_option("#f-cell", value=str(lab.cell_id("SIM-NMC811-C1-001")))
    with lab.api("technician") as c:
        runs_before = len(c.get("/api/v1/runs").json())
    # A charge voltage above the cell's cut-off: the error is shown beside the field.
    page.fill("#p-charge_voltage_v", "4.5")
    page.click("#check")
    err = page.locator(".error[data-for='protocol.charge_voltage_v']")
    err.wait_for(state="visible")
    assert "4.2" in err.inner_text()
    assert page.is_hidden("#confirm")
    # An uploaded document that is not a valid protocol: the error sits by the upload.
    page.select_option("#f-source", "upload")
    page.set_input_files("#f-document", files=[{
        "name": "bad.yaml", "mimeType": "text/yaml",
        "buffer": b"schema_version: 1\nname: bad\nsteps:\n  - step: cc\n    rate_c: 0.5\n"}])
    page.click("#check")
    doc_err = page.locator(".error[data-for='protocol_document']")
    doc_err.wait_for(state="visible")
    assert page.is_hidden("#confirm")
    page.select_option("#f-source", "protocol")
    # Short steps (a high taper current ends the CV phase early) so progress moves soon;
    # a sample every 5 s is plenty for the plot to grow.
    for field, value in {"period": "5", "charge_current_a": "4.9", "charge_voltage_v": "4.0",
                         "taper_current_a": "3", "rest_s": "10",
                         "discharge_current_a": "4.9", "discharge_cutoff_v": "3.5",
                         "cycles": "50"}.items():
        page.fill(f"#f-{field}" if field == "period" else f"#p-{field}", value)
    page.click("#check")
    page.wait_for_selector("#confirm:not([hidden])")
    steps = page.locator("#confirm-steps tbody tr")
    currents = [steps.nth(i).locator("td").nth(3).inner_text() for i in range(steps.count())]
    assert "4.900" in currents and "-4.900" in currents
    assert page.locator("#confirm-limits tbody tr").count() > 0
    s.shot("start-confirm")
    with lab.api("technician") as c:  # the dry runs stored nothing
        assert len(c.get("/api/v1/runs").json()) == runs_before
    page.click("#start")
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    page.wait_for_selector("body[data-ready='true']")
    # The live plot grows from the stream; the progress bar advances at step ends.
    plot = page.locator("#plot-vit")
    start = int(plot.get_attribute("data-points") or 0)
    page.wait_for_function(
        f"Number(document.querySelector('#plot-vit').dataset.points) > {start + 20}")
    bar = "Number(document.querySelector('main > .progress').dataset.progress || 0)"
    page.wait_for_function(f"{bar} > 0")
    first = page.evaluate(bar)
    page.wait_for_function(f"{bar} > {first}")
    titles = _axis_titles(page, "#plot-vit")
    assert titles and all(" / " in t for t in titles), titles
    # A finished step and the current one: the steps table is refreshed by its own
    # request, which may land after the progress bar's update, so wait for it.
    page.wait_for_function("document.querySelectorAll('#steps tbody tr').length >= 2")
    s.shot("run-page-live")
    page.click("#pause")
    page.wait_for_selector("body[data-run-state='paused']")
    assert page.is_enabled("#resume") and page.is_disabled("#pause")
    page.click("#resume")
    page.wait_for_selector("body[data-run-state='running']")
    page.click("#stop")
    page.click("#stop")  # a second click confirms
    page.wait_for_selector("body[data-run-state='stopped']")
    with lab.api("technician") as c:
        run = c.get(f"/api/v1/runs/{run_id}").json()
        events = c.get(f"/api/v1/runs/{run_id}/events").json()
    assert run["state"] == "stopped"
    assert any(e["kind"] == "audit" and e["message"] == "stop requested"
               and e["actor"].startswith("demo-") for e in events)
    assert page.is_disabled("#stop") and page.is_disabled("#pause")


def test_a_progress_answer_older_than_the_stop_leaves_the_run_stopped(session, lab: Lab) -> None:
    """The run page asks ``/api/v1/lab`` for progress every 3 s. An answer asked for while
    the run was running and arriving after the stream said it stopped put the page back
    to "running" for good (the stream ends with the run): the answer is held here until
    the page shows the stop."""
    with lab.api("technician") as c:
        r = c.post("/api/v1/runs", json={
            "channel": "cabinet1/7", "cell_serial": "SIM-NMC811-C1-007", "sample_period_s": 5,
            "protocol": {"charge_current_a": 4.9, "charge_voltage_v": 4.0,
                         "taper_current_a": 3, "rest_s": 10, "discharge_current_a": 4.9,
                         "discharge_cutoff_v": 3.5, "cycles": 50}})
        assert r.status_code == 201, r.text
        run_id = int(r.json()["id"])
    s = session("technician")
    page = s.open(f"/runs/{run_id}")
    # A progress the page shows: the lab's answers now carry the run with its progress.
    page.wait_for_function(
        "Number(document.querySelector('main > .progress').dataset.progress || 0) > 0")
    held: list[tuple[Any, Any]] = []
    holding = [True]

    def hold(route: Any) -> None:
        if holding[0]:
            held.append((route, route.fetch()))
        else:
            route.continue_()

    page.route("**/api/v1/lab", hold)
    while not held:  # the page's next refresh, answered while the run runs
        page.wait_for_timeout(100)
    assert held[0][1].json() and page.get_attribute("body", "data-run-state") == "running"
    refreshes = int(page.get_attribute("#run-progress", "data-refreshes") or 0)
    page.click("#stop")
    page.click("#stop")  # a second click confirms
    page.wait_for_selector("body[data-run-state='stopped']")
    holding[0] = False
    for route, answer in held:
        route.fulfill(response=answer)
    page.wait_for_function(
        f"Number(document.querySelector('#run-progress').dataset.refreshes || 0) > {refreshes}")
    assert page.get_attribute("body", "data-run-state") == "stopped"
    assert page.is_disabled("#stop") and page.is_disabled("#pause")


def test_run_page_exports_parquet_and_shows_cycles(session, lab: Lab, seeded: Seeded) -> None:
    run_id = seeded.runs[0]
    s = session("engineer")
    page = s.open(f"/runs/{run_id}")
    assert not page.is_visible("#stop")  # engineers do not operate runs
    with page.expect_download() as dl:
        page.click("[data-export='parquet']")
    path = Path(dl.value.path())
    assert dl.value.suggested_filename == f"run-{run_id}.parquet"
    table = pq.read_table(path)
    meta = pq.read_metadata(path).metadata
    assert table.num_rows > 0 and table.num_rows == int(meta[b"labdaq.rows"])
    assert {"t_s", "voltage_v", "current_a", "temperature_c"} <= set(table.column_names)
    page.wait_for_selector("#plot-cycles[data-points='3']")  # from the run's stream
    # An ended run is judged against the catalogue: a verdict per applicable entry.
    page.wait_for_selector("#verdicts tbody td[class^='v-']")
    for plot in ("#plot-vit", "#plot-cycles"):
        titles = _axis_titles(page, plot)
        assert titles and all(" / " in t for t in titles), (plot, titles)
    s.shot("run-page-engineer")


@pytest.mark.slow  # a second live start flow; the technician's is in make test
def test_engineer_starts_an_abuse_run_with_a_reason(session, lab: Lab) -> None:
    s = session("engineer")
    page = s.open("/runs/new?channel=cabinet1/4")
    assert page.is_visible("#f-reason")
    page.select_option("#f-cell", value=str(lab.cell_id("SIM-NMC811-C1-004")))
    page.select_option("#f-source", "upload")
    page.set_input_files("#f-document", files=[{
        "name": "overcharge.yaml", "mimeType": "text/yaml",
        "buffer": b"schema_version: 1\nname: overcharge\nabuse: true\n"
                  b"safety: {min_voltage_v: 2.0, max_temperature_c: 100.0}\n"
                  b"steps:\n  - {step: cc, current_a: 3.0, "
                  b"until: {voltage_v: 4.4, duration_s: 60}}\n"}])
    # Without a reason the API's 422 lands beside the reason field.
    page.click("#check")
    page.locator(".error[data-for='reason']").wait_for(state="visible")
    assert page.is_hidden("#confirm")
    page.fill("#f-reason", "UN 38.3 T7 overcharge, dashboard")
    page.click("#check")
    page.wait_for_selector("#confirm:not([hidden])")
    assert "from the instrument" in page.inner_text("#confirm-limits")
    page.click("#start")
    page.wait_for_url(re.compile(r"/runs/\d+$"))
    run_id = int(page.url.rsplit("/", 1)[1])
    with lab.api("technician") as c:
        events = c.get(f"/api/v1/runs/{run_id}/events").json()
        c.post(f"/api/v1/runs/{run_id}/stop")
    (created,) = [e for e in events if e["kind"] == "audit"]
    assert created["data"]["abuse"] is True and created["actor"] == "dash-engineer"
    assert created["data"]["reason"] == "UN 38.3 T7 overcharge, dashboard"


def test_run_page_dqdv_and_nyquist_with_circuit_fit(session, lab: Lab, seeded: Seeded) -> None:
    s = session("technician")
    page = s.open(f"/runs/{seeded.runs[0]}")
    # dQ/dV of the first and the last cycle's charge.
    assert page.get_attribute("#plot-dqdv", "data-curves") == "2"
    assert page.is_hidden("#dqdv-none")
    names = page.eval_on_selector("#plot-dqdv", "d => d.data.map(t => t.name)")
    assert names == ["cycle 1 charge", "cycle 3 charge"]
    # Every spectrum measured and fitted: markers and a dashed fit line each.
    assert page.get_attribute("#plot-eis", "data-fits") == "3"
    modes = page.eval_on_selector("#plot-eis", "d => d.data.map(t => t.mode)")
    assert modes.count("markers") == 3 and modes.count("lines") == 3
    for plot in ("#plot-dqdv", "#plot-eis"):
        titles = _axis_titles(page, plot)
        assert titles and all(" / " in t for t in titles), (plot, titles)
    # The fitted ohmic resistance is the seeded circuit's, in mΩ with its uncertainty.
    rows = page.locator("#eis-fits tbody tr[data-fitted='true']")
    assert rows.count() == 3
    r0_mohm = float(rows.first.locator("td.r0").inner_text().split("±")[0])
    assert abs(r0_mohm - EIS_PARAMS["r0_ohm"] * 1000) < 1.0
    s.shot("run-page-dqdv-nyquist")


def test_cell_page_lists_runs_and_fade_trend(session, lab: Lab, seeded: Seeded) -> None:
    s = session("engineer")
    page = s.open(f"/cells/{seeded.cell_id}")
    assert page.inner_text("#cell-serial") == "DASH-SEED-001"
    ids = page.eval_on_selector_all("#cell-runs tbody tr", "rs => rs.map(r => r.dataset.runId)")
    assert ids == [str(r) for r in seeded.runs]
    # Discharge capacity across both runs' cycles: six points, fading.
    fade = page.eval_on_selector("#plot-fade", "d => d.data.flatMap(t => t.y)")
    assert len(fade) == 6 and fade == sorted(fade, reverse=True)
    titles = _axis_titles(page, "#plot-fade")
    assert titles and all(" / " in t for t in titles), titles
    assert page.is_visible("#cell-verdicts")
    s.shot("cell")


def test_queue_page_reorders_cancels_and_confirms_the_cell(session, lab: Lab,
                                                           seeded: Seeded) -> None:
    head, second, third, fourth = seeded.queue
    sel = "section[data-channel='cabinet1/5'] tbody tr"
    order = f"Array.from(document.querySelectorAll(\"{sel}\")).map(r => r.dataset.runId).join()"

    def queue_ids() -> list[int]:
        with lab.api("technician") as c:
            r = c.get(f"/api/v1/channels/{seeded.queue_channel_id}/queue")
            return [x["id"] for x in r.json()]

    # An engineer sees the queue but has nothing to press.
    e = session("engineer")
    page = e.open("/queue")
    assert page.evaluate(order) == ",".join(map(str, seeded.queue))
    assert page.locator(".queue-actions button").count() == 0
    s = session("technician")
    page = s.open("/queue")
    row = page.locator(f"{sel}[data-run-id='{head}']")
    assert row.get_attribute("data-state") == "awaiting_cell"
    assert "aborted_safety" in row.locator("td.why").inner_text()
    s.shot("queue")
    # Move the last run up one place.
    page.locator(f"{sel}[data-run-id='{fourth}'] button.up").click()
    page.wait_for_function(f"{order} === '{head},{second},{fourth},{third}'")
    assert queue_ids() == [head, second, fourth, third]
    # Cancel one: a second click confirms.
    cancel = page.locator(f"{sel}[data-run-id='{second}'] button.cancel")
    cancel.click()
    assert cancel.inner_text() == "Confirm cancel"
    cancel.click()
    page.wait_for_function(f"{order} === '{head},{fourth},{third}'")
    # The head waits for its cell: confirming it puts it back in the queue, audited.
    page.locator(f"{sel}[data-run-id='{head}'] button.confirm-cell").click()
    page.wait_for_selector(f"{sel}[data-run-id='{head}'][data-state='queued']")
    assert queue_ids() == [head, fourth, third]
    s.shot("queue-after")
    with lab.api("technician") as c:
        assert c.get(f"/api/v1/runs/{second}").json()["state"] == "stopped"
        audit = {rid: [ev["message"] for ev in c.get(f"/api/v1/runs/{rid}/events").json()
                       if ev["kind"] == "audit" and (ev["actor"] or "").startswith("demo-")]
                 for rid in (head, second, fourth)}
    assert any("moved in the queue" in x for x in audit[fourth]), audit
    assert any("cancelled in the queue" in x for x in audit[second]), audit
    assert any("DASH-QUEUE-001 confirmed" in x for x in audit[head]), audit


def test_technician_gets_403_from_admin_page_and_api(session, lab: Lab) -> None:
    s = session("technician")
    statuses: dict[str, int] = {}
    s.page.on("response", lambda r: statuses.__setitem__(urlsplit(r.url).path, r.status))
    page = s.open("/admin")
    # The URL itself is refused to the technician's session, not just the data behind it.
    assert statuses["/admin"] == 403
    assert page.is_visible("#denied") and "technician" in page.inner_text("#denied")
    assert page.locator("#admin-body").count() == 0
    assert "/ui/admin/instruments" not in statuses
    assert page.inner_text("#who-role") == "technician"  # still signed in, nav as usual
    # The session's own request, CSRF header and all, is refused by role.
    status = page.evaluate("""async () => (await fetch('/api/v1/instruments?dry_run=true', {
        method: 'PUT', headers: {'Content-Type': 'application/json',
        'X-CSRF-Token': csrfToken()},
        body: JSON.stringify({instruments: [], cells: []})})).status""")
    assert status == 403
    for path in ("/ui/admin/instruments", "/imports/new"):
        assert page.evaluate(f"async () => (await fetch('{path}')).status") == 403, path
    s.shot("admin-technician")
    a = session("admin")
    statuses.clear()
    a.page.on("response", lambda r: statuses.__setitem__(urlsplit(r.url).path, r.status))
    page = a.open("/admin")
    assert statuses["/admin"] == 200 and statuses["/ui/admin/instruments"] == 200
    assert page.is_visible("#admin-body")
    assert page.locator("#instruments tbody tr").count() == 4
    # Users and the active tokens, never a token's secret.
    assert page.locator("#tokens tr[data-token='dash-admin']").count() == 1
    assert lab.tokens["admin"] not in page.content()
    a.shot("admin")


def test_safety_stop_alarm_stays_until_acknowledged(session, lab: Lab) -> None:
    with lab.api("technician") as c:
        r = c.post("/api/v1/runs", json={"channel": "cabinet1/8",
                                         "cell_serial": "SIM-NMC811-C1-008",
                                         "template": "basic_cycle", "sample_period_s": 1})
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]
    s = session("technician")
    page = s.open("/")
    alarm = page.locator(f".alarm:has(a[href='/runs/{run_id}'])")
    alarm.wait_for(state="visible")
    assert "min_voltage_v" in alarm.inner_text()
    page.wait_for_selector("#channels tr[data-channel='cabinet1/8'][data-state='safety_stop']")
    s.shot("overview-safety-stop")
    # Still there on another page and after a reload: only an acknowledgement clears it.
    page = s.open(f"/runs/{run_id}")
    page.wait_for_selector("body[data-run-state='aborted_safety']")
    alarm = page.locator(f".alarm:has(a[href='/runs/{run_id}'])")
    alarm.wait_for(state="visible")
    alarm_id = int(alarm.get_attribute("data-alarm-id") or 0)
    alarm.locator("button.ack").click()
    alarm.wait_for(state="detached")
    page.reload()
    page.wait_for_selector("body[data-ready='true']")
    assert page.locator(f".alarm[data-alarm-id='{alarm_id}']").count() == 0
    with lab.api("technician") as c:
        events = c.get(f"/api/v1/runs/{run_id}/events").json()
        again = c.post(f"/api/v1/alarms/{alarm_id}/ack")
    acks = [e for e in events if e["kind"] == "audit" and e["data"].get("acknowledges") == alarm_id]
    assert len(acks) == 1 and acks[0]["actor"].startswith("demo-")
    assert again.status_code == 409
    with lab.api("engineer") as c:  # engineers do not operate: they may not acknowledge
        assert c.post(f"/api/v1/alarms/{alarm_id}/ack").status_code == 403


def _serve_page(html: str) -> tuple[str, Any]:
    """Another site's page on 127.0.0.1 (another port: another origin, the same site)."""
    class One(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the handler's protocol)
            body = html.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), One)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}/", server


def _queued_run(lab: Lab, channel: str, serial: str) -> int:
    """A run that waits in its queue for a day: something a forged request could stop."""
    with lab.api("technician") as c:
        r = c.post("/api/v1/runs", json={
            "channel": channel, "cell_serial": serial, "template": "basic_cycle",
            "not_before": (datetime.now(UTC) + timedelta(days=1)).isoformat()})
        assert r.status_code == 201, r.text
        return int(r.json()["id"])


def test_forged_cross_site_post_is_refused(session, lab: Lab) -> None:
    run_id = _queued_run(lab, "cabinet1/6", "SIM-NMC811-C1-006")
    s = session("technician")
    page = s.open(f"/runs/{run_id}")  # the technician is signed in in this browser
    # Another site's page posts a form to the stop URL: a request a browser sends with
    # the session cookie (127.0.0.1 on another port is the same site for SameSite) but
    # without the CSRF header, and with that site's Origin.
    evil_url, server = _serve_page(
        f"<form id='f' method='post' action='{lab.base}/api/v1/runs/{run_id}/stop'></form>"
        "<script>document.getElementById('f').submit()</script>")
    try:
        evil = s.ctx.new_page()
        with evil.expect_response(f"**/api/v1/runs/{run_id}/stop") as forged:
            evil.goto(evil_url)
        resp = forged.value
        assert resp.status == 403, resp.text()
        sent = resp.request.all_headers()
        assert "labdaq_session=" in sent.get("cookie", ""), sent  # refused, not cookie-less
        assert sent.get("origin", "").startswith("http://127.0.0.1:")
        evil.close()
    finally:
        server.shutdown()
        server.server_close()
    with lab.api("technician") as c:
        assert c.get(f"/api/v1/runs/{run_id}").json()["state"] == "queued"
    # The same stop from our own page (the session's CSRF header sent) is accepted.
    page.click("#stop")
    page.click("#stop")  # a second click confirms
    page.wait_for_selector("body[data-run-state='stopped']")
    with lab.api("technician") as c:
        events = c.get(f"/api/v1/runs/{run_id}/events").json()
    # A waiting run is cancelled in its queue by the stop, audited as the session's user.
    (stop,) = [e for e in events if e["kind"] == "audit"
               and e["message"].startswith("cancelled in the queue")]
    assert stop["actor"].startswith("demo-")


def test_sign_out_ends_the_session(session, lab: Lab) -> None:
    s = session(None)
    page = s.page
    page.goto(lab.base + "/signin")
    page.fill("#token", lab.tokens["engineer"])
    page.click("#signin-form button[type=submit]")
    page.wait_for_selector("body[data-page='overview'][data-ready='true']")
    (sid,) = [c["value"] for c in s.ctx.cookies() if c["name"] == "labdaq_session"]
    with httpx.Client(base_url=lab.base, cookies={"labdaq_session": sid}) as c:
        assert c.get("/api/v1/whoami").json()["role"] == "engineer"
    page.click("#signout")
    page.wait_for_url("**/signin")
    assert not [c for c in s.ctx.cookies() if c["name"].startswith("labdaq_")]
    # Pages send the browser to sign in again, and the old cookie is refused everywhere.
    page.goto(lab.base + "/queue")
    page.wait_for_url("**/signin?next=%2Fqueue")
    with httpx.Client(base_url=lab.base, cookies={"labdaq_session": sid}) as c:
        r = c.get("/api/v1/whoami")
        assert r.status_code == 401 and "ended" in r.json()["detail"]
        assert c.get("/queue", follow_redirects=False).status_code == 303
    with lab.api("admin") as c:
        audit = c.get("/api/v1/audit", params={"limit": 1000}).json()
    assert any(a["action"].startswith("signed out of the dashboard")
               and a["actor"] == "dash-engineer" for a in audit), audit[-3:]


def test_import_form_brings_in_a_vendor_file(session, lab: Lab) -> None:
    with lab.api("technician") as c:  # a cell of its own: the seeded cells' pages count runs
        r = c.post("/api/v1/cells", json={
            "serial": "DASH-IMPORT-001", "chemistry": "nmc811", "capacity_ah": 4.9,
            "charge_cutoff_v": 4.2, "discharge_cutoff_v": 2.5})
        assert r.status_code == 201, r.text
    s = session("engineer")
    page = s.open("/imports/new")
    assert page.is_visible("nav a[href='/imports/new']")
    # Without a file the form says so beside the field and sends nothing.
    page.click("#import-submit")
    page.wait_for_selector("[data-for='file']:has-text('Choose a file')")
    # A file no reader knows: the API's 422 names the format field, and is shown there.
    page.set_input_files("#i-file", files=[{"name": "notes.txt", "mimeType": "text/plain",
                                            "buffer": b"not a cycler file\n"}])
    page.click("#import-submit")
    page.wait_for_selector("[data-for='format']:has-text('neware')")
    assert page.is_hidden("#import-result")
    page.set_input_files("#i-file", str(ROOT / "tests" / "data" / "vendor" / "test.ndax"))
    page.select_option("#i-format", "neware")
    page.select_option("#i-cell", "DASH-IMPORT-001")
    page.click("#import-submit")
    page.wait_for_selector("#import-result:not([hidden])")
    run_id = int(page.get_attribute("#import-result", "data-run-id") or 0)
    assert page.get_attribute("#import-result", "data-created") == "true"
    assert "neware" in page.inner_text("#import-facts")
    s.shot("import")
    with lab.api("engineer") as c:
        run = c.get(f"/api/v1/runs/{run_id}").json()
        (imp,) = c.get("/api/v1/imports", params={"run_id": run_id}).json()
    assert run["state"] == "imported" and run["cell_id"] == lab.cell_id("DASH-IMPORT-001")
    assert imp["format"] == "neware" and imp["imported_by"] == "dash-engineer"
    assert imp["n_samples"] > 0
    # The imported run's page: its recorded data plotted like any run's.
    page.click("#import-run")
    page.wait_for_url(f"**/runs/{run_id}")
    page.wait_for_selector("body[data-run-state='imported'][data-ready='true']")
    page.wait_for_function("Number(document.querySelector('#plot-vit').dataset.points) > 0")
    s.shot("import-run")


PAGES = ["/signin", "/", "/runs/new", "/runs/{run}", "/cells/{cell}", "/queue", "/admin",
         "/imports/new"]


@pytest.mark.parametrize("size", list(SIZES))
def test_no_page_scrolls_sideways(session, lab: Lab, seeded: Seeded, size: str) -> None:
    s = session("admin", size)
    for path in PAGES:
        url = path.format(run=seeded.runs[0], cell=seeded.cell_id)
        if url == "/signin":
            s.page.goto(lab.base + url)
            s.page.wait_for_selector("#signin-form")
        else:
            s.open(url)
        wide = s.page.evaluate(
            "document.documentElement.scrollWidth - document.documentElement.clientWidth")
        assert wide <= 0, f"{url} at {SIZES[size]} scrolls sideways by {wide} px"
        name = url.strip("/").replace("/", "-") or "overview"
        s.shot(f"{name}-{size}")
