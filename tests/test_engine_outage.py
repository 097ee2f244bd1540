"""The database goes away for a few seconds mid-run; acquisition goes on and no sample is
lost: the run completes with samples numbered 1..N.

* SQLite: another connection holds an exclusive lock for 3 s (writers wait, then fail).
* PostgreSQL (runs whenever LABDAQ_TEST_PG_URL is set): new connections to the run's
  database are refused and the engine's backends are terminated for 3 s.

Meanwhile the samples go to the writer's local journal and are replayed when the database
answers (labdaq.engine.writer), and step records, events and run state wait in the node's
record queue (labdaq.engine.node.RecordWriter); the scheduler logs and carries on.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from tests.db_fixtures import PG_URL
from tests.engine_rig import Rig, assert_contiguous, eventually, rows_of, samples, start_rig

SPEED = 200.0
OUTAGE_S = 3.0

PROTOCOL = {
    "schema_version": 1,
    "name": "outage test",
    "steps": [
        {"step": "rest", "until": {"duration_s": 60}},
        {"step": "cc", "current_a": -2.0, "until": {"duration_s": 500}},
        {"step": "rest", "until": {"duration_s": 100}},
        {"step": "cc", "current_a": 2.0, "until": {"duration_s": 500}},
        {"step": "rest", "until": {"duration_s": 60}},
    ],
}


def _hold_sqlite_lock(path: str, seconds: float, locked: threading.Event) -> None:
    conn = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        threading.Event().wait(seconds)
        conn.execute("ROLLBACK")
    finally:
        conn.close()


async def _sqlite_outage(url: str) -> None:
    locked = threading.Event()
    holder = asyncio.to_thread(
        _hold_sqlite_lock, make_url(url).database or "", OUTAGE_S, locked
    )
    await holder
    assert locked.is_set()


async def _postgres_outage(url: str) -> None:
    import asyncpg

    assert PG_URL
    name = make_url(url).database
    admin_url = make_url(PG_URL)
    admin = await asyncpg.connect(
        host=admin_url.host,
        port=admin_url.port or 5432,
        user=admin_url.username,
        password=admin_url.password,
        database=admin_url.database,
    )
    try:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = $1 AND pid <> pg_backend_pid()",
            name,
        )
        assert killed >= 1, "the engine had no connection to terminate"
        await asyncio.sleep(OUTAGE_S)
    finally:
        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
        await admin.close()


async def test_database_outage_loses_no_sample(db_url: str, tmp_path: Path) -> None:
    lab = SimLab(smus=1, seed=21)
    rig: Rig = await start_rig(db_url, lab, SPEED, journal_dir=tmp_path / "journal")
    # Give up on a stuck write after 1 s (default 5 s) so that the journal takes over
    # well within the outage.
    rig.node.writer.write_timeout_s = 1.0
    try:
        run_id = await rig.start_run("smu1/1", protocol_document=PROTOCOL)

        async def in_discharge() -> bool:
            s = await samples(rig.maker, run_id)
            return bool((s["step_index"] == 1).sum() > 5)

        await eventually(in_discharge, "the run to reach its discharge")
        seq_before = int((await samples(rig.maker, run_id))["seq"][-1])
        if db_url.startswith("sqlite"):
            await _sqlite_outage(db_url)
        else:
            await _postgres_outage(db_url)
        run = await rig.wait_end(run_id, timeout_s=40)
        writer = rig.node.writer
        s = await samples(rig.maker, run_id)
        steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    finally:
        await rig.stop()
    assert run.state == "completed", (run.state, run.end_reason)
    # The outage was real: samples went through the journal, and came back.
    assert writer.rows_journaled > 0 and writer.rows_replayed > 0
    assert writer.journal_pending_rows == 0 and writer.rows_dropped == 0
    assert_contiguous(s["seq"])
    assert s["seq"][-1] == run.last_seq > seq_before
    assert [st.step_index for st in steps] == [0, 1, 2, 3, 4]


async def test_journal_overflow_becomes_an_interruption_with_bounds(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The outage outlasts the journal (here a journal too small for any batch): the lost
    samples are an interruption event with their seq and time bounds; the run carries on,
    and every sample outside those bounds is stored."""
    from sqlalchemy import select

    from labdaq.storage.db import session_scope

    lab = SimLab(smus=1, seed=22)
    rig: Rig = await start_rig(sqlite_url, lab, SPEED, journal_dir=tmp_path / "journal")
    rig.node.writer.write_timeout_s = 1.0
    journal = rig.node.writer.journal
    assert journal is not None
    journal.max_bytes = 0  # nothing fits: every batch of the outage is dropped
    try:
        run_id = await rig.start_run("smu1/1", protocol_document=PROTOCOL)
        async def twenty() -> bool:
            return len((await samples(rig.maker, run_id))["seq"]) > 20

        await eventually(twenty, "20 samples before the outage")
        await _sqlite_outage(sqlite_url)
        run = await rig.wait_end(run_id, timeout_s=40)
        s = await samples(rig.maker, run_id)
        async with session_scope(rig.maker) as sess:
            events = (
                await sess.scalars(
                    select(m.Event).where(
                        m.Event.run_id == run_id, m.Event.kind == "interruption"
                    )
                )
            ).all()
        dropped = rig.node.writer.rows_dropped
    finally:
        await rig.stop()
    assert run.state == "completed", (run.state, run.end_reason)
    assert dropped > 0 and events, "the outage should have dropped samples"
    last = events[-1].data
    assert last["cause"] == "journal_overflow"
    assert last["samples_lost_at_most"] == dropped
    stored = set(s["seq"].tolist())
    missing = set(range(1, int(run.last_seq) + 1)) - stored
    # The missing samples lie within the event's bounds; the first dropped batch may have
    # committed after its write timed out (hence "at most").
    assert 0 < len(missing) <= dropped
    assert min(missing) >= last["from_seq"] and max(missing) <= last["to_seq"]
    # Outside the bounds nothing is missing.
    assert stored >= set(range(1, last["from_seq"]))
    assert stored >= set(range(last["to_seq"] + 1, int(run.last_seq) + 1))


