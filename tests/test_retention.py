"""Retention (labdaq.retention, ``labdaq retention archive``): an ended run's archived
Parquet export holds exactly its samples (hashes recorded), its downsampled copy is in the
database, an audit event says so, the raw samples stay, and a second pass does nothing;
a running run is refused. SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select, update
from typer.testing import CliRunner

from labdaq import retention
from labdaq.cli import app
from labdaq.errors import Invalid
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.dataout_fixtures import insert_samples, make_lab

N = 12_000


async def test_an_ended_run_is_archived_and_copied_downsampled_once(
        db_url: str, tmp_path: Path) -> None:
    lab = await make_lab(db_url, runs=3)
    old, recent, running = lab["run_ids"]
    for rid in lab["run_ids"]:
        insert_samples(db_url, rid, N, seed=rid)
    engine = create_engine(db_url)
    maker = sessionmaker(engine)
    now = datetime.now(UTC)
    try:
        async with session_scope(maker) as s:
            for rid, ended in ((old, now - timedelta(days=40)), (recent, now)):
                await s.execute(update(m.Run).where(m.Run.id == rid).values(ended_at=ended))
            await s.execute(update(m.Run).where(m.Run.id == running)
                            .values(state="running", ended_at=None))
        async with maker() as s:
            assert await retention.due_runs(s, now - timedelta(days=30)) == [old]
        with pytest.raises(Invalid):
            await retention.archive_run(maker, db_url, running, tmp_path, 500)

        done = await retention.archive_run(maker, db_url, old, tmp_path, 500)
        assert done.created and done.samples == N and 0 < done.downsampled <= 500
        f = pq.ParquetFile(done.path)
        table = f.read()
        meta = {k.decode(): v.decode() for k, v in f.metadata.metadata.items()}
        assert table.num_rows == N and meta["labdaq.data_sha256"] == done.data_sha256
        assert table.column("seq").to_pylist() == list(range(1, N + 1))
        async with maker() as s:
            rec = await s.scalar(select(m.RunArchive).where(m.RunArchive.run_id == old))
            assert rec is not None
            assert rec.file_sha256 == hashlib.sha256(Path(done.path).read_bytes()).hexdigest()
            copy = (await s.execute(
                select(m.DownsampledSample.seq, m.DownsampledSample.voltage_v)
                .where(m.DownsampledSample.run_id == old)
                .order_by(m.DownsampledSample.seq))).all()
            raw = dict((await s.execute(select(m.Sample.seq, m.Sample.voltage_v)
                                        .where(m.Sample.run_id == old))).all())
            # The copy is stored samples as they were, the run's ends included; the raw
            # samples are all still there.
            assert len(copy) == done.downsampled and len(raw) == N
            assert copy[0][0] == 1 and copy[-1][0] == N
            assert all(raw[seq] == v for seq, v in copy)
            [ev] = (await s.scalars(select(m.Event).where(
                m.Event.run_id == old, m.Event.kind == "audit"))).all()
            assert ev.data["action"] == "run archived"
            assert ev.data["after"]["data_sha256"] == done.data_sha256

        again = await retention.archive_run(maker, db_url, old, tmp_path, 500)
        assert not again.created and again.path == done.path
        async with maker() as s:
            assert await s.scalar(select(func.count()).select_from(m.DownsampledSample)
                                  ) == done.downsampled
            assert await retention.due_runs(s, now - timedelta(days=30)) == []
    finally:
        await engine.dispose()


def test_cli_archives_the_runs_due(sqlite_url: str, tmp_path: Path) -> None:
    import asyncio

    lab = asyncio.run(make_lab(sqlite_url, runs=1))
    [rid] = lab["run_ids"]
    insert_samples(sqlite_url, rid, 1000)

    async def ended_long_ago() -> None:
        engine = create_engine(sqlite_url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                await s.execute(update(m.Run).where(m.Run.id == rid)
                                .values(ended_at=datetime.now(UTC) - timedelta(days=90)))
        finally:
            await engine.dispose()

    asyncio.run(ended_long_ago())
    args = ["retention", "archive", "--database-url", sqlite_url, "--data-dir", str(tmp_path)]
    out = CliRunner().invoke(app, args)
    assert out.exit_code == 0, out.output
    [line] = [json.loads(x) for x in out.output.splitlines() if x.startswith("{")]
    assert line["run_id"] == rid and line["samples"] == 1000 and line["created"]
    assert Path(line["path"]).parent == tmp_path / "archive"
    out = CliRunner().invoke(app, args)  # nothing due any more
    assert out.exit_code == 0 and not out.output.strip(), out.output
