"""Sample writer: batching, back-pressure, journal on database outage, replay, crash recovery.

Database tests run on SQLite and PostgreSQL (``db_url``/``db_engine`` fixtures). Outages are
real, not mocked: on SQLite another connection holds ``BEGIN EXCLUSIVE`` while the writer's
engine has a 50 ms busy timeout; on PostgreSQL the test database stops accepting
connections (``ALLOW_CONNECTIONS false``) and the writer's backends are terminated.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.journal import Journal
from labdaq.engine.writer import SampleWriter
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.db_fixtures import PG_URL


async def _seed_run(engine: AsyncEngine) -> int:
    """Instrument, channel, cell, protocol and one run: samples need a run (foreign key)."""
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
        run = m.Run(channel_id=ch.id, cell_id=cell.id, protocol_id=proto.id, sample_period_s=1)
        s.add(run)
        await s.flush()
        return run.id


def _rows(run_id: int, start: int, n: int) -> list[tuple[Any, ...]]:
    return [
        (run_id, seq, seq * 0.1, 1.7e9 + seq, 0, 1, 3.7, -1.0, 25.0, seq / 3600, seq / 1000, 0,
         0.5)
        for seq in range(start, start + n)
    ]


async def _seqs(engine: AsyncEngine, run_id: int) -> list[int]:
    async with engine.connect() as conn:
        res = await conn.execute(
            text("SELECT seq FROM samples WHERE run_id = :r ORDER BY seq"), {"r": run_id}
        )
        return [int(x) for x in res.scalars()]


async def _until(pred: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


class RecordingWriter(SampleWriter):
    """Records the size of every insert; optionally slows the database down."""

    delay_s = 0.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.inserts: list[tuple[float, int]] = []

    async def _insert(self, rows: Sequence[Sequence[Any]]) -> None:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        await super()._insert(rows)
        self.inserts.append((time.monotonic(), len(rows)))


def _writer_engine(url: str, busy_ms: int = 50) -> AsyncEngine:
    """An engine whose SQLite connections give up on a lock after ``busy_ms``, not 10 s."""
    engine = create_engine(url)
    if make_url(url).get_backend_name() == "sqlite":

        def short_busy_timeout(dbapi_conn: Any, _record: Any) -> None:
            # Runs after labdaq's own connect hook (registered first), overriding 10 s.
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={busy_ms}")
            cur.close()

        event.listen(engine.sync_engine, "connect", short_busy_timeout)
    return engine


@asynccontextmanager
async def _outage(url: str) -> AsyncIterator[None]:
    """Make the database unavailable to the writer for the duration of the block."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        lock = sqlite3.connect(u.database or "", timeout=5)
        lock.isolation_level = None
        lock.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            lock.execute("ROLLBACK")
            lock.close()
        return
    import asyncpg

    assert PG_URL
    a = make_url(PG_URL)
    admin = await asyncpg.connect(
        host=a.host, port=a.port or 5432, user=a.username, password=a.password, database=a.database
    )
    name = u.database
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


# -- batching ------------------------------------------------------------------------------


async def test_rows_stored_once_in_batches_by_size_and_by_age(db_engine: AsyncEngine) -> None:
    run_id = await _seed_run(db_engine)
    # max_batch_rows = batch_rows: no merging of queued batches in this test.
    writer = RecordingWriter(db_engine, batch_rows=1000, batch_age_s=0.3, max_batch_rows=1000)
    writer.start()
    t_put = time.monotonic()
    for start in range(1, 2501, 100):
        await writer.put(_rows(run_id, start, 100))
    # No flush: the last 500 rows must go out by age alone.
    await _until(lambda: writer.rows_written == 2500)
    assert [n for _, n in writer.inserts] == [1000, 1000, 500]
    assert writer.inserts[2][0] - t_put >= 0.3 * 0.9
    assert writer.batches_written == 3
    await writer.close()
    assert await _seqs(db_engine, run_id) == list(range(1, 2501))
    assert writer.rows_journaled == 0 and writer.db_available