async def test_progress_follows_the_run_and_stops_at_its_end(db_url: str) -> None:
    """The progress UPDATE the writer commits with the samples (labdaq.engine.ledger) on
    both databases: while the run goes, runs.last_seq and the resumable position follow
    it; once it has ended, a progress row built before the end does not overwrite the
    final record."""
    from labdaq.engine.ledger import Records, RecordSql
    from labdaq.storage.db import session_scope

    lab = SimLab(smus=1, seed=22)
    rig: Rig = await start_rig(db_url, lab, SPEED)
    try:
        run_id = await rig.start_run("smu1/1", protocol_document=PROTOCOL)
        seen: list[int] = []
        for _ in range(400):
            async with session_scope(rig.maker) as s:
                run = await s.get(m.Run, run_id)
                assert run is not None
                if run.position is not None and run.last_seq > 0:
                    assert run.position["seq"] == run.last_seq
                    assert run.position["step_cap_ah"] >= 0.0
                    if not seen or run.last_seq > seen[-1]:
                        seen.append(run.last_seq)
            if len(seen) >= 3:
                break
            await asyncio.sleep(0.05)
        assert len(seen) >= 3, f"progress did not follow the run: {seen}"
        stale = {"run_id": run_id, "step_index": 0, "step_count": 5, "cycle_index": 1,
                 "elapsed_s": 1.0, "last_seq": 1, "position": {"seq": 1}}
        run = await rig.wait_end(run_id, timeout_s=60)
        paramstyle = "numeric_dollar" if "postgresql" in db_url else "qmark"
        sql = RecordSql.for_paramstyle(paramstyle)
        async with rig.engine.begin() as conn:
            for stmt, params in sql.params(Records(progress={run_id: stale})):
                await conn.exec_driver_sql(stmt, params)  # type: ignore[arg-type]
        async with session_scope(rig.maker) as s:
            after = await s.get(m.Run, run_id)
            assert after is not None
            assert (after.state, after.last_seq) == (run.state, run.last_seq)
            assert after.last_seq > 1 and after.position != {"seq": 1}
    finally:
        await rig.stop()


