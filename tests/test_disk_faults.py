"""Disk faults mid-run: the data directory filling up, and I/O errors on the N-th write.

The acquisition node runs in the test's event loop against a simulated lab over real TCP,
as in tests/test_db_outage.py, and a discharge is measured while the fault happens:

* Disk full: the data directory (SQLite file and the sample journal) is a small tmpfs
  mounted for the test. Mid-run a filler file takes every free byte, is held a few
  seconds, then deleted. SQLite and the journal both hit ENOSPC for real.
* I/O error on the N-th write: the sample writer's N-th commit raises SQLite's
  "disk I/O error" before anything is written, and a later one after its rows were
  committed (the outcome a client cannot know), injected in-process.

Afterwards, counted from the database before asserting (and recorded for the fault
campaign): no sample committed before the fault is missing, none is duplicated; every
seq the run numbered is stored, or falls in a range an interruption event names with its
cause; from when the fault ends the samples are contiguous, and the run completed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import exc as sa_exc
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from labdaq.cli import _register_sim_lab
from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.engine.writer import SampleWriter
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker, upgrade
from tests.fault_report import lost_and_duplicates, record_fault

# The same C/5 discharge as the database outage, and its wait for the run's end.
from tests.test_db_outage import _wait_end, start_discharge

pytestmark = [pytest.mark.slow, pytest.mark.faults]

SPEED = 100.0
TMPFS_SIZE = "48m"
FULL_HOLD_S = 4.0


@contextlib.contextmanager
def _tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` for the block; unmounted afterwards."""
    where.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
        capture_output=True, text=True, check=False,
    )
    if res.returncode != 0:
        pytest.fail(
            "the disk-full scenario needs to mount a tmpfs (run as root or with "
            f"CAP_SYS_ADMIN): mount said {res.stderr.strip() or res.returncode}"
        )
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def _fill(path: Path) -> int:
    """Write ``path`` until the file system is full; bytes written."""
    chunk = b"\0" * (1 << 16)
    n = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        while True:
            try:
                n += os.write(fd, chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(chunk) == 1:
                    return n
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(fd)


async def _node(
    url: str, journal_dir: Path
) -> tuple[SimLab, dict[str, Any], AcquisitionNode, asyncio.Task[None], AsyncEngine]:
    lab = SimLab(speed=SPEED, soc=0.5, watchdog_s=None)
    desc = lab.start()
    await _register_sim_lab(url, desc)
    engine = create_engine(url)
    node = AcquisitionNode(
        engine, EngineClock(SPEED), poll_s=0.05, batch_age_s=0.1, journal_dir=journal_dir
    )
    assert isinstance(node.writer, SampleWriter), "these scenarios drive the in-process writer"
    task = asyncio.create_task(node.run_forever(), name="node")
    return lab, desc, node, task, engine


async def _stop(lab: SimLab, node: AcquisitionNode, task: asyncio.Task[None],
                engine: AsyncEngine) -> None:
    node.request_stop()
    try:
        await asyncio.wait_for(task, 30)
    finally:
        await engine.dispose()
        lab.stop()


async def _seqs(maker: async_sessionmaker[AsyncSession], run_id: int) -> list[int]:
    async with session_scope(maker) as s:
        return list(
            (await s.scalars(
                select(m.Sample.seq).where(m.Sample.run_id == run_id).order_by(m.Sample.seq)
            )).all()
        )


async def _count(maker: async_sessionmaker[AsyncSession], run_id: int) -> int:
    async with session_scope(maker) as s:
        n = await s.scalar(
            select(func.count()).select_from(m.Sample).where(m.Sample.run_id == run_id)
        )
    return int(n or 0)


async def _wait_for(pred: Callable[[], Awaitable[bool]], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if await pred():
                return
        except AssertionError:
            raise
        except Exception:  # noqa: BLE001 - the database may be failing right now
            pass
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


async def _check_outcome(
    maker: async_sessionmaker[AsyncSession],
    run_id: int,
    committed_before: list[int],
    scenario: str,
    faults: int,
    t_fault_over: float,
) -> None:
    """Count, record, then assert the outcome shared by both scenarios."""
    run = await _wait_end(maker, run_id, 60)
    async with session_scope(maker) as s:
        rows = (
            await s.execute(
                select(m.Sample.seq, m.Sample.ts_utc)
                .where(m.Sample.run_id == run_id)
                .order_by(m.Sample.seq)
            )
        ).all()
        events = (
            await s.scalars(
                select(m.Event).where(m.Event.run_id == run_id, m.Event.kind == "interruption")
            )
        ).all()
    seq = [int(r[0]) for r in rows]
    ts = np.array([r[1] for r in rows], float)
    lost, dups = lost_and_duplicates(seq, committed_before)
    record_fault(scenario, faults=faults, lost=lost, duplicates=dups,
                 runs_resumed=int(run.state == "completed"), runs=1,
                 missed_periods=run.missed_periods)
    assert lost == 0 and dups == 0, (lost, dups)
    assert run.state == "completed", (run.state, run.end_reason)
    assert seq and seq[0] == 1 and seq[-1] == run.last_seq, (seq[:3], seq[-3:], run.last_seq)
    # Every numbered sample is stored, or in a range an interruption event says is lost
    # and why.
    named = [(int(e.data["from_seq"]), int(e.data["to_seq"])) for e in events
             if (e.data or {}).get("from_seq") is not None]
    stored = set(seq)
    unexplained = [
        k for k in range(1, run.last_seq + 1)
        if k not in stored and not any(a <= k <= b for a, b in named)
    ]
    assert not unexplained, (unexplained[:10], named)
    for e in events:
        assert e.message and (e.data or {}).get("cause"), (e.message, e.data)
    # From the end of the fault on, nothing is missing.
    after = np.array(seq)[ts > t_fault_over]
    assert after.size > 0
    assert (np.diff(after) == 1).all(), after[np.flatnonzero(np.diff(after) != 1)][:5]


async def test_disk_full_mid_run(tmp_path: Path) -> None:
    """The data directory's file system fills up mid-run and frees again seconds later."""
    with _tmpfs(tmp_path / "data", TMPFS_SIZE) as data:
        url = f"sqlite:///{data / 'labdaq.db'}"
        await asyncio.to_thread(upgrade, url)
        lab, desc, node, task, engine = await _node(url, data / "journal")
        check = create_engine(url)
        maker = sessionmaker(check)
        filler = data / "filler"
        try:
            run_id = await start_discharge(maker, desc)
            await _wait_for(lambda: _count_ge(maker, run_id, 200), 60, "samples to flow")
            committed_before = await _seqs(maker, run_id)
            writer = node.writer
            assert isinstance(writer, SampleWriter)
            ticks0 = next(iter(node.groups.values())).ticks
            filled = await asyncio.to_thread(_fill, filler)
            assert filled > 0
            try:
                # The writer notices (SQLite "database or disk is full", or the journal
                # ENOSPC) once it next has rows to store.
                await _wait_for(
                    lambda: _noticed(writer), 30, "the writer to meet the full disk"
                )
                await asyncio.sleep(FULL_HOLD_S)
                # Neither SQLite nor the journal could take the samples: they waited in
                # memory.
                assert not writer.db_available
                assert writer.held_rows > 0
                # Acquisition went on while the disk was full.
                assert next(iter(node.groups.values())).ticks - ticks0 > 10
                assert run_id in node.active
                with contextlib.suppress(Exception):
                    committed_before = await _seqs(maker, run_id)
            finally:
                filler.unlink()
            t_free = time.time()
            await _check_outcome(maker, run_id, committed_before,
                                 f"disk full {FULL_HOLD_S:g} s mid-run (tmpfs, SQLite + journal)",
                                 1, t_free + 2.0)
            # A few seconds of a full disk cost no sample: held in memory, then stored.
            assert writer.rows_dropped == 0 and not writer.journal_overflowed
            assert writer.held_rows == 0 and writer.journal_pending_rows == 0
            seq = await _seqs(maker, run_id)
            assert seq == list(range(1, len(seq) + 1)), "gaps in seq"
        finally:
            with contextlib.suppress(FileNotFoundError):
                filler.unlink()
            await check.dispose()
            await _stop(lab, node, task, engine)


async def _count_ge(maker: async_sessionmaker[AsyncSession], run_id: int, n: int) -> bool:
    return await _count(maker, run_id) >= n


async def _noticed(writer: SampleWriter) -> bool:
    return (not writer.db_available) or writer.rows_dropped > 0 or writer.rows_journaled > 0


FAIL_BEFORE_AT = 5  # this commit of the writer fails, nothing written
FAIL_AFTER_AT = 12  # this one fails after its rows were committed


async def test_io_error_on_nth_write(db_url: str, tmp_path: Path) -> None:
    """The writer's 5th commit fails with "disk I/O error" before writing, its 12th after
    its rows were committed: retried from the journal, nothing lost, nothing doubled."""
    lab, desc, node, task, engine = await _node(db_url, tmp_path / "journal")
    writer = node.writer
    assert isinstance(writer, SampleWriter)
    real = writer._insert
    calls = 0
    injected: list[int] = []

    async def failing_insert(rows: Any, records: Any = None) -> None:
        nonlocal calls
        calls += 1
        disk = sa_exc.OperationalError(
            "COMMIT", None, sqlite3.OperationalError("disk I/O error")
        )
        if calls == FAIL_BEFORE_AT:
            injected.append(calls)
            raise disk
        await real(rows, records) if records is not None else await real(rows)
        if calls == FAIL_AFTER_AT:
            injected.append(calls)
            raise disk

    writer._insert = failing_insert  # type: ignore[method-assign]
    check = create_engine(db_url)
    maker = sessionmaker(check)
    try:
        run_id = await start_discharge(maker, desc)
        await _wait_for(lambda: _count_ge(maker, run_id, 20), 60, "samples to flow")
        await _wait_for(lambda: _true(len(injected) == 2), 60, "both injected errors")
        committed_before = await _seqs(maker, run_id)
        t_over = time.time()
        await _check_outcome(maker, run_id, committed_before,
                             f"disk I/O error on the writer's commit {FAIL_BEFORE_AT} (before) "
                             f"and {FAIL_AFTER_AT} (after writing), "
                             f"{make_url(db_url).get_backend_name()}", 2, t_over)
        assert writer.rows_journaled > 0 and writer.rows_replayed >= writer.rows_journaled
        assert writer.rows_dropped == 0 and writer.rows_rejected == 0
        assert writer.journal_pending_rows == 0
    finally:
        await check.dispose()
        await _stop(lab, node, task, engine)


async def _true(v: bool) -> bool:
    return v
