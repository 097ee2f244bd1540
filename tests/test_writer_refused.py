"""Sample rows the database refuses (an unknown run, a NULL in a NOT NULL column, a row of
the wrong width, an error that keeps coming): isolated and counted, the rest of the batch
stored. SQLite and PostgreSQL (``db_engine`` fixture)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.writer import SampleWriter
from tests.test_writer import _rows, _seed_run, _seqs, _until


async def test_rejected_rows_are_isolated(db_engine: AsyncEngine) -> None:
    run_id = await _seed_run(db_engine)
    rows: list[Any] = _rows(run_id, 1, 300)
    rows[10] = (run_id + 999, *rows[10][1:])  # unknown run (foreign key)
    rows[200] = (*rows[200][:6], None, *rows[200][7:])  # NULL voltage (NOT NULL)
    writer = SampleWriter(db_engine, batch_rows=300)
    await writer.put(rows)
    await writer.close()
    assert writer.rows_rejected == 2
    assert writer.db_available
    assert await _seqs(db_engine, run_id) == [s for s in range(1, 301) if s not in (11, 201)]


async def test_rows_of_the_wrong_width_never_shift_values_into_other_columns(
    db_engine: AsyncEngine,
) -> None:
    # SQLite inserts 50 rows per statement, flattened: a row one value short next to one
    # a value long would bind the same count and move values between columns. Each is
    # refused on its own and every other row is stored exactly as given, including the
    # rows after the last whole statement.
    run_id = await _seed_run(db_engine)
    rows: list[Any] = _rows(run_id, 1, 123)
    rows = [(*r[:7], r[7] - r[1] / 1000, *r[8:]) for r in rows]  # a distinct current each
    rows[20] = rows[20][:-1]  # 12 values
    rows[30] = (*rows[30], 0.0)  # 14 values, in the same 50 rows as the short one
    writer = SampleWriter(db_engine, batch_rows=200)
    await writer.put(rows)
    await writer.close()
    assert writer.rows_rejected == 2
    async with db_engine.connect() as conn:
        stored = (await conn.execute(text(
            "SELECT run_id, seq, t_s, ts_utc, step_index, cycle_index, voltage_v, current_a, "
            "temperature_c, step_capacity_ah, step_energy_wh, flags, temperature_age_s "
            "FROM samples WHERE run_id = :r ORDER BY seq"), {"r": run_id})).all()
    expected = [r for j, r in enumerate(rows) if j not in (20, 30)]
    assert [tuple(r) for r in stored] == expected


class PoisonWriter(SampleWriter):
    """A driver failure that no classifier knows, caused by one particular row."""

    async def _insert(self, rows: Sequence[Sequence[Any]]) -> None:
        if any(r[1] == 13 for r in rows):
            raise RuntimeError("driver cannot encode this row")
        await super()._insert(rows)


async def test_unrecognised_error_on_one_row_does_not_block_the_rest(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    # Treated as an outage first (rows journaled), but once it persists while the database
    # answers, the row is isolated and dropped instead of holding everything back.
    run_id = await _seed_run(db_engine)
    writer = PoisonWriter(
        db_engine, batch_rows=100, journal_dir=tmp_path / "journal", retry_max_s=0.1
    )
    await writer.put(_rows(run_id, 1, 500))
    await writer.flush()
    await _until(lambda: writer.journal_pending_rows == 0)
    await writer.put(_rows(run_id, 501, 10))
    await writer.close()
    assert writer.rows_rejected == 1 and writer.db_available
    assert await _seqs(db_engine, run_id) == [s for s in range(1, 511) if s != 13]
