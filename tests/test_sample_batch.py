"""The engine → writer-process hand-off: a tick's rows as one binary batch.

Byte-level checks of labdaq.engine.sample_batch (header fields, column order, NaN
temperatures, flags, empty batches, ledgers with and without their slow part, damaged
messages), and the batch through a real writer process into a real database.
"""

from __future__ import annotations

import math
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.ledger import FAST_COLUMNS, Ledger
from labdaq.engine.sample_batch import MAGIC, SampleBatch, concat, decode, encode, is_batch
from labdaq.engine.writer_process import WriterProcess
from labdaq.storage.models import SAMPLE_COLUMNS, SampleFlag
from tests.test_writer import _seed_run

_HEAD = 24


def _batch(n: int, run_id: int = 7, seq0: int = 1, temps: list[float] | None = None,
           flags: list[int] | None = None, ages: list[float] | None = None) -> SampleBatch:
    k = np.arange(n)
    return SampleBatch(
        run_id=np.full(n, run_id, np.int64),
        seq=seq0 + k.astype(np.int64),
        t_s=0.01 * k,
        ts_utc=1_765_000_000.25,
        step_index=np.full(n, 2, np.int64),
        cycle_index=np.full(n, 3, np.int64),
        voltage_v=3.7 + 0.001 * k,
        current_a=-1.5 + 0 * k,
        temperature_c=np.asarray(temps if temps is not None else 25.0 + 0 * k, float),
        step_capacity_ah=1e-4 * k,
        step_energy_wh=4e-4 * k,
        flags=np.asarray(flags if flags is not None else [0] * n, np.int64),
        temperature_age_s=np.asarray(ages if ages is not None else [np.nan] * n, float),
    )


def _fast(n: int, run_id: int = 7) -> np.ndarray:
    f = np.arange(n * len(FAST_COLUMNS), dtype=np.float64).reshape(n, len(FAST_COLUMNS))
    f[:, 0] = run_id
    return f


def test_header_and_columns_are_laid_out_as_documented() -> None:
    b = _batch(3)
    buf = encode(b, Ledger(fast=[_fast(3)]))
    magic, version, flags, n_fast, n, slow_len, ts_utc = struct.unpack_from("<4sBBHIId", buf)
    assert (magic, version, flags, n_fast, n, slow_len) == (MAGIC, 2, 1, 1, 3, 0)
    assert ts_utc == 1_765_000_000.25
    assert struct.unpack_from("<Q", buf, _HEAD) == (3,)  # rows of the one fast array
    cols = _HEAD + 8
    assert struct.unpack_from("<3q", buf, cols) == (7, 7, 7)  # run_id
    assert struct.unpack_from("<3q", buf, cols + 24) == (1, 2, 3)  # seq
    assert struct.unpack_from("<3d", buf, cols + 48) == (0.0, 0.01, 0.02)  # t_s
    assert len(buf) == _HEAD + 8 + 12 * 3 * 8 + 3 * len(FAST_COLUMNS) * 8
    assert is_batch(buf) and not is_batch(pickle.dumps(("flush", 1)))


def test_round_trip_gives_the_rows_the_writer_inserts() -> None:
    b = _batch(4, temps=[25.0, math.nan, 26.5, math.nan], ages=[0.25, math.nan, 1.5, math.nan],
               flags=[0, int(SampleFlag.BREACH), int(SampleFlag.EDGE | SampleFlag.RESUMED),
                      int(SampleFlag.TEMP_LOST | SampleFlag.GAP)])
    got, ledger = decode(encode(b, None))
    assert ledger is None
    rows = got.rows()
    assert rows == b.rows()
    assert len(rows[0]) == len(SAMPLE_COLUMNS)
    assert [r[8] for r in rows] == [25.0, None, 26.5, None]  # NaN temperature -> NULL
    assert [r[11] for r in rows] == [0, 1, 12, 80]
    assert [r[12] for r in rows] == [0.25, None, 1.5, None]  # the reading's age, NaN -> NULL
    assert all(type(r[11]) is int and type(r[1]) is int for r in rows)  # plain Python
    assert rows[1][:6] == (7, 2, 0.01, 1_765_000_000.25, 2, 3)
    assert rows[1][7:] == (-1.5, None, 1e-4, 4e-4, 1, None)


