"""Runs with synthetic samples written straight into the database, for the data-out tests.

The samples are stored rows like the writer's (same table, same columns), with values
chosen to be awkward for text formats: non-terminating binary fractions, tiny and huge
magnitudes, negative zero, and missing temperatures at the start of the run.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import numpy as np
import pyarrow as pa
from sqlalchemy.engine import make_url

from labdaq.auth import create_token
from labdaq.channels import upsert_instrument
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

CELL = {
    "serial": "EXP-001",
    "chemistry": "nmc811",
    "capacity_ah": 4.9,
    "charge_cutoff_v": 4.2,
    "discharge_cutoff_v": 2.5,
}


def synthetic_columns(n: int, seed: int = 1, start_seq: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = np.arange(start_seq, start_seq + n, dtype=np.int64)
    t = seq * 0.1 + rng.random(n) * 1e-3
    cycle = (seq // 5000).astype(np.int64)
    step = ((seq // 1250) % 4).astype(np.int64)
    v = 3.0 + rng.random(n) * 1.2
    i = np.where(step % 2 == 0, 2.45, -2.45) + rng.normal(0, 1e-3, n)
    temp = 25.0 + rng.random(n) / 3.0
    cap = rng.random(n) * 5.0
    energy = rng.random(n) * 1e-300 + rng.random(n) * 20.0
    if n > 4:
        v[1] = 0.1
        i[2] = -0.0
        energy[3] = 2.5e22
        cap[4] = 1 / 3
    return {
        "seq": seq,
        "t_s": t,
        "ts_utc": 1.7e9 + t,
        "step_index": step,
        "cycle_index": cycle,
        "voltage_v": v,
        "current_a": i,
        "temperature_c": temp,
        "step_capacity_ah": cap,
        "step_energy_wh": energy,
        "flags": (seq % 7 == 0).astype(np.int64),
        "temperature_age_s": rng.random(n) * 2.0,
    }


#: Arrow types matching the samples table's columns on SQLite and PostgreSQL.
_INGEST_TYPES = {
    "run_id": pa.int32(), "seq": pa.int64(), "step_index": pa.int32(),
    "cycle_index": pa.int32(), "flags": pa.int32(),
}


def insert_samples(url: str, run_id: int, n: int, batch: int = 200_000, seed: int = 1,
                   missing_temperature: int = 10, first_seq: int = 1) -> None:
    """Insert ``n`` samples for ``run_id``: sqlite3 ``executemany`` on SQLite, ADBC bulk
    ingest on PostgreSQL (fast enough for millions of rows). Not ADBC on SQLite: its own
    copy of the SQLite library breaks the locks of this process's other connections
    (labdaq.export.connect)."""
    u = make_url(url)
    sqlite = u.get_backend_name() == "sqlite"
    if sqlite:
        conn: Any = sqlite3.connect(u.database or "")
    else:
        import adbc_driver_postgresql.dbapi as adbc_pg

        conn = adbc_pg.connect(u.set(drivername="postgresql").render_as_string(
            hide_password=False))
    try:
        cur = conn.cursor()
        for start in range(0, n, batch):
            k = min(batch, n - start)
            c = synthetic_columns(k, seed=seed + start, start_seq=first_seq + start)
            missing = np.arange(start, start + k) < missing_temperature
            arrays = {"run_id": np.full(k, run_id), **c}
            table = pa.table({
                name: pa.array(arrays[name], type=_INGEST_TYPES.get(name, pa.float64()),
                               mask=missing if name in ("temperature_c", "temperature_age_s")
                               else None)
                for name in m.SAMPLE_COLUMNS
            })
            if sqlite:
                cur.executemany(
                    f"INSERT INTO samples ({', '.join(m.SAMPLE_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(m.SAMPLE_COLUMNS))})",
                    zip(*(table.column(x).to_pylist() for x in m.SAMPLE_COLUMNS), strict=True),
                )
            else:
                cur.adbc_ingest("samples", table, mode="append")
            conn.commit()
        cur.close()
    finally:
        conn.close()


async def make_lab(url: str, runs: int = 1) -> dict[str, Any]:
    """An instrument, a channel, a cell, a protocol and ``runs`` completed runs; tokens."""
    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            inst = await upsert_instrument(
                s, "smu1", "keithley2450", "TCPIP::127.0.0.1::1::SOCKET",
                [{"index": 1, "name": "smu1/1", "max_current_a": 7.35, "max_voltage_v": 105.0}],
            )
            inst.idn = "KEITHLEY INSTRUMENTS,MODEL 2450,04321987,1.7.12b"
            cell = m.Cell(**CELL, maker="Samsung SDI", model="INR21700-50E", lot="L7")
            proto = m.Protocol(name="basic_cycle", content_hash="sha256:" + "ab" * 32,
                               document={"steps": []})
            s.add_all([cell, proto])
            await s.flush()
            channel_id = (await s.get(m.Instrument, inst.id)) and inst.id
            ch = (await s.execute(m.Channel.__table__.select())).first()
            assert ch is not None and channel_id
            run_ids = []
            for _ in range(runs):
                run = m.Run(channel_id=ch.id, cell_id=cell.id, protocol_id=proto.id,
                            state="completed", sample_period_s=0.1)
                s.add(run)
                await s.flush()
                run_ids.append(run.id)
            tokens = {
                role: await create_token(s, f"t-{role}", role)
                for role in ("technician", "engineer", "admin")
            }
            return {"run_ids": run_ids, "cell_id": cell.id, "tokens": tokens}
    finally:
        await engine.dispose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def api_server(url: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``labdaq api`` in its own process on a free port; yields its base URL. Its output
    goes to a file next to the database (a pipe nobody reads would fill and block it)."""
    port = free_port()
    log_path = f"{make_url(url).database or '/tmp/labdaq'}-api.log" if url.startswith(
        "sqlite") else os.devnull
    log = open(log_path, "wb")  # noqa: SIM115 - closed in the finally below
    env = {**os.environ, "LABDAQ_API_NICE": "0"}
    env.pop("LABDAQ_DATABASE_URL", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "labdaq.cli", "api", "--port", str(port), "--database-url", url],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120  # generous: a loaded machine imports slowly
        while True:
            assert proc.poll() is None, open(log_path, "rb").read().decode(errors="replace")
            try:
                if httpx.get(f"{base}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "labdaq api did not come up"
            time.sleep(0.2)
        yield base, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def peak_rss_bytes(pid: int) -> int:
    """The process's peak resident set (VmHWM), from /proc."""
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc status")
