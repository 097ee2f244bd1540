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
* Idempotent inserts on ``(run_id, seq)``. SQLite: ``executemany`` of ``INSERT ... ON
  CONFLICT (run_id, seq) DO NOTHING`` (not ``INSERT OR IGNORE``, which would also silently
  skip NOT NULL violations). PostgreSQL: COPY (asyncpg ``copy_records_to_table``) into a
  per-connection TEMP staging table, then ``INSERT ... SELECT ... ON CONFLICT (run_id, seq)
  DO NOTHING`` in the same transaction.
  So a batch whose commit outcome is unknown (timeout, dropped connection) can be written
  again — from the journal — without ever duplicating a sample.
* Database unavailable (SQLite "database is locked" past its busy timeout or other
  OperationalError, PostgreSQL refused/terminated connections and SQLSTATE classes 08, 40,
  42, 53, 55, 57, 58, or a write that has not finished within ``write_timeout_s``; an
  unrecognised error counts as unavailable too, see below): the batch goes to the journal,
  ``db_available`` turns False, and from then on the writer drains the queue straight into
  the journal (one fsync per drain, not per row) so acquisition keeps running. It retries
  the database with exponential backoff (``retry_min_s`` … ``retry_max_s``) by replaying the
  journal's oldest record; when that succeeds it replays the rest in order, deleting each
  journal file only after all its rows are committed, then goes back to direct writes.
* Rows the database rejects (constraint or data errors: unknown run, NULL in a NOT NULL
  column, a value of the wrong type) would fail forever, so they are isolated — rows of
  runs that no longer exist in one query, the rest by bisecting the batch — logged and
  counted in ``rows_rejected``; the rest of the batch is stored. An unrecognised error that
  repeats three times while the database answers ``SELECT 1`` is handled the same way, so
  one poisonous row cannot hold every later sample back in the journal.
* A journal left by a crashed process is replayed before anything else on start-up.
* Disk full or failing (the journal cannot be written either): the batches are held in
  memory, oldest first, and retried with backoff — to the database, or the journal —
  for up to ``hold_s`` (30 s), within half of ``max_pending_rows`` so ``put`` never waits
  on them; past either bound they are dropped as below.
* Disk bound: ``max_journal_bytes`` (default 1 GiB ≈ 11 M rows). A batch that does not fit
  (or cannot be held: see above) is dropped (``rows_dropped``) and
  ``journal_overflowed`` becomes True, so the engine can record an interruption (rows
  found unreadable at replay are counted the same way). Blocking instead would stop the
  sampling loop and its safety checks, which is worse than losing samples of a run that is
  by then hours into an outage.
* Without ``journal_dir`` there is nowhere durable to put rows: the writer retries with
  backoff holding them in memory and ``put`` waits once ``max_pending_rows`` are pending.

Why driver-level SQL (SQLite ``exec_driver_sql`` with tuples, PostgreSQL COPY): the ORM
and Core ``insert()`` with dicts are several times slower on the hot table
(docs/performance.md).

Positions, and the steps and cycles a batch's rows complete, come with the rows
(:mod:`labdaq.engine.ledger`) and are committed in the same transaction; the journal keeps
them with their rows. Why one class of ~800 lines: the queue, the journal fallback and
the database path share the accounting (pending, settled, retry timing) that must change
together; the SQL and the journal format have modules of their own.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import logging
import operator
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.journal import Journal, Record
from labdaq.engine.ledger import Ledger, Records, RecordSql, Resolver
from labdaq.storage.models import SAMPLE_COLUMNS, Run

log = logging.getLogger(__name__)

_PK = operator.itemgetter(0, 1)  # (run_id, seq) in SAMPLE_COLUMNS order

SampleRow = tuple[int, int, float, float, int, int, float, float, float | None, float, float, int]
Rows = Sequence[Sequence[Any]]

# Per-connection staging table for COPY; ON COMMIT DELETE ROWS empties it in place at each
# commit (PostgreSQL skips that for transactions that did not touch it).
PG_STAGE = "labdaq_samples_stage"
_PG_STAGE_DDL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {PG_STAGE} (LIKE samples INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)


def insert_sql(dialect_name: str, paramstyle: str) -> str:
    """INSERT for samples that skips rows already stored, so replays never duplicate.

    Only the (run_id, seq) conflict is skipped: other constraint violations still raise,
    so the writer can count and report the rows it could not store.
    """
    cols = ", ".join(SAMPLE_COLUMNS)
    n = len(SAMPLE_COLUMNS)
    if paramstyle in ("numeric_dollar",):
        ph = ", ".join(f"${i}" for i in range(1, n + 1))
    elif paramstyle in ("format", "pyformat"):
        ph = ", ".join(["%s"] * n)
    else:
        ph = ", ".join(["?"] * n)
    return f"INSERT INTO samples ({cols}) VALUES ({ph}) ON CONFLICT (run_id, seq) DO NOTHING"


