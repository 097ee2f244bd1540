"""Acquisition node: owns the instruments, claims queued runs and supervises channel workers.

Runs in its own OS process (``labdaq engine``), never in the API's: see docs/architecture.md
"Processes" for the measurements behind that.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import socket
import sys
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Table, bindparam, literal_column, select, update
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from labdaq.drivers.errors import InstrumentReportedError
from labdaq.engine.channel import ChannelRun, StepRecord
from labdaq.engine.clock import EngineClock
from labdaq.engine.group import LOST_INSTRUMENT, Callbacks, InstrumentGroup
from labdaq.engine.writer import SampleWriter
from labdaq.engine.writer_process import WriterProcess
from labdaq.heartbeat import HEARTBEAT_PERIOD_S, INSTRUMENT_OK, Heartbeat
from labdaq.protocol import ResolvedProtocol
from labdaq.storage import models as m
from labdaq.storage.db import session_scope, sessionmaker

log = logging.getLogger(__name__)


def default_journal_dir(engine: AsyncEngine) -> Path | None:
    """Where samples are journaled while the database is unavailable, when not configured:
    next to an SQLite file (``<dir>/journal``); None for other databases (say where)."""
    url = make_url(str(engine.url))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).resolve().parent / "journal"
    return None


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


@dataclass
class OpenInstrument:
    row_id: int
    name: str
    driver: Any
    worker: Any  # labdaq.drivers.transport.InstrumentWorker


def _answers(driver: Any) -> None:
    """Reconnect and get a reply. An accepted connection alone does not show that the
    instrument is back: a peer may accept and close at once (so may a port server in
    front of a dead instrument)."""
    driver.transport.reconnect()
    try:
        driver.check_errors()
    except InstrumentReportedError:
        pass  # an error entry is a reply: it answers


_RUNS = cast(Table, m.Run.__table__)
# A Core executemany: the ORM's bulk UPDATE by primary key does more per row, and this
# runs for every active run on every progress update.
_PROGRESS_UPDATE = (
    update(_RUNS)
    # A row built just before its run ended must not overwrite the final record.
    .where(_RUNS.c.id == bindparam("run_id"),
           # Literal values: an IN list of parameters cannot go in an executemany.
           _RUNS.c.state.in_([literal_column(f"'{v.value}'")
                              for v in (m.RunState.running, m.RunState.paused)]))
    .values({c: bindparam(c) for c in (
        "step_index", "step_count", "cycle_index", "elapsed_s", "last_seq", "position")})
)


async def _write_progress(s: AsyncSession, rows: list[dict[str, Any]]) -> None:
    """One executemany UPDATE of progress rows (``_progress_row``)."""
    if rows:
        await s.execute(_PROGRESS_UPDATE, rows)


class _NotResumable(Exception):
    """Resuming this run would be unsafe; the message is the reason recorded on it."""


# Positions held at most (see AcquisitionNode._publish_progress_locked): a writer that
# cannot settle rows (database down, no journal) must not make them pile up.
_MAX_HELD = 256


def _progress_row(cr: ChannelRun) -> dict[str, Any]:
    """A run's progress and resumable position, as an UPDATE-by-primary-key parameter."""
    st = cr.step
    return {
        "run_id": cr.run_id,
        "step_index": st.index if st is not None else cr.pc,
        "step_count": len(cr.program),
        "cycle_index": cr.cycle.cycle_index,
        "elapsed_s": cr.t_s,
        "last_seq": cr.seq,
        "position": cr.position(),
    }


def tune_interpreter() -> None:
    """Interpreter settings for the engine process, where latency is safety.

    The GIL switch interval drops from 5 ms to 0.5 ms: an instrument's worker thread that
    has its reply waits for the event loop to hand the GIL over, and at 5 ms that wait was
    most of the loop's lateness (4 cabinets at 100 Hz: p99 17.7 → 9.7 ms, missed ticks
    6,912 → 1,408 in benchmarks/acquisition_scale.py).
    """
    sys.setswitchinterval(0.0005)


