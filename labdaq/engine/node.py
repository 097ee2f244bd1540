"""Acquisition node: owns the instruments, claims queued runs, resumes active ones, and
runs one InstrumentGroup per instrument.

Runs in its own OS process (``labdaq engine``), never in the API's: see docs/architecture.md
"Processes". This module is the lifecycle (open, claim, recover, stop) and the dispatch of
what groups emit; the rest has modules of its own: scheduling.py (the periodic round),
recovery.py (resuming after a gap), aux_steps.py (EIS and chamber steps), recorder.py (the
one outlet for records), group.py (the hot loop) and the sample sink (writer.py,
writer_process.py).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.drivers.roles import Cycler
from labdaq.engine.aux_steps import AuxSteps
from labdaq.engine.aux_temps import WiredTemperatures
from labdaq.engine.channel import ChannelRun
from labdaq.engine.clock import EngineClock
from labdaq.engine.delegated import DelegatedRuns
from labdaq.engine.events import (
    AuxRequested,
    EngineEvent,
    InstrumentLost,
    RunEnded,
    RunEvent,
)
from labdaq.engine.group import InstrumentGroup
from labdaq.engine.instruments import OpenInstrument
from labdaq.engine.node_link import NodeLink
from labdaq.engine.recorder import RunRecorder
from labdaq.engine.recovery import Recovery
from labdaq.engine.scheduling import Scheduling
from labdaq.engine.sink import SampleSink
from labdaq.engine.stats import EngineStats
from labdaq.engine.writer import SampleWriter
from labdaq.engine.writer_process import WriterProcess
from labdaq.heartbeat import HEARTBEAT_PERIOD_S, INSTRUMENT_OK, Heartbeat
from labdaq.nodes import owned_by
from labdaq.storage import models as m
from labdaq.storage.db import session_scope, sessionmaker

log = logging.getLogger(__name__)


class InstrumentFenced(RuntimeError):
    """Another node holds the instrument's advisory lock: this one must not drive it."""


def default_journal_dir(engine: AsyncEngine) -> Path | None:
    """Where samples are journaled while the database is unavailable, when not configured:
    next to an SQLite file (``<dir>/journal``); None for other databases (say where)."""
    url = make_url(str(engine.url))
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        return Path(url.database).resolve().parent / "journal"
    return None


def tune_interpreter() -> None:
    """Interpreter settings for the engine process, where latency is safety.

    The GIL switch interval drops from 5 ms to 0.5 ms: an instrument's worker thread that
    has its reply waits for the event loop to hand the GIL over, and at 5 ms that wait was
    most of the loop's lateness (docs/performance.md).
    """
    sys.setswitchinterval(0.0005)


