"""Storage: migrations, constraints and the sample writer, on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.writer import SampleWriter
from labdaq.storage import models as m
from labdaq.storage.db import alembic_config, session_scope, sessionmaker


def test_migrations_match_models(db_url: str) -> None:
    # `alembic check` raises if autogenerate finds any difference between models and schema.
    command.check(alembic_config(db_url))


async def _seed(engine: AsyncEngine) -> tuple[int, int, int]:
    async with session_scope(sessionmaker(engine)) as s:
        inst = m.Instrument(name="smu1", driver="keithley2450", resource="TCPIP::x::1::SOCKET")
        s.add(inst)
        await s.flush()
        ch = m.Channel(name="smu1/1", instrument_id=inst.id, index=1)
        cell = m.Cell(
            serial="C1",
            chemistry="nmc",
            capacity_ah=2.5,
            charge_cutoff_v=4.2,
            discharge_cutoff_v=2.5,
        )
        proto = m.Protocol(name="p", content_hash="0" * 64, document={"a": 1})
        s.add_all([ch, cell, proto])
        await s.flush()
        return ch.id, cell.id, proto.id


async def test_one_holding_run_and_one_place_per_queue_enforced_by_database(
    db_engine: AsyncEngine,
) -> None:
    ch, cell, proto = await _seed(db_engine)
    maker = sessionmaker(db_engine)

    def run(state: str, order: int | None = None) -> m.Run:
        return m.Run(channel_id=ch, cell_id=cell, protocol_id=proto, sample_period_s=1,
                     state=state, queue_order=order)

    async with session_scope(maker) as s:
        s.add_all([run("running"), run("queued", 1), run("awaiting_cell", 2)])
    # One run holds the channel's instrument (running or paused), never two.
    for state in ("running", "paused"):
        with pytest.raises(IntegrityError):
            async with session_scope(maker) as s:
                s.add(run(state))
    # Each waiting run has its own place in the channel's queue.
    for state in ("queued", "awaiting_cell"):
        with pytest.raises(IntegrityError):
            async with session_scope(maker) as s:
                s.add(run(state, 2))
    # A finished run holds nothing and keeps no place.
    async with session_scope(maker) as s:
        await s.execute(text("UPDATE runs SET state = 'completed'"))
        s.add_all([run("running"), run("queued", 1)])


def _rows(run_id: int, start: int, n: int) -> list[tuple]:
    return [
        (run_id, seq, seq * 1.0, 1.7e9 + seq, 0, 1, 3.7, -1.0, 25.0, seq / 3600, seq / 1000, 0,
         None)
        for seq in range(start, start + n)
    ]


async def test_writer_stores_every_row_once_even_when_replayed(db_engine: AsyncEngine) -> None:
    ch, cell, proto = await _seed(db_engine)
    async with session_scope(sessionmaker(db_engine)) as s:
        run = m.Run(channel_id=ch, cell_id=cell, protocol_id=proto, sample_period_s=1)
        s.add(run)
        await s.flush()
        run_id = run.id
    writer = SampleWriter(db_engine, batch_rows=500, batch_age_s=0.05)
    writer.start()
    await writer.put(_rows(run_id, 1, 1234))
    # A replay after a fault re-sends rows that were already stored: they must be ignored.
    await writer.put(_rows(run_id, 1000, 500))
    await writer.close()
    async with session_scope(sessionmaker(db_engine)) as s:
        count = await s.scalar(select(func.count()).select_from(m.Sample))
        seqs = (await s.scalars(select(m.Sample.seq).order_by(m.Sample.seq))).all()
        first = await s.get(m.Sample, (run_id, 1))
    assert count == 1499
    assert list(seqs) == list(range(1, 1500))
    assert first is not None and first.voltage_v == pytest.approx(3.7)
    assert first.temperature_c == pytest.approx(25.0)


async def test_writer_flushes_small_batches_by_age(db_engine: AsyncEngine) -> None:
    ch, cell, proto = await _seed(db_engine)
    async with session_scope(sessionmaker(db_engine)) as s:
        run = m.Run(channel_id=ch, cell_id=cell, protocol_id=proto, sample_period_s=1)
        s.add(run)
        await s.flush()
        run_id = run.id
    writer = SampleWriter(db_engine, batch_rows=10_000, batch_age_s=0.05)
    writer.start()
    await writer.put(_rows(run_id, 1, 3))
    import asyncio

    for _ in range(1500):  # up to 30 s: a condition poll, only a hang reaches the end
        await asyncio.sleep(0.02)
        if writer.rows_written == 3:
            break
    assert writer.rows_written == 3  # written by age, without an explicit flush
    await writer.close()


async def test_sqlite_pragmas(sqlite_url: str) -> None:
    from labdaq.storage.db import create_engine

    engine = create_engine(sqlite_url)
    async with engine.connect() as conn:
        assert (await conn.exec_driver_sql("PRAGMA journal_mode")).scalar() == "wal"
        assert (await conn.exec_driver_sql("PRAGMA synchronous")).scalar() == 1
        assert (await conn.exec_driver_sql("PRAGMA foreign_keys")).scalar() == 1
    await engine.dispose()
