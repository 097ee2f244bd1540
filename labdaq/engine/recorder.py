"""RunRecorder: the engine's one outlet to the database for everything but sample rows.

Run state transitions (through :mod:`labdaq.run_states`, the state machine the API side
uses too), events (safety trips, interruptions with their bounds, dropped samples, clock
jumps, state changes), EIS spectra, and the last steps and cycles of a run that ended.
Positions, and the steps and cycles a phase end completes while the run goes on, are not
here: they are committed with the samples they count (labdaq/engine/ledger.py).

Writes that the acquisition loop causes never wait for the database: they are queued in
a :class:`RecordWriter` and written in order by a background task, which keeps them over
an outage. Writes the scheduler needs an answer from (claiming a run, recording a resume)
are done at once and raise if the database is not there.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from labdaq import run_queue, run_states
from labdaq.engine.channel import ChannelRun
from labdaq.engine.events import RunEvent
from labdaq.nodes import wake_node_of_run
from labdaq.storage import models as m
from labdaq.storage.db import session_scope

log = logging.getLogger(__name__)

RecordOp = Callable[[AsyncSession], Awaitable[None]]


class RecordWriter:
    """Writes step, cycle, event, spectrum and run-state records in order, off the
    acquisition loop.

    The acquisition loop must never wait for the database (a locked SQLite file waits up
    to its busy timeout; a PostgreSQL outage fails every statement): the group's callbacks
    only append an operation here. A background task applies queued operations in order,
    several per transaction; when the database fails it keeps them and retries with
    backoff. Records are few (steps, cycles, events), so they are held in memory; a row
    the database refuses (a duplicate after a commit whose outcome was lost) is dropped
    with a log line rather than blocking the ones behind it.
    """

    def __init__(
        self,
        maker: async_sessionmaker[AsyncSession],
        retry_min_s: float = 0.05,
        retry_max_s: float = 2.0,
        max_batch: int = 200,
    ) -> None:
        self.maker = maker
        self.retry_min_s = retry_min_s
        self.retry_max_s = retry_max_s
        self.max_batch = max_batch
        self._ops: deque[tuple[str, RecordOp]] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.written = 0
        self.dropped = 0
        self.failures = 0
        self.last_error: str | None = None

    @property
    def pending(self) -> int:
        return len(self._ops)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="record-writer")

    def put(self, what: str, op: RecordOp) -> None:
        self._ops.append((what, op))
        self._idle.clear()
        self._wake.set()
        if self._task is None:
            self.start()

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every queued record is written; False on timeout."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            return False
        return True

    async def close(self, timeout_s: float = 10.0) -> None:
        if not await self.drain(timeout_s) and self._ops:
            log.error(
                "database unavailable at shutdown: %d records not written (%s)",
                len(self._ops),
                ", ".join(sorted({w for w, _ in self._ops})),
            )
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _run(self) -> None:
        delay = self.retry_min_s
        while True:
            if not self._ops:
                self._idle.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            batch = [self._ops[j] for j in range(min(self.max_batch, len(self._ops)))]
            try:
                async with session_scope(self.maker) as s:
                    for _, op in batch:
                        await op(s)
            except sa_exc.IntegrityError:
                # One of them was written before (or is refused): apply them one by one.
                await self._one_by_one(batch)
            except Exception as exc:  # noqa: BLE001 - database unavailable: keep, retry
                self.failures += 1
                if self.last_error is None:
                    log.warning("records not written, will retry: %s", exc)
                self.last_error = f"{type(exc).__name__}: {exc}"
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.retry_max_s)
                continue
            else:
                self.written += len(batch)
            if self.last_error is not None:
                log.warning("records written again after a database outage")
            self.last_error = None
            delay = self.retry_min_s
            for _ in batch:
                self._ops.popleft()

    async def _one_by_one(self, batch: list[tuple[str, RecordOp]]) -> None:
        for what, op in batch:
            while True:
                try:
                    async with session_scope(self.maker) as s:
                        await op(s)
                except sa_exc.IntegrityError as exc:
                    self.dropped += 1
                    log.error("%s record refused by the database, dropped: %s", what, exc)
                except Exception:  # noqa: BLE001 - unavailable again: retry this one
                    await asyncio.sleep(self.retry_max_s)
                    continue
                else:
                    self.written += 1
                break


async def insert_ignoring_duplicates(
    s: AsyncSession, model: type[Any], rows: list[dict[str, Any]]
) -> None:
    """INSERT rows, skipping any its unique constraints already hold (a record written
    before a kill must not make the state written with it fail)."""
    if not rows:
        return
    from sqlalchemy.dialects import postgresql, sqlite

    stmt = (
        postgresql.insert(model).on_conflict_do_nothing()
        if s.get_bind().dialect.name == "postgresql"
        else sqlite.insert(model).on_conflict_do_nothing()
    )
    await s.execute(stmt, rows)


class RunRecorder:
    """Every engine write besides sample rows (see the module docstring)."""

    def __init__(self, maker: async_sessionmaker[AsyncSession], node_name: str,
                 owns: ColumnElement[bool] | None = None) -> None:
        self.maker = maker
        self.node_name = node_name
        # Which instruments' runs this node claims and resumes (labdaq.nodes.owned_by);
        # None: all of them.
        self.owns = owns
        self.queue = RecordWriter(maker)

    @property
    def pending(self) -> int:
        return self.queue.pending

    def start(self) -> None:
        self.queue.start()

    async def close(self) -> None:
        await self.queue.close()

    # -- queued: never waits for the database ------------------------------------------
    def row(self, what: str, model: type[Any], **values: Any) -> None:
        """Queue one row; it is built afresh for every attempt to write it."""

        async def op(s: AsyncSession) -> None:
            s.add(model(**values))

        self.queue.put(what, op)

    def event(self, ev: RunEvent) -> None:
        self.row("event", m.Event, run_id=ev.run_id, kind=ev.kind, severity=ev.severity,
                 message=ev.message, data=ev.data, actor=self.node_name)

    def finished(self, run_id: int, outcome: tuple[str, str], cr: ChannelRun | None) -> None:
        """The run's terminal state, its last steps and cycles (committed with their
        samples already: the node flushes first) and a state event, in one transaction."""
        state, reason = outcome
        values = run_states.ending(m.RunState(state), reason)
        if cr is not None:
            values.update(last_seq=cr.seq, elapsed_s=cr.t_s, cycle_index=cr.cycle.cycle_index,
                          position=cr.position())
        closing = [] if cr is None else cr.closing
        steps = [{"run_id": run_id, **tr.step.__dict__} for tr in closing if tr.step]
        cycles = [{"run_id": run_id, **c} for tr in closing for c in tr.cycles]
        node = self.node_name

        async def op(s: AsyncSession) -> None:
            run = await s.get(m.Run, run_id)
            if run is None:
                return  # deleted meanwhile
            await insert_ignoring_duplicates(s, m.Step, steps)
            await insert_ignoring_duplicates(s, m.Cycle, cycles)
            for key, value in values.items():
                setattr(run, key, value)
            s.add(m.Event(run_id=run_id, kind="state",
                          severity="info" if state == "completed" else "warning",
                          message=f"run {state}: {reason}", data={"state": state},
                          actor=node))
            # The channel is free once this commits: wake its node for the next run of
            # its queue (PostgreSQL; labdaq.nodes) instead of waiting for its next poll.
            await wake_node_of_run(s, run, "ended")

        self.queue.put("run state", op)

    # -- direct: the scheduler needs the outcome ---------------------------------------
    async def claim(self, run_id: int, channel_id: int) -> bool:
        """queued → running, atomically: only one node moves a run out of 'queued', and
        the database lets only one run hold a channel (False: another one does)."""
        waiting = [s.value for s in m.WAITING_STATES]
        try:
            async with session_scope(self.maker) as s:
                # Row-locked first, skipping a row another transaction holds: of two
                # claims at once one gets the row, the other moves on (and finds it no
                # longer queued next round). SQLite has no row locks: one writer at a time.
                if await s.scalar(
                        select(m.Run.id)
                        .where(m.Run.id == run_id, m.Run.state == m.RunState.queued.value)
                        .with_for_update(skip_locked=True)) is None:
                    return False
                res = await s.execute(
                    update(m.Run)
                    .where(m.Run.id == run_id,
                           m.Run.state.in_([m.RunState.queued.value]))
                    .values(state=m.RunState.running.value, started_at=datetime.now(UTC),
                            node=self.node_name, waiting_reason=None)
                )
                if getattr(res, "rowcount", 0) != 1:
                    return False
                # What a technician confirmed for the runs behind it was the cell on the
                # channel before this run: they are judged against this run's cell now.
                await s.execute(
                    update(m.Run)
                    .where(m.Run.channel_id == channel_id, m.Run.id != run_id,
                           m.Run.state.in_(waiting))
                    .values(cell_confirmed_at=None)
                )
                return True
        except sa_exc.IntegrityError:
            return False

    async def claim_many(self, claims: list[tuple[int, int]]) -> set[int]:
        """:meth:`claim` for the heads of several channels ((run id, channel id) each) in
        one transaction: a scheduler round that starts hundreds of runs commits once,
        not once per run. Returns the runs claimed. If the database refuses the batch (a
        channel held by another run meanwhile) each is claimed on its own."""
        if len(claims) < 2:
            return {r for r, c in claims if await self.claim(r, c)}
        waiting = [s.value for s in m.WAITING_STATES]
        queued = m.RunState.queued.value
        try:
            async with session_scope(self.maker) as s:
                ids = [r for r, _ in claims]
                got = set((await s.scalars(
                    select(m.Run.id).where(m.Run.id.in_(ids), m.Run.state == queued)
                    .with_for_update(skip_locked=True))).all())
                if not got:
                    return set()
                # Only the rows this statement moved out of 'queued' are claimed.
                got = set((await s.scalars(
                    update(m.Run).where(m.Run.id.in_(got), m.Run.state == queued)
                    .values(state=m.RunState.running.value, started_at=datetime.now(UTC),
                            node=self.node_name, waiting_reason=None)
                    .returning(m.Run.id))).all())
                # As in claim: the runs behind each are judged against its cell now.
                await s.execute(
                    update(m.Run)
                    .where(m.Run.channel_id.in_([c for r, c in claims if r in got]),
                           m.Run.id.not_in(got), m.Run.state.in_(waiting))
                    .values(cell_confirmed_at=None))
                return {int(r) for r in got}
        except sa_exc.IntegrityError:
            return {r for r, c in claims if await self.claim(r, c)}

    async def queue_heads(self, now: datetime) -> list[run_queue.Decision]:
        """The head of every free channel's queue of this node's instruments and whether
        it may start now."""
        async with session_scope(self.maker) as s:
            decisions = await run_queue.decide(s, now)
            if self.owns is None:
                return decisions
            mine = set((await s.scalars(select(m.Instrument.id).where(self.owns))).all())
            return [d for d in decisions if d.channel.instrument_id in mine]

    async def hold(self, run_id: int, reason: str) -> None:
        """queued → awaiting_cell: the next run of a free channel waits for a technician
        to confirm its cell (POST /api/v1/runs/{id}/confirm-cell); an event says why."""
        async with session_scope(self.maker) as s:
            res = await s.execute(
                update(m.Run)
                .where(m.Run.id == run_id, m.Run.state == m.RunState.queued.value)
                .values(state=m.RunState.awaiting_cell.value, waiting_reason=reason)
            )
            if getattr(res, "rowcount", 0) == 1:
                s.add(m.Event(run_id=run_id, kind="queue", severity="warning",
                              message=f"waiting for a technician to confirm the cell: {reason}",
                              data={"state": m.RunState.awaiting_cell.value,
                                    "reason": reason},
                              actor=self.node_name))

    async def requested(self, run_ids: list[int]) -> list[tuple[int, str]]:
        """(run id, command) for the active runs the API has sent a command."""
        async with session_scope(self.maker) as s:
            return [(int(r), str(a)) for r, a in (await s.execute(
                select(m.Run.id, m.Run.requested_action).where(
                    m.Run.id.in_(run_ids), m.Run.requested_action.is_not(None))
            )).all()]

    async def command_taken(self, run_id: int, command: str) -> None:
        """A pause or resume was handed to the run's group: the state it leads to."""
        to = {"pause": m.RunState.paused, "resume": m.RunState.running}[command]
        async with session_scope(self.maker) as s:
            await s.execute(
                update(m.Run)
                .where(m.Run.id == run_id, m.Run.state.in_(run_states.sources(to)))
                .values(state=to.value, requested_action=None)
            )

    async def paused_by_engine(self, why: RunEvent) -> None:
        """The engine pauses a running run for a technician (a chamber that missed its set
        point in time): the state and the event saying why, in one transaction. A pending
        command is left for the scheduler (a technician's stop still ends the run)."""
        async with session_scope(self.maker) as s:
            await s.execute(
                update(m.Run)
                .where(m.Run.id == why.run_id, m.Run.state == m.RunState.running.value)
                .values(state=m.RunState.paused.value)
            )
            s.add(m.Event(run_id=why.run_id, kind=why.kind, severity=why.severity,
                          message=why.message, data=why.data, actor=self.node_name))

    async def resumed(self, run_id: int, why: str, gap: dict[str, Any],
                      still_active: bool) -> None:
        """The run acquires again after a gap: the interruption event with its bounds."""
        async with session_scope(self.maker) as s:
            row = await s.get(m.Run, run_id)
            assert row is not None
            # (Not one already ended by a breach as it rejoined; a paused run stays paused.)
            if still_active and row.state != m.RunState.paused.value:
                row.state = m.RunState.running.value
            row.node = self.node_name
            s.add(m.Event(run_id=run_id, kind="interruption", severity="warning",
                          message=f"{why}; run resumed after a {gap['gap_s']:.1f} s gap",
                          data=gap, actor=self.node_name))

    async def interrupted(self, run_id: int, reason: str, gap: dict[str, Any]) -> None:
        """The run cannot be resumed: it ends ``interrupted`` with the reason."""
        async with session_scope(self.maker) as s:
            row = await s.get(m.Run, run_id)
            assert row is not None
            for key, value in run_states.ending(m.RunState.interrupted, reason).items():
                setattr(row, key, value)
            s.add(m.Event(run_id=run_id, kind="interruption", severity="warning",
                          message=reason, data=gap, actor=self.node_name))

    async def acquiring(self, run_ids: list[int] | None = None) -> list[tuple[m.Run, m.Channel]]:
        """Runs (with their channels) in an acquiring state on this node's instruments;
        all, or of ``run_ids``."""
        q = (select(m.Run, m.Channel).join(m.Channel, m.Channel.id == m.Run.channel_id)
             .where(m.Run.state.in_([s.value for s in run_states.ACQUIRING])))
        if self.owns is not None:  # another node's runs are that node's to resume
            q = q.join(m.Instrument, m.Instrument.id == m.Channel.instrument_id).where(self.owns)
        if run_ids is not None:
            q = q.where(m.Run.id.in_(run_ids))
        async with session_scope(self.maker) as s:
            return [(r, c) for r, c in (await s.execute(q)).all()]
