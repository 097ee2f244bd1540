"""Sample ingest: labdaq's SampleWriter vs raw sqlite3.executemany, same rows, same schema.

Both write into a freshly migrated labdaq database (samples table with its (run_id, seq)
primary key), in batches of the same size, one commit per batch, WAL + synchronous=NORMAL.

Two patterns, one JSON line each:

* ``sqlite_sample_ingest``: one run's rows handed over 64 at a time (rows/s, wall clock).
* ``sqlite_interleaved_ingest``: what the writer process gets from buffered acquisition at
  100 Hz: 16 cabinets x 64 runs (1,024), each cabinet's fetch a SampleBatch of 5 readings x 64
  runs, so every commit interleaves 1,024 runs. Rows per CPU-second of this process (the
  writer's event loop and aiosqlite's thread), against raw ``executemany`` of the same
  rows as tuples, sorted by (run_id, seq), 32,000 per commit. The note gives the writer
  fed the same rows as tuples (``SampleBatch.rows``), the path plain rows take.
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

import numpy as np  # noqa: E402
from _common import result  # noqa: E402
from _ingest_cpu import cpu_s  # noqa: E402

from labdaq.engine.sample_batch import SampleBatch  # noqa: E402
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


def fetch_batch(runs: np.ndarray, f: int, readings: int = 5) -> SampleBatch:
    """Fetch number ``f`` of one cabinet: ``readings`` readings of its runs, reading-major
    (seq ``f * readings + 1`` on)."""
    k = np.repeat(np.arange(f * readings, (f + 1) * readings), len(runs))
    n = len(k)
    return SampleBatch(
        run_id=np.tile(runs, readings), seq=k + 1, t_s=k * 0.01,
        ts_utc=1.7e9 + k * 0.01, step_index=np.full(n, 2, np.int64),
        cycle_index=np.ones(n, np.int64), voltage_v=3.6 + (k % 100) * 1e-3,
        current_a=np.full(n, -2.5), temperature_c=25.0 + (k % 7) * 0.1,
        step_capacity_ah=k * 6.9e-5, step_energy_wh=k * 2.5e-4,
        flags=np.zeros(n, np.int64), temperature_age_s=np.full(n, np.nan))


def fetch_batches(run_ids: list[int], fetches: int, per_cabinet: int = 64) -> list[SampleBatch]:
    """Every cabinet's fetches in turn."""
    cabinets = [np.asarray(run_ids[c0:c0 + per_cabinet], np.int64)
                for c0 in range(0, len(run_ids), per_cabinet)]
    return [fetch_batch(runs, f) for f in range(fetches) for runs in cabinets]


async def writer_cpu(url: str, batches: list[SampleBatch], as_tuples: bool) -> float:
    """Rows per CPU-second of SampleWriter storing ``batches`` as the writer process does."""
    engine = create_engine(url)
    writer = SampleWriter(engine)
    writer.start()
    c0 = cpu_s()
    for b in batches:
        # The tuples, as the writer process made them from each batch until it kept arrays.
        await writer.put(b.rows() if as_tuples else b)
    await writer.close()
    spent = cpu_s() - c0
    await engine.dispose()
    n = sum(len(b) for b in batches)
    assert writer.rows_written == n
    return n / spent


def raw_cpu(path: Path, batches: list[SampleBatch], commit_rows: int = 32_000) -> float:
    con = sqlite3.connect(path)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    sql = insert_sql("sqlite", "qmark")
    rows = [r for b in batches for r in b.rows()]
    c0 = cpu_s()
    for i in range(0, len(rows), commit_rows):
        con.executemany(sql, sorted(rows[i:i + commit_rows]))
        con.commit()
    spent = cpu_s() - c0
    con.close()
    return len(rows) / spent


def interleaved(fetches: int, repeats: int) -> None:
    arrays, tuples, raw = [], [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as d:
            paths = [Path(d) / f"{k}.db" for k in ("arrays", "tuples", "raw")]
            runs = []
            for p in paths:
                upgrade(f"sqlite:///{p}")
                runs.append(asyncio.run(prepare_runs(f"sqlite:///{p}", 1024)))
            raw.append(raw_cpu(paths[2], fetch_batches(runs[2], fetches)))
            arrays.append(asyncio.run(
                writer_cpu(f"sqlite:///{paths[0]}", fetch_batches(runs[0], fetches), False)))
            tuples.append(asyncio.run(
                writer_cpu(f"sqlite:///{paths[1]}", fetch_batches(runs[1], fetches), True)))
    med = [sorted(x)[len(x) // 2] for x in (arrays, tuples, raw)]
    n = fetches * 5 * 1024
    print(f"interleaved: rows={n} arrays={arrays} tuples={tuples} raw={raw}", file=sys.stderr)
    result(
        "sqlite_interleaved_ingest",
        med[0],
        "rows/CPU-s",
        med[2],
        note=(f"{n} rows of 1,024 runs in 5-reading fetches of 64, vs raw executemany of "
              f"sorted tuples; the writer fed tuples: {med[1]:,.0f} rows/CPU-s "
              f"({med[1] / med[2]:.2f}x raw)"),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="200k rows instead of 300k")
    ap.add_argument("--rows", type=int, default=None)
    ap.add_argument("--batch", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    n = args.rows or (200_000 if args.quick else 300_000)
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
    interleaved(20 if args.quick else 40, 1)


if __name__ == "__main__":
    main()