async def test_batches_queued_behind_a_slow_write_merge_up_to_the_cap(
    db_engine: AsyncEngine,
) -> None:
    run_id = await _seed_run(db_engine)
    writer = RecordingWriter(db_engine, batch_rows=100, batch_age_s=10, max_batch_rows=350)
    writer.delay_s = 0.2
    writer.start()
    await writer.put(_rows(run_id, 1, 100))
    await _until(lambda: writer.pending_rows == 100 and not writer._batches)  # being written
    for start in range(101, 1001, 100):
        await writer.put(_rows(run_id, start, 100))
    await writer.flush()
    # The first batch went out alone; the nine queued behind its slow write went out as
    # few transactions as the cap allows (3 + 3 + 3 batches of 100, never 400).
    assert [n for _, n in writer.inserts] == [100, 300, 300, 300]
    await writer.close()
    assert await _seqs(db_engine, run_id) == list(range(1, 1001))
    assert writer.rows_written == 1000 and writer.rows_journaled == 0


async def test_commits_are_spaced_unless_the_cap_or_a_flush_is_waiting(
    db_engine: AsyncEngine,
) -> None:
    run_id = await _seed_run(db_engine)
    # An interval no test run lasts: only the cap or a flush can start a write before it.
    writer = RecordingWriter(db_engine, batch_rows=100, batch_age_s=3600, max_batch_rows=300,
                             commit_interval_s=3600)
    writer.start()
    await writer.put(_rows(run_id, 1, 100))
    await _until(lambda: writer.rows_written == 100)  # nothing written yet: it goes at once
    for start in (101, 201):
        await writer.put(_rows(run_id, start, 100))
        # The writer task saw the batch and went back to sleep: it waits for its time.
        await _until(lambda: not writer._wake.is_set())
        assert writer.rows_written == 100
    await writer.put(_rows(run_id, 301, 100))  # now the cap's 300 rows are queued
    await _until(lambda: writer.rows_written == 400)
    await writer.put(_rows(run_id, 401, 100))
    await writer.flush()  # a flush does not wait for the interval either
    assert [n for _, n in writer.inserts] == [100, 300, 100]
    await writer.close()
    assert await _seqs(db_engine, run_id) == list(range(1, 501))


async def test_lists_and_large_puts(db_engine: AsyncEngine) -> None:
    run_id = await _seed_run(db_engine)
    writer = RecordingWriter(db_engine, batch_rows=300, max_pending_rows=1000, max_batch_rows=600)
    rows = [list(r) for r in _rows(run_id, 1, 2500)]  # rows may be lists; one put > bound
    rows[7][8] = None  # temperature is optional
    await writer.put(rows)
    await writer.close()
    assert max(n for _, n in writer.inserts) <= 600
    assert await _seqs(db_engine, run_id) == list(range(1, 2501))
    async with session_scope(sessionmaker(db_engine)) as s:
        row = await s.get(m.Sample, (run_id, 8))
        assert row is not None and row.temperature_c is None


# -- idempotent replay ---------------------------------------------------------------------


