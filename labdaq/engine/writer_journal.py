"""The sample writer's fallback path: journal, hold in memory, retry, drop.

One job of :class:`~labdaq.engine.writer.SampleWriter` (which inherits it): where a batch
goes when the database cannot take it (:mod:`.writer_db` said ``DOWN``), and how it comes
back.

* Database unavailable: the batch goes to the journal (:mod:`.journal`), and from then on
  the writer drains its queue straight into the journal (one fsync per drain, not per
  row) so acquisition keeps running. When the database answers again the journal is
  replayed oldest first, several records per transaction, each journal file deleted only
  after all its rows are committed; then the writer goes back to direct writes.
* A journal left by a crashed process is replayed before anything else on start-up.
* Disk full or failing (the journal cannot be written either): the batches are held in
  memory, oldest first, and retried with backoff — to the database, or the journal —
  for up to ``hold_s`` (30 s), within half of ``max_pending_rows`` so ``put`` never waits
  on them; past either bound they are dropped as below.
* Disk bound: ``max_journal_bytes`` (default 1 GiB ≈ 11 M rows). A batch that does not fit
  (or cannot be held: see above) is dropped (``rows_dropped``, bounds per run in
  ``dropped_by_run``) and ``journal_overflowed`` becomes True, so the engine can record an
  interruption (rows found unreadable at replay are counted the same way). Blocking
  instead would stop the sampling loop and its safety checks, which is worse than losing
  samples of a run that is by then hours into an outage.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from labdaq.engine.journal import Journal, Record
from labdaq.engine.ledger import Ledger, Records, Resolver
from labdaq.engine.writer_db import DatabaseWrites, Rows, _Outcome

log = logging.getLogger(__name__)


def _consume_all(journal: Journal, recs: list[Record]) -> None:
    for rec in recs:
        journal.consume(rec)



class JournalFallback(DatabaseWrites):
    """The journal and the batches held in memory, with the counters ``rows_journaled``,
    ``rows_replayed``, ``rows_dropped`` and ``journal_overflowed``."""

    # SampleWriter's (writer.py): the queue batches come from and its accounting.
    _batches: deque[tuple[Rows, Ledger | None]]
    _buf_rows: int
    _pending: int
    _resolver: Resolver
    max_pending_rows: int
    max_batch_rows: int
    _settle: Callable[[int], None]
    _pulse: Callable[[], None]

    def _init_fallback(
        self, journal_dir: Path | None, max_journal_bytes: int, journal_segment_bytes: int,
        journal_fsync: bool, hold_s: float, max_pending_rows: int,
    ) -> None:
        self._journal = (
            Journal(
                journal_dir,
                max_bytes=max_journal_bytes,
                segment_bytes=journal_segment_bytes,
                fsync=journal_fsync,
            )
            if journal_dir is not None
            else None
        )
        self._replay_now = False
        self._replay_attempts = 0
        self._journal_lost = 0  # journal.lost_rows already counted in rows_dropped
        # Batches the journal could not take because writing it failed (disk full, I/O
        # error), oldest first, each with when it was first held: kept in memory and
        # retried for up to hold_s, within half the memory bound so put() never waits.
        self._held: deque[tuple[Rows, Records, float]] = deque()
        self._held_rows = 0
        self._held_retrying = 0  # held rows out of the deque while _store_held retries them
        self._held_retry_at = 0.0
        self._held_delay = self.retry_min_s
        self.hold_s = hold_s
        self.max_held_rows = max(1, max_pending_rows // 2)
        self.rows_journaled = 0
        self.rows_replayed = 0
        self.rows_dropped = 0
        self.journal_overflowed = False
        self.dropped_by_run: dict[int, list[Any]] = {}

    async def _store_held(self) -> None:
        """Retry the batches a failing disk kept in memory, oldest first: straight to the
        database when it takes writes and nothing older waits in the journal, else the
        journal again."""
        held = list(self._held)
        self._held.clear()
        self._held_retrying, self._held_rows = self._held_rows, 0
        assert self._journal is not None
        try:
            if not self._journal.pending_rows and (
                self.db_available or time.monotonic() >= self._retry_at
            ):
                while held:
                    rows, records, _ = held[0]
                    if await self._write_batch(rows, records) is not _Outcome.OK:
                        break
                    held.pop(0)
                    self._held_retrying -= len(rows)
                    self._settle(len(rows))
            if held:
                await self._spill([(b, r) for b, r, _ in held], [t for _, _, t in held])
            else:
                self._held_delay = self.retry_min_s
        finally:
            self._held_retrying = 0

    def _keep_or_drop(
        self, batches: list[tuple[Rows, Records, float]], failed: bool = True
    ) -> None:
        """Hold batches the journal could not take, within the hold bounds; drop the rest.
        ``failed``: the journal just failed (back off) rather than rows joining the queue."""
        now = time.monotonic()
        for b, rec, since in batches:
            if now - since < self.hold_s and self._held_rows + len(b) <= self.max_held_rows:
                self._held.append((b, rec, since))
                self._held_rows += len(b)
            else:
                self._drop(b)
        if not failed:
            return
        self._held_retry_at = now + self._held_delay
        self._held_delay = min(self._held_delay * 2, self.retry_max_s)

    def _drop(self, b: Rows) -> None:
        assert self._journal is not None
        self.rows_dropped += len(b)
        self._note_dropped(b)
        if not self.journal_overflowed:
            log.error(
                "sample journal full (%d of %d bytes) or failing: dropping samples",
                self._journal.size_bytes,
                self._journal.max_bytes,
            )
        self.journal_overflowed = True
        self._settle(len(b))

    async def _spill(
        self,
        batches: list[tuple[Rows, Records]],
        since: list[float] | None = None,
    ) -> None:
        """Append batches, plus every batch queued behind them, to the journal (one fsync).

        Batches it cannot take because the disk failed are held in memory (``since``: when
        each was first held), those beyond the journal's size bound dropped."""
        assert self._journal is not None
        while self._batches:
            rows, ledger = self._batches.popleft()
            batches.append((rows, self._resolver.resolve(ledger)))
        if not batches:
            return
        try:
            written = await asyncio.to_thread(
                self._journal.append_many,
                [b for b, _ in batches],
                [r.to_json() if r else None for _, r in batches],
            )
        except OSError as exc:
            log.error("sample journal %s not writable: %s", self._journal.directory, exc)
            self.last_error = f"journal: {exc}"
            written = 0
        for b, _ in batches[:written]:
            self.rows_journaled += len(b)
            self._settle(len(b))
        if written < len(batches) and self._journal.last_append_error is not None:
            now = time.monotonic()
            stamps = (since or []) + [now] * len(batches)
            self._keep_or_drop(
                [(b, r, stamps[i]) for i, (b, r) in enumerate(batches) if i >= written]
            )
            return
        for b, _ in batches[written:]:
            self._drop(b)

    def _note_dropped(self, rows: Rows) -> None:
        """Keep, per run, the bounds of the samples lost so the engine can record them
        (dropped_by_run: run_id -> [first_seq, last_seq, first_t_s, last_t_s, rows])."""
        for r in rows:
            run_id, seq, t_s = int(r[0]), int(r[1]), float(r[2])
            b = self.dropped_by_run.get(run_id)
            if b is None:
                self.dropped_by_run[run_id] = [seq, seq, t_s, t_s, 1]
            else:
                b[0], b[1] = min(b[0], seq), max(b[1], seq)
                b[2], b[3] = min(b[2], t_s), max(b[3], t_s)
                b[4] += 1

    async def _replay(self) -> None:
        """Write journaled records oldest first until done or the database fails again."""
        assert self._journal is not None
        journal = self._journal
        self._replay_now = False
        try:
            while journal.pending_rows:
                # Records are as small as the batches that spilled; several go in one
                # transaction (up to max_batch_rows), or a journal filled while the
                # database was slow drains more slowly than samples keep arriving.
                recs: list[Record] = await asyncio.to_thread(
                    journal.peek_many, self.max_batch_rows
                )
                if not recs:
                    break
                rows = recs[0].rows if len(recs) == 1 else [r for rec in recs for r in rec.rows]
                records = Records()
                for rec in recs:
                    if rec.records is not None:
                        records.extend(Records.from_json(rec.records))
                if await self._write_batch(rows, records) is not _Outcome.OK:
                    return
                await asyncio.to_thread(_consume_all, journal, recs)
                self.rows_replayed += len(rows)
                self._pulse()
                # A long replay must not stall acquisition: past half the memory bound,
                # newer batches join the journal behind the records being replayed.
                if self._pending - self._buf_rows > self.max_pending_rows // 2:
                    await self._spill([])
            log.info("sample journal replayed; writing directly again")
        finally:
            lost = journal.lost_rows - self._journal_lost
            if lost:
                # A journal file damaged after it was written: these samples are gone.
                self._journal_lost = journal.lost_rows
                self.rows_dropped += lost
                self.journal_overflowed = True
                log.error("sample journal: %d rows unreadable, lost", lost)
            self._replay_attempts += 1
            self._pulse()