def pg_merge_sql() -> str:
    """Move the staged rows into samples; rows already stored are skipped."""
    cols = ", ".join(SAMPLE_COLUMNS)
    return (
        f"INSERT INTO samples ({cols}) SELECT {cols} FROM {PG_STAGE} "
        "ON CONFLICT (run_id, seq) DO NOTHING"
    )


def _sqlstate(exc: BaseException) -> str | None:
    """SQLSTATE of a PostgreSQL error, raw asyncpg or wrapped by SQLAlchemy."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        state = getattr(cur, "sqlstate", None) or getattr(cur, "pgcode", None)
        if isinstance(state, str):
            return state
        cur = getattr(cur, "orig", None) or cur.__cause__
    return None


def is_data_error(exc: BaseException) -> bool:
    """True when the error is about the rows (retrying cannot help), not the database."""
    if isinstance(exc, (sa_exc.IntegrityError, sa_exc.DataError, sa_exc.ArgumentError)):
        return True
    state = _sqlstate(exc)
    if state is not None:
        # Class 22 data exception, 23 integrity constraint violation.
        return state[:2] in ("22", "23")
    if isinstance(exc, sa_exc.ProgrammingError):
        # sqlite3 refusing to bind a value ("Error binding parameter", "Incorrect number
        # of bindings"); other programming errors (missing table...) keep the rows.
        return "binding" in str(exc.orig)
    # asyncpg's client-side encoding errors are ValueErrors (asyncpg.DataError), as are
    # our own shape checks; TypeError for values no driver can encode.
    return isinstance(exc, (ValueError, TypeError)) and not isinstance(exc, OSError)


# SQLSTATE classes that say "the database, not these rows": connection exception,
# transaction rollback (serialization, deadlock), insufficient resources (disk full, too
# many connections), object not in prerequisite state (not accepting connections),
# operator intervention (shutdown, terminated backend), system error, and syntax/access
# rule violations (missing table, privileges) — a deployment problem, never a reason to
# drop samples.
_UNAVAILABLE_STATES = ("08", "40", "42", "53", "55", "57", "58")


def is_unavailable_error(exc: BaseException) -> bool:
    """True when the error says the database cannot take writes right now."""
    import asyncpg
    from asyncpg.exceptions._base import InternalClientError

    if isinstance(
        exc,
        (
            OSError,
            TimeoutError,
            sa_exc.OperationalError,  # SQLite: database is locked, disk I/O error, ...
            sa_exc.InterfaceError,
            sa_exc.DisconnectionError,
            sa_exc.TimeoutError,  # connection pool exhausted
            asyncpg.InterfaceError,  # connection closed, operation in progress
            InternalClientError,  # protocol state left behind by a dropped connection
        ),
    ):
        return True
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    state = _sqlstate(exc)
    return state is not None and state[:2] in _UNAVAILABLE_STATES


def _consume_all(journal: Journal, recs: list[Record]) -> None:
    for rec in recs:
        journal.consume(rec)


class _Outcome(enum.Enum):
    OK = 1
    DOWN = 2  # database unavailable or too slow: keep the rows, retry later
    DATA = 3  # the database refused these rows
    UNKNOWN = 4  # unrecognised error: treated as DOWN unless it persists (see _write_batch)


def classify(exc: BaseException) -> _Outcome:
    """DATA for errors about the rows, DOWN for an unavailable database, else UNKNOWN."""
    if is_data_error(exc):
        return _Outcome.DATA
    if is_unavailable_error(exc):
        return _Outcome.DOWN
    return _Outcome.UNKNOWN


class SampleWriter:
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
    ) -> None:
        self.engine = engine
        self.max_pending_rows = max(1, max_pending_rows)
        # A batch must fit in the bound, or put() could wait for space that never comes.
        self.batch_rows = max(1, min(batch_rows, self.max_pending_rows))
        self.batch_age_s = batch_age_s
        # Batches queued behind a write are merged up to this many rows (see _take).
        self.max_batch_rows = max(self.batch_rows, max_batch_rows)
        self.write_timeout_s = write_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._dialect = engine.dialect.name
        self._sql = insert_sql(self._dialect, engine.dialect.paramstyle)
        # Positions, steps and cycles committed with the rows they count (ledger.py).
        self._rec_sql = RecordSql.for_paramstyle(
            "numeric_dollar" if self._dialect == "postgresql" else engine.dialect.paramstyle
        )
        self._resolver = Resolver()
        self._merge_sql = pg_merge_sql()
        self._staged: weakref.WeakSet[Any] = weakref.WeakSet()  # connections with the table
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

        # Memory: the open batch, then full batches waiting for the writer task.
        self._buf: list[Sequence[Any]] = []
        self._buf_ledger: Ledger | None = None
        self._buf_since = 0.0
        # Full batches in stream order, each with the ledger that came with its rows.
        self._batches: deque[tuple[list[Sequence[Any]], Ledger | None]] = deque()
        self._pending = 0  # rows in memory: open batch + queued + being written
        self._rows_in = 0  # rows ever handed over
        self._rows_settled = 0  # rows committed, journaled, rejected or dropped (FIFO)

        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # writer task: something to do
        self._space = asyncio.Event()  # producers: rows left memory
        self._progress = asyncio.Event()  # flush waiters: pulsed on any progress
        self._ready = False  # journal scanned (replay of a previous crash can start)
        self._closing = False
        self._replay_now = False
        self._replay_attempts = 0
        self._retry_at = 0.0
        self._retry_delay = retry_min_s
        self._straggler: asyncio.Task[Any] | None = None
        self._straggler_since = 0.0
        self._unknown_streak = 0  # consecutive unrecognised write errors
        self._journal_lost = 0  # journal.lost_rows already counted in rows_dropped
        # Batches the journal could not take because writing it failed (disk full, I/O
        # error), oldest first, each with when it was first held: kept in memory and
        # retried for up to hold_s, within half the memory bound so put() never waits.
        self._held: deque[tuple[list[Sequence[Any]], Records, float]] = deque()
        self._held_rows = 0
        self._held_retrying = 0  # held rows out of the deque while _store_held retries them
        self._held_retry_at = 0.0
        self._held_delay = retry_min_s
        self.hold_s = hold_s
        self.max_held_rows = max(1, self.max_pending_rows // 2)

        self.rows_written = 0
        self.batches_written = 0
        self.rows_journaled = 0
        self.rows_replayed = 0
        self.rows_rejected = 0
        self.rows_dropped = 0
        self.journal_overflowed = False
        self.dropped_by_run: dict[int, list[Any]] = {}
        self.db_available = True
        self.last_error: str | None = None

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

    async def put(self, rows: Rows, ledger: Ledger | None = None) -> None:
        """Hand rows over; waits only when ``max_pending_rows`` are already in memory.

        ``ledger`` (positions, steps, cycles that these rows complete) is committed in the
        same transaction as these rows, or a later one that holds no other rows of its
        runs; it needs at least one row to travel with.
        """
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
        self._buf.extend(rows)
        if ledger is not None:
            if self._buf_ledger is None:
                self._buf_ledger = Ledger()
            self._buf_ledger.extend(ledger)
        self._pending += n
        self._rows_in += n
        if len(self._buf) >= self.batch_rows:
            self._hand_over()

    def _hand_over(self) -> None:
        if self._buf:
            self._batches.append((self._buf, self._buf_ledger))
            self._buf, self._buf_ledger = [], None
            self._wake.set()

    async def flush(self) -> None:
        """Return once every row handed over is committed or durably journaled."""
        if self._task is None:
            self.start()
        self._hand_over()
        target = self._rows_in
        await self._wait_until(lambda: self._ready and self._rows_settled >= target)
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

    def _take(self, now: float) -> tuple[list[Sequence[Any]], Records] | None:
        if self._batches:
            batch, ledger = self._batches.popleft()
            records = self._resolver.resolve(ledger)
            # Behind? Write what has queued up in one transaction: with hundreds of runs
            # interleaved, rows per commit is what sets the rate (docs/performance.md).
            # Capped so that one write stays far inside write_timeout_s even on a loaded
            # machine: merging a whole backlog once made single writes time out, and the
            # writer then fell into its journal and could not climb out.
            while self._batches and len(batch) + len(self._batches[0][0]) <= self.max_batch_rows:
                more, ledger = self._batches.popleft()
                batch.extend(more)
                records.extend(self._resolver.resolve(ledger))
            return batch, records
        if self._buf and now - self._buf_since >= self.batch_age_s:
            # Age-based flush so a slow channel's samples reach the database promptly.
            batch, ledger = self._buf, self._buf_ledger
            self._buf, self._buf_ledger = [], None
            return batch, self._resolver.resolve(ledger)
        return None

    async def _sleep(self, now: float) -> None:
        deadlines = []
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

    async def _store(self, taken: tuple[list[Sequence[Any]], Records]) -> None:
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
        self, batches: list[tuple[list[Sequence[Any]], Records, float]], failed: bool = True
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

    def _drop(self, b: list[Sequence[Any]]) -> None:
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
        batches: list[tuple[list[Sequence[Any]], Records]],
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
                if self._pending - len(self._buf) > self.max_pending_rows // 2:
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

    # -- database ---------------------------------------------------------------------
    async def _write_batch(self, rows: Rows, records: Records | None = None) -> _Outcome:
        """Commit rows with their records; isolate and drop rows the database refuses.
        OK or DOWN."""
        records = records or None
        outcome = await self._attempt(
            (lambda: self._insert(rows, records)) if records else (lambda: self._insert(rows))
        )
        if outcome is _Outcome.OK:
            self._unknown_streak = 0
        elif outcome is _Outcome.UNKNOWN:
            # An unrecognised error keeps the rows (journal) like an outage would. But if
            # it keeps coming while the database answers a trivial query, it is these rows
            # that fail, and retrying them forever would hold every later sample back in
            # the journal: isolate them like rows the database refuses.
            self._unknown_streak += 1
            if self._unknown_streak < 3 or not await self._db_alive():
                return _Outcome.DOWN
            log.error("a batch keeps failing (%s) while the database answers", self.last_error)
            outcome = _Outcome.DATA
        if outcome is not _Outcome.DATA:
            return outcome
        # Most likely the run was deleted (foreign key): drop its rows in one query.
        known = await self._known_runs(rows)
        if known is not None:
            try:
                kept = [r for r in rows if r[0] in known]
            except TypeError:  # an unhashable run_id: leave it to the bisection
                kept = list(rows)
            self._reject(len(rows) - len(kept), "run does not exist")
            rows = kept
            if records:
                records = records.only_runs(known)
        # Then bisect what is left: a bad row costs about 2·log2(batch) transactions.
        stack: list[Rows] = [rows] if rows else []
        while stack:
            part = stack.pop()
            outcome = await self._attempt(functools.partial(self._insert, part))
            if outcome is _Outcome.UNKNOWN and await self._db_alive():
                outcome = _Outcome.DATA
            if outcome is not _Outcome.OK and outcome is not _Outcome.DATA:
                return _Outcome.DOWN
            if outcome is _Outcome.DATA:
                if len(part) == 1:
                    self._reject(1, f"{part[0]!r}: {self.last_error}")
                else:
                    mid = len(part) // 2
                    stack += [part[mid:], part[:mid]]
        if records:
            # The rows are in; their records on their own (exact unless refused).
            outcome = await self._attempt(functools.partial(self._insert, [], records))
            if outcome is _Outcome.DATA:
                log.error("positions/steps/cycles refused by the database, dropped: %s",
                          self.last_error)
            elif outcome is not _Outcome.OK:
                return _Outcome.DOWN
        return _Outcome.OK

    def _reject(self, n: int, why: str) -> None:
        if n:
            self.rows_rejected += n
            log.error("%d sample rows refused by the database and dropped: %s", n, why)

    async def _known_runs(self, rows: Rows) -> set[Any] | None:
        found: set[Any] = set()

        async def query() -> None:
            ids = sorted({r[0] for r in rows})
            async with self.engine.connect() as conn:
                found.update((await conn.execute(select(Run.id).where(Run.id.in_(ids)))).scalars())

        # Errors (unhashable ids, the database gone) fall back to bisecting or retrying.
        return found if await self._attempt(query) is _Outcome.OK else None

    async def _db_alive(self) -> bool:
        async def ping() -> None:
            async with self.engine.connect() as conn:
                await conn.exec_driver_sql("SELECT 1")

        return await self._attempt(ping) is _Outcome.OK

    async def _attempt(self, op: Callable[[], Awaitable[None]]) -> _Outcome:
        """Run one database operation, giving up on it after ``write_timeout_s``.

        A timed-out operation is not cancelled (cancelling mid-COPY or mid-commit can wedge
        a pooled connection); it finishes in the background as a "straggler" while its
        rows go to the journal — harmless, because inserts are idempotent. No new attempt
        starts while a straggler is outstanding; the next attempt first gives it another
        ``write_timeout_s`` to finish (it usually does once the database is back).
        """
        if self._straggler is not None:
            if not self._straggler.done():
                await asyncio.wait({self._straggler}, timeout=self.write_timeout_s)
            if not self._straggler.done():
                if time.monotonic() - self._straggler_since > 12 * self.write_timeout_s:
                    self._straggler.cancel()  # a black-holed connection never returns
                self._mark_down("a timed-out database write is still outstanding")
                return _Outcome.DOWN
            self._straggler = None
        task = asyncio.ensure_future(op())
        done, _ = await asyncio.wait({task}, timeout=self.write_timeout_s)
        if not done:
            self._straggler, self._straggler_since = task, time.monotonic()
            task.add_done_callback(self._straggler_done)
            self._mark_down(f"database write took longer than {self.write_timeout_s:g} s")
            return _Outcome.DOWN
        exc = task.exception()
        if exc is None:
            self._mark_up()
            return _Outcome.OK
        outcome = classify(exc)
        if outcome is _Outcome.DATA:
            self.last_error = f"{type(exc).__name__}: {exc}"
        else:
            self._mark_down(f"{type(exc).__name__}: {exc}")
        return outcome

    def _straggler_done(self, task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.debug("timed-out database write ended with %r", task.exception())
        self._wake.set()  # a replay may start now

    def _mark_down(self, why: str) -> None:
        now = time.monotonic()
        if self.db_available:
            where = "journaling samples" if self._journal else "holding samples in memory"
            log.warning("database unavailable (%s); %s", why, where)
        else:
            log.debug("database still unavailable: %s", why)
        self.db_available = False
        self.last_error = why
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.retry_max_s)

    def _mark_up(self) -> None:
        if not self.db_available:
            log.warning("database available again")
        self.db_available = True
        self._retry_delay = self.retry_min_s

    async def _insert(self, rows: Rows, records: Records | None = None) -> None:
        if self._dialect == "postgresql":
            await self._insert_pg(rows, records)
        else:
            await self._insert_sql(rows, records)
        self.rows_written += len(rows)
        self.batches_written += 1

    async def _insert_sql(self, rows: Rows, records: Records | None = None) -> None:
        # In (run_id, seq) order: a batch interleaves every running channel, and walking
        # the primary-key B-tree in order is faster than hopping between their pages row
        # by row (docs/performance.md).
        params = sorted(rows, key=_PK)
        # exec_driver_sql wants a list whose first element is a tuple; the driver itself
        # takes any sequences, so only a leading list row needs converting.
        if params and not isinstance(params[0], tuple):
            params = [tuple(r) for r in params]
        async with self.engine.begin() as conn:
            if params:
                await conn.exec_driver_sql(self._sql, params)
            for sql, rec_params in self._rec_sql.params(records) if records else ():
                await conn.exec_driver_sql(sql, rec_params)  # type: ignore[arg-type]

    async def _insert_pg(self, rows: Rows, records: Records | None = None) -> None:
        import asyncpg

        # A pooled connection killed while idle (server restart, pg_terminate_backend) is
        # only noticed on use; skip the ones asyncpg already knows are closed.
        for _ in range(self._pool_size() + 1):
            async with self.engine.connect() as conn:
                raw = await conn.get_raw_connection()
                apg: asyncpg.Connection = raw.driver_connection  # type: ignore[assignment]
                if apg.is_closed():
                    await conn.invalidate()
                    continue
                try:
                    await self._copy_merge(apg, rows, records)
                except asyncpg.UndefinedTableError:
                    if apg not in self._staged:
                        raise
                    # Something dropped our temp table (DISCARD ALL); recreate next time.
                    self._staged.discard(apg)
                    continue
                except BaseException as exc:
                    if not is_data_error(exc):
                        # Dead or mid-protocol: never hand this connection back to the pool.
                        try:
                            await conn.invalidate()
                        except Exception:  # noqa: BLE001 - already broken
                            pass
                    raise
                return
        raise ConnectionError("no usable database connection in the pool")

    async def _copy_merge(self, apg: Any, rows: Rows, records: Records | None = None) -> None:
        new = apg not in self._staged
        async with apg.transaction():
            if new:
                await apg.execute(_PG_STAGE_DDL)
            if rows:
                await apg.copy_records_to_table(PG_STAGE, records=rows, columns=SAMPLE_COLUMNS)
                await apg.execute(self._merge_sql)
            for sql, rec_params in self._rec_sql.params(records) if records else ():
                await apg.executemany(sql, rec_params)
        if new:  # only once the CREATE is committed
            self._staged.add(apg)

    def _pool_size(self) -> int:
        size = getattr(self.engine.sync_engine.pool, "size", None)
        n = size() if callable(size) else 5
        return max(1, min(int(n), 20))
