"""The sample writer's database writes: idempotent batched inserts, error classes, timeouts.

One job of :class:`~labdaq.engine.writer.SampleWriter` (which inherits it): commit a batch
of rows, with the positions, steps and cycles they complete (:mod:`.ledger`), in one
transaction, and say whether that worked (``OK``), the database cannot take writes now
(``DOWN``: the rows go to the journal, :mod:`.writer_journal`) or refused the rows.

* Idempotent inserts on ``(run_id, seq)``. SQLite: ``executemany`` of ``INSERT ... ON
  CONFLICT (run_id, seq) DO NOTHING`` (not ``INSERT OR IGNORE``, which would also silently
  skip NOT NULL violations). PostgreSQL: COPY (asyncpg ``copy_records_to_table``) straight
  into samples; a batch that meets a stored row fails on the primary key as a whole and is
  then COPYed into a per-connection TEMP staging table and moved with ``INSERT ... SELECT
  ... ON CONFLICT (run_id, seq) DO NOTHING`` in the same transaction.
  So a batch whose commit outcome is unknown (timeout, dropped connection) can be written
  again — from the journal — without ever duplicating a sample.
* Unavailable: SQLite "database is locked" past its busy timeout or other
  OperationalError, PostgreSQL refused/terminated connections and SQLSTATE classes 08, 40,
  42, 53, 55, 57, 58, or a write that has not finished within ``write_timeout_s``. The
  writer marks the database down and retries it with exponential backoff
  (``retry_min_s`` … ``retry_max_s``).
* Rows the database rejects (constraint or data errors: unknown run, NULL in a NOT NULL
  column, a value of the wrong type) would fail forever, so they are isolated — rows of
  runs that no longer exist in one query, the rest by bisecting the batch — logged and
  counted in ``rows_rejected``; the rest of the batch is stored. An unrecognised error that
  repeats three times while the database answers ``SELECT 1`` is handled the same way, so
  one poisonous row cannot hold every later sample back in the journal.

Why driver-level SQL (SQLite ``exec_driver_sql`` with tuples, PostgreSQL COPY): the ORM
and Core ``insert()`` with dicts are several times slower on the hot table
(docs/performance.md).
"""

from __future__ import annotations

import asyncio
import enum
import functools
import itertools
import logging
import operator
import time
import weakref
from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy import exc as sa_exc
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine.journal import Journal
from labdaq.engine.ledger import Records, RecordSql
from labdaq.engine.sample_rows import Rows, SampleRows
from labdaq.storage.models import SAMPLE_COLUMNS, Run

log = logging.getLogger(__name__)

_PK = operator.itemgetter(0, 1)  # (run_id, seq) in SAMPLE_COLUMNS order

# Per-connection staging table for COPY; ON COMMIT DELETE ROWS empties it in place at each
# commit (PostgreSQL skips that for transactions that did not touch it).
PG_STAGE = "labdaq_samples_stage"
_PG_STAGE_DDL = (
    f"CREATE TEMP TABLE IF NOT EXISTS {PG_STAGE} (LIKE samples INCLUDING DEFAULTS) "
    "ON COMMIT DELETE ROWS"
)


def insert_sql(dialect_name: str, paramstyle: str, rows: int = 1) -> str:
    """INSERT of ``rows`` samples that skips rows already stored, so replays never
    duplicate.

    Only the (run_id, seq) conflict is skipped: other constraint violations still raise,
    so the writer can count and report the rows it could not store.
    """
    cols = ", ".join(SAMPLE_COLUMNS)
    n = len(SAMPLE_COLUMNS)
    if paramstyle in ("numeric_dollar",):
        groups = [", ".join(f"${k * n + i}" for i in range(1, n + 1)) for k in range(rows)]
    elif paramstyle in ("format", "pyformat"):
        groups = [", ".join(["%s"] * n)] * rows
    else:
        groups = [", ".join(["?"] * n)] * rows
    values = ", ".join(f"({g})" for g in groups)
    return f"INSERT INTO samples ({cols}) VALUES {values} ON CONFLICT (run_id, seq) DO NOTHING"


#: Rows per INSERT statement on SQLite: one statement of 50 rows binds the same values as
#: 50 of one row, but steps and resets the statement (and releases the GIL) once instead
#: of 50 times; with the flattening it cost 3.7 against 4.8 µs of CPU per row
#: (docs/performance.md). 50 x 13 values stays far below SQLite's bound-variable limit.
SQLITE_ROWS_PER_INSERT = 50


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



