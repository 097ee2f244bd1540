"""The database made unavailable mid-run: acquisition goes on, no sample is lost.

The acquisition node runs in the test's event loop against a simulated lab over real TCP
(the style of tests/test_engine.py), with its sample journal in ``tmp_path/journal``. In the
middle of a discharge the database goes away for a few seconds, for real, not mocked:

* SQLite: another connection holds ``BEGIN EXCLUSIVE``. The engine's connections wait on
  the file lock (busy_timeout 10 s, labdaq/storage/db.py); the sample writer gives up on a
  write after its ``write_timeout_s`` (5 s by default, left as shipped) and journals. The
  lock is held 7 s: past the writer's timeout, within the busy timeout, the same as a long
  backup or a stuck reader-turned-writer would do.
* PostgreSQL: the test database stops accepting connections (``ALLOW_CONNECTIONS false``)
  and every session of it is terminated, then connections are allowed again.

Afterwards: seq is exactly 1..N (nothing lost, nothing duplicated), N is what the engine
says it measured, the samples' wall-clock stamps show acquisition never paused during the
outage, the journal was used and emptied, and the run completed with its step and cycle
records.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from labdaq.cli import _register_sim_lab
from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.runs import RunCreate, create_run
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.db_fixtures import PG_URL
from tests.fault_report import lost_and_duplicates, record_fault

SPEED = 100.0
# C/5 for 30 simulated minutes: ~18 s of wall time. The outage (7 s of wall time, 700
# simulated s) starts once 50 samples are stored: by then at most 500 simulated s have
# passed even if a loaded machine let the engine take only one tick in ten, so the
# outage falls in the discharge.
DISCHARGE_S, REST_S = 1800, 60
RUN_S = DISCHARGE_S + REST_S
PROTOCOL: dict[str, Any] = {
    "schema_version": 1,
    "name": "outage_discharge",
    "steps": [
        {
            "step": "cc",
            "rate_c": -0.2,
            "until": {"duration_s": DISCHARGE_S, "voltage_v": "discharge_cutoff"},
        },
        {"step": "rest", "until": {"duration_s": REST_S}},
    ],
}
SQLITE_HOLD_S = 7.0  # > SampleWriter.write_timeout_s (5 s), < SQLite busy_timeout (10 s)
PG_DOWN_S = 4.0


@dataclass
class Rig:
    """The simulated lab, the node running in this event loop, and its database."""

    lab: SimLab
    desc: dict[str, Any]
    url: str
    engine: AsyncEngine
    maker: async_sessionmaker[AsyncSession]
    node: AcquisitionNode
    task: asyncio.Task[None]
    journal_dir: Path


@pytest.fixture
async def rig(db_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    """Lab served over TCP, registered like ``serve --sim`` does, node started; stopped
    (outputs off) afterwards."""
    lab = SimLab(speed=SPEED, soc=0.5, watchdog_s=None)
    desc = lab.start()
    engine: AsyncEngine | None = None
    task: asyncio.Task[None] | None = None
    node: AcquisitionNode | None = None
    try:
        await _register_sim_lab(db_url, desc)
        engine = create_engine(db_url)
        journal_dir = tmp_path / "journal"
        node = AcquisitionNode(
            engine,
            EngineClock(SPEED),
            poll_s=0.05,
            batch_age_s=0.1,
            journal_dir=journal_dir,
        )
        task = asyncio.create_task(node.run_forever(), name="node")
        yield Rig(lab, desc, db_url, engine, sessionmaker(engine), node, task, journal_dir)
    finally:
        if node is not None and task is not None:
            node.request_stop()
            await asyncio.wait_for(task, 30)
        if engine is not None:
            await engine.dispose()
        lab.stop()


async def _start_run(rig: Rig) -> int:
    """Queue the discharge on the SMU's channel; the node claims it."""
    return await start_discharge(rig.maker, rig.desc)


