"""The sample writer in its own process: same contract as SampleWriter across a pipe.

Real child processes and real databases (SQLite and PostgreSQL through ``db_url``); the
SQLite outage is another connection holding ``BEGIN EXCLUSIVE``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import time
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.writer_process import WriterProcess, WriterProcessDied
from tests.test_writer import _rows, _seed_run, _seqs


async def _until(pred: object, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.02)


async def test_rows_are_committed_by_flush_and_counted(db_url: str, db_engine: AsyncEngine,
                                                       tmp_path: Path) -> None:
    run_id = await _seed_run(db_engine)
    w = WriterProcess(db_url, batch_rows=500, batch_age_s=0.05, journal_dir=tmp_path / "j")
    w.start()
    try:
        for start in range(1, 3001, 100):
            await w.put(_rows(run_id, start, 100))
        # Same rows again (a replay): idempotent on (run_id, seq).
        await w.put(_rows(run_id, 1, 100))
        await w.flush()
        assert await _seqs(db_engine, run_id) == list(range(1, 3001))
        assert w.pending_rows == 0
        assert w.rows_written == 3100 and w.rows_journaled == 0 and w.db_available
    finally:
        await w.close()
    assert w.pid is None  # joined


async def test_back_pressure_bounds_rows_in_flight(sqlite_url: str, tmp_path: Path) -> None:
    from labdaq.storage.db import create_engine

    engine = create_engine(sqlite_url)
    run_id = await _seed_run(engine)
    w = WriterProcess(sqlite_url, batch_rows=50, batch_age_s=0.01, max_pending_rows=200)
    w.start()
    peak = 0
    try:
        for start in range(1, 5001, 50):
            await w.put(_rows(run_id, start, 50))
            peak = max(peak, w.pending_rows)
        await w.flush()
        assert peak <= 200
        assert await _seqs(engine, run_id) == list(range(1, 5001))
    finally:
        await w.close()
        await engine.dispose()


async def test_outage_journals_in_the_child_then_replays(sqlite_url: str,
                                                         tmp_path: Path) -> None:
    from labdaq.storage.db import create_engine

    engine = create_engine(sqlite_url)
    run_id = await _seed_run(engine)
    w = WriterProcess(sqlite_url, batch_rows=100, batch_age_s=0.02,
                      journal_dir=tmp_path / "journal", write_timeout_s=0.3)
    w.start()
    await w.flush()
    lock = sqlite3.connect(sqlite_url.split("sqlite:///", 1)[1], timeout=0)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        await w.put(_rows(run_id, 1, 300))
        await _until(lambda: not w.db_available and w.rows_journaled >= 300)
        assert w.journal_pending_rows >= 300
        # Acquisition keeps going during the outage.
        await w.put(_rows(run_id, 301, 300))
        lock.rollback()
        await w.flush()
        assert w.db_available and w.journal_pending_rows == 0
        assert await _seqs(engine, run_id) == list(range(1, 601))
    finally:
        lock.close()
        await w.close()
        await engine.dispose()


async def test_a_killed_child_fails_put_and_flush(sqlite_url: str) -> None:
    w = WriterProcess(sqlite_url)
    w.start()
    await w.flush()
    assert w.pid is not None
    os.kill(w.pid, signal.SIGKILL)
    with pytest.raises(WriterProcessDied):
        await asyncio.wait_for(w.flush(), 10)
    with pytest.raises(WriterProcessDied):
        await w.put(_rows(1, 1, 1))
    await w.close()


async def test_child_exits_when_its_engine_is_gone(sqlite_url: str) -> None:
    """No leftover writer may race a restarted engine for the same (run_id, seq)."""
    w = WriterProcess(sqlite_url)
    w.start()
    await w.flush()
    proc = w._proc
    assert proc is not None
    # What a kill -9 of the engine does to the pipe: the engine's end is closed.
    w._detach()
    assert await asyncio.to_thread(proc.wait, 10) == 0
