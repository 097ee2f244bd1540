"""Export rows/s over HTTP against the plain fastest path, measured in the same run.

One job: a run of N synthetic samples (stored rows in a migrated SQLite file) is exported
through labdaq's API (`GET /api/v1/runs/{id}/export`, `labdaq api` in its own process,
response streamed to nowhere by an httpx client) and, as the baseline, by the plainest
fast path: ADBC `SELECT ... ORDER BY seq` straight into one Arrow table, then pyarrow
writes it (Parquet zstd, or Arrow CSV) to a file. Both for Parquet and CSV; each repeat
takes the best of `--repeats`. Prints one JSON line per format; Parquet last.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _lab(url: str) -> tuple[int, str]:
    from labdaq.auth import create_token
    from labdaq.channels import upsert_instrument
    from labdaq.storage import models as m
    from labdaq.storage.db import create_engine, session_scope, sessionmaker

    engine = create_engine(url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            inst = await upsert_instrument(s, "smu1", "keithley2450", "TCPIP::127.0.0.1::1::SOCKET",
                                           [{"index": 1, "name": "smu1/1"}])
            await s.flush()
            ch = (await s.execute(m.Channel.__table__.select())).first()
            assert ch is not None and inst.id
            cell = m.Cell(serial="B-1", chemistry="nmc811", capacity_ah=4.9,
                          charge_cutoff_v=4.2, discharge_cutoff_v=2.5)
            proto = m.Protocol(name="bench", content_hash="sha256:" + "0" * 64, document={})
            s.add_all([cell, proto])
            await s.flush()
            run = m.Run(channel_id=ch.id, cell_id=cell.id, protocol_id=proto.id,
                        state="completed", sample_period_s=1.0)
            s.add(run)
            await s.flush()
            return run.id, await create_token(s, "bench", "engineer")
    finally:
        await engine.dispose()


def _fill(path: str, run_id: int, rows: int, batch: int = 200_000) -> None:
    from labdaq.storage.models import SAMPLE_COLUMNS

    con = sqlite3.connect(path)
    rng = np.random.default_rng(0)
    sql = (f"INSERT INTO samples ({', '.join(SAMPLE_COLUMNS)}) "
           f"VALUES ({', '.join('?' * len(SAMPLE_COLUMNS))})")
    for start in range(0, rows, batch):
        k = min(batch, rows - start)
        seq = np.arange(start + 1, start + k + 1)
        t = seq * 1.0
        cols = [np.full(k, run_id), seq, t, 1.7e9 + t, (seq // 1000) % 4, seq // 4000,
                3.0 + rng.random(k), rng.normal(0, 1, k), 25 + rng.random(k),
                rng.random(k), rng.random(k) * 10, np.zeros(k, dtype=np.int64)]
        con.executemany(sql, zip(*(c.tolist() for c in cols), strict=True))
        con.commit()
    con.close()


def _plain(path: str, run_id: int, fmt: str, out: Path) -> float:
    import adbc_driver_sqlite.dbapi as adbc
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    t0 = time.perf_counter()
    with adbc.connect(path) as conn, conn.cursor() as cur:
        cur.execute("SELECT seq, t_s, ts_utc, step_index, cycle_index, voltage_v, current_a, "
                    "temperature_c, step_capacity_ah, step_energy_wh, flags FROM samples "
                    "WHERE run_id = ? ORDER BY seq", (run_id,))
        table = cur.fetch_arrow_table()
    if fmt == "parquet":
        pq.write_table(table, out, compression="zstd")
    else:
        pacsv.write_csv(table, out)
    return time.perf_counter() - t0


def _http(base: str, token: str, run_id: int, fmt: str) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = 0
    with httpx.stream("GET", f"{base}/api/v1/runs/{run_id}/export", params={"format": fmt},
                      headers={"Authorization": f"Bearer {token}"}, timeout=1800) as r:
        r.raise_for_status()
        for chunk in r.iter_bytes():
            n += len(chunk)
    return time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="200k rows instead of 500k")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    rows = a.rows or (200_000 if a.quick else 500_000)
    from labdaq.storage.db import upgrade

    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "labdaq.db")
        url = f"sqlite:///{path}"
        upgrade(url)
        run_id, token = asyncio.run(_lab(url))
        t0 = time.perf_counter()
        _fill(path, run_id, rows)
        print(f"filled {rows} rows in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
        port = _port()
        env = {**os.environ, "LABDAQ_API_NICE": "0"}
        env.pop("LABDAQ_DATABASE_URL", None)
        proc = subprocess.Popen([sys.executable, "-m", "labdaq.cli", "api", "--port", str(port),
                                 "--database-url", url], env=env)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(600):
                try:
                    if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            for fmt in ("csv", "parquet"):
                http_s = min(_http(base, token, run_id, fmt)[0] for _ in range(a.repeats))
                size = _http(base, token, run_id, fmt)[1]
                plain_s = min(_plain(path, run_id, fmt, Path(tmp) / f"plain.{fmt}")
                              for _ in range(a.repeats))
                http_rate, plain_rate = rows / http_s, rows / plain_s
                print(f"{fmt}: http {http_s:.2f} s ({size / 2**20:.0f} MiB), plain "
                      f"{plain_s:.2f} s", file=sys.stderr)
                result(
                    f"export_{fmt}_http_rows_per_s", http_rate, "rows/s", plain_rate,
                    note=f"{rows} samples of one run, SQLite; GET /api/v1/runs/{{id}}/export?"
                    f"format={fmt} streamed over HTTP (labdaq api in its own process, ADBC "
                    f"keyset chunks) vs plain ADBC read into one Arrow table + pyarrow "
                    f"{'Parquet zstd' if fmt == 'parquet' else 'CSV'} write to a file; "
                    f"best of {a.repeats}; target >= 0.8x",
                    headline=f"{fmt} export {http_rate:,.0f} rows/s over HTTP = "
                    f"{http_rate / plain_rate:.2f}x the plain path ({plain_rate:,.0f} rows/s)",
                )
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
