"""Sample ingest on PostgreSQL: labdaq's SampleWriter vs raw asyncpg COPY, same rows, same schema.

Baseline: asyncpg ``copy_records_to_table`` of the same rows straight into ``samples``, one
transaction per batch — the fastest client path there is (deps.md §5: 1.6 M rows/s against
276 k for executemany), but not idempotent. The writer does COPY into a temp staging table
plus ``INSERT ... SELECT ... ON CONFLICT (run_id, seq) DO NOTHING`` so replays never
duplicate, and takes rows the way the engine hands them over: one 64-channel cabinet tick
per ``put`` (a row of each of 64 running runs) with its ledger — every run's fast state,
and the first tick every run's full position — so each transaction also updates the
positions of the runs it holds rows of (docs/architecture.md, "Positions are committed
with their samples"). ``--no-positions``: one run, rows without ledgers (the figure
measured before positions were counted).

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

from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from _common import result  # noqa: E402
from ingest import make_rows, prepare_runs  # noqa: E402
from sqlalchemy import text  # noqa: E402
from sqlalchemy.engine import make_url  # noqa: E402

from labdaq.engine.ledger import FAST_COLUMNS, Ledger  # noqa: E402
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


async def labdaq_ingest(url: str, puts: list[tuple[list[tuple], Ledger | None]],
                        batch: int) -> float:
    engine = create_engine(url)
    writer = SampleWriter(engine, batch_rows=batch, batch_age_s=1.0, max_pending_rows=batch * 8)
    writer.start()
    n = sum(len(rows) for rows, _ in puts)
    t0 = time.perf_counter()
    for rows, ledger in puts:
        await writer.put(rows, ledger)
    await writer.close()
    dt = time.perf_counter() - t0
    await engine.dispose()
    assert writer.rows_written == n and writer.rows_journaled == 0
    return dt


def ticks(run_ids: list[int], n: int, positions: bool) -> list[tuple[list[tuple], Ledger | None]]:
    """``n`` rows as the engine hands them over: one tick of every run per put (rows
    interleaved by run), each with its ledger when ``positions``."""
    per_run = -(-n // len(run_ids))
    rows = [r for tick in zip(*(make_rows(rid, per_run) for rid in run_ids), strict=True)
            for r in tick][:n]
    out: list[tuple[list[tuple], Ledger | None]] = []
    for i in range(0, len(rows), len(run_ids)):
        tick = rows[i : i + len(run_ids)]
        if not positions:
            out.append((tick, None))
            continue
        fast = np.zeros((len(tick), len(FAST_COLUMNS)))
        fast[:, 0] = [r[0] for r in tick]  # run_id
        fast[:, 1] = [r[1] for r in tick]  # seq
        fast[:, 2] = [r[2] for r in tick]  # t_s
        fast[:, 3] = [r[9] for r in tick]  # the step's capacity so far
        full = [_full_position(int(r[0])) for r in tick] if i == 0 else []
        out.append((tick, Ledger(fast=[fast], positions=full)))
    return out


def _full_position(run_id: int) -> dict[str, Any]:
    """A run's position as a group sends it when the run joins (channel.py's form)."""
    return {
        "run_id": run_id, "step_index": 0, "step_count": 3, "cycle_index": 1,
        "position": {
            "pc": 0, "seq": 0, "t_s": 0.0, "step_cap_ah": 0.0, "step_en_wh": 0.0,
            "step_dis_ah": 0.0, "loop_iters": {}, "loop_dis_ah": {}, "loop_first_dis_ah": {},
            "step_number": 1, "step_t0_s": 0.0, "step_started_t_s": 0.0, "phase_t0_s": 0.0,
            "phase_name": "cc", "pulse_i": 0,
            "cycle": {"cycle_index": 1, "start_t_s": 0.0, "end_t_s": 0.0, "charge_ah": 0.0,
                      "discharge_ah": 0.0, "charge_wh": 0.0, "discharge_wh": 0.0,
                      "charge_v_s": 0.0, "charge_s": 0.0, "discharge_v_s": 0.0,
                      "discharge_s": 0.0, "gaps": 0},
        },
    }


async def _positions_committed(url: str, run_ids: list[int], per_run: int) -> bool:
    """Every run's committed position counts its last committed sample."""
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(
                text("SELECT r.id, r.last_seq, max(s.seq) FROM runs r JOIN samples s "
                     "ON s.run_id = r.id WHERE r.id = ANY(:ids) GROUP BY r.id, r.last_seq"),
                {"ids": run_ids})).all()
    finally:
        await engine.dispose()
    return len(rows) == len(run_ids) and all(last == top for _, last, top in rows)


def one_round(server: str, n: int, batch: int, channels: int, positions: bool,
              raw_first: bool) -> tuple[float, float]:
    names = [f"labdaq_bench_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    urls = [make_url(server).set(database=d).render_as_string(hide_password=False) for d in names]
    try:
        for d, url in zip(names, urls, strict=True):
            asyncio.run(_admin(server, f'CREATE DATABASE "{d}"'))
            upgrade(url)
        ours_url, raw_url = urls
        k = channels if positions else 1
        runs_ours = asyncio.run(prepare_runs(ours_url, k, "running"))
        runs_raw = asyncio.run(prepare_runs(raw_url, k, "running"))
        puts = ticks(runs_ours, n, positions)
        rows_raw = [r for rows, _ in ticks(runs_raw, n, False) for r in rows]
        # Which side goes first alternates between rounds: the server's caches and
        # checkpoints otherwise favour one side.
        if raw_first:
            raw = n / asyncio.run(raw_ingest(raw_url, rows_raw, batch))
        ours = n / asyncio.run(labdaq_ingest(ours_url, puts, batch))
        if not raw_first:
            raw = n / asyncio.run(raw_ingest(raw_url, rows_raw, batch))
        if positions and not asyncio.run(_positions_committed(ours_url, runs_ours, n // k)):
            raise SystemExit("a run's committed position does not count its last sample")
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
    ap.add_argument("--channels", type=int, default=64, help="runs per put (one cabinet)")
    ap.add_argument("--no-positions", action="store_true",
                    help="one run, rows without ledgers (no positions committed)")
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
    for i in range(1 if args.quick else args.repeats):
        o, r = one_round(server, n, args.batch, args.channels, not args.no_positions,
                         raw_first=i % 2 == 0)
        ours.append(o)
        raw.append(r)
    ours_med = sorted(ours)[len(ours) // 2]
    raw_med = sorted(raw)[len(raw) // 2]
    print(f"rows={n} batch={args.batch} labdaq={ours} raw={raw}", file=sys.stderr)
    how = ("one run, no positions" if args.no_positions else
           f"{args.channels} runs, positions committed with their rows")
    result(
        NAME,
        ours_med,
        "rows/s",
        raw_med,
        note=f"{n} rows, batch {args.batch}, {how}, vs raw asyncpg copy_records_to_table",
    )


if __name__ == "__main__":
    main()
