"""Inquired readings of delegated runs, for the live view.

One job: put each delegated run's latest ``inquire`` reading (V, I, T, step, cycle, the
instrument's state) into ``live_readings``, where the API's streams read it
(labdaq/live.py). The follower (labdaq/engine/delegated.py) hands over one round's
readings; they are written in a task of their own so that a slow or unavailable database
never holds up the follower's safety check. Latest wins: a round that comes while the
previous one is still being written replaces the one waiting, so at most one write is
in flight and one waits. A failed write is logged and dropped: these are not samples
(only harvested records are), the next round writes newer ones.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from labdaq.storage import models as m
from labdaq.storage.db import session_scope

log = logging.getLogger(__name__)


class LiveReadings:
    """The writer of ``live_readings`` rows (one per run, overwritten)."""

    def __init__(self, maker: async_sessionmaker[AsyncSession]) -> None:
        self.maker = maker
        self._pending: dict[int, dict[str, Any]] = {}  # run id -> its newest reading
        self._task: asyncio.Task[None] | None = None
        self.written = 0  # rows written, for tests and logs

    def put(self, readings: list[dict[str, Any]]) -> None:
        """Queue readings (each with ``run_id``) for writing; never waits."""
        for r in readings:
            self._pending[int(r["run_id"])] = r
        if self._pending and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self._write(), name="live-readings")

    async def _write(self) -> None:
        while self._pending:
            batch, self._pending = list(self._pending.values()), {}
            try:
                async with session_scope(self.maker) as s:
                    for r in batch:
                        await _upsert(s, r)
                self.written += len(batch)
            except Exception as exc:  # noqa: BLE001 - a live view's reading, not data
                log.warning("live readings not written (%d runs): %s", len(batch), exc)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def _upsert(s: AsyncSession, reading: dict[str, Any]) -> None:
    """UPDATE, then INSERT when there was no row (portable, as the heartbeat's)."""
    values = {k: v for k, v in reading.items() if k != "run_id"}
    res = await s.execute(update(m.LiveReading)
                          .where(m.LiveReading.run_id == reading["run_id"]).values(values))
    if getattr(res, "rowcount", 0) == 0:
        s.add(m.LiveReading(**reading))