async def test_replay_of_stored_rows_does_not_duplicate(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    run_id = await _seed_run(db_engine)
    writer = SampleWriter(db_engine, batch_rows=400, batch_age_s=0.05)
    await writer.put(_rows(run_id, 1, 1000))
    await writer.flush()
    assert writer.batches_merged == 0  # new rows go straight in (PostgreSQL: COPY)
    await writer.put(_rows(run_id, 500, 1000))  # overlaps 500..1000
    await writer.close()
    # PostgreSQL: the batches that met stored rows went through the staging merge.
    assert (writer.batches_merged > 0) == (db_engine.dialect.name == "postgresql")
    # A journal whose rows were (partly) committed before a crash is replayed again.
    journal = Journal(tmp_path / "journal")
    journal.append_many([_rows(run_id, 1, 700), _rows(run_id, 1200, 600)])
    journal.close()
    writer = SampleWriter(db_engine, journal_dir=tmp_path / "journal")
    writer.start()
    await writer.flush()
    assert writer.rows_replayed == 1300 and writer.journal_pending_rows == 0
    await writer.close()
    assert await _seqs(db_engine, run_id) == list(range(1, 1800))
    assert not list((tmp_path / "journal").iterdir())


# -- database unavailable ------------------------------------------------------------------


async def test_outage_journals_then_replays_every_row_once(db_url: str, tmp_path: Path) -> None:
    engine = _writer_engine(db_url)
    check = create_engine(db_url)
    try:
        run_id = await _seed_run(check)
        writer = SampleWriter(
            engine,
            batch_rows=200,
            batch_age_s=0.05,
            max_pending_rows=2000,
            journal_dir=tmp_path / "journal",
            write_timeout_s=2.0,
            retry_max_s=0.2,
        )
        writer.start()
        await writer.put(_rows(run_id, 1, 1000))
        await writer.flush()
        assert writer.rows_written == 1000 and writer.db_available

        slowest_put = 0.0
        async with _outage(db_url):
            for start in range(1001, 6001, 50):
                t0 = time.perf_counter()
                await writer.put(_rows(run_id, start, 50))
                slowest_put = max(slowest_put, time.perf_counter() - t0)
                await asyncio.sleep(0.004)  # ~1.2 s of acquisition during the outage
            # flush during the outage: everything is durable in the journal.
            await writer.flush()
            assert not writer.db_available
            assert writer.rows_journaled > 0
            assert writer.journal_pending_rows == writer.rows_journaled
            assert writer.pending_rows == 0
        # Acquisition never waited on the dead database (only on queue space, briefly):
        # a put that waited for a write would have taken its write_timeout_s.
        assert slowest_put < writer.write_timeout_s, slowest_put

        await writer.flush()  # database back: the journal is replayed now
        assert writer.db_available
        assert writer.journal_pending_rows == 0
        assert writer.rows_replayed == writer.rows_journaled
        assert not list((tmp_path / "journal").iterdir())
        await writer.put(_rows(run_id, 6001, 10))
        await writer.close()
        await check.dispose()  # its pooled connection was terminated with the others
        assert await _seqs(check, run_id) == list(range(1, 6011))
        assert writer.rows_dropped == 0 and writer.rows_rejected == 0
        assert not writer.journal_overflowed
    finally:
        await engine.dispose()
        await check.dispose()


@asynccontextmanager
async def _flapping(url: str) -> AsyncIterator[list[int]]:
    """Interrupt the writer over and over: kill its PostgreSQL backends mid-transaction, or
    take and release the SQLite write lock. Yields a list that counts the interruptions."""
    hits: list[int] = []
    stop = asyncio.Event()
    u = make_url(url)
    if u.get_backend_name() == "sqlite":

        def lock_once() -> None:
            # Waits for the writer's own transaction to end (a hang guard: a descheduled
            # writer can hold its lock for seconds on a loaded machine).
            con = sqlite3.connect(u.database or "", timeout=120, isolation_level=None)
            try:
                con.execute("BEGIN EXCLUSIVE")
                time.sleep(0.08)
                con.execute("ROLLBACK")
                hits.append(1)
            finally:
                con.close()

        async def flap() -> None:
            while not stop.is_set():
                await asyncio.to_thread(lock_once)
                await asyncio.sleep(0.03)

    else:
        import asyncpg

        assert PG_URL
        a = make_url(PG_URL)
        admin = await asyncpg.connect(
            host=a.host, port=a.port or 5432, user=a.username, database=a.database
        )

        async def flap() -> None:
            while not stop.is_set():
                killed = await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = $1 AND pid <> pg_backend_pid()",
                    u.database,
                )
                hits.append(int(killed))
                await asyncio.sleep(0.03)

    task = asyncio.create_task(flap())
    try:
        yield hits
    finally:
        stop.set()
        await task
        if u.get_backend_name() != "sqlite":
            await admin.close()


async def test_repeated_interruptions_lose_and_duplicate_nothing(
    db_url: str, tmp_path: Path
) -> None:
    engine = _writer_engine(db_url)
    check = create_engine(db_url)
    try:
        run_id = await _seed_run(check)
        await check.dispose()
        writer = SampleWriter(
            engine,
            batch_rows=100,
            batch_age_s=0.02,
            max_pending_rows=2000,
            journal_dir=tmp_path / "journal",
            retry_max_s=0.1,
        )
        writer.start()
        async with _flapping(db_url) as hits:
            for start in range(1, 8001, 40):
                await writer.put(_rows(run_id, start, 40))
                await asyncio.sleep(0.003)
        assert sum(hits) > 0
        await writer.close()
        assert writer.rows_dropped == 0 and writer.journal_pending_rows == 0
        assert await _seqs(check, run_id) == list(range(1, 8001))
    finally:
        await engine.dispose()
        await check.dispose()


async def test_journal_left_at_close_is_replayed_by_next_writer(
    db_url: str, tmp_path: Path
) -> None:
    engine = _writer_engine(db_url)
    try:
        run_id = await _seed_run(engine)
        jdir = tmp_path / "journal"
        async with _outage(db_url):
            writer = SampleWriter(engine, batch_rows=100, journal_dir=jdir, retry_max_s=0.1)
            await writer.put(_rows(run_id, 1, 750))
            await writer.close()  # the database is still down: rows stay journaled
            assert writer.rows_journaled == 750 and writer.journal_pending_rows == 750
        assert list(jdir.iterdir())
        await engine.dispose()  # a new process: fresh connections
        writer = SampleWriter(engine, journal_dir=jdir)
        writer.start()
        await writer.flush()
        assert writer.rows_replayed == 750 and not list(jdir.iterdir())
        await writer.close()
        assert await _seqs(engine, run_id) == list(range(1, 751))
    finally:
        await engine.dispose()