async def start_discharge(maker: async_sessionmaker[AsyncSession], desc: dict[str, Any]) -> int:
    """Queue :data:`PROTOCOL` on the first instrument's first channel of a simulated lab
    (``desc``); the node claims it."""
    ch = desc["instruments"][0]["channels"][0]
    async with session_scope(maker) as s:
        run = await create_run(
            s,
            RunCreate(
                channel=ch["name"],
                cell_serial=ch["cell"]["serial"],
                protocol_document=PROTOCOL,
                sample_period_s=1.0,
            ),
            actor="test",
        )
        await s.flush()
        return int(run.id)


async def _has_samples(
    maker: async_sessionmaker[AsyncSession], run_id: int, at_least: int
) -> bool:
    """At least ``at_least`` samples of the run are committed."""
    async with session_scope(maker) as s:
        n = await s.scalar(
            select(func.count()).select_from(m.Sample).where(m.Sample.run_id == run_id)
        )
    return int(n or 0) >= at_least


async def _wait_for(
    pred: Callable[[], Awaitable[bool]], timeout_s: float, what: str
) -> None:
    """Poll an async predicate without blocking the node sharing this loop."""
    deadline = time.monotonic() + timeout_s
    while not await pred():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


async def _pg_admin() -> Any:
    """A connection to the server's own database (not the test's, which goes away)."""
    import asyncpg

    assert PG_URL
    a = make_url(PG_URL)
    return await asyncpg.connect(
        host=a.host, port=a.port or 5432, user=a.username, password=a.password, database=a.database
    )


