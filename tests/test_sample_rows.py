"""Sample rows as one float64 array (labdaq.engine.sample_rows), and what the database stores
from them: the same values and types as the row tuples gave, on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.sample_batch import SampleBatch, concat
from labdaq.engine.sample_rows import SampleRows, join, rows_of
from labdaq.engine.writer import SampleWriter
from labdaq.storage import models as m
from labdaq.storage.db import session_scope, sessionmaker
from labdaq.storage.models import SAMPLE_COLUMNS
from tests.test_sample_batch import _batch
from tests.test_writer import _seed_run, _seqs


def _mixed(run_a: int, run_b: int) -> SampleBatch:
    """Two runs interleaved, seq descending in one, temperatures and ages partly missing,
    flags with several bits."""
    a = _batch(6, run_id=run_a, seq0=1, temps=[25.0, np.nan, 26.5, np.nan, 27.0, 0.0],
               flags=[0, 1, 8, 16 | 4, 32, 64], ages=[0.5, np.nan, 0.0, 1.25, np.nan, 2.0])
    b = _batch(6, run_id=run_b, seq0=10)
    b.seq = b.seq[::-1].copy()
    b.ts_utc = 1_765_000_100.5
    return concat([a, b])


def _same(got: list[tuple[Any, ...]], want: list[tuple[Any, ...]]) -> None:
    """Equal values of equal types (1 and 1.0 differ here)."""
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert [type(x) for x in g] == [type(x) for x in w], (g, w)
        assert g == w


def test_rows_are_the_batch_tuples_with_their_types() -> None:
    b = _mixed(3, 4)
    rows = SampleRows.from_batch(b)
    assert rows is not None
    _same(rows.tolist(), b.rows())
    _same(list(rows), b.rows())
    assert len(rows) == 12
    assert rows[1] == b.rows()[1] and rows[1][8] is None
    assert isinstance(rows[2:5], SampleRows) and rows[2:5].tolist() == b.rows()[2:5]


@pytest.mark.parametrize("column", ["run_id", "seq", "step_index", "cycle_index", "flags"])
def test_an_integer_a_float64_cannot_hold_keeps_the_tuples(column: str) -> None:
    b = _batch(3)
    col = getattr(b, column).copy()
    col[1] = 2**53 + 1
    setattr(b, column, col)
    assert SampleRows.from_batch(b) is None
    rows = rows_of(b)
    assert not isinstance(rows, SampleRows)
    assert rows[1][SAMPLE_COLUMNS.index(column)] == 2**53 + 1
    _same(list(rows), b.rows())


def test_insert_params_are_in_key_order_and_flat() -> None:
    b = _mixed(9, 2)
    rows = SampleRows.from_batch(b)
    assert rows is not None
    multi, rest = rows.insert_params(5)
    assert len(multi) == 2 and len(rest) == 2
    assert isinstance(multi[0], tuple) and isinstance(rest[0], tuple)
    flat = [v for p in multi for v in p] + [v for p in rest for v in p]
    got = [tuple(flat[i:i + 13]) for i in range(0, len(flat), 13)]
    keys = [(r[0], r[1]) for r in got]
    assert keys == sorted((r[0], r[1]) for r in b.rows())
    by_key = {(r[0], r[1]): r for r in b.rows()}
    for r in got:
        want = by_key[(r[0], r[1])]
        # Floats throughout; a missing temperature or age is NaN, which SQLite binds as NULL.
        assert all(isinstance(v, float) for v in r)
        assert [None if isinstance(v, float) and math.isnan(v) else v for v in r] == list(want)


def test_join_keeps_arrays_when_it_can() -> None:
    a = SampleRows.from_batch(_batch(2, seq0=1))
    b = SampleRows.from_batch(_batch(3, seq0=3))
    assert a is not None and b is not None
    both = join([a, b])
    assert isinstance(both, SampleRows) and [r[1] for r in both] == [1, 2, 3, 4, 5]
    mixed = join([a, [(7, 9, *a[0][2:])]])
    assert isinstance(mixed, list) and [r[1] for r in mixed] == [1, 2, 9]


def test_the_array_must_have_one_column_per_sample_field() -> None:
    with pytest.raises(ValueError, match="expected"):
        SampleRows(np.zeros((2, 12)))


async def _another_run(engine: AsyncEngine, like: int) -> int:
    async with session_scope(sessionmaker(engine)) as s:
        first = await s.get(m.Run, like)
        assert first is not None
        run = m.Run(channel_id=first.channel_id, cell_id=first.cell_id,
                    protocol_id=first.protocol_id, sample_period_s=1)
        s.add(run)
        await s.flush()
        return run.id


async def _stored(engine: AsyncEngine) -> list[tuple[Any, ...]]:
    cols = ", ".join(SAMPLE_COLUMNS)
    async with engine.connect() as conn:
        res = await conn.execute(text(f"SELECT {cols} FROM samples ORDER BY run_id, seq"))
        return [tuple(r) for r in res]


async def test_the_database_stores_the_tuples_values_and_types(db_engine: AsyncEngine) -> None:
    run_a = await _seed_run(db_engine)
    run_b = await _another_run(db_engine, run_a)
    b = _mixed(run_a, run_b)
    writer = SampleWriter(db_engine, batch_rows=5)  # split into pieces, joined again
    await writer.put(b)
    await writer.close()
    assert writer.rows_written == 12 and writer.rows_rejected == 0
    _same(await _stored(db_engine), sorted(b.rows(), key=lambda r: (r[0], r[1])))
    if db_engine.dialect.name == "sqlite":
        async with db_engine.connect() as conn:
            kinds = set(await conn.execute(text(
                "SELECT typeof(run_id), typeof(seq), typeof(step_index), typeof(cycle_index),"
                " typeof(flags), typeof(voltage_v), typeof(t_s) FROM samples")))
        assert kinds == {("integer",) * 5 + ("real",) * 2}


async def test_rows_the_database_refuses_are_isolated_from_an_array(
    db_engine: AsyncEngine,
) -> None:
    run_id = await _seed_run(db_engine)
    b = _batch(300, run_id=run_id)
    b.run_id = b.run_id.copy()
    b.run_id[10] = run_id + 999  # unknown run (foreign key)
    b.voltage_v = b.voltage_v.copy()
    b.voltage_v[200] = np.nan  # NULL voltage (NOT NULL)
    assert isinstance(rows_of(b), SampleRows)
    writer = SampleWriter(db_engine, batch_rows=300)
    await writer.put(b)
    await writer.close()
    # SQLite binds NaN as NULL, which the NOT NULL voltage refuses; PostgreSQL's double
    # precision holds a NaN, as it did from the row tuples.
    refused = (11, 201) if db_engine.dialect.name == "sqlite" else (11,)
    assert writer.rows_rejected == len(refused)
    assert await _seqs(db_engine, run_id) == [s for s in range(1, 301) if s not in refused]
