"""Retention: an ended run gets an archived export and a downsampled copy; its raw samples
stay.

A lab keeps raw samples for as long as a test report may be questioned, and a database of
years of 1 s samples is large. Retention here never deletes a sample (the issue's rule:
raw samples go only through an audited admin deletion, which is not built). What it does
for each ended run, once:

* **archived export**: the run's samples as the Parquet export (labdaq.export: the same
  file, description and ``data_sha256`` as ``GET /runs/{id}/export``) written to the
  archive folder (``archive_dir``, default ``<data_dir>/archive``), with the file's own
  SHA-256, so the archive can be checked and kept off the database's disks;
* **downsampled copy**: at most ``retention_points`` of its samples chosen to keep the
  shape of voltage and current (labdaq.downsample, MinMaxLTTB) copied into
  ``samples_downsampled``: a plot of the whole run that stays cheap;
* a ``run_archives`` row (where, what, both hashes) and an audit event, in one
  transaction with the copy. A run already archived is left alone.

The export is taken up to the last seq committed when it starts; an ended run gets no
more samples, so that is all of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from labdaq import export
from labdaq.downsample import downsample
from labdaq.errors import Invalid, NotFound
from labdaq.run_states import TERMINAL
from labdaq.sample_arrow import SampleFilter
from labdaq.storage import models as m

ENDED = tuple(s.value for s in TERMINAL)


@dataclass(frozen=True)
class Archived:
    """What archiving one run did (``created``: False when it was archived already)."""

    run_id: int
    path: str
    samples: int
    downsampled: int
    data_sha256: str
    created: bool


async def due_runs(session: AsyncSession, ended_before: datetime) -> list[int]:
    """Ended runs, ended before ``ended_before``, not archived yet; oldest first."""
    archived = select(m.RunArchive.run_id)
    return list((await session.scalars(
        select(m.Run.id).where(m.Run.state.in_(ENDED), m.Run.ended_at.is_not(None),
                               m.Run.ended_at < ended_before, m.Run.id.not_in(archived))
        .order_by(m.Run.ended_at, m.Run.id))).all())


def _downsample(url: str, run_id: int, top: int, points: int) -> Any:
    conn, style = export.connect(url)
    try:
        return downsample(conn, style, run_id, top, points, SampleFilter())[0]
    finally:
        conn.close()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


async def archive_run(maker: async_sessionmaker[AsyncSession], url: str, run_id: int,
                      archive_dir: Path, points: int) -> Archived:
    """Archive one ended run (see the module docstring); idempotent."""
    async with maker() as s:
        run = await s.get(m.Run, run_id)
        if run is None:
            raise NotFound(f"no run {run_id}")
        if run.state not in ENDED:
            raise Invalid(f"run {run_id} is {run.state}: only an ended run is archived")
        done = await s.scalar(select(m.RunArchive).where(m.RunArchive.run_id == run_id))
        if done is not None:
            return Archived(run_id, done.path, done.samples, done.downsampled,
                            done.data_sha256, False)
        plan = await export.plan_run_export(s, run_id, "parquet")
    archive_dir.mkdir(parents=True, exist_ok=True)
    path = archive_dir / f"run-{run_id}{export.SUFFIXES['parquet']}"
    part = path.with_suffix(path.suffix + ".part")
    # Written aside and renamed: a file under the final name is always whole.
    meta = await asyncio.to_thread(export.export_to_file, url, plan, "parquet", str(part))
    file_sha = await asyncio.to_thread(_sha256, part)
    os.replace(part, path)
    top = plan.max_seq[run_id]
    table = await asyncio.to_thread(_downsample, url, run_id, top, points)
    copy: list[dict[str, Any]] = [{"run_id": run_id, **row} for row in table.to_pylist()]
    async with maker() as s, s.begin():
        if copy:
            await s.execute(insert(m.DownsampledSample), copy)
        after = {"path": str(path), "format": "parquet", "samples": int(meta["rows"]),
                 "last_seq": top, "data_sha256": meta["data_sha256"],
                 "file_sha256": file_sha, "downsampled": len(copy)}
        s.add(m.RunArchive(run_id=run_id, archived_by="labdaq retention", **after))
        s.add(m.Event(run_id=run_id, kind="audit",
                      message=f"run {run_id} archived to {path} ({after['samples']} samples; "
                              f"{len(copy)} kept downsampled); raw samples kept",
                      data={"action": "run archived", "before": None, "after": after}))
    return Archived(run_id, str(path), int(meta["rows"]), len(copy), str(meta["data_sha256"]),
                    True)