class AcquisitionNode(Scheduling, Recovery):
    def __init__(
        self,
        engine: AsyncEngine,
        clock: EngineClock,
        poll_s: float = 0.2,
        batch_rows: int = 2000,
        batch_age_s: float = 0.5,
        max_batch_rows: int = 32_000,
        commit_interval_s: float = 0.25,
        node_name: str | None = None,
        max_resume_gap_s: float = 600.0,
        control_period_s: float = 1.0,
        journal_dir: Path | None = None,
        writer_process: bool = False,
        temperature_stale_s: float = 3.0,
        temperature_lost_s: float = 15.0,
        unassigned: bool = True,
        fence_wait_s: float = 60.0,
    ) -> None:
        self.control_period_s = control_period_s
        self.engine = engine
        self.maker = sessionmaker(engine)
        self.clock = clock
        self.poll_s = poll_s
        # Samples survive a database outage in a local journal (writer.py); without a
        # configured directory, an SQLite database journals next to its file.
        self.journal_dir = journal_dir if journal_dir is not None else default_journal_dir(engine)
        # The sample sink: the writer in a child process (LABDAQ_WRITER_PROCESS, the
        # default of `labdaq engine`; writer_process.py says why) or in this process.
        self.writer: SampleSink = (
            WriterProcess(
                engine.url.render_as_string(hide_password=False),
                batch_rows=batch_rows, batch_age_s=batch_age_s, journal_dir=self.journal_dir,
                max_batch_rows=max_batch_rows, commit_interval_s=commit_interval_s,
            )
            if writer_process
            else SampleWriter(
                engine, batch_rows=batch_rows, batch_age_s=batch_age_s,
                journal_dir=self.journal_dir, max_batch_rows=max_batch_rows,
                commit_interval_s=commit_interval_s,
            )
        )
        self.node_name = node_name or socket.gethostname()
        # Which instruments are this node's (labdaq.nodes): assigned to it, and with
        # ``unassigned`` (the single-machine node) those assigned to none. Each is fenced
        # by an advisory lock and the node is woken by NOTIFY (node_link.py).
        self.owns = owned_by(self.node_name, unassigned)
        self.link = NodeLink(engine.url.render_as_string(hide_password=False),
                             self.node_name, unassigned)
        self.recorder = RunRecorder(self.maker, self.node_name, self.owns)
        # How long open_all waits for a fence another process holds (node_link.py).
        self.fence_wait_s = fence_wait_s
        self.max_resume_gap_s = max_resume_gap_s
        self.instruments: dict[int, OpenInstrument] = {}
        self.groups: dict[int, InstrumentGroup] = {}
        self.active: dict[int, ChannelRun] = {}
        self.run_groups: dict[int, InstrumentGroup] = {}  # active run id -> its group
        self.aux = AuxSteps(self.instruments, self.recorder, clock)
        self.temperatures = WiredTemperatures(self.instruments, self.aux.wiring, clock,
                                              stale_s=temperature_stale_s,
                                              lost_s=temperature_lost_s,
                                              open_logger=self._open_by_name)
        self._finishing: set[asyncio.Task[None]] = set()
        self._scheduler_error = False
        self._stopping = asyncio.Event()
        # Wall-clock jump detection (_watch_wall_clock): a jump is a change of at least
        # clock_jump_threshold_s in the wall clock's offset from the monotonic clock,
        # held for two scheduler rounds.
        self.wall_clock: Callable[[], float] = time.time
        self.clock_jump_threshold_s = 1.0
        # Scheduler rounds done (what "the engine has looked at its queues" means).
        self.rounds = 0
        self._clock_offset_s: float | None = None  # the wall clock's settled offset
        self._clock_pending_s: float | None = None  # a new offset, seen for one round
        self._dropped_reported: dict[int, int] = {}  # run id -> samples lost, recorded
        self._waiting: set[asyncio.Task[None]] = set()  # runs waiting for an instrument
        if isinstance(self.writer, WriterProcess):
            self.writer.on_death = self._writer_died
        # Why the node stopped on its own (None: asked to); `labdaq engine` exits non-zero
        # then, and `labdaq serve` restarts it.
        self.failure: str | None = None
        self.heartbeat = Heartbeat(self.node_name)
        self.stats = EngineStats()  # for /metrics, through the heartbeat (stats.py)
        self._next_beat_s = 0.0
        self.delegated = DelegatedRuns(self)

    @property
    def records(self) -> RunRecorder:
        """The recorder (older name, kept for benchmarks that report its backlog)."""
        return self.recorder

    # -- instruments -------------------------------------------------------------------
    async def _open_instrument(self, row: m.Instrument) -> OpenInstrument:
        from labdaq.drivers.opener import open_configured, resolve_driver
        from labdaq.drivers.transport import InstrumentWorker

        if not await self.link.acquire(row.id):
            raise InstrumentFenced(f"instrument {row.name} is driven by another node "
                                   "(its advisory lock is held)")
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

    async def _open_by_name(self, name: str) -> OpenInstrument:
        """Open an enabled instrument the node does not have open (a temperature logger
        that was off when the engine started)."""
        async with session_scope(self.maker) as s:
            row = await s.scalar(select(m.Instrument).where(m.Instrument.name == name,
                                                            m.Instrument.enabled, self.owns))
        if row is None:
            raise LookupError(f"no enabled instrument {name!r}")
        return await self._open_instrument(row)

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
            lambda ev: self._on_event(ev, instrument_id),
            control_period_s=self.control_period_s,
            # Golden-ratio steps spread any number of groups evenly over a period.
            phase=len(self.groups) * 0.6180339887,
            temperatures=self.temperatures,
        )
        self.groups[instrument_id] = group
        return group

    async def open_all(self) -> None:
        """Connect every configured instrument and make it safe before any run starts."""
        async with session_scope(self.maker) as s:
            rows = (await s.scalars(select(m.Instrument).where(m.Instrument.enabled,
                                                                self.owns))).all()
        # Fences first: this node's previous process may still hold some (killed on
        # another machine, its connection not yet dropped by the server).
        fenced = await self.link.acquire_waiting([r.id for r in rows], self.fence_wait_s,
                                                 self._stopping)
        for row in rows:
            if row.id in fenced:
                why = "its advisory lock is held by another process (node_link.py)"
                log.error("instrument %s not opened: %s", row.name, why)
                self.heartbeat.instruments[row.name] = f"not connected: {why}"
                continue
            try:
                inst = await self._open_instrument(row)
                if isinstance(inst.driver, Cycler):
                    await inst.worker.call(inst.driver.safe_shutdown)
            except Exception as exc:  # noqa: BLE001 - one broken instrument must not stop the rest
                log.error("instrument %s (%s) not ready: %s", row.name, row.resource, exc)
                self.heartbeat.instruments[row.name] = f"not connected: {exc}"
                self.stats.instrument_error(row.name)

    # -- lifecycle ---------------------------------------------------------------------
    async def run_forever(self) -> None:
        tune_interpreter()
        self.writer.start()
        self.recorder.start()
        try:
            await self.link.connect()
            await self.open_all()
            # Everything alive now (modules, ORM metadata, drivers) lives as long as the
            # process: keep it out of the collector's full passes, which stall every
            # instrument's loop (docs/performance.md).
            gc.collect()
            gc.freeze()
            await self._recover_when_ready()
            while not self._stopping.is_set():
                self.link.wake.clear()  # what woke it is read by this round
                await self.tick()
                await self._sleep_round()
        finally:
            await self.shutdown()

    def request_stop(self) -> None:
        self._stopping.set()
        self.link.wake.set()

    async def _sleep_round(self) -> None:
        """Until the next round: ``poll_s``, or sooner when woken (a command or a new run
        for this node, NOTIFY on PostgreSQL) or asked to stop."""
        try:
            await asyncio.wait_for(self.link.wake.wait(), timeout=self.poll_s)
        except TimeoutError:
            pass

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
        await self.link.check()  # the fences are still this node's (node_link.py)
        if self.link.lost and self.failure is None:
            self.failure = f"instrument fences lost to another process: {sorted(self.link.lost)}"
            log.error("%s: stopping", self.failure)
            self.request_stop()
        async with session_scope(self.maker) as s:
            await self.heartbeat.write(s, len(self.active) + len(self.delegated.runs), state,
                                       self.stats.snapshot(self.writer, self.groups.values()))

    async def shutdown(self) -> None:
        # Runs are not stopped here: an engine restart resumes them (recovery.py). The
        # outputs are turned off and every sample (with its position) committed, which is
        # what resuming needs.
        self.aux.cancel_all()
        await self.delegated.close()  # their programs run on; a restart follows them again
        if self._waiting:
            await asyncio.wait(self._waiting, timeout=10)
        for group in self.groups.values():
            await group.halt()
        await self.temperatures.close()
        for inst in self.instruments.values():
            if not isinstance(inst.driver, Cycler):
                continue  # impedance meters, chambers: nothing to switch off
            try:
                await inst.worker.call(inst.driver.all_off)
            except Exception as exc:  # noqa: BLE001
                log.error("could not make %s safe: %s", inst.name, exc)
        if self._finishing:
            await asyncio.wait(self._finishing, timeout=10)
        try:
            await self.writer.flush()
        except Exception as exc:  # noqa: BLE001 - the journal keeps what it could not write
            log.error("could not flush samples at shutdown: %s", exc)
        await self.writer.close()
        self._report_dropped()  # what the last flush could not keep
        await self.recorder.close()
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
        await self.link.close()  # the fences go last, with the instruments safe and closed

    # -- what groups emit ----------------------------------------------------------------
    async def _on_event(self, ev: EngineEvent, instrument_id: int | None = None) -> None:
        """The one entry for what a group emits; returns promptly (the group awaits it
        inside its acquisition loop): records are queued, anything longer is a task."""
        if isinstance(ev, RunEvent):
            self.recorder.event(ev)
        elif isinstance(ev, RunEnded):
            self._run_ended(ev.run)
        elif isinstance(ev, AuxRequested):
            group = self.run_groups.get(ev.run.run_id)
            if group is not None:
                self.aux.start(ev.run, ev.phase, group)
        elif isinstance(ev, InstrumentLost):
            assert instrument_id is not None
            self._instrument_lost(instrument_id, ev.runs, ev.reason)

    def _release(self, run_id: int) -> None:
        """The run no longer acquires on this node: forget it, stop its aux step."""
        self.active.pop(run_id, None)
        self.run_groups.pop(run_id, None)
        self.aux.wiring.pop(run_id, None)
        self.aux.cancel(run_id)

    def _run_ended(self, cr: ChannelRun) -> None:
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
        self.recorder.finished(cr.run_id, outcome, cr)
