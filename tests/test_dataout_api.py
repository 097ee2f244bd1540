"""Data out over the API, in-process: exports (CSV, Parquet, BDF), samples pages and
downsampling, cells. Samples are synthetic rows written straight into SQLite."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import text

from labdaq import export
from labdaq.api.app import create_app
from labdaq.config import Settings
from labdaq.storage.db import create_engine
from tests.dataout_fixtures import insert_samples, make_lab

N = 30_000  # several export chunks (65,536 rows each would be one: the tests use smaller)


@pytest.fixture(autouse=True)
def _small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Many chunks in a small run: the chunk seams are where streaming goes wrong.
    monkeypatch.setattr(export, "DEFAULT_CHUNK_ROWS", 7_000)
    monkeypatch.setattr(export.stream_export, "__defaults__", (7_000,))


@pytest.fixture
async def lab(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, Any], str]]:
    info = await make_lab(db_url, runs=2)
    insert_samples(db_url, info["run_ids"][0], N)
    insert_samples(db_url, info["run_ids"][1], 1_000, seed=99)
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, info, db_url


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def stored(url: str, run_id: int) -> dict[str, list[Any]]:
    """The stored samples, read through SQLAlchemy (not the ADBC path under test)."""
    engine = create_engine(url)
    try:
        async with engine.connect() as con:
            rows = (await con.execute(
                text(f"SELECT {', '.join(export.COLUMNS)} FROM samples WHERE run_id = :r "
                     "ORDER BY seq"), {"r": run_id},
            )).all()
    finally:
        await engine.dispose()
    return {c: [r[i] for r in rows] for i, c in enumerate(export.COLUMNS)}


def digest_of(table: pa.Table) -> str:
    d = export.DataDigest()
    for b in table.select(list(export.COLUMNS)).to_batches():
        d.update(b)
    return d.hexdigest()


# --- exports ----------------------------------------------------------------------------


async def test_parquet_export_reads_back_bit_exact(lab) -> None:
    c, info, url = lab
    run_id = info["run_ids"][0]
    r = await c.get(f"/api/v1/runs/{run_id}/export", params={"format": "parquet"},
                    headers=auth(info["tokens"]["engineer"]))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/vnd.apache.parquet"
    assert f'filename="run-{run_id}.parquet"' in r.headers["content-disposition"]
    f = pq.ParquetFile(io.BytesIO(r.content))
    assert f.metadata.num_row_groups > 1  # streamed in chunks
    table = f.read()
    want = await stored(url, run_id)
    assert table.num_rows == N
    for col in export.COLUMNS:
        got = table.column(col).to_pylist()
        if col in ("seq", "step_index", "cycle_index", "flags"):
            assert got == want[col], col
        else:
            # Bit-exact: compare the IEEE-754 bit patterns (None where no value is stored).
            to_bits = [None if v is None else np.float64(v).view(np.int64) for v in want[col]]
            got_bits = [None if v is None else np.float64(v).view(np.int64) for v in got]
            assert got_bits == to_bits, col
    assert table.column("temperature_c").null_count == 10
    # Self-describing: the description in the schema, the digest in the footer.
    kv = {k.decode(): v.decode() for k, v in f.metadata.metadata.items()}
    cell = json.loads(kv["labdaq.cell"])
    run = json.loads(kv["labdaq.run"])
    assert cell["serial"] == "EXP-001" and cell["maker"] == "Samsung SDI"
    assert run["protocol"]["content_hash"] == "sha256:" + "ab" * 32
    assert run["instruments"][0]["serial"] == "04321987"
    assert json.loads(kv["labdaq.software"])["name"] == "labdaq"
    assert kv["labdaq.rows"] == str(N)
    assert kv["labdaq.data_sha256"] == digest_of(table)
    assert b"labdaq.cell" in table.schema.metadata


async def test_csv_floats_round_trip_exactly(lab) -> None:
    c, info, url = lab
    run_id = info["run_ids"][0]
    r = await c.get(f"/api/v1/runs/{run_id}/export", params={"format": "csv"},
                    headers=auth(info["tokens"]["engineer"]))
    assert r.status_code == 200
    text = r.text
    head = [ln for ln in text.splitlines() if ln.startswith("#")]
    body = [ln for ln in text.splitlines() if not ln.startswith("#")]
    block = {ln[2:].split(": ", 1)[0]: ln[2:].split(": ", 1)[1] for ln in head[1:]}
    assert json.loads(block["cell"])["serial"] == "EXP-001"
    assert json.loads(block["run"])["protocol"]["content_hash"].startswith("sha256:")
    assert block["rows"] == str(N)
    rows = list(csv.reader(body))
    assert tuple(rows[0]) == export.COLUMNS
    want = await stored(url, run_id)
    assert len(rows) - 1 == N
    for j, col in enumerate(export.COLUMNS):
        for i, row in enumerate(rows[1:]):
            w = want[col][i]
            if w is None:
                assert row[j] == ""
            elif isinstance(w, float):
                # Shortest repr: parsing gives back the same double, and no longer text
                # than Python's own shortest representation.
                assert float(row[j]) == w and len(row[j]) <= len(repr(w)) + 2, (col, i)
            else:
                assert int(row[j]) == w
    # The same digest as the Parquet export of the same data.
    pq_r = await c.get(f"/api/v1/runs/{run_id}/export", params={"format": "parquet"},
                       headers=auth(info["tokens"]["engineer"]))
    kv = pq.read_metadata(io.BytesIO(pq_r.content)).metadata
    assert block["data_sha256"] == kv[b"labdaq.data_sha256"].decode()


# The Battery Data Format's quantities (battery-data-alliance/battery-data-format,
# README.md, "Defining the BDF for Cycler Time-Series Data", tables 2-4: preferred labels).
BDF_SPEC_LABELS = {
    "Test Time / s", "Voltage / V", "Current / A",  # required
    "Unix Time / s", "Cycle Count / 1", "Step Count / 1", "Ambient Temperature / degC",
    "Step Index / 1", "Charging Capacity / Ah", "Discharging Capacity / Ah",
    "Step Capacity / Ah", "Net Capacity / Ah", "Cumulative Capacity / Ah",
    "Charging Energy / Wh", "Discharging Energy / Wh", "Step Energy / Wh",
    "Net Energy / Wh", "Cumulative Energy / Wh", "Power / W", "Internal Resistance / Ohm",
    "Ambient Pressure / Pa", "Applied Pressure / Pa",
    *(f"Surface Temperature T{k} / degC" for k in range(1, 6)),
}


async def test_bdf_column_names_match_the_specification(lab) -> None:
    c, info, url = lab
    run_id = info["run_ids"][0]
    r = await c.get(f"/api/v1/runs/{run_id}/export", params={"format": "bdf"},
                    headers=auth(info["tokens"]["engineer"]))
    assert r.status_code == 200
    assert r.headers["content-disposition"].endswith('.bdf.csv"')
    rows = list(csv.reader(io.StringIO(r.text)))
    header = rows[0]
    # BDF: the first row is the header of preferred labels; every row has its columns.
    assert set(header) <= BDF_SPEC_LABELS
    assert {"Test Time / s", "Voltage / V", "Current / A"} <= set(header)
    assert all(len(row) == len(header) for row in rows[1:])
    assert len(rows) - 1 == N
    want = await stored(url, run_id)
    col = {name: [row[k] for row in rows[1:]] for k, name in enumerate(header)}
    assert [float(v) for v in col["Voltage / V"]] == want["voltage_v"]
    assert [float(v) for v in col["Test Time / s"]] == want["t_s"]
    steps = [int(v) for v in col["Step Count / 1"]]
    assert all(b - a in (0, 1) for a, b in zip(steps, steps[1:], strict=False))
    changes = sum(
        1 for k in range(1, N)
        if (want["step_index"][k], want["cycle_index"][k])
        != (want["step_index"][k - 1], want["cycle_index"][k - 1])
    )
    assert steps[-1] - steps[0] == changes
    # Its description is the parallel metadata document, with the same digest.
    meta = await c.get(f"/api/v1/runs/{run_id}/export/metadata", params={"format": "bdf"},
                       headers=auth(info["tokens"]["engineer"]))
    assert meta.status_code == 200
    pq_r = await c.get(f"/api/v1/runs/{run_id}/export", params={"format": "parquet"},
                       headers=auth(info["tokens"]["engineer"]))
    kv = pq.read_metadata(io.BytesIO(pq_r.content)).metadata
    assert meta.json()["data_sha256"] == kv[b"labdaq.data_sha256"].decode()
    assert meta.json()["columns"]["voltage_v"] == "Voltage / V"


async def test_cell_export_holds_all_its_runs(lab) -> None:
    c, info, _ = lab
    r = await c.get(f"/api/v1/cells/{info['cell_id']}/export", params={"format": "parquet"},
                    headers=auth(info["tokens"]["engineer"]))
    assert r.status_code == 200
    t = pq.read_table(io.BytesIO(r.content))
    assert t.num_rows == N + 1_000
    ids = t.column("run_id").to_pylist()
    assert ids[:N] == [info["run_ids"][0]] * N and ids[N:] == [info["run_ids"][1]] * 1_000
    bdf = await c.get(f"/api/v1/cells/{info['cell_id']}/export", params={"format": "bdf"},
                      headers=auth(info["tokens"]["engineer"]))
    assert bdf.status_code == 422


async def test_export_errors(lab) -> None:
    c, info, _ = lab
    run_id = info["run_ids"][0]
    assert (await c.get(f"/api/v1/runs/{run_id}/export")).status_code == 401
    eng = auth(info["tokens"]["engineer"])
    r = await c.get(f"/api/v1/runs/{run_id}/export", params={"format": "xlsx"}, headers=eng)
    assert r.status_code == 422 and "format" in r.text
    assert (await c.get("/api/v1/runs/9999/export", headers=eng)).status_code == 404
    assert (await c.get("/api/v1/cells/9999/export", headers=eng)).status_code == 404


# --- samples ----------------------------------------------------------------------------


async def test_samples_cursor_walks_every_row_once(lab) -> None:
    c, info, url = lab
    run_id = info["run_ids"][0]
    eng = auth(info["tokens"]["engineer"])
    seqs: list[int] = []
    after = 0
    pages = 0
    while True:
        r = await c.get(f"/api/v1/runs/{run_id}/samples",
                        params={"after_seq": after, "limit": 7_000}, headers=eng)
        assert r.status_code == 200
        page = r.json()
        seqs += page["seq"]
        pages += 1
        after = page["next_after_seq"]
        if not page["more"]:
            break
    assert pages == 5
    assert seqs == (await stored(url, run_id))["seq"]


async def test_samples_filters_by_time_and_cycle(lab) -> None:
    c, info, url = lab
    run_id = info["run_ids"][0]
    eng = auth(info["tokens"]["engineer"])
    want = await stored(url, run_id)
    r = await c.get(f"/api/v1/runs/{run_id}/samples",
                    params={"t_from": 100.0, "t_to": 200.0, "limit": 100_000}, headers=eng)
    got = r.json()
    expect = [s for s, t in zip(want["seq"], want["t_s"], strict=True) if 100.0 <= t <= 200.0]
    assert got["seq"] == expect and got["more"] is False
    r = await c.get(f"/api/v1/runs/{run_id}/samples",
                    params={"cycle": 3, "limit": 100_000}, headers=eng)
    expect = [s for s, k in zip(want["seq"], want["cycle_index"], strict=True) if k == 3]
    assert r.json()["seq"] == expect and len(expect) == 5000


async def test_samples_downsampled_keep_shape(lab) -> None:
    c, info, url = lab
    run_id = info["run_ids"][0]
    eng = auth(info["tokens"]["engineer"])
    r = await c.get(f"/api/v1/runs/{run_id}/samples", params={"points": 500}, headers=eng)
    assert r.status_code == 200
    got = r.json()
    want = await stored(url, run_id)
    assert got["downsampled"] is True and got["source_count"] == N
    assert 250 <= got["count"] <= 500
    assert got["seq"] == sorted(set(got["seq"]))
    index = {s: k for k, s in enumerate(want["seq"])}
    for k, s in enumerate(got["seq"]):  # real stored rows, not interpolated values
        assert got["voltage_v"][k] == want["voltage_v"][index[s]]
    assert got["seq"][0] == want["seq"][0] and got["seq"][-1] == want["seq"][-1]
    # The one deep voltage dip (seq 2, 0.1 V) survives 60:1 downsampling.
    assert min(got["voltage_v"]) == 0.1
    # Fewer rows than points: all of them.
    r = await c.get(f"/api/v1/runs/{run_id}/samples",
                    params={"points": 1000, "cycle": 0, "t_to": 50.0}, headers=eng)
    expect = [s for s, t, k in zip(want["seq"], want["t_s"], want["cycle_index"], strict=True)
              if t <= 50.0 and k == 0]
    assert r.json()["seq"] == expect
    bad = await c.get(f"/api/v1/runs/{run_id}/samples", params={"points": 1}, headers=eng)
    assert bad.status_code == 422


# --- cells ------------------------------------------------------------------------------


async def test_cells_create_edit_audit_and_roles(lab) -> None:
    c, info, _ = lab
    tech, eng = auth(info["tokens"]["technician"]), auth(info["tokens"]["engineer"])
    body = {"serial": "LFP-7", "spec": "lfp", "maker": "A123", "model": "ANR26650M1B",
            "lot": "2026-11", "received_on": "2026-11-30"}
    assert (await c.post("/api/v1/cells", json=body)).status_code == 401
    assert (await c.post("/api/v1/cells", json=body, headers=eng)).status_code == 403
    r = await c.post("/api/v1/cells", json=body, headers=tech)
    assert r.status_code == 201, r.text
    cell = r.json()
    # Electrical values come from seeds/cells/lfp.yaml.
    assert cell["capacity_ah"] == 2.5 and cell["charge_cutoff_v"] == 3.6
    assert cell["spec_name"] == "lfp" and cell["received_on"] == "2026-11-30"
    assert cell["run_ids"] == []
    assert (await c.post("/api/v1/cells", json=body, headers=tech)).status_code == 409
    bad = {"serial": "X-1", "chemistry": "nmc", "capacity_ah": 1.0,
           "charge_cutoff_v": 2.0, "discharge_cutoff_v": 3.0}
    r = await c.post("/api/v1/cells", json=bad, headers=tech)
    assert r.status_code == 422 and "discharge_cutoff_v" in r.text
    r = await c.post("/api/v1/cells", json={"serial": "X-2", "spec": "nope"}, headers=tech)
    assert r.status_code == 422 and "lfp" in r.text
    # Edit: only the given fields change, and the audit trail says who and what.
    r = await c.patch(f"/api/v1/cells/{cell['id']}", json={"lot": "2026-12"}, headers=tech)
    assert r.status_code == 200 and r.json()["lot"] == "2026-12"
    assert r.json()["maker"] == "A123" and r.json()["updated_at"] is not None
    assert (await c.patch(f"/api/v1/cells/{cell['id']}", json={"lot": "x"},
                          headers=eng)).status_code == 403
    r = await c.patch(f"/api/v1/cells/{cell['id']}", json={"discharge_cutoff_v": 3.7},
                      headers=tech)
    assert r.status_code == 422
    events = (await c.get(f"/api/v1/cells/{cell['id']}/events", headers=eng)).json()
    assert [e["actor"] for e in events] == ["t-technician", "t-technician"]
    assert events[1]["data"]["before"]["lot"] == "2026-11"
    assert events[1]["data"]["after"]["lot"] == "2026-12"
    # Lists and single reads show each cell's runs.
    listed = (await c.get("/api/v1/cells", headers=eng)).json()
    exp = next(x for x in listed if x["serial"] == "EXP-001")
    assert exp["run_ids"] == info["run_ids"]
    one = (await c.get(f"/api/v1/cells/{info['cell_id']}", headers=eng)).json()
    assert one["run_ids"] == info["run_ids"]
    assert (await c.get("/api/v1/cells", params={"serial": "LFP-7"},
                        headers=eng)).json()[0]["id"] == cell["id"]
    assert (await c.get("/api/v1/cells/9999", headers=eng)).status_code == 404
