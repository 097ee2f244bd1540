"""Imports of other labs' cycler files (labdaq.imports) through the API and the CLI: each
format's reader, the cycler's own per-cycle summary kept beside labdaq's and agreeing with
it, idempotence by file hash, read-only runs, files without a current column.

Files written here in the vendors' layouts (the cycler's counters integrated by the test
with the rectangle rule, as a cycler accumulates between readings; labdaq's from the
samples with trapezoids) cover the readers without public example files (Arbin CSV,
Maccor with cycles); the public files are in tests/test_import_vendor_files.py.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from labdaq import auth
from labdaq.api.app import create_app
from labdaq.cli import app as cli_app
from labdaq.config import Settings
from labdaq.imports.maccor import seconds
from labdaq.storage.db import create_engine, session_scope, sessionmaker

VENDOR = Path(__file__).parent / "data" / "vendor"


def _profile(cycles: int = 2, dt_s: float = 10.0) -> dict[str, np.ndarray]:
    """Charge at 1.0 A for an hour, rest, discharge at 0.95 A to 3.0 V, rest; repeated."""
    t, v, i, cyc, step = [], [], [], [], []
    now = 0.0
    for c in range(1, cycles + 1):
        for s, (amps, dur) in enumerate([(1.0, 3600.0), (0.0, 600.0), (-0.95, 3700.0),
                                         (0.0, 600.0)], start=1):
            n = int(dur / dt_s)
            tt = now + dt_s * np.arange(1, n + 1)
            frac = np.arange(1, n + 1) / n
            volts = {1.0: 3.0 + 1.2 * frac, 0.0: np.full(n, 3.6 if s == 4 else 4.1),
                     -0.95: 4.2 - 1.2 * frac}[amps]
            t.append(tt)
            v.append(volts)
            i.append(np.full(n, amps))
            cyc.append(np.full(n, c))
            step.append(np.full(n, s))
            now = tt[-1]
    return {k: np.concatenate(x) for k, x in
            dict(t=t, v=v, i=i, cycle=cyc, step=step).items()}


def _counters(p: dict[str, np.ndarray], reset: str) -> tuple[np.ndarray, np.ndarray]:
    """The cycler's charge and discharge Ah counters (rectangle rule), reset at each
    ``reset`` ("cycle" like Arbin, "step" like Maccor)."""
    dq = np.zeros_like(p["t"])
    dq[1:] = p["i"][1:] * np.diff(p["t"]) / 3600.0
    key = p["cycle"] if reset == "cycle" else p["cycle"] * 1000 + p["step"]
    qc, qd = np.zeros_like(dq), np.zeros_like(dq)
    for k in np.unique(key):
        sel = key == k
        qc[sel] = np.cumsum(np.clip(dq[sel], 0, None))
        qd[sel] = np.cumsum(np.clip(-dq[sel], 0, None))
    return qc, qd


def _expected(p: dict[str, np.ndarray]) -> dict[int, tuple[float, float]]:
    qc, qd = _counters(p, "step")
    return {int(c): (float(sum(qc[(p["cycle"] == c) & (p["step"] == s)].max() for s in (1, 3))),
                     float(sum(qd[(p["cycle"] == c) & (p["step"] == s)].max() for s in (1, 3))))
            for c in np.unique(p["cycle"])}


def write_arbin_csv(path: Path, p: dict[str, np.ndarray]) -> Path:
    qc, qd = _counters(p, "cycle")
    rows = ["Data_Point,Test_Time(s),Step_Index,Cycle_Index,Current(A),Voltage(V),"
            "Charge_Capacity(Ah),Discharge_Capacity(Ah)"]
    for k in range(p["t"].size):
        rows.append(f"{k + 1},{p['t'][k]:.3f},{p['step'][k]},{p['cycle'][k]},{p['i'][k]:.6f},"
                    f"{p['v'][k]:.6f},{qc[k]:.8f},{qd[k]:.8f}")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_maccor(path: Path, p: dict[str, np.ndarray]) -> Path:
    qc, qd = _counters(p, "step")
    state = np.where(p["i"] > 0, "C", np.where(p["i"] < 0, "D", "R"))
    rows = ["Today's Date 12/06/2026  Date of Test:\t12/01/2026\t Filename:\tcell.001",
            "Rec#\tCyc#\tStep\tTest (Sec)\tStep (Sec)\tAmp-hr\tWatt-hr\tAmps\tVolts\tState\tES"]
    for k in range(p["t"].size):
        rows.append(f"{k + 1}\t{p['cycle'][k]}\t{p['step'][k]}\t{p['t'][k]:.3f}\t0\t"
                    f"{qc[k] + qd[k]:.8f}\t0\t{abs(p['i'][k]):.6f}\t{p['v'][k]:.6f}\t"
                    f"{state[k]}\t0")
    path.write_text("\n".join(rows) + "\n")
    return path


def _clock(t_s: float) -> str:
    """A MacTest duration as its ``TestTime``/``StepTime`` columns write it."""
    d, rest = divmod(t_s, 86400.0)
    h, rest = divmod(rest, 3600.0)
    m, sec = divmod(rest, 60.0)
    return f"  {int(d)}d {int(h):02d}:{int(m):02d}:{sec:g}"


def write_maccor_clock(path: Path, p: dict[str, np.ndarray]) -> Path:
    """The MacTest layout with durations (``0d 01:02:3.5``) for test and step time, the
    step time counted from the reading before each step's first (where it began)."""
    qc, qd = _counters(p, "step")
    state = np.where(p["i"] > 0, "C", np.where(p["i"] < 0, "D", "R"))
    new = np.r_[True, np.diff(p["step"]) != 0]
    began = np.maximum.accumulate(np.where(new, np.r_[0.0, p["t"][:-1]], 0.0))
    rows = ["Today's Date:\t14 December 2020\tDate of Test:\t11 December 2020, 12:22:12 PM",
            "Filename:\tcell_01\tTester Channel:\t1",
            "Procedure:\tcycle.000\tDescription:\t",
            "Rec#\tCyc#\tStep\tTestTime\tStepTime\tAmp-hr\tWatt-hr\tAmps\tVolts\tState\tES\t"
            "DPt Time\t"]
    for k in range(p["t"].size):
        rows.append(f"{k + 1}\t{p['cycle'][k]}\t{p['step'][k]}\t{_clock(p['t'][k])}\t"
                    f"{_clock(p['t'][k] - began[k])}\t{qc[k] + qd[k]:.8f}\t0\t"
                    f"{abs(p['i'][k]):.5f}\t{p['v'][k]:.5f}\t{state[k]}\t1\t"
                    f"12/11/2020 12:22:12\t")
    path.write_text("\n".join(rows) + "\n")
    return path


