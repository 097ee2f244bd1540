"""Batched sample writer: bounded queue → batched idempotent inserts, journal when the DB is down.

Data path::

    put(rows) ─▶ open batch ─(batch_rows or batch_age_s)─▶ queue ─▶ writer task ─▶ database
                  └──────────── at most max_pending_rows in memory ────┘   │ unavailable
                                                                           ▼
                                                  append-only journal (journal.py), replayed
                                                  oldest first when the database answers

* Back-pressure, never an unbounded buffer: every row handed to :meth:`SampleWriter.put`
  counts against ``max_pending_rows`` until it is committed, journaled or rejected;
  ``put`` waits for space, and that is the only thing it ever waits for.
* Batches queued behind a write are merged into one transaction (up to
  ``max_batch_rows``): with hundreds of runs interleaved, rows per commit sets the rate.
  ``commit_interval_s`` spaces the commits out: a write starts at most that often unless
  ``max_batch_rows`` are waiting or a flush asks for them. Every commit also updates the
  position of each run in it (:mod:`.ledger`), so at 1,024 runs a commit of 2,000 rows
  spent more on positions than on its rows (docs/performance.md).
* Without ``journal_dir`` there is nowhere durable to put rows: the writer retries with
  backoff holding them in memory and ``put`` waits once ``max_pending_rows`` are pending.

Its jobs, a module each: this one the queue, the batching and the writer task that
drives the rest; :mod:`.writer_db` the database writes (idempotent inserts, what an error
means, timeouts, rows the database refuses); :mod:`.writer_journal` the fallback when the
database cannot take a batch (journal, replay, holding batches in memory while the disk
fails, dropping them past the bounds). They share one object because they share its
accounting (rows pending, settled, when to retry), which must change together.

Positions, and the steps and cycles a batch's rows complete, come with the rows
(:mod:`labdaq.engine.ledger`) and are committed in the same transaction; the journal keeps
them with their rows.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.journal import Journal
from labdaq.engine.ledger import Ledger, Records, Resolver
from labdaq.engine.sample_batch import SampleBatch
from labdaq.engine.sample_rows import SampleRows, join, rows_of
from labdaq.engine.writer_db import (  # noqa: F401 - public names, imported from here
    PG_STAGE,
    Rows,
    _Outcome,
    classify,
    insert_sql,
    is_data_error,
    is_unavailable_error,
    pg_merge_sql,
)
from labdaq.engine.writer_journal import JournalFallback

log = logging.getLogger(__name__)


class SampleWriter(JournalFallback):
    """Collects sample rows and writes them in batches; see the module docstring.

    ``put`` hands rows over (13-tuples or lists in ``SAMPLE_COLUMNS`` order); ``flush``
    returns once everything handed over so far is committed or, if the database is
    unavailable, durably journaled (and, if the database answers, once the journal has
    been replayed); ``close`` flushes and stops the writer task, leaving any journal that
    could not be replayed for the next start.

    Counters: ``rows_written``/``batches_written`` (rows in committed insert transactions,
    duplicates that the database skipped included), ``rows_journaled``, ``rows_replayed``,
    ``rows_rejected``, ``rows_dropped``; state: ``db_available``, ``journal_overflowed``,
    ``journal_pending_rows``, ``pending_rows``, ``last_error``.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        batch_rows: int = 2000,
        batch_age_s: float = 0.5,
        max_pending_rows: int = 200_000,
        journal_dir: Path | None = None,
        *,
        max_batch_rows: int = 32_000,
        max_journal_bytes: int = 1 << 30,
        journal_segment_bytes: int = 16 << 20,
        journal_fsync: bool = True,
        write_timeout_s: float = 5.0,
        retry_min_s: float = 0.05,
        retry_max_s: float = 2.0,
        hold_s: float = 30.0,
        commit_interval_s: float = 0.0,
    ) -> None:
        self._init_db(engine, write_timeout_s, retry_min_s, retry_max_s)
        self.max_pending_rows = max(1, max_pending_rows)
        # A batch must fit in the bound, or put() could wait for space that never comes.
        self.batch_rows = max(1, min(batch_rows, self.max_pending_rows))
        self.batch_age_s = batch_age_s
        # Batches queued behind a write are merged up to this many rows (see _take).
        self.max_batch_rows = max(self.batch_rows, max_batch_rows)
        self.commit_interval_s = max(0.0, commit_interval_s)
        self._next_commit_at = 0.0  # a queued batch waits for this (monotonic) time
        self._urgent = 0  # flushes waiting: queued batches go now
        self._resolver = Resolver()

        # Memory: the open batch (the pieces handed over, joined when it is handed on),
        # then full batches waiting for the writer task.
        self._buf: list[Rows] = []
        self._buf_rows = 0
        self._buf_ledger: Ledger | None = None
        self._buf_since = 0.0
        # Full batches in stream order, each with the ledger that came with its rows.
        self._batches: deque[tuple[Rows, Ledger | None]] = deque()
        self._pending = 0  # rows in memory: open batch + queued + being written
        self._rows_in = 0  # rows ever handed over
        self._rows_settled = 0  # rows committed, journaled, rejected or dropped (FIFO)

        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # writer task: something to do
        self._space = asyncio.Event()  # producers: rows left memory
        self._progress = asyncio.Event()  # flush waiters: pulsed on any progress
        self._ready = False  # journal scanned (replay of a previous crash can start)
        self._closing = False
        self._init_fallback(journal_dir, max_journal_bytes, journal_segment_bytes,
                            journal_fsync, hold_s, self.max_pending_rows)

    # -- public state -----------------------------------------------------------------
    @property
    def journal_pending_rows(self) -> int:
        """Rows in the journal not yet committed to the database."""
        return self._journal.pending_rows if self._journal is not None else 0

    @property
    def pending_rows(self) -> int:
        """Rows held in memory (bounded by ``max_pending_rows``)."""
        return self._pending

    @property
    def held_rows(self) -> int:
        """Rows held in memory because neither the database nor the journal took them."""
        return self._held_rows + self._held_retrying

    @property
    def rows_settled(self) -> int:
        """Rows handed over that are committed, journaled, rejected or dropped."""
        return self._rows_settled

    @property
    def journal(self) -> Journal | None:
        return self._journal

    # -- producer side ----------------------------------------------------------------
    def start(self) -> None:
        if self._task is None:
            self._closing = False
            self._task = asyncio.create_task(self._run(), name="sample-writer")

    async def put(self, rows: Rows | SampleBatch, ledger: Ledger | None = None) -> None:
        """Hand rows over; waits only when ``max_pending_rows`` are already in memory.

        ``ledger`` (positions, steps, cycles that these rows complete) is committed in the
        same transaction as these rows, or a later one that holds no other rows of its
        runs; it needs at least one row to travel with.
        """
        if isinstance(rows, SampleBatch):
            rows = rows_of(rows)
        elif not isinstance(rows, SampleRows):
            rows = list(rows)  # the caller may reuse its list
        n = len(rows)
        if n == 0:
            return
        if self._task is None:
            self.start()
        if n > self.batch_rows:
            for i in range(0, n, self.batch_rows):
                last = i + self.batch_rows >= n
                await self.put(rows[i : i + self.batch_rows], ledger if last else None)
            return
        while self._pending + n > self.max_pending_rows:
            self._check_alive()
            # The open batch counts too; hand it over so the writer can free its space
            # now rather than when it ages out.
            self._hand_over()
            self._space.clear()
            await self._space.wait()
        if not self._buf:
            self._buf_since = time.monotonic()
            self._wake.set()  # the writer task arms the age timer
        self._buf.append(rows)
        self._buf_rows += n
        if ledger is not None:
            if self._buf_ledger is None:
                self._buf_ledger = Ledger()
            self._buf_ledger.extend(ledger)
        self._pending += n
        self._rows_in += n
        if self._buf_rows >= self.batch_rows:
            self._hand_over()

    def _take_buf(self) -> tuple[Rows, Ledger | None]:
        taken = join(self._buf), self._buf_ledger
        self._buf, self._buf_rows, self._buf_ledger = [], 0, None
        return taken

    def _hand_over(self) -> None:
        if self._buf:
            self._batches.append(self._take_buf())
            self._wake.set()

    async def flush(self) -> None:
        """Return once every row handed over is committed or durably journaled."""
        if self._task is None:
            self.start()
        self._hand_over()
        target = self._rows_in
        self._urgent += 1
        self._wake.set()
        try:
            await self._wait_until(lambda: self._ready and self._rows_settled >= target)
        finally:
            self._urgent -= 1
        if self.journal_pending_rows:
            # One replay attempt now rather than at the next backoff step, so a flush
            # after the database came back means "in the database".
            attempts = self._replay_attempts
            self._replay_now = True
            self._wake.set()
            await self._wait_until(
                lambda: self._replay_attempts > attempts or not self.journal_pending_rows
            )

    async def close(self) -> None:
        """Flush, stop the writer task; a journal that could not be replayed stays on disk."""
        if self._task is None:
            if self._journal is not None:
                self._journal.close()
            return
        await self.flush()
        self._closing = True
        self._wake.set()
        task, self._task = self._task, None
        await task
        if self._straggler is not None and not self._straggler.done():
            # Its rows are journaled; waiting a little lets it release its connection.
            done, _ = await asyncio.wait({self._straggler}, timeout=self.write_timeout_s)
            if not done:
                self._straggler.cancel()
        if self._journal is not None:
            await asyncio.to_thread(self._journal.close)

    def _check_alive(self) -> None:
        task = self._task
        if task is not None and task.done():
            exc = None if task.cancelled() else task.exception()
            raise RuntimeError("sample writer task has stopped") from exc

    async def _wait_until(self, pred: Callable[[], bool]) -> None:
        while not pred():
            self._check_alive()
            await self._progress.wait()

    def _pulse(self) -> None:
        # Wake every waiter once; each re-checks its own condition.
        self._progress.set()
        self._progress = asyncio.Event()

    # -- writer task ------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            if self._journal is not None:
                await asyncio.to_thread(self._journal.open)
                if self._journal.pending_rows:
                    log.warning(
                        "sample journal %s holds %d rows from an earlier run; replaying",
                        self._journal.directory,
                        self._journal.pending_rows,
                    )
            self._ready = True
            self._pulse()
            while True:
                now = time.monotonic()
                if self._replay_due(now):
                    await self._replay()
                    continue
                if self._held and now >= self._held_retry_at:
                    await self._store_held()
                    continue
                batch = self._take(now)
                if batch is not None:
                    self._next_commit_at = now + self.commit_interval_s
                    await self._store(batch)
                    continue
                if self._closing:
                    return
                await self._sleep(now)
        except Exception:
            log.exception("sample writer stopped")
            raise
        finally:
            # Producers and flushers waiting on us must see that we are gone.
            self._space.set()
            self._pulse()

    def _replay_due(self, now: float) -> bool:
        if self._journal is None or not self._journal.pending_rows or self._closing:
            return False
        return self._replay_now or now >= self._retry_at

    def _take(self, now: float) -> tuple[Rows, Records] | None:
        if self._batches and self._spacing(now):
            return None
        if self._batches:
            first, ledger = self._batches.popleft()
            parts, n = [first], len(first)
            # Behind? Write what has queued up in one transaction: with hundreds of runs
            # interleaved, rows per commit is what sets the rate (docs/performance.md).
            # Capped so that one write stays far inside write_timeout_s even on a loaded
            # machine: merging a whole backlog once made single writes time out, and the
            # writer then fell into its journal and could not climb out.
            while self._batches and n + len(self._batches[0][0]) <= self.max_batch_rows:
                more, later = self._batches.popleft()
                parts.append(more)
                n += len(more)
                # One resolution for the whole write: each run's newest position is built
                # once, not once per queued batch that carries it.
                if ledger is None:
                    ledger = later
                elif later is not None:
                    ledger.extend(later)
            return join(parts), self._resolver.resolve(ledger)
        if self._buf and now - self._buf_since >= self.batch_age_s:
            # Age-based flush so a slow channel's samples reach the database promptly.
            batch, ledger = self._take_buf()
            return batch, self._resolver.resolve(ledger)
        return None

    def _spacing(self, now: float) -> bool:
        """True while queued batches wait for the next commit time."""
        return (now < self._next_commit_at and not self._urgent and not self._closing
                and sum(len(b) for b, _ in self._batches) < self.max_batch_rows)

    async def _sleep(self, now: float) -> None:
        deadlines = []
        if self._batches:
            deadlines.append(self._next_commit_at)
        if self._buf:
            deadlines.append(self._buf_since + self.batch_age_s)
        if self.journal_pending_rows:
            deadlines.append(self._retry_at)
        if self._held:
            deadlines.append(self._held_retry_at)
        # No await between the checks above and clear(): nothing can slip in between.
        self._wake.clear()
        timeout = max(0.0, min(deadlines) - now) if deadlines else None
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _settle(self, n: int) -> None:
        self._pending -= n
        self._rows_settled += n
        self._space.set()
        self._pulse()

    async def _store(self, taken: tuple[Rows, Records]) -> None:
        """Write one batch, or journal it (with everything queued behind it) if the DB is down."""
        batch, records = taken
        if self._held:
            # Older rows wait in memory for a failing disk: these queue behind them.
            self._keep_or_drop([(batch, records, time.monotonic())], failed=False)
            return
        if self._journal is not None:
            down = not self.db_available and time.monotonic() < self._retry_at
            if self._journal.pending_rows or down:
                # Keep the order: while older rows wait in the journal, new ones join them.
                await self._spill([taken])
                return
            if await self._write_batch(batch, records) is _Outcome.OK:
                self._settle(len(batch))
            else:
                await self._spill([taken])
            return
        # No journal: the rows can only wait in memory; put() feels the back-pressure.
        while await self._write_batch(batch, records) is not _Outcome.OK:
            await asyncio.sleep(max(0.0, self._retry_at - time.monotonic()))
        self._settle(len(batch))