@asynccontextmanager
async def _outage(url: str) -> AsyncIterator[None]:
    """The database is unavailable to the node for the duration of the block."""
    u = make_url(url)
    if u.get_backend_name() == "sqlite":
        lock = sqlite3.connect(
            u.database or "", timeout=10, isolation_level=None, check_same_thread=False
        )
        # In a thread: taking the lock waits while the engine is mid-commit, and the
        # engine shares this event loop.
        await asyncio.to_thread(lock.execute, "BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            await asyncio.to_thread(lock.execute, "ROLLBACK")
            lock.close()
        return
    admin = await _pg_admin()
    name = u.database
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        assert killed >= 1, "the node had no session to lose"
        yield
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


@pytest.mark.faults
async def test_database_outage_mid_run_loses_no_sample(rig: Rig) -> None:
    """SQLite locked for 7 s / PostgreSQL refusing connections for 4 s in the middle of a
    discharge: the run goes on and completes, every sample reaches the database once."""
    run_id = await _start_run(rig)
    # A separate engine for the test's own reads, so the node's pool is not disturbed.
    check = create_engine(rig.url)
    check_maker = sessionmaker(check)
    try:
        await _wait_for(
            lambda: _has_samples(check_maker, run_id, 50), 60, "samples to flow"
        )
        group = next(iter(rig.node.groups.values()))
        ticks0 = group.ticks
        hold_s = SQLITE_HOLD_S if make_url(rig.url).get_backend_name() == "sqlite" else PG_DOWN_S
        async with _outage(rig.url):
            t_down = time.time()
            await asyncio.sleep(hold_s)
            t_up = time.time()
            # The safety/acquisition loop went on (how many of its ticks a loaded machine
            # lets it take is not the point; the samples' spacing below shows no pause).
            ticks = group.ticks - ticks0
            assert ticks > 10, (ticks, hold_s * SPEED)
            assert not rig.node.writer.db_available
            assert rig.node.writer.rows_journaled > 0
            # The run did not end while the database was away.
            assert run_id in rig.node.active
        await check.dispose()  # PostgreSQL: its pooled connection was terminated too

        run = await _wait_end(check_maker, run_id, 90)  # a hang guard
        assert run.state == "completed", (run.state, run.end_reason)
        writer = rig.node.writer
        assert writer.db_available
        assert writer.journal_pending_rows == 0
        assert writer.rows_replayed >= writer.rows_journaled > 0
        assert writer.rows_dropped == 0 and writer.rows_rejected == 0
        assert not writer.journal_overflowed
        assert not [p for p in rig.journal_dir.glob("*") if p.is_file() and p.stat().st_size]

        async with session_scope(check_maker) as s:
            rows = (
                await s.execute(
                    select(m.Sample.seq, m.Sample.ts_utc, m.Sample.step_index)
                    .where(m.Sample.run_id == run_id)
                    .order_by(m.Sample.seq)
                )
            ).all()
            steps = (
                await s.scalars(
                    select(m.Step).where(m.Step.run_id == run_id).order_by(m.Step.step_number)
                )
            ).all()
            cycles = (await s.scalars(select(m.Cycle).where(m.Cycle.run_id == run_id))).all()
            states = (
                await s.scalars(
                    select(m.Event.data).where(m.Event.run_id == run_id, m.Event.kind == "state")
                )
            ).all()
        seq = np.array([r[0] for r in rows], np.int64)
        ts = np.array([r[1] for r in rows], float)
        lost, dups = lost_and_duplicates(seq.tolist(), list(range(1, (run.last_seq or 0) + 1)))
        sqlite = make_url(rig.url).get_backend_name() == "sqlite"
        record_fault(f"SQLite locked {SQLITE_HOLD_S:g} s mid-run" if sqlite else
                     f"PostgreSQL connections cut and refused {PG_DOWN_S:g} s mid-run",
                     faults=1, lost=lost, duplicates=dups,
                     runs_resumed=int(run.state == "completed"), runs=1,
                     missed_periods=run.missed_periods)
        # Nothing lost, nothing duplicated: 1..N, and N is what the engine measured.
        assert seq.size and seq[0] == 1, seq[:3]
        bad = np.flatnonzero(np.diff(seq) != 1)
        assert bad.size == 0, [(seq[b], seq[b + 1]) for b in bad[:5]]
        assert seq[-1] == run.last_seq
        # At most one a simulated second (30 minutes, then a minute's rest); fewer when the
        # accelerated loop falls behind on a loaded machine and skips ticks: those are
        # never measured, so never numbered; they are not lost samples.
        assert 0.2 * RUN_S < seq.size <= RUN_S + 10, seq.size
        # Samples were measured all through the outage (they were stamped when measured,
        # stored later from the journal): no pause anywhere near the writer's 5 s write
        # timeout or the lock's length, which acquisition waiting on the database would
        # show; the margin is for a loaded machine, which stalls the loop for moments.
        during = (ts >= t_down) & (ts <= t_up)
        assert during.sum() > 0, int(during.sum())
        span = np.concatenate(([t_down], ts[during], [t_up]))
        assert np.diff(span).max() < 2.5, float(np.diff(span).max())
        # Records written around the outage (retried, never doubled): two steps, one cycle,
        # one final state.
        assert [(st.step_number, st.kind) for st in steps] == [(1, "cc"), (2, "rest")]
        assert steps[0].end_reason == "duration"
        assert set(np.unique([r[2] for r in rows]).tolist()) == {st.step_index for st in steps}
        assert [c.cycle_index for c in cycles] == [1]
        assert cycles[0].discharge_capacity_ah == pytest.approx(
            sum(abs(st.capacity_ah) for st in steps), rel=1e-6
        )
        assert states == [{"state": "completed"}]
    finally:
        await check.dispose()


async def _wait_end(
    maker: async_sessionmaker[AsyncSession], run_id: int, timeout_s: float
) -> m.Run:
    """The run once it has left the active states (the database may still be recovering)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            async with session_scope(maker) as s:
                run = await s.get(m.Run, run_id)
                assert run is not None
                if run.state not in ("queued", "running", "paused"):
                    return run
        except AssertionError:
            raise
        except Exception:  # noqa: BLE001 - the database may still be coming back
            pass
        assert time.monotonic() < deadline, f"run {run_id} did not end in {timeout_s} s"
        await asyncio.sleep(0.1)