def test_concatenated_batches_keep_each_rows_wall_time() -> None:
    """A fetch of logged readings: one put, each reading's rows with their own ts_utc."""
    a, b = _batch(2), _batch(3, seq0=3)
    b.ts_utc = 1_765_000_000.5
    both = concat([a, b])
    buf = encode(both, Ledger(fast=[_fast(5)]))
    flags, n = struct.unpack_from("<4sBBHIId", buf)[2], struct.unpack_from("<4sBBHIId", buf)[4]
    assert flags == 3 and n == 5  # a ledger, and a ts_utc column
    got, _ = decode(buf)
    assert got.rows() == both.rows() == a.rows() + b.rows()
    assert [r[3] for r in got.rows()] == [1_765_000_000.25] * 2 + [1_765_000_000.5] * 3


def test_all_nan_temperatures_store_null() -> None:
    got, _ = decode(encode(_batch(3, temps=[math.nan] * 3)))
    assert [r[8] for r in got.rows()] == [None, None, None]


def test_empty_batch() -> None:
    buf = encode(_batch(0), Ledger())
    assert len(buf) == _HEAD
    got, ledger = decode(buf)
    assert len(got) == 0 and got.rows() == []
    assert ledger == Ledger()  # present but empty, as sent


def test_ledger_fast_arrays_and_slow_part_travel_in_order() -> None:
    pos = {"run_id": 7, "step_index": 1, "step_count": 4, "cycle_index": 0,
           "position": {"pc": 1, "t_s": 0.02}}
    gap = {"run_id": 7, "seq": 3, "count": 2, "t_from_s": 0.5, "t_to_s": 0.51,
           "period_s": 0.01, "ts_utc": 1.0, "total": 2, "cause": "late"}
    sent = Ledger(fast=[_fast(2), _fast(1, run_id=8)], positions=[pos],
                  steps=[{"run_id": 7, "step_number": 1}], cycles=[], gaps=[gap])
    buf = encode(_batch(3), sent)
    assert struct.unpack_from("<H", buf, 6) == (2,)
    assert len(buf) % 8 == 0  # the slow part is padded like every section
    _, got = decode(buf)
    assert got is not None
    assert [f.tolist() for f in got.fast] == [f.tolist() for f in sent.fast]
    assert (got.positions, got.steps, got.cycles, got.gaps) == (
        sent.positions, sent.steps, sent.cycles, sent.gaps)


@pytest.mark.parametrize("damage", ["short", "long", "magic", "version", "header"])
def test_damaged_messages_are_refused(damage: str) -> None:
    buf = bytearray(encode(_batch(2), Ledger(fast=[_fast(2)])))
    if damage == "short":
        buf = buf[:-8]
    elif damage == "long":
        buf += bytes(8)
    elif damage == "magic":
        buf[:4] = b"XXXX"
    elif damage == "version":
        buf[4] = 9
    else:
        buf = buf[:10]
    with pytest.raises(ValueError):
        decode(bytes(buf))


def test_a_column_of_the_wrong_length_is_refused() -> None:
    b = _batch(3)
    b.flags = np.zeros(2, np.int64)
    with pytest.raises(ValueError, match="flags"):
        encode(b)


@pytest.mark.slow  # a writer process per database: ~5 s on the loaded 2-core machine
async def test_batches_through_the_writer_process_are_stored(
        db_url: str, db_engine: AsyncEngine, tmp_path: Path) -> None:
    from sqlalchemy import text

    run_id = await _seed_run(db_engine)
    w = WriterProcess(db_url, batch_rows=50, batch_age_s=0.05, journal_dir=tmp_path / "j")
    w.start()
    try:
        temps = [25.0, math.nan, 24.0, math.nan]
        flags = [0, int(SampleFlag.BREACH), 0, int(SampleFlag.TEMP_LOST)]
        await w.put(_batch(4, run_id=run_id, temps=temps, flags=flags),
                    Ledger(fast=[_fast(4, run_id)]))
        await w.put(_batch(0, run_id=run_id))  # nothing to store: no message
        await w.put(_batch(3, run_id=run_id, seq0=5))
        await w.flush()
        assert w.rows_written == 7 and w.pending_rows == 0
    finally:
        await w.close()
    async with db_engine.connect() as conn:
        got: list[Any] = (await conn.execute(text(
            "SELECT seq, temperature_c, flags FROM samples WHERE run_id = :r ORDER BY seq"),
            {"r": run_id})).all()
    assert [tuple(r) for r in got] == [
        (1, 25.0, 0), (2, None, 1), (3, 24.0, 0), (4, None, 64),
        (5, 25.0, 0), (6, 25.0, 0), (7, 25.0, 0)]
