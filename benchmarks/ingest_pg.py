"""Sample ingest on PostgreSQL: labdaq's SampleWriter vs raw asyncpg COPY, same rows, same schema.

Baseline: asyncpg ``copy_records_to_table`` of the same rows straight into ``samples``, one
transaction per batch — the fastest client path there is (deps.md §5: 1.6 M rows/s against
276 k for executemany), but not idempotent. The writer does COPY into a temp staging table
plus ``INSERT ... SELECT ... ON CONFLICT (run_id, seq) DO NOTHING`` so replays never
duplicate, and takes rows the way the engine hands them over (64 per ``put``).

Each side writes into its own freshly migrated throwaway database. The server comes from
LABDAQ_BENCH_PG_URL or LABDAQ_TEST_PG_URL; without either (or when the server does not
answer) it prints a result whose value is null. Prints a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402
from ingest import make_rows, prepare  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from labdaq.engine.writer import SampleWriter  # noqa: E402
from labdaq.storage.db import create_engine, upgrade  # noqa: E402
from labdaq.storage.models import SAMPLE_COLUMNS  # noqa: E402

NAME = "pg_sample_ingest"


def skip(note: str) -> None:
    print(
        json.dumps(
            {"name": NAME, "value": None, "unit": "rows/s", "baseline": None, "ratio": None}
            | {"note": note}
        ),
        flush=True,
    )


async def _admin(url: str, sql: str) -> None:
    import asyncpg

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def raw_ingest(url: str, rows: list[tuple], batch: int) -> float:
    import asyncpg

    u = make_url(url)
    conn = await asyncpg.connect(
        host=u.host, port=u.port or 5432, user=u.username, password=u.password, database=u.database
    )
    try:
        t0 = time.perf_counter()
        for i in range(0, len(rows), batch):
            async with conn.transaction():
                await conn.copy_records_to_table(
                    "samples", records=rows[i : i + batch], columns=SAMPLE_COLUMNS
                )
        return time.perf_counter() - t0
    finally:
        await conn.close()


async def labdaq_ingest(url: str, rows: list[tuple], batch: int) -> float:
    engine = create_engine(url)
    writer = SampleWriter(engine, batch_rows=batch, batch_age_s=1.0, max_pending_rows=batch * 8)
    writer.start()
    t0 = time.perf_counter()
    for i in range(0, len(rows), 64):  # a 64-channel cabinet tick per put
        await writer.put(rows[i : i + 64])
    await writer.close()
    dt = time.perf_counter() - t0
    await engine.dispose()
    assert writer.rows_written == len(rows) and writer.rows_journaled == 0
    return dt


def one_round(server: str, n: int, batch: int) -> tuple[float, float]:
    names = [f"labdaq_bench_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    urls = [make_url(server).set(database=d).render_as_string(hide_password=False) for d in names]
    try:
        for d, url in zip(names, urls, strict=True):
            asyncio.run(_admin(server, f'CREATE DATABASE "{d}"'))
            upgrade(url)
        ours_url, raw_url = urls
        run_ours = asyncio.run(prepare(ours_url))
        run_raw = asyncio.run(prepare(raw_url))
        rows_ours, rows_raw = make_rows(run_ours, n), make_rows(run_raw, n)
        raw = n / asyncio.run(raw_ingest(raw_url, rows_raw, batch))
        ours = n / asyncio.run(labdaq_ingest(ours_url, rows_ours, batch))
        return ours, raw
    finally:
        for d in names:
            asyncio.run(_admin(server, f'DROP DATABASE IF EXISTS "{d}" WITH (FORCE)'))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="100k rows instead of 250k")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    server = os.environ.get("LABDAQ_BENCH_PG_URL") or os.environ.get("LABDAQ_TEST_PG_URL")
    if not server:
        skip("no PostgreSQL (set LABDAQ_BENCH_PG_URL or LABDAQ_TEST_PG_URL)")
        return
    try:
        asyncio.run(_admin(server, "SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any connection problem means "cannot measure"
        skip(f"no PostgreSQL ({type(exc).__name__}: {exc})")
        return
    n = args.rows or (100_000 if args.quick else 250_000)
    ours, raw = [], []
    for _ in range(1 if args.quick else args.repeats):
        o, r = one_round(server, n, args.batch)
        ours.append(o)
        raw.append(r)
    ours_med = sorted(ours)[len(ours) // 2]
    raw_med = sorted(raw)[len(raw) // 2]
    print(f"rows={n} batch={args.batch} labdaq={ours} raw={raw}", file=sys.stderr)
    result(
        NAME,
        ours_med,
        "rows/s",
        raw_med,
        note=f"{n} rows, batch {args.batch}, vs raw asyncpg copy_records_to_table",
    )


if __name__ == "__main__":
    main()