def write_bdf(path: Path, p: dict[str, np.ndarray]) -> Path:
    rows = ["Test Time / s,Voltage / V,Current / A,Cycle Count / 1,Step Count / 1"]
    rows += [f"{p['t'][k]:.3f},{p['v'][k]:.6f},{p['i'][k]:.6f},{p['cycle'][k]},"
             f"{2 * p['cycle'][k] + p['step'][k]}" for k in range(p["t"].size)]
    path.write_text("\n".join(rows) + "\n")
    return path


def write_mpt_without_current(path: Path, p: dict[str, np.ndarray]) -> Path:
    """An EC-Lab text file with potential and charge but no current column."""
    q_mah = np.concatenate([[0.0], np.cumsum(
        0.5 * (p["i"][1:] + p["i"][:-1]) * np.diff(p["t"]) / 3.6)])
    lines = ["EC-Lab ASCII FILE", "Nb header lines : 4", "comment", "time/s\tEwe/V\t(Q-Qo)/mA.h"]
    lines += [f"{p['t'][k]:.3f}\t{p['v'][k]:.6f}\t{q_mah[k]:.6f}" for k in range(p["t"].size)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode())
    return path


Client = tuple[httpx.AsyncClient, dict[str, str]]


@contextlib.asynccontextmanager
async def _client(db_url: str) -> AsyncIterator[Client]:
    engine = create_engine(db_url)
    tokens: dict[str, str] = {}
    try:
        async with session_scope(sessionmaker(engine)) as s:
            for role in ("technician", "engineer", "admin"):
                user = await auth.create_user(s, f"{role}-user", role, actor="seed")
                _, tokens[role] = await auth.issue_token(s, user, "t", "seed", None)
    finally:
        await engine.dispose()
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://t") as c:
            yield c, {k: f"Bearer {v}" for k, v in tokens.items()}


@pytest.fixture
async def client(db_url: str) -> AsyncIterator[Client]:
    """On both databases: where what is stored and found again matters."""
    async with _client(db_url) as got:
        yield got


@pytest.fixture
async def sqlite_client(sqlite_url: str) -> AsyncIterator[Client]:
    """Where only the reader and the analysis matter."""
    async with _client(sqlite_url) as got:
        yield got