async def test_replay_writes_several_journal_records_per_transaction(
    db_url: str, tmp_path: Path
) -> None:
    """A journal filled with small records while the database was slow is replayed a few
    records per transaction (up to max_batch_rows): one record at a time it drained more
    slowly than samples kept arriving, and filled its bound."""
    engine = _writer_engine(db_url)
    try:
        run_id = await _seed_run(engine)
        jdir = tmp_path / "journal"
        journal = Journal(jdir, segment_bytes=25_000)  # ~2 records of 100 rows per file
        journal.open()
        assert journal.append_many([_rows(run_id, s, 100) for s in range(1, 1001, 100)]) == 10
        journal.close()
        writer = RecordingWriter(engine, journal_dir=jdir, max_batch_rows=350)
        writer.start()
        await writer.flush()
        sizes = [n for _, n in writer.inserts]
        # Never more than the cap, never across a file (2 records each), all of it once.
        assert sizes == [200] * 5, sizes
        assert writer.rows_replayed == 1000 and not list(jdir.iterdir())
        await writer.close()
        assert await _seqs(engine, run_id) == list(range(1, 1001))
    finally:
        await engine.dispose()


async def test_write_slower_than_timeout_goes_to_journal(sqlite_url: str, tmp_path: Path) -> None:
    # busy_timeout (3 s) longer than the writer's patience (0.2 s): the blocked write keeps
    # waiting in the background and commits once the lock is gone, while its rows are also
    # journaled and later replayed; the idempotent insert keeps that at exactly once.
    engine = _writer_engine(sqlite_url, busy_ms=3000)
    try:
        run_id = await _seed_run(engine)
        writer = SampleWriter(
            engine,
            batch_rows=100,
            batch_age_s=0.02,
            journal_dir=tmp_path / "journal",
            write_timeout_s=0.2,
            retry_max_s=0.1,
        )
        writer.start()
        slowest_put = 0.0
        async with _outage(sqlite_url):
            for start in range(1, 2001, 20):
                t0 = time.perf_counter()
                await writer.put(_rows(run_id, start, 20))
                slowest_put = max(slowest_put, time.perf_counter() - t0)
                await asyncio.sleep(0.008)
            assert not writer.db_available and writer.rows_journaled > 0
        # No put was held for the blocked write (that one waits out the 3 s busy timeout).
        assert slowest_put < 3.0, slowest_put
        await writer.close()
        assert writer.journal_pending_rows == 0
        assert await _seqs(engine, run_id) == list(range(1, 2001))
    finally:
        await engine.dispose()


async def test_no_journal_waits_in_memory_bounded(sqlite_url: str) -> None:
    engine = _writer_engine(sqlite_url)
    try:
        run_id = await _seed_run(engine)
        writer = SampleWriter(
            engine, batch_rows=100, batch_age_s=0.05, max_pending_rows=500, retry_max_s=0.1
        )
        writer.start()
        async with _outage(sqlite_url):
            producer = asyncio.create_task(writer.put(_rows(run_id, 1, 2000)))
            # Once a write has failed, nothing leaves memory until the database is back:
            # 2000 rows cannot fit in 500, so the producer is held (back-pressure).
            await _until(lambda: not writer.db_available, timeout=30.0)
            assert not producer.done()
            assert writer.pending_rows <= 500
        await producer
        await writer.close()
        assert await _seqs(engine, run_id) == list(range(1, 2001))
    finally:
        await engine.dispose()


async def test_journal_overflow_drops_and_flags(sqlite_url: str, tmp_path: Path) -> None:
    engine = _writer_engine(sqlite_url)
    try:
        run_id = await _seed_run(engine)
        writer = SampleWriter(
            engine,
            batch_rows=100,
            batch_age_s=0.05,
            journal_dir=tmp_path / "j",
            max_journal_bytes=30_000,  # ~3 records of 100 rows
            retry_max_s=0.1,
        )
        writer.start()
        async with _outage(sqlite_url):
            await writer.put(_rows(run_id, 1, 1000))
            await writer.flush()
            assert writer.journal_overflowed
            assert writer.rows_dropped > 0
            assert writer.rows_journaled + writer.rows_dropped == 1000
            assert writer.journal is not None and writer.journal.size_bytes <= 30_000
        await writer.close()
        stored = await _seqs(engine, run_id)
        assert len(stored) == writer.rows_journaled
        assert stored == list(range(1, len(stored) + 1))  # oldest kept, newest dropped
    finally:
        await engine.dispose()