class DatabaseWrites:
    """The database side of SampleWriter: writes a batch, classifies what went wrong,
    keeps the database's state (``db_available``, ``last_error``, when to retry it) and
    the counters ``rows_written``, ``batches_written`` and ``rows_rejected``."""

    # SampleWriter's (writer.py): whether rows would be journaled, and its task's wake-up.
    _journal: Journal | None
    _wake: asyncio.Event

    def _init_db(
        self, engine: AsyncEngine, write_timeout_s: float, retry_min_s: float,
        retry_max_s: float,
    ) -> None:
        self.engine = engine
        self.write_timeout_s = write_timeout_s
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self._dialect = engine.dialect.name
        self._sql = insert_sql(self._dialect, engine.dialect.paramstyle)
        self._sql_multi = insert_sql(self._dialect, engine.dialect.paramstyle,
                                     SQLITE_ROWS_PER_INSERT)
        # Positions, steps and cycles committed with the rows they count (ledger.py).
        self._rec_sql = RecordSql.for_paramstyle(
            "numeric_dollar" if self._dialect == "postgresql" else engine.dialect.paramstyle
        )
        self._merge_sql = pg_merge_sql()
        self._staged: weakref.WeakSet[Any] = weakref.WeakSet()  # connections with the table
        self._retry_at = 0.0
        self._retry_delay = retry_min_s
        self._straggler: asyncio.Task[Any] | None = None
        self._straggler_since = 0.0
        self._unknown_streak = 0  # consecutive unrecognised write errors
        self.rows_written = 0
        self.batches_written = 0
        self.rows_rejected = 0
        # PostgreSQL batches that met stored rows and went through the staging merge.
        self.batches_merged = 0
        self.db_available = True
        self.last_error: str | None = None

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
        if (rows and not isinstance(rows, SampleRows)
                and set(map(len, rows)) != {len(SAMPLE_COLUMNS)}):
            # A data error, so the bisection refuses exactly the malformed rows: COPY
            # would store a row with an extra value cut short, and SQLite's flattened
            # statements would shift a short row's neighbours into the wrong columns.
            raise ValueError(f"a sample row without exactly {len(SAMPLE_COLUMNS)} values")
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
        k = SQLITE_ROWS_PER_INSERT
        if isinstance(rows, SampleRows):
            multi, rest = rows.insert_params(k)  # sorted and flattened by numpy
        else:
            params = sorted(rows, key=_PK)
            # exec_driver_sql wants a list whose first element is a tuple; the driver
            # itself takes any sequences, so only a leading list row needs converting.
            if params and not isinstance(params[0], tuple):
                params = [tuple(r) for r in params]
            whole = len(params) - len(params) % k
            flat = itertools.chain.from_iterable
            multi = [tuple(flat(params[i:i + k])) for i in range(0, whole, k)]
            rest = params[whole:]
        async with self.engine.begin() as conn:
            if multi:
                await conn.exec_driver_sql(self._sql_multi, multi)
            if rest:
                await conn.exec_driver_sql(self._sql, rest)
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
        """COPY the rows straight into samples, with their records, in one transaction. A
        batch that meets rows already stored (a replay of a batch whose commit went
        unseen) fails as a whole on the primary key and is written again through the
        staging table, which skips the stored rows: the merge, a second pass over every
        row, is paid only then (docs/performance.md)."""
        import asyncpg

        if rows:
            try:
                async with apg.transaction():
                    await apg.copy_records_to_table("samples", records=rows,
                                                    columns=SAMPLE_COLUMNS)
                    await self._write_records(apg, records)
                return
            except asyncpg.UniqueViolationError:
                self.batches_merged += 1
        new = apg not in self._staged
        async with apg.transaction():
            if new:
                await apg.execute(_PG_STAGE_DDL)
            if rows:
                await apg.copy_records_to_table(PG_STAGE, records=rows, columns=SAMPLE_COLUMNS)
                await apg.execute(self._merge_sql)
            await self._write_records(apg, records)
        if new:  # only once the CREATE is committed
            self._staged.add(apg)

    async def _write_records(self, apg: Any, records: Records | None) -> None:
        for sql, rec_params in self._rec_sql.params(records) if records else ():
            await apg.executemany(sql, rec_params)

    def _pool_size(self) -> int:
        size = getattr(self.engine.sync_engine.pool, "size", None)
        n = size() if callable(size) else 5
        return max(1, min(int(n), 20))