async def _upload(c: httpx.AsyncClient, token: str, path: Path,
                  **form: str) -> httpx.Response:
    return await c.post("/api/v1/imports", headers={"Authorization": token}, data=form,
                        files={"file": (path.name, path.read_bytes())})


@pytest.mark.parametrize("writer,fmt,name", [(write_arbin_csv, "arbin-csv", "cell.csv"),
                                             (write_maccor, "maccor", "cell.001"),
                                             (write_maccor_clock, "maccor", "cell.txt")])
async def test_vendor_summary_is_kept_and_agrees_with_ours(
        sqlite_client: Client, tmp_path: Path, writer: Any, fmt: str, name: str) -> None:
    c, tok = sqlite_client
    p = _profile()
    path = writer(tmp_path / name, p)
    r = await _upload(c, tok["engineer"], path)
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["format"] == fmt and got["reader_licence"] == "labdaq's own"
    if writer is write_maccor_clock:  # its step times put a reading where each step began
        assert got["details"]["step_start_readings"] == 7
    vendor = {row["cycle_index"]: row for row in got["vendor_cycles"]}
    ours = (await c.get(f"/api/v1/runs/{got['run_id']}/cycles",
                        headers={"Authorization": tok["engineer"]})).json()
    assert [row["cycle_index"] for row in ours] == [1, 2]
    expected = _expected(p)
    for row in ours:
        cyc = row["cycle_index"]
        for key, k in (("charge_capacity_ah", 0), ("discharge_capacity_ah", 1)):
            # Discharge counted negative: the vendor's sign convention was converted.
            assert row[key] > 0.9
            assert abs(row[key] - vendor[cyc][key]) / vendor[cyc][key] < 0.005, (cyc, key)
            assert vendor[cyc][key] == pytest.approx(expected[cyc][k], rel=1e-6)


async def test_import_is_idempotent_read_only_and_audited(client: Client,
                                                          tmp_path: Path) -> None:
    c, tok = client
    path = write_bdf(tmp_path / "cell.bdf.csv", _profile(cycles=1))
    first = await _upload(c, tok["engineer"], path)
    assert first.status_code == 201, first.text
    again = await _upload(c, tok["admin"], path)
    assert again.status_code == 200 and again.json()["run_id"] == first.json()["run_id"]
    assert again.json()["created"] is False
    listed = (await c.get("/api/v1/imports", headers={"Authorization": tok["technician"]})).json()
    assert [x["run_id"] for x in listed] == [first.json()["run_id"]]
    one = await c.get(f"/api/v1/imports?run_id={first.json()['run_id']}",
                      headers={"Authorization": tok["technician"]})
    assert [x["id"] for x in one.json()] == [first.json()["id"]]
    run_id = first.json()["run_id"]
    run = (await c.get(f"/api/v1/runs/{run_id}", headers={"Authorization": tok["admin"]})).json()
    assert run["state"] == "imported"
    for command in ("pause", "resume", "stop"):
        r = await c.post(f"/api/v1/runs/{run_id}/{command}",
                         headers={"Authorization": tok["admin"]})
        assert r.status_code == 409, (command, r.text)
    # A technician may not import; the run's trail names who did.
    r = await _upload(c, tok["technician"], path)
    assert r.status_code == 403
    trail = (await c.get(f"/api/v1/audit?run_id={run_id}",
                         headers={"Authorization": tok["admin"]})).json()
    assert any("imported from cell.bdf.csv" in t["action"] and t["actor"] == "engineer-user"
               for t in trail), trail


async def test_imported_run_is_analysed_and_evaluated(sqlite_client: Client,
                                                      tmp_path: Path) -> None:
    c, tok = sqlite_client
    path = write_bdf(tmp_path / "cell.bdf.csv", _profile(cycles=2))
    run_id = (await _upload(c, tok["engineer"], path)).json()["run_id"]
    h = {"Authorization": tok["engineer"]}
    samples = (await c.get(f"/api/v1/runs/{run_id}/samples?limit=5", headers=h)).json()
    assert samples["current_a"][0] == pytest.approx(1.0)
    r = await c.get(f"/api/v1/runs/{run_id}/evaluation", headers=h)
    assert r.status_code == 200, r.text