async def test_failing_journal_disk_holds_rows_in_memory(
    sqlite_url: str, tmp_path: Path, monkeypatch: Any
) -> None:
    """Database down and the journal's disk failing (ENOSPC): the rows wait in memory and
    reach the database once it answers; held past ``hold_s`` they are dropped, flagged."""
    engine = _writer_engine(sqlite_url)
    disk_full = [True]
    real_append = Journal.append_many

    def append_many(self: Journal, *a: Any, **kw: Any) -> int:
        if disk_full[0]:
            self.last_append_error = OSError(28, "No space left on device")
            raise self.last_append_error
        return real_append(self, *a, **kw)

    monkeypatch.setattr(Journal, "append_many", append_many)
    try:
        run_id = await _seed_run(engine)
        writer = SampleWriter(engine, batch_rows=100, batch_age_s=0.05,
                              journal_dir=tmp_path / "j", retry_max_s=0.1)
        writer.start()
        async with _outage(sqlite_url):
            await writer.put(_rows(run_id, 1, 500))
            await _until(lambda: writer.held_rows == 500)
            assert writer.rows_dropped == 0 and not writer.journal_overflowed
            disk_full[0] = False
        await writer.flush()
        assert writer.held_rows == 0 and writer.rows_dropped == 0
        assert await _seqs(engine, run_id) == list(range(1, 501))

        # Held longer than hold_s: dropped and flagged, as when the journal is full.
        disk_full[0] = True
        writer.hold_s = 0.0
        async with _outage(sqlite_url):
            await writer.put(_rows(run_id, 501, 100))
            await writer.flush()
            assert writer.rows_dropped == 100 and writer.journal_overflowed
            assert writer.dropped_by_run[run_id][:2] == [501, 600]
        disk_full[0] = False
        await writer.close()
        assert await _seqs(engine, run_id) == list(range(1, 501))
    finally:
        await engine.dispose()


# -- crash recovery ------------------------------------------------------------------------


async def test_crash_recovery_ignores_torn_last_record(
    db_engine: AsyncEngine, tmp_path: Path
) -> None:
    run_id = await _seed_run(db_engine)
    jdir = tmp_path / "journal"
    journal = Journal(jdir)
    assert journal.append_many([_rows(run_id, 1, 100), _rows(run_id, 101, 100)]) == 2
    assert journal.append_many([_rows(run_id, 201, 100)]) == 1
    journal.close()
    (seg,) = list(jdir.iterdir())
    with open(seg, "r+b") as fh:  # the crash cut the last write short
        fh.truncate(seg.stat().st_size - 7)

    writer = SampleWriter(db_engine, journal_dir=jdir)
    writer.start()
    await writer.flush()
    assert writer.rows_replayed == 200
    assert writer.journal is not None and writer.journal.ignored_bytes > 0
    await writer.put(_rows(run_id, 1000, 5))
    await writer.close()
    assert await _seqs(db_engine, run_id) == list(range(1, 201)) + list(range(1000, 1005))
    assert not list(jdir.iterdir())


# -- back-pressure -------------------------------------------------------------------------


async def test_fast_producer_bounded_by_max_pending_rows(db_engine: AsyncEngine) -> None:
    run_id = await _seed_run(db_engine)
    writer = RecordingWriter(
        db_engine, batch_rows=100, batch_age_s=0.05, max_pending_rows=500, max_batch_rows=100
    )
    writer.delay_s = 0.02  # a database slower than the producer; one batch per insert
    writer.start()
    most = 0
    t0 = time.perf_counter()
    for start in range(1, 5001, 50):
        await writer.put(_rows(run_id, start, 50))
        most = max(most, writer.pending_rows)
    waited = time.perf_counter() - t0
    await writer.close()
    assert most <= 500
    # 4500 rows beyond the bound had to wait for 45 slow inserts.
    assert waited >= 45 * 0.02 * 0.8
    assert await _seqs(db_engine, run_id) == list(range(1, 5001))
