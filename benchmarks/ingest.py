"""Sample ingest: labdaq's SampleWriter vs raw sqlite3.executemany, same rows, same schema.

Both write into a freshly migrated labdaq database (samples table with its (run_id, seq)
primary key), in batches of the same size, one commit per batch, WAL + synchronous=NORMAL.
Prints a JSON object as its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402

from labdaq.engine.writer import SampleWriter, insert_sql  # noqa: E402
from labdaq.storage import models as m  # noqa: E402
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade  # noqa: E402


def make_rows(run_id: int, n: int) -> list[tuple]:
    return [
        (
            run_id,
            seq,
            seq * 0.1,
            1.7e9 + seq * 0.1,
            2,
            1,
            3.6 + (seq % 100) * 1e-3,
            -2.5,
            25.0 + (seq % 7) * 0.1,
            seq * 6.9e-5,
            seq * 2.5e-4,
            0,
            0.4 + (seq % 10) * 0.1,  # temperature_age_s: the logger's reading's age
        )
        for seq in range(1, n + 1)
    ]


async def prepare(url: str) -> int:
    return (await prepare_runs(url, 1))[0]


async def prepare_runs(url: str, n: int, state: str = "queued") -> list[int]:
    """``n`` runs on ``n`` channels of one instrument (``state``: "running" for runs whose
    positions the writer updates)."""
    engine = create_engine(url)
    async with session_scope(sessionmaker(engine)) as s:
        inst = m.Instrument(name="bench", driver="keithley2450", resource="TCPIP::x::1::SOCKET")
        s.add(inst)
        await s.flush()
        chans = [m.Channel(name=f"bench/{i}", instrument_id=inst.id, index=i)
                 for i in range(1, n + 1)]
        cell = m.Cell(
            serial="B1", chemistry="nmc", capacity_ah=5, charge_cutoff_v=4.2, discharge_cutoff_v=2.5
        )
        proto = m.Protocol(name="bench", content_hash="b" * 64, document={})
        s.add_all([*chans, cell, proto])
        await s.flush()
        runs = [m.Run(channel_id=ch.id, cell_id=cell.id, protocol_id=proto.id,
                      sample_period_s=1, state=state) for ch in chans]
        s.add_all(runs)
        await s.flush()
        run_ids = [r.id for r in runs]
    await engine.dispose()
    return run_ids


async def labdaq_ingest(url: str, rows: list[tuple], batch: int) -> float:
    engine = create_engine(url)
    writer = SampleWriter(engine, batch_rows=batch, batch_age_s=1.0, max_pending_rows=batch * 8)
    writer.start()
    t0 = time.perf_counter()
    # The engine hands rows over per tick; emulate a 64-channel cabinet tick.
    for i in range(0, len(rows), 64):
        await writer.put(rows[i : i + 64])
    await writer.close()
    dt = time.perf_counter() - t0
    await engine.dispose()
    assert writer.rows_written == len(rows)
    return dt


def raw_ingest(path: Path, rows: list[tuple], batch: int) -> float:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    sql = insert_sql("sqlite", "qmark")
    t0 = time.perf_counter()
    for i in range(0, len(rows), batch):
        con.executemany(sql, rows[i : i + batch])
        con.commit()
    dt = time.perf_counter() - t0
    con.close()
    return dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="200k rows instead of 500k")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.rows or (200_000 if args.quick else 500_000)
    ours, raw = [], []
    for _ in range(1 if args.quick else args.repeats):
        with tempfile.TemporaryDirectory() as d:
            a, b = Path(d) / "ours.db", Path(d) / "raw.db"
            for p in (a, b):
                upgrade(f"sqlite:///{p}")
            run_a = asyncio.run(prepare(f"sqlite:///{a}"))
            run_b = asyncio.run(prepare(f"sqlite:///{b}"))
            rows_a, rows_b = make_rows(run_a, n), make_rows(run_b, n)
            raw.append(n / raw_ingest(b, rows_b, args.batch))
            ours.append(n / asyncio.run(labdaq_ingest(f"sqlite:///{a}", rows_a, args.batch)))
    ours_med = sorted(ours)[len(ours) // 2]
    raw_med = sorted(raw)[len(raw) // 2]
    print(f"rows={n} batch={args.batch} labdaq={ours} raw={raw}", file=sys.stderr)
    result(
        "sqlite_sample_ingest",
        ours_med,
        "rows/s",
        raw_med,
        note=f"{n} rows, batch {args.batch}, vs raw sqlite3.executemany",
    )


if __name__ == "__main__":
    main()