@pytest.mark.slow  # the export's reader process: 4-7 s on a loaded machine
async def test_imported_runs_bdf_export_imports_to_the_same_cycles(
        sqlite_client: Client, tmp_path: Path) -> None:
    c, tok = sqlite_client
    h = {"Authorization": tok["engineer"]}
    path = write_bdf(tmp_path / "cell.bdf.csv", _profile(cycles=2))
    run_id = (await _upload(c, tok["engineer"], path)).json()["run_id"]
    exported = await c.get(f"/api/v1/runs/{run_id}/export?format=bdf", headers=h)
    assert exported.status_code == 200, exported.text
    back = tmp_path / "again.bdf.csv"
    back.write_bytes(exported.content)
    again = (await _upload(c, tok["engineer"], back)).json()
    assert again["created"] and again["run_id"] != run_id
    cycles = [(await c.get(f"/api/v1/runs/{rid}/cycles", headers=h)).json()
              for rid in (run_id, again["run_id"])]
    assert [x["discharge_capacity_ah"] for x in cycles[0]] == pytest.approx(
        [x["discharge_capacity_ah"] for x in cycles[1]], rel=1e-9)


async def test_file_without_current_is_imported_from_its_charge(
        sqlite_client: Client, tmp_path: Path) -> None:
    c, tok = sqlite_client
    p = _profile(cycles=1)
    r = await _upload(c, tok["engineer"], write_mpt_without_current(tmp_path / "ocv.mpt", p))
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["format"] == "biologic" and got["current_measured"] is False
    assert got["reader_licence"] == "GPL-3.0-or-later"
    (cyc,) = (await c.get(f"/api/v1/runs/{got['run_id']}/cycles",
                          headers={"Authorization": tok["engineer"]})).json()
    assert cyc["charge_capacity_ah"] == pytest.approx(1.0, rel=0.005)
    assert cyc["discharge_capacity_ah"] == pytest.approx(0.95 * 3700 / 3600, rel=0.005)


def test_public_maccor_export_through_the_cli(sqlite_url: str, tmp_path: Path) -> None:
    """battery-data-toolkit's Maccor example (minutes, rest only) via `labdaq import`."""
    runner = CliRunner()
    args = ["import", str(VENDOR / "maccor_example.001"), "--database-url", sqlite_url,
            "--by", "ci"]
    first = runner.invoke(cli_app, args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.output)
    assert out["format"] == "maccor" and out["samples"] == 8 and out["created"] is True
    again = json.loads(runner.invoke(cli_app, args).output)
    assert again["run_id"] == out["run_id"] and again["created"] is False
    other = write_bdf(tmp_path / "x.bdf.csv", _profile(cycles=1))
    bad = runner.invoke(cli_app, ["import", str(other), "--cell", "NO-SUCH",
                                  "--database-url", sqlite_url])
    assert bad.exit_code == 2 and "no cell with serial 'NO-SUCH'" in bad.output
    # Without a template `labdaq evaluate` says why no entry applies; with one, its entries.
    plain = json.loads(runner.invoke(cli_app, ["import", str(other), "--database-url",
                                               sqlite_url]).output)
    said = runner.invoke(cli_app, ["evaluate", str(plain["run_id"]), "--database-url",
                                   sqlite_url])
    assert said.exit_code == 0 and "imported without a protocol template" in said.output
    cycled = write_bdf(tmp_path / "y.bdf.csv", _profile(cycles=2))
    out = json.loads(runner.invoke(cli_app, [
        "import", str(cycled), "--template", "basic_cycle", "--database-url",
        sqlite_url]).output)
    assert out["template"] == "basic_cycle"
    said = runner.invoke(cli_app, ["evaluate", str(out["run_id"]), "--database-url",
                                   sqlite_url])
    assert said.exit_code == 0 and "lab-energy-efficiency" in said.output, said.output


async def test_unreadable_file_is_422_not_500(sqlite_client: Client) -> None:
    c, tok = sqlite_client
    for fmt in (None, "biologic", "arbin-csv", "maccor", "bdf", "neware", "arbin-res"):
        form = {} if fmt is None else {"format": fmt}
        for name, body in (("x.mpr", b"\x00\xff" * 64), ("../x.csv", b"Test_Time,Cycle_Index\n"),
                           ("x.001", b"Rec#\tCyc#\n1\tz\n"), ("x.bdf.csv", b"nan")):
            r = await c.post("/api/v1/imports", headers={"Authorization": tok["engineer"]},
                             data=form, files={"file": (name, body)})
            assert r.status_code == 422, (fmt, name, r.text)
            assert r.headers["content-type"] == "application/problem+json"