class AcquisitionNode:
    def __init__(
        self,
        engine: AsyncEngine,
        clock: EngineClock,
        poll_s: float = 0.2,
        batch_rows: int = 2000,
        batch_age_s: float = 0.5,
        max_batch_rows: int = 32_000,
        node_name: str | None = None,
        max_resume_gap_s: float = 600.0,
        control_period_s: float = 1.0,
        journal_dir: Path | None = None,
        writer_process: bool = False,
    ) -> None:
        self.control_period_s = control_period_s
        self.engine = engine
        self.maker = sessionmaker(engine)
        self.clock = clock
        self.poll_s = poll_s
        # Samples survive a database outage in a local journal (writer.py); without a
        # configured directory, an SQLite database journals next to its file.
        self.journal_dir = journal_dir if journal_dir is not None else default_journal_dir(engine)
        # writer_process: the writer runs in a child process (writer_process.py explains
        # why); in-process is kept for tests that drive a node directly.
        self.writer: SampleWriter | WriterProcess = (
            WriterProcess(
                engine.url.render_as_string(hide_password=False),
                batch_rows=batch_rows, batch_age_s=batch_age_s, journal_dir=self.journal_dir,
                max_batch_rows=max_batch_rows,
            )
            if writer_process
            else SampleWriter(
                engine, batch_rows=batch_rows, batch_age_s=batch_age_s,
                journal_dir=self.journal_dir, max_batch_rows=max_batch_rows,
            )
        )
        if isinstance(self.writer, WriterProcess):
            self.writer.on_death = self._writer_died
        # Why the node stopped on its own (None: asked to); `labdaq engine` exits non-zero
        # then, and `labdaq serve` restarts it.
        self.failure: str | None = None
        self.records = RecordWriter(self.maker)
        self._finishing: set[asyncio.Task[None]] = set()
        self._scheduler_error = False
        self.node_name = node_name or socket.gethostname()
        self.heartbeat = Heartbeat(self.node_name)
        self._next_beat_s = 0.0
        self.max_resume_gap_s = max_resume_gap_s
        self.instruments: dict[int, OpenInstrument] = {}
        self.groups: dict[int, InstrumentGroup] = {}
        self.active: dict[int, ChannelRun] = {}
        self.aux_tasks: dict[int, asyncio.Task[None]] = {}
        self.channel_aux: dict[int, dict[str, Any]] = {}  # run id -> channel.aux
        self._stopping = asyncio.Event()
        # Wall-clock jump detection (_watch_wall_clock): a jump is a difference of at least
        # clock_jump_threshold_s between wall and monotonic time elapsed since the last tick.
        self.wall_clock: Callable[[], float] = time.time
        self.clock_jump_threshold_s = 1.0
        self._clock_ref: tuple[float, float] | None = None
        self._dropped_reported: dict[int, int] = {}  # run id -> samples lost, recorded
        self._waiting: set[asyncio.Task[None]] = set()  # runs waiting for an instrument
        # Progress writes in order: a periodic update built before an instrument was lost
        # must not land after the positions saved for its runs.
        self._progress_lock = asyncio.Lock()
        # Positions taken but not saved yet, oldest first: each waits until the writer has
        # settled every row handed to it before the position was taken (see
        # _publish_progress_locked). Entries: (writer.rows_in then, [(run, progress row)]).
        self._held: deque[tuple[int, list[tuple[ChannelRun, dict[str, Any]]]]] = deque()

    # -- instruments -------------------------------------------------------------------
    async def _open_instrument(self, row: m.Instrument) -> OpenInstrument:
        from labdaq.drivers.opener import open_configured, resolve_driver
        from labdaq.drivers.transport import InstrumentWorker

        resolve_driver(row.driver)  # an unknown driver fails here, before a thread starts
        worker = InstrumentWorker(name=row.name)
        # The driver's declared framing, then the row's options (drivers/opener.py).
        try:
            driver = await worker.call(open_configured, row)
        except BaseException:
            worker.shutdown(wait=False)  # no thread left behind per failed attempt
            raise
        inst = OpenInstrument(row.id, row.name, driver, worker)
        self.instruments[row.id] = inst
        self.heartbeat.instruments[row.name] = INSTRUMENT_OK
        return inst

    async def _group_for(self, instrument_id: int) -> InstrumentGroup:
        group = self.groups.get(instrument_id)
        if group is not None:
            return group
        inst = self.instruments.get(instrument_id)
        if inst is None:
            async with session_scope(self.maker) as s:
                row = await s.get(m.Instrument, instrument_id)
                assert row is not None
            inst = await self._open_instrument(row)
        group = InstrumentGroup(
            inst.name,
            inst.driver,
            inst.worker.call,
            self.clock,
            self.writer,
            Callbacks(
                on_step=self._on_step,
                on_cycle=self._on_cycle,
                on_event=self._on_event,
                on_finish=self._on_finish,
                on_aux=self._on_aux,
                on_lost=functools.partial(self._on_lost, instrument_id),
            ),
            control_period_s=self.control_period_s,
            # Golden-ratio steps spread any number of groups evenly over a period.
            phase=len(self.groups) * 0.6180339887,
        )
        self.groups[instrument_id] = group
        return group

    async def open_all(self) -> None:
        """Connect every configured instrument and make it safe before any run starts."""
        async with session_scope(self.maker) as s:
            rows = (await s.scalars(select(m.Instrument).where(m.Instrument.enabled))).all()
        for row in rows:
            try:
                inst = await self._open_instrument(row)
                if hasattr(inst.driver, "safe_shutdown"):
                    await inst.worker.call(inst.driver.safe_shutdown)
            except Exception as exc:  # noqa: BLE001 - one broken instrument must not stop the rest
                log.error("instrument %s (%s) not ready: %s", row.name, row.resource, exc)
                self.heartbeat.instruments[row.name] = f"not connected: {exc}"

    # -- lifecycle ---------------------------------------------------------------------
    async def run_forever(self) -> None:
        tune_interpreter()
        self.writer.start()
        self.records.start()
        try:
            await self.open_all()
            # Everything alive now (modules, ORM metadata, drivers) lives as long as the
            # process: keep it out of the collector's full passes, which took ~130 ms here
            # (a stalled acquisition loop: every tick of every instrument missed).
            gc.collect()
            gc.freeze()
            await self._recover_when_ready()
            while not self._stopping.is_set():
                await self.tick()
                try:
                    await asyncio.wait_for(self._stopping.wait(), timeout=self.poll_s)
                except TimeoutError:
                    pass
        finally:
            await self.shutdown()

    async def _recover_when_ready(self) -> None:
        """Recover once the database answers and a previous process's journal is replayed.

        Resuming numbers new samples after the last *committed* one, so journaled rows of
        the previous process must be in the database first, or they would collide.
        """
        delay = self.poll_s
        while not self._stopping.is_set():
            try:
                await self.writer.flush()
                if self.writer.journal_pending_rows == 0:
                    await self.recover()
                    return
                why = f"{self.writer.journal_pending_rows} journaled samples not replayed yet"
            except Exception as exc:  # noqa: BLE001 - database not there yet: wait, retry
                why = f"{type(exc).__name__}: {exc}"
            log.warning("recovery waits for the database: %s", why)
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)

    def request_stop(self) -> None:
        self._stopping.set()

    def _writer_died(self, why: str) -> None:
        """The sample writer process is gone. Its runs are not failed: the node stops
        (outputs off, runs left active) and `labdaq serve` restarts the engine, whose
        recovery resumes them after their last committed sample, the gap on record."""
        log.error("sample writer died (%s): stopping the node so that it is restarted", why)
        self.failure = "writer process died"
        self.request_stop()

    async def _beat(self, state: str = "running") -> None:
        """Write the heartbeat (labdaq.heartbeat) about once a second."""
        now = time.monotonic()
        if state == "running" and now < self._next_beat_s:
            return
        self._next_beat_s = now + HEARTBEAT_PERIOD_S
        async with session_scope(self.maker) as s:
            await self.heartbeat.write(s, len(self.active), state)

    async def shutdown(self) -> None:
        # Runs are not stopped here: an engine restart resumes them (see recover()). The
        # outputs are turned off and the position is saved, which is what resuming needs.
        for task in self.aux_tasks.values():
            task.cancel()
        if self._waiting:
            await asyncio.wait(self._waiting, timeout=10)
        for group in self.groups.values():
            group._closing = True
        for group in self.groups.values():
            if group._task is not None:
                await asyncio.wait([group._task], timeout=10)
        for inst in self.instruments.values():
            if not hasattr(inst.driver, "all_off"):
                continue  # impedance meters, chambers: nothing to switch off
            try:
                await inst.worker.call(inst.driver.all_off)
            except Exception as exc:  # noqa: BLE001
                log.error("could not make %s safe: %s", inst.name, exc)
        if self._finishing:
            await asyncio.wait(self._finishing, timeout=10)
        try:
            # Settles every sample taken, so the positions taken next are saved at once.
            await self.writer.flush()
            await self._publish_progress()
        except Exception as exc:  # noqa: BLE001 - positions are saved again on the next start
            log.error("could not save run positions at shutdown: %s", exc)
        await self.writer.close()
        self._report_dropped()  # what the last flush could not keep
        await self.records.close()
        try:
            await asyncio.wait_for(self._beat(self.failure or "stopped"), 5)
        except Exception as exc:  # noqa: BLE001 - readiness then goes by the beat's age
            log.warning("could not write the last heartbeat: %s", exc)
        for inst in self.instruments.values():
            # Close the link (the instrument sees a clean disconnect, not a dead peer).
            try:
                await asyncio.wait_for(inst.worker.call(inst.driver.close), 5)
            except Exception as exc:  # noqa: BLE001 - shutting down regardless
                log.warning("could not close %s: %s", inst.name, exc)
            inst.worker.shutdown(wait=False)

    # -- recovery ----------------------------------------------------------------------
    async def recover(self) -> None:
        """Resume runs a previous engine process left active, or mark them interrupted.

        Resuming continues at the step the run was in, with the step's accumulated
        capacity and time; the samples continue from the last committed sequence number,
        and the gap becomes an interruption event with its bounds.
        """
        async with session_scope(self.maker) as s:
            rows = (
                await s.execute(
                    select(m.Run, m.Channel)
                    .join(m.Channel, m.Channel.id == m.Run.channel_id)
                    .where(m.Run.state.in_([m.RunState.running, m.RunState.paused]))
                )
            ).all()
        for run, channel in rows:
            await self._resume(run, channel)

    async def _resume(self, run: m.Run, channel: m.Channel,
                      why: str = "acquisition node restarted") -> None:
        from sqlalchemy import func

        async with session_scope(self.maker) as s:
            last = (
                await s.execute(
                    select(
                        m.Sample.seq,
                        m.Sample.t_s,
                        m.Sample.ts_utc,
                        m.Sample.step_index,
                        m.Sample.step_capacity_ah,
                        m.Sample.step_energy_wh,
                    )
                    .where(m.Sample.run_id == run.id)
                    .order_by(m.Sample.seq.desc())
                    .limit(1)
                )
            ).first()
            n_samples = await s.scalar(
                select(func.count()).select_from(m.Sample).where(m.Sample.run_id == run.id)
            )
        # The limit is in wall seconds (what a cell resting with its output off lives
        # through); the run's own timeline, on the engine clock, moves on by gap_s.
        wall_gap_s = time.time() - last.ts_utc if last else 0.0
        gap_s = wall_gap_s * self.clock.speed
        pos = run.position
        reason = None
        if pos is None or last is None:
            reason = "no saved position to resume from"
        elif wall_gap_s > self.max_resume_gap_s:
            reason = (
                f"interrupted for {wall_gap_s:.0f} s, more than the "
                f"{self.max_resume_gap_s:.0f} s a run may be resumed after"
            )
        if reason is None:
            assert pos is not None and last is not None
            try:
                resolved = ResolvedProtocol.model_validate(run.plan)
                cr = ChannelRun(run.id, channel.index, resolved, run.sample_period_s)
                self.channel_aux[run.id] = dict(channel.aux or {})
                pos = dict(pos)
                pos_seq = int(pos["seq"])
                # The committed samples are the truth: continue after the last one.
                pos["seq"] = int(last.seq)
                pos["t_s"] = float(last.t_s)
                phase = cr.restore(pos, shift_s=gap_s)
                # The accumulators (step, cycle, loops) all come from the position, saved
                # at one moment; samples committed after it are integrated on top, so that
                # they stay consistent with each other and with the committed samples.
                if pos_seq < int(last.seq):
                    unsafe = await self._catch_up(cr, pos_seq, int(last.seq))
                    if unsafe is not None:
                        raise _NotResumable(unsafe)
                cr.t_s = float(last.t_s) + gap_s
                # Paused stays paused (output off) until someone resumes it.
                cr.pause_requested = run.state == m.RunState.paused.value
                group = await self._group_for(channel.instrument_id)
                # Active before it joins: a breach on its first reading finishes it at once.
                self.active[run.id] = cr
                await group.add(cr, phase, self.clock.now() - cr.t_s)
            except _NotResumable as exc:
                self.channel_aux.pop(run.id, None)
                reason = str(exc)
            except LOST_INSTRUMENT as exc:
                self.active.pop(run.id, None)
                self.channel_aux.pop(run.id, None)
                if channel.instrument_id not in self.instruments:
                    reason = f"could not resume: {type(exc).__name__}: {exc}"
                else:
                    # Lost again as the run rejoined (a flapping link): wait for it once
                    # more. The run stays running, its gap (from the last committed
                    # sample) keeps counting toward max_resume_gap_s.
                    log.warning("run %s: instrument lost again while resuming: %s",
                                run.id, exc)
                    self._wait_for(channel.instrument_id, [run.id], [],
                                   f"{why}; lost again while resuming: "
                                   f"{type(exc).__name__}: {exc}")
                    return
            except Exception as exc:  # noqa: BLE001
                self.active.pop(run.id, None)
                self.channel_aux.pop(run.id, None)
                reason = f"could not resume: {type(exc).__name__}: {exc}"
        async with session_scope(self.maker) as s:
            row = await s.get(m.Run, run.id)
            assert row is not None
            data = {
                "last_seq": last.seq if last else 0,
                "samples_committed": n_samples,
                "from_t_s": last.t_s if last else None,
                "gap_s": gap_s,
                "gap_wall_s": wall_gap_s,
            }
            if reason is None:
                if run.id in self.active and row.state != m.RunState.paused.value:
                    # (Not one already ended by a breach as it rejoined.)
                    row.state = m.RunState.running.value
                row.node = self.node_name
                s.add(
                    m.Event(
                        run_id=run.id,
                        kind="interruption",
                        severity="warning",
                        message=f"{why}; run resumed after a {gap_s:.1f} s gap",
                        data={**data, "to_t_s": (last.t_s + gap_s) if last else None},
                        actor=self.node_name,
                    )
                )
            else:
                row.state = m.RunState.interrupted.value
                row.ended_at = datetime.now(UTC)
                row.end_reason = reason
                s.add(
                    m.Event(
                        run_id=run.id,
                        kind="interruption",
                        severity="warning",
                        message=reason,
                        data=data,
                        actor=self.node_name,
                    )
                )

    async def _catch_up(self, cr: ChannelRun, from_seq: int, to_seq: int) -> str | None:
        """Integrate committed samples ``from_seq``..``to_seq`` into a restored run.

        Returns why the run cannot be resumed when they belong to a later step or cycle
        than its position: the position is older than a step boundary (a kill in the short
        time a saved position trails the samples), and resuming from it would run part of
        a finished step again — more charge into a cell that already had it."""
        async with session_scope(self.maker) as s:
            rows = (
                await s.execute(
                    select(
                        m.Sample.t_s,
                        m.Sample.voltage_v,
                        m.Sample.current_a,
                        m.Sample.step_index,
                        m.Sample.cycle_index,
                        m.Sample.flags,
                    )
                    .where(m.Sample.run_id == cr.run_id, m.Sample.seq.between(from_seq, to_seq))
                    .order_by(m.Sample.seq)
                )
            ).all()
        st = cr.step
        if st is None or len(rows) != to_seq - from_seq + 1:
            return None
        later = [r for r in rows
                 if r.step_index != st.index or r.cycle_index != cr.cycle.cycle_index]
        if later:
            return (
                f"the saved position (step {st.index}, cycle {cr.cycle.cycle_index}, sample "
                f"{from_seq}) is older than the committed samples (step {later[-1].step_index}, "
                f"cycle {later[-1].cycle_index} at sample {to_seq}): resuming would repeat "
                "part of a finished step"
            )
        cr.catch_up(
            [r.t_s for r in rows],
            [r.voltage_v for r in rows],
            [r.current_a for r in rows],
            [bool(r.flags & 2) for r in rows],  # FLAG_PAUSED: nothing moved
        )
        return None

    # -- scheduling --------------------------------------------------------------------
    async def tick(self) -> None:
        """One scheduler round. A database error is logged, never fatal: acquisition goes
        on in the groups, samples and records wait for the database."""
        self._watch_wall_clock()
        self._report_dropped()
        try:
            await self._apply_requests()
            await self._claim_queued()
            await self._publish_progress()
            await self._beat()
        except Exception as exc:  # noqa: BLE001
            # Once per outage at warning level; every poll would flood the log.
            level = logging.DEBUG if self._scheduler_error else logging.WARNING
            log.log(level, "scheduler: database not available (%s: %s)", type(exc).__name__, exc)
            self._scheduler_error = True
        else:
            if self._scheduler_error:
                log.warning("scheduler: database available again")
            self._scheduler_error = False

    def _watch_wall_clock(self) -> None:
        """Record a wall-clock jump (NTP step, a technician setting the time) on every
        active run. Step and run timing use the monotonic clock and are unaffected; the
        samples' ts_utc follow the wall clock, so a jump shows there and the event says
        by how much."""
        wall, mono = self.wall_clock(), time.monotonic()
        ref, self._clock_ref = self._clock_ref, (wall, mono)
        if ref is None:
            return
        jump_s = (wall - ref[0]) - (mono - ref[1])
        if abs(jump_s) < self.clock_jump_threshold_s:
            return
        log.warning("wall clock jumped %+.3f s against the monotonic clock", jump_s)
        data = {"jump_s": jump_s, "wall_before": ref[0], "wall_after": wall,
                "monotonic_elapsed_s": mono - ref[1]}
        for run_id in list(self.active):
            self._record(
                "event", m.Event, run_id=run_id, kind="clock_jump", severity="warning",
                message=f"wall clock jumped {jump_s:+.3f} s; run timing follows the monotonic "
                "clock, sample ts_utc the wall clock",
                data=data, actor=self.node_name,
            )

    def _report_dropped(self) -> None:
        """An interruption event for samples the writer had to drop (journal full or
        failing during a database outage), with the bounds of what is missing; repeated
        with the new bounds if more of the same run are dropped later."""
        for run_id, (seq0, seq1, t0, t1, n) in list(self.writer.dropped_by_run.items()):
            if self._dropped_reported.get(run_id) == n:
                continue
            self._dropped_reported[run_id] = n
            self._record(
                "event", m.Event, run_id=run_id, kind="interruption", severity="error",
                message=f"up to {n} samples lost: the database was unavailable and the "
                "local journal was full or failing",
                # "At most": a batch whose write timed out counts as dropped, yet may have
                # committed after all; the samples table says which are really missing.
                data={"cause": "journal_overflow", "from_seq": seq0, "to_seq": seq1,
                      "from_t_s": t0, "to_t_s": t1, "samples_lost_at_most": n},
                actor=self.node_name,
            )

    async def _apply_requests(self) -> None:
        if not self.active:
            return
        async with session_scope(self.maker) as s:
            rows = (
                await s.execute(
                    select(m.Run.id, m.Run.requested_action).where(
                        m.Run.id.in_(list(self.active)), m.Run.requested_action.is_not(None)
                    )
                )
            ).all()
            for run_id, action in rows:
                cr = self.active.get(run_id)
                if cr is None:
                    continue
                if action == "stop":
                    cr.stop_requested = True
                elif action == "pause":
                    cr.pause_requested = True
                    await s.execute(
                        update(m.Run)
                        .where(m.Run.id == run_id)
                        .values(state=m.RunState.paused.value, requested_action=None)
                    )
                elif action == "resume":
                    cr.pause_requested = False
                    await s.execute(
                        update(m.Run)
                        .where(m.Run.id == run_id)
                        .values(state=m.RunState.running.value, requested_action=None)
                    )

    async def _claim_queued(self) -> None:
        async with session_scope(self.maker) as s:
            queued = (
                await s.execute(
                    select(m.Run, m.Channel)
                    .join(m.Channel, m.Channel.id == m.Run.channel_id)
                    .where(m.Run.state == m.RunState.queued.value)
                    .order_by(m.Run.id)
                )
            ).all()
        for run, channel in queued:
            if run.id in self.active:
                continue
            async with session_scope(self.maker) as s:
                # Claim atomically: only one node moves a run out of 'queued'.
                res = await s.execute(
                    update(m.Run)
                    .where(m.Run.id == run.id, m.Run.state == m.RunState.queued.value)
                    .values(
                        state=m.RunState.running.value,
                        started_at=datetime.now(UTC),
                        node=self.node_name,
                    )
                )
                if getattr(res, "rowcount", 0) != 1:
                    continue
            await self._start(run, channel)

    async def _start(self, run: m.Run, channel: m.Channel) -> None:
        try:
            resolved = ResolvedProtocol.model_validate(run.plan)
            cr = ChannelRun(run.id, channel.index, resolved, run.sample_period_s)
            self.channel_aux[run.id] = dict(channel.aux or {})
            group = await self._group_for(channel.instrument_id)
            lim = resolved.limits
            # Layer one of safety: the instrument's own protection trips even if we stall.
            await group.call(
                group.driver.configure_protection,
                channel.index,
                lim.max_voltage_v,
                lim.max_abs_current_a,
            )
            tr = cr.start(0.0)
            if tr.done or tr.next_phase is None:
                cr.outcome = ("completed", "the program has no measuring step")
                await self._on_finish(cr)
                return
            self.active[run.id] = cr
            await group.add(cr, tr.next_phase, self.clock.now())
        except LOST_INSTRUMENT as exc:
            self.active.pop(run.id, None)
            self.channel_aux.pop(run.id, None)
            if channel.instrument_id not in self.instruments:
                log.error("run %s could not start: %s", run.id, exc)
                await self._finish(run.id, ("failed", f"{type(exc).__name__}: {exc}"), None)
                return
            # The instrument stopped answering while the run was joining (its other runs
            # are being handed over by their group just now): no sample of this run is
            # stored, so it starts afresh once the instrument answers, like they resume.
            reason = (f"instrument lost while the run was starting: "
                      f"{type(exc).__name__}: {exc}")
            log.warning("run %s: %s", run.id, reason)
            await self._on_event(
                run.id, "interruption", "warning", reason,
                {"cause": "instrument_lost",
                 "instrument": self.instruments[channel.instrument_id].name,
                 "channel": channel.index, "from_t_s": None, "last_seq": 0, "to_t_s": None,
                 "error": str(exc)})
            self._wait_for(channel.instrument_id, [run.id], [], reason, fresh=True)
        except Exception as exc:  # noqa: BLE001 - the run fails with its reason; others go on
            log.exception("run %s could not start", run.id)
            self.active.pop(run.id, None)
            await self._finish(run.id, ("failed", f"{type(exc).__name__}: {exc}"), None)

    # -- auxiliary instruments (EIS, chamber) -------------------------------------------
    def _aux_instrument(self, run_id: int, role: str) -> OpenInstrument:
        name = (self.channel_aux.get(run_id) or {}).get(role)
        if isinstance(name, list):
            name = name[0]
        for inst in self.instruments.values():
            if inst.name == name:
                return inst
        raise LookupError(f"no {role} instrument is wired to this run's channel")

    async def _on_aux(self, cr: ChannelRun, phase: Any) -> None:
        old = self.aux_tasks.pop(cr.run_id, None)
        if old is not None:
            old.cancel()
        self.aux_tasks[cr.run_id] = asyncio.create_task(
            self._run_aux(cr, phase), name=f"aux-{cr.run_id}"
        )

    async def _run_aux(self, cr: ChannelRun, phase: Any) -> None:
        st = phase.aux
        try:
            if st.step == "eis":
                await self._eis(cr, st)
            elif st.step == "set_temperature":
                await self._set_temperature(cr, st)
            cr.aux_done = True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the run fails with the reason, not the node
            log.exception("run %s: %s step failed", cr.run_id, st.step)
            cr.aux_error = f"{st.step} step {st.index} failed: {type(exc).__name__}: {exc}"

    async def _eis(self, cr: ChannelRun, st: Any) -> None:
        import numpy as np

        inst = self._aux_instrument(cr.run_id, "impedance")
        decades = abs(np.log10(st.stop_frequency_hz / st.start_frequency_hz))
        n = max(2, int(round(decades * st.points_per_decade)) + 1)
        freqs = np.geomspace(st.start_frequency_hz, st.stop_frequency_hz, n)
        z = await inst.worker.call(inst.driver.sweep, freqs)
        v_dc = await inst.worker.call(inst.driver.dc_voltage_v)
        z = np.asarray(z, complex)
        self._record(
            "eis spectrum",
            m.EisSpectrum,
            run_id=cr.run_id,
            step_index=st.index,
            cycle_index=cr.cycle.cycle_index,
            t_s=cr.t_s,
            instrument=inst.name,
            dc_voltage_v=float(v_dc),
            frequency_hz=[float(f) for f in freqs],
            z_real_ohm=[float(x) for x in z.real],
            z_imag_ohm=[float(x) for x in z.imag],
        )

    async def _set_temperature(self, cr: ChannelRun, st: Any) -> None:
        inst = self._aux_instrument(cr.run_id, "chamber")
        await inst.worker.call(inst.driver.set_point_c, st.temperature_c)
        t_start = self.clock.now()
        stable_since: float | None = None
        while True:
            actual = float(await inst.worker.call(inst.driver.actual_c))
            now = self.clock.now()
            if abs(actual - st.temperature_c) <= st.tolerance_c:
                stable_since = now if stable_since is None else stable_since
                if now - stable_since >= st.stable_for_s:
                    return
            else:
                stable_since = None
            if now - t_start > st.timeout_s:
                raise TimeoutError(
                    f"chamber {inst.name} at {actual:.2f} °C did not hold "
                    f"{st.temperature_c:.2f} ± {st.tolerance_c} °C for {st.stable_for_s:.0f} s "
                    f"within {st.timeout_s:.0f} s"
                )
            await self.clock.sleep_until(now + max(1.0, min(30.0, st.stable_for_s / 10)))

    # -- callbacks from groups -----------------------------------------------------------
    # The group awaits these inside its acquisition loop: they only queue the records.
    async def _on_step(self, run_id: int, rec: StepRecord) -> None:
        values = dict(rec.__dict__)
        self._record("step", m.Step, run_id=run_id, **values)

    async def _on_cycle(self, run_id: int, summary: dict[str, Any]) -> None:
        self._record("cycle", m.Cycle, run_id=run_id, **summary)

    async def _on_event(
        self, run_id: int, kind: str, severity: str, message: str, data: dict[str, Any]
    ) -> None:
        self._record(
            "event",
            m.Event,
            run_id=run_id,
            kind=kind,
            severity=severity,
            message=message,
            data=data,
            actor=self.node_name,
        )

    async def _on_lost(self, instrument_id: int, runs: list[ChannelRun], reason: str) -> None:
        """An instrument stopped answering and its group let its runs go: save where
        each run is, then wait for the instrument in a task of its own and resume them."""
        for cr in runs:
            self._release(cr.run_id)
        rows = [_progress_row(cr) for cr in runs]
        self._wait_for(instrument_id, [cr.run_id for cr in runs], rows, reason)

    def _wait_for(self, instrument_id: int, run_ids: list[int], rows: list[dict[str, Any]],
                  reason: str, fresh: bool = False) -> None:
        """Wait for the instrument in a task of its own, then resume the runs (``fresh``:
        start them, they had stored nothing when it was lost)."""
        self.heartbeat.instruments[self.instruments[instrument_id].name] = f"lost: {reason}"
        waiter = asyncio.create_task(self._await_instrument(instrument_id, run_ids, rows,
                                                            reason, fresh),
                                     name=f"await-instrument-{instrument_id}")
        self._waiting.add(waiter)
        waiter.add_done_callback(self._waiting.discard)

    async def _await_instrument(self, instrument_id: int, run_ids: list[int],
                                rows: list[dict[str, Any]], reason: str,
                                fresh: bool = False) -> None:
        try:
            await self._await_and_resume(instrument_id, run_ids, rows, reason, fresh)
        except Exception:  # noqa: BLE001 - the runs stay running for the next engine start
            log.exception("runs %s: could not resume after the instrument returned", run_ids)

    async def _await_and_resume(self, instrument_id: int, run_ids: list[int],
                                rows: list[dict[str, Any]], reason: str,
                                fresh: bool = False) -> None:
        inst = self.instruments[instrument_id]
        lost_at = time.monotonic()
        # Resuming reads the saved position and continues after the last committed sample.
        await self.writer.flush()
        async with self._progress_lock, session_scope(self.maker) as s:
            await _write_progress(s, rows)
        give_up = time.monotonic() + self.max_resume_gap_s  # wall seconds
        delay = 0.5
        answered = False
        while not self._stopping.is_set():
            try:
                await inst.worker.call(_answers, inst.driver)
                self.heartbeat.instruments[inst.name] = INSTRUMENT_OK
                answered = True
                break
            except Exception as exc:  # noqa: BLE001 - still gone: wait and try again
                if time.monotonic() > give_up:
                    log.error("instrument %s did not come back: %s", inst.name, exc)
                    self.heartbeat.instruments[inst.name] = f"lost: {exc}"
                    break
            try:
                await asyncio.wait_for(self._stopping.wait(), timeout=delay)
            except TimeoutError:
                pass
            delay = min(delay * 2, 5.0)
        if self._stopping.is_set():
            return  # still running in the database: the next engine start resumes them
        log.warning("instrument %s: resuming %d runs after: %s", inst.name, len(run_ids),
                    reason)
        async with session_scope(self.maker) as s:
            pairs = (
                await s.execute(
                    select(m.Run, m.Channel)
                    .join(m.Channel, m.Channel.id == m.Run.channel_id)
                    .where(m.Run.id.in_(run_ids),
                           m.Run.state.in_([m.RunState.running, m.RunState.paused]))
                )
            ).all()
        for run, channel in pairs:
            if not fresh:
                # Past max_resume_gap_s this marks the run interrupted, with the reason.
                await self._resume(run, channel, why=f"{reason}; it answered again")
            elif not answered:
                await self._finish(run.id, ("interrupted", f"{reason}; the instrument did "
                                            f"not answer within {self.max_resume_gap_s:.0f} s"),
                                   None)
            else:
                wall_s = time.monotonic() - lost_at
                wait_s = wall_s * self.clock.speed
                await self._on_event(
                    run.id, "interruption", "warning",
                    f"{reason}; it answered again; run started after a {wait_s:.1f} s wait",
                    {"cause": "instrument_lost", "last_seq": 0, "samples_committed": 0,
                     "from_t_s": None, "to_t_s": 0.0, "gap_s": wait_s, "gap_wall_s": wall_s})
                await self._start(run, channel)

    def _release(self, run_id: int) -> None:
        """The run no longer acquires on this node: forget it, stop its aux task."""
        self.active.pop(run_id, None)
        self.channel_aux.pop(run_id, None)
        task = self.aux_tasks.pop(run_id, None)
        if task is not None:
            task.cancel()

    async def _on_finish(self, cr: ChannelRun) -> None:
        self._release(cr.run_id)
        # The run's state is written once its samples are committed (or journaled), in a
        # task of its own: waiting for the writer here would stall the other channels'
        # acquisition and safety checks.
        outcome = cr.outcome or ("failed", "ended without outcome")
        fin = asyncio.create_task(self._finish_after_flush(cr, outcome), name=f"finish-{cr.run_id}")
        self._finishing.add(fin)
        fin.add_done_callback(self._finishing.discard)

    async def _finish_after_flush(self, cr: ChannelRun, outcome: tuple[str, str]) -> None:
        try:
            await self.writer.flush()
        except Exception as exc:  # noqa: BLE001 - the state must still be recorded
            log.error("run %s: samples not flushed before finishing: %s", cr.run_id, exc)
        await self._finish(cr.run_id, outcome, cr)

    async def _finish(self, run_id: int, outcome: tuple[str, str], cr: ChannelRun | None) -> None:
        state, reason = outcome
        ended_at = datetime.now(UTC)
        progress = (
            {
                "last_seq": cr.seq,
                "elapsed_s": cr.t_s,
                "cycle_index": cr.cycle.cycle_index,
                "position": cr.position(),
            }
            if cr is not None
            else {}
        )
        node = self.node_name

        async def op(s: AsyncSession) -> None:
            run = await s.get(m.Run, run_id)
            if run is None:
                return  # deleted meanwhile
            run.state = state
            run.end_reason = reason
            run.ended_at = ended_at
            run.requested_action = None
            for key, value in progress.items():
                setattr(run, key, value)
            s.add(
                m.Event(
                    run_id=run_id,
                    kind="state",
                    severity="info" if state == "completed" else "warning",
                    message=f"run {state}: {reason}",
                    data={"state": state},
                    actor=node,
                )
            )

        self.records.put("run state", op)

    def _record(self, what: str, model: type[Any], **values: Any) -> None:
        """Queue one row; it is built afresh for every attempt to write it."""

        async def op(s: AsyncSession) -> None:
            s.add(model(**values))

        self.records.put(what, op)

    async def _publish_progress(self) -> None:
        """Every active run's progress and position, an instrument group at a time: one
        executemany UPDATE (and transaction) per group, the event loop free in between.
        Done for all 512 runs of a benchmark at once it held the loop long enough for
        every 100 Hz instrument loop to miss ticks (1,600-4,500 lost sample periods in 5
        s at 8 cabinets x 100 Hz; ~64 with progress every 5 s instead). Each run's row is
        built from one moment, so its position stays consistent."""
        if not self.active:
            self._held.clear()
            return
        async with self._progress_lock:
            await self._publish_progress_locked()

    async def _publish_progress_locked(self) -> None:
        """Save the positions whose samples are settled, then take new ones.

        A position counts every reading up to the moment it is taken, and resuming trusts
        it for the step's and cycle's accumulators. Saved while its last samples still
        waited in the writer, a kill would resume it with charge counted from samples that
        were never stored. So a position is held until the writer has settled (committed
        or journaled — recovery replays the journal first) every row handed to it before
        the position was taken. Saved positions trail the samples by about a batch age;
        resuming integrates the committed samples after them (``_catch_up``).
        """
        await self._save_settled()
        if len(self._held) < _MAX_HELD:
            done: set[int] = set()
            for group in list(self.groups.values()):
                runs = [cr for cr in group.runs if cr.run_id in self.active]
                done.update(cr.run_id for cr in runs)
                if not runs or group.putting:
                    # Rows numbered but not yet handed over: this position could not be
                    # matched to them. The next round takes it.
                    continue
                group.sync_all()
                self._held.append((self.writer.rows_in, [(cr, _progress_row(cr)) for cr in runs]))
            # Runs not in a group yet (still joining one).
            rest = [(cr, _progress_row(cr)) for rid, cr in list(self.active.items())
                    if rid not in done]
            if rest:
                self._held.append((self.writer.rows_in, rest))
        # A writer that has caught up (slow sampling, or flushed) settles them at once.
        await self._save_settled()

    async def _save_settled(self) -> None:
        """Save held positions whose rows are settled, oldest first, one group per UPDATE;
        a run that has since left or rejoined (lost instrument, end) is skipped: its
        position was saved on the way out."""
        settled = []
        while self._held and self._held[0][0] <= self.writer.rows_settled:
            settled.append(self._held.popleft()[1])
        # Several settled at once (the writer caught up): only each run's newest counts.
        seen: set[int] = set()
        for snap in reversed(settled):
            rows = [row for cr, row in snap
                    if cr.run_id not in seen and self.active.get(cr.run_id) is cr]
            seen.update(cr.run_id for cr, _ in snap)
            if rows:
                async with session_scope(self.maker) as s:
                    await _write_progress(s, rows)