async def test_saved_position_never_counts_samples_not_yet_stored(db_url: str) -> None:
    """Resuming trusts the saved position's accumulators, so a position is saved only once
    the writer has settled every sample it counts. With samples held in the writer for 2 s
    (wall), the saved position never passes the last committed sample, yet it follows the
    run as they are committed."""
    from sqlalchemy import func, select

    from labdaq.storage.db import session_scope

    lab = SimLab(smus=1, seed=23)
    rig: Rig = await start_rig(db_url, lab, SPEED, batch_age_s=2.0, batch_rows=100_000)
    try:
        run_id = await rig.start_run("smu1/1", protocol_document=PROTOCOL)
        saved: list[tuple[int, int]] = []  # (position seq, last committed seq)
        for _ in range(600):  # a condition poll of up to a minute or more
            async with session_scope(rig.maker) as s:
                # Position first: committed samples only grow, so reading them second
                # can only favour the position on either database's isolation.
                run = await s.get(m.Run, run_id)
                assert run is not None
                pos_seq = int(run.position["seq"]) if run.position else 0
                committed = await s.scalar(
                    select(func.max(m.Sample.seq)).where(m.Sample.run_id == run_id)
                )
            if pos_seq:
                saved.append((pos_seq, int(committed or 0)))
            if len({p for p, _ in saved}) >= 2:
                break
            await asyncio.sleep(0.05)
        ahead = [(p, c) for p, c in saved if p > c]
        assert not ahead, f"saved positions ahead of the committed samples: {ahead}"
        assert len({p for p, _ in saved}) >= 2, f"the saved position did not follow: {saved}"
    finally:
        await rig.stop()


async def test_position_older_than_a_step_boundary_is_not_resumed(db_url: str) -> None:
    """A position is committed with the samples it counts, so it always matches the last
    committed sample. One that does not (a database edited or restored by hand) is not
    trusted: resuming from a position in an earlier step would run part of a finished
    step again, so the run is marked interrupted with the reason instead."""
    from labdaq.storage.db import session_scope

    lab = SimLab(smus=1, seed=24)
    rig: Rig = await start_rig(db_url, lab, SPEED, max_resume_gap_s=1e9)
    try:
        run_id = await rig.start_run("smu1/1", protocol_document=PROTOCOL)
        old: dict[str, Any] | None = None
        for _ in range(200):
            async with session_scope(rig.maker) as s:
                run = await s.get(m.Run, run_id)
                assert run is not None
                if run.position and run.step_index == 1 and run.position["seq"] > 0:
                    old = dict(run.position)  # saved while in the discharge step
                    break
            await asyncio.sleep(0.02)
        assert old is not None, "no position saved in step 1"
        await rig.wait_end(run_id, timeout_s=60)
        # As a kill would have left it: still running, the position from step 1, the
        # committed samples up to the last step.
        async with session_scope(rig.maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            run.state, run.position, run.ended_at = m.RunState.running.value, old, None
        async with session_scope(rig.maker) as s:
            run = await s.get(m.Run, run_id)
            channel = await s.get(m.Channel, run.channel_id) if run else None
        assert run is not None and channel is not None
        await rig.node._resume(run, channel)
        assert run_id not in rig.node.active
        async with session_scope(rig.maker) as s:
            after = await s.get(m.Run, run_id)
            assert after is not None
            assert after.state == "interrupted"
            assert "does not match the last committed sample" in (after.end_reason or "")
            assert f"sample {old['seq']}" in (after.end_reason or "")
    finally:
        await rig.stop()