def test_maccor_durations_are_read_as_seconds() -> None:
    assert seconds("  0d 00:00:5.05000019073486") == pytest.approx(5.05000019073486)
    assert seconds("2d 03:04:05.5") == 2 * 86400 + 3 * 3600 + 4 * 60 + 5.5
    assert seconds("01:02.5") == 62.5 and seconds("1,234.5") == 1234.5
    assert seconds("") != seconds("")  # blank: NaN
    with pytest.raises(ValueError):
        seconds("5 min")


def _entries(evaluation: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["entry_id"]: e for e in evaluation["entries"]}


async def test_imported_run_without_template_says_so(sqlite_client: Client,
                                                     tmp_path: Path) -> None:
    c, tok = sqlite_client
    h = {"Authorization": tok["engineer"]}
    path = write_bdf(tmp_path / "cell.bdf.csv", _profile(cycles=2))
    got = (await _upload(c, tok["engineer"], path)).json()
    assert got["template"] is None
    ev = (await c.get(f"/api/v1/runs/{got['run_id']}/evaluation", headers=h)).json()
    assert ev["entries"] == [] and ev["template"] is None
    assert ev["note"].startswith("imported without a protocol template")
    # An unknown template is refused before the file is read.
    bad = await _upload(c, tok["engineer"], path, template="no_such_template")
    assert bad.status_code == 422 and "no_such_template" in bad.text


async def test_imported_run_is_judged_by_its_declared_template(sqlite_client: Client,
                                                               tmp_path: Path) -> None:
    """basic_cycle's entries report the imported cycles' efficiencies; capacity_check_c3's
    AIS-156 pre-cycling entry is not evaluable while the cell's capacity is the import's
    placeholder and passes once the lab enters the datasheet value (0.95 A is C/3 of a
    2.85 Ah cell). Changing the template is audited; a technician may not."""
    c, tok = sqlite_client
    h = {"Authorization": tok["engineer"]}
    path = write_bdf(tmp_path / "cell.bdf.csv", _profile(cycles=2))
    r = await _upload(c, tok["engineer"], path, template="basic_cycle")
    assert r.status_code == 201, r.text
    got = r.json()
    assert got["template"] == "basic_cycle"
    run_id = got["run_id"]
    ev = (await c.get(f"/api/v1/runs/{run_id}/evaluation", headers=h)).json()
    assert ev["template"] == "basic_cycle" and "tagged step" in ev["note"]
    eff = _entries(ev)["lab-energy-efficiency"]
    assert eff["verdict"] == "reported"
    ce = next(cr for cr in eff["criteria"] if cr["metric"] == "coulombic_efficiency")
    assert ce["value"] == pytest.approx(0.95 * 3700 / 3600, rel=0.005)

    patch = f"/api/v1/imports/{got['id']}"
    assert (await c.patch(patch, headers={"Authorization": tok["technician"]},
                          json={"template": "capacity_check_c3"})).status_code == 403
    assert (await c.patch(patch, headers=h, json={"template": "nope"})).status_code == 422
    r = await c.patch(patch, headers=h, json={"template": "capacity_check_c3"})
    assert r.status_code == 200 and r.json()["template"] == "capacity_check_c3"
    pre = _entries((await c.get(f"/api/v1/runs/{run_id}/evaluation", headers=h)).json())[
        "ais156-cell-precycle"]
    assert pre["verdict"] == "not_evaluable"
    assert pre["criteria"][0]["reason"] == "the cell has no rated capacity"
    cell_id = (await c.get(f"/api/v1/runs/{run_id}", headers=h)).json()["cell_id"]
    # Cells are a technician's to edit (role "operate").
    r = await c.patch(f"/api/v1/cells/{cell_id}", headers={"Authorization": tok["technician"]},
                      json={"capacity_ah": 2.85})
    assert r.status_code == 200, r.text
    pre = _entries((await c.get(f"/api/v1/runs/{run_id}/evaluation", headers=h)).json())[
        "ais156-cell-precycle"]
    assert pre["verdict"] == "pass" and pre["criteria"][0]["value"] == 2.0
    trail = (await c.get(f"/api/v1/audit?run_id={run_id}",
                         headers={"Authorization": tok["admin"]})).json()
    assert any("protocol template set to capacity_check_c3" in t["action"] for t in trail)
    report = await c.get(f"/api/v1/runs/{run_id}/report", headers=h)
    assert report.status_code == 200 and "imported (bdf) as following template" in report.text
