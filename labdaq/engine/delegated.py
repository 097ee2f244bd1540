"""Delegated runs: a cycler that runs its own step program (a ``ProgramRunner``, e.g. a
Neware BTS 8.0 channel) is handed the run's whole protocol, and the engine follows it.

One job: the life of a delegated run on the node. The protocol is cut at its chamber
steps into segments (drivers/neware_steps.py; the cycler's program cannot wait for
another instrument): for each, the engine holds the chamber (labdaq/engine/aux_steps.py),
then writes the segment's step file and starts it, pinning the run to the test id the
start returned (stored in ``runs.position`` before anything else, so a restarted engine
follows the same test and never starts a second); when that program finishes, the next
segment's chamber steps and program follow, its records numbered on from the last.
Then one follower per instrument, every sample period (the shortest of its runs'):

* ``inquire`` of all its runs' channels in one request: the live state, checked against
  the run's limits (second layer of safety; the first is the program's own protection,
  written into the step file) — a breach sends ``stop`` at once and ends the run
  ``aborted_safety`` with a safety event;
* ``download`` of the records after the last harvested one, of the pinned test: each
  record is a sample with ``seq`` = its index (delegated_records.py), committed with the
  run's position and the steps and cycles it completes, so a repeated harvest writes
  nothing twice; every harvested reading is checked as well;
* the vendor's state ends the run: ``finish`` → completed, ``stop`` → stopped, ``protect``
  → aborted_safety with the cycler's reason as a safety event.

A lost link (the server does not answer) leaves the program running on the cycler. When
it answers again the follower downloads what was recorded meanwhile (no gap in the
samples) and records one ``interruption`` event from the last reading labdaq saw to the
first it sees again (cause ``link_lost``; ``samples_missing`` 0). An engine restart is
the same (cause ``engine_restart``). API commands (stop, pause, resume) go to the cycler.

Over 450 lines on purpose: starting, following, segment changes and ending share one
run's state (:class:`DelegatedRun`) and each other's ordering (what is stored, pinned and
flushed before what); the parts that stand alone are modules of their own (the records'
bookkeeping, the live readings, the wait for an unreachable server).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from labdaq.drivers.errors import InstrumentError
from labdaq.drivers.neware_steps import Segment, translate
from labdaq.drivers.roles import ProgramRunner
from labdaq.engine.delegated_live import LiveReadings
from labdaq.engine.delegated_records import Harvest, RecordBook, breach
from labdaq.engine.delegated_wait import ServerWait
from labdaq.engine.events import RunEvent, SafetyTrip
from labdaq.engine.instruments import OpenInstrument
from labdaq.heartbeat import INSTRUMENT_OK
from labdaq.protocol import ResolvedProtocol
from labdaq.storage import models as m
from labdaq.storage.db import session_scope

if TYPE_CHECKING:
    from labdaq.engine.node_parts import NodeParts

log = logging.getLogger(__name__)

ENDED = {"finish": "completed", "stop": "stopped", "protect": "aborted_safety"}


@dataclass
class DelegatedRun:
    run_id: int
    instrument_id: int
    bts: str  # the cycler's channel name (devid-subdevid-chlid)
    resolved: ResolvedProtocol
    period_s: float
    book: RecordBook
    seen_t_s: float = 0.0  # run time of the last reading labdaq saw
    lost_from_t_s: float | None = None  # set while labdaq cannot see the channel
    lost_cause: str = ""
    lost_note: dict[str, Any] = field(default_factory=dict)  # more about the gap, for its event
    # since when each kind of reading ("inquired", "harvested": two timelines, the
    # harvested one behind) has been past a limit, for breach_duration_s
    breach_since_t_s: dict[str, float] = field(default_factory=dict)
    commands: list[str] = field(default_factory=list)
    outcome: tuple[str, str] | None = None
    following: bool = False  # the program runs (after the chamber steps)
    in_chamber: bool = False  # holding chamber steps (nothing runs on the cycler)
    starting: asyncio.Task[None] | None = None
    # The protocol cut at its chamber steps (drivers/neware_steps.py); book.segment says
    # which one is held or runs.
    segments: list[Segment] = field(default_factory=list)
    clock0: float = 0.0  # the engine clock at the run's time 0


def _runs_programs(driver: str) -> bool:
    """The driver runs its own step programs (an unknown one fails where it is opened)."""
    from labdaq.drivers.opener import resolve_driver

    try:
        return issubclass(resolve_driver(driver), ProgramRunner)
    except Exception:  # noqa: BLE001 - not ours to judge here
        return False


class DelegatedRuns:
    """The node's delegated runs and one follower task per instrument."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node
        self.runs: dict[int, DelegatedRun] = {}
        self.followers: dict[int, asyncio.Task[None]] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        # Runs whose server did not answer at engine start (delegated_wait.py).
        self.waits = ServerWait(self)
        # Each round's inquired readings, for the live view (delegated_live.py).
        self.live = LiveReadings(node.maker)

    # -- which channels ---------------------------------------------------------------
    async def instrument_of(self, channel: m.Channel) -> OpenInstrument | None:
        """The channel's instrument if its driver runs its own programs (opened if need
        be, which may raise), else None."""
        node = self.node
        inst = node.instruments.get(channel.instrument_id)
        if inst is None:
            async with session_scope(node.maker) as s:
                row = await s.get(m.Instrument, channel.instrument_id)
            if row is None or not _runs_programs(row.driver):
                return None
            inst = await node._open_instrument(row)
        if not isinstance(inst.driver, ProgramRunner):
            return None
        if not getattr(inst.driver, "channel_map", True):
            await inst.worker.call(inst.driver.connect)
        return inst

    # -- start / resume -----------------------------------------------------------------
    async def start(self, run: m.Run, channel: m.Channel, inst: OpenInstrument) -> None:
        resolved = ResolvedProtocol.model_validate(run.plan)
        sf = translate(resolved, sample_name=f"labdaq run {run.id}",
                       record_period_s=run.sample_period_s)
        bts = await inst.worker.call(inst.driver.channel_name, channel.index)
        dr = DelegatedRun(run.id, inst.row_id, bts, resolved, run.sample_period_s,
                          RecordBook(run.id, resolved, sf.step_map), segments=sf.segments,
                          clock0=self.node.clock.now())
        dr.book.bts_channel, dr.book.speed = bts, self.node.clock.speed
        self.runs[run.id] = dr
        self.node.aux.wiring[run.id] = dict(channel.aux or {})
        dr.starting = asyncio.create_task(self._start(dr, inst), name=f"start-{run.id}")

    async def _start(self, dr: DelegatedRun, inst: OpenInstrument) -> None:
        """Hold the chamber steps of the run's current segment, then start its program
        (the first segment's at the run's start, a later one's when the previous
        program has finished)."""
        node, book = self.node, dr.book
        seg = dr.segments[book.segment]
        part = "" if book.segment == 0 else f"-part{book.segment + 1}"
        try:
            dr.in_chamber = True
            for st in seg.chamber_steps[book.chamber_done:]:
                t_from = node.clock.now() - dr.clock0
                while (missed := await node.aux.set_temperature(dr.run_id, st)) is not None:
                    # Not held in time: paused for a technician, as a direct run is.
                    await node.recorder.paused_by_engine(missed)
                    if not await self._wait_resume(dr):
                        return
                node.recorder.row("step", m.Step, **book.chamber_step(
                    st, t_from, node.clock.now() - dr.clock0))
                book.chamber_done += 1
                if book.segment:  # a restart now goes on after this chamber step
                    await self._pin(dr)
            if seg.xml is None:  # the protocol ends with chamber steps
                await self._end_unstarted(dr, ("completed", "program finished"))
                return
            # From here a stop waits for the start's outcome (it may have run): the
            # follower sends it to the cycler.
            dr.in_chamber = False
            name = f"labdaq-run-{dr.run_id}{part}.xml"
            await inst.worker.call(inst.driver.put_step_file, name, seg.xml)
            book.t_offset_s = node.clock.now() - dr.clock0
            book.start_wall_s = node.wall_clock()
            book.step_map = seg.step_map
            barcode = f"labdaq-run-{dr.run_id}{part}"
            try:
                book.test_id = await inst.worker.call(inst.driver.start, dr.bts, name,
                                                      barcode)
            except InstrumentError as exc:
                # A start whose reply was lost may have run, and an engine killed before
                # it stored the test id left its program running: this run's barcode
                # says whose it is.
                book.test_id = await self._adopt(inst, dr, barcode, exc)
            book.test_segment = book.segment
            await self._pin(dr)
            node.recorder.event(RunEvent(
                dr.run_id, "delegated", "info",
                f"program {book.segment + 1} of {len(dr.segments)} started on {inst.name} "
                f"channel {dr.bts} as test {book.test_id}",
                {"instrument": inst.name, "channel": dr.bts, "test_id": book.test_id,
                 "segment": book.segment, "segments": len(dr.segments),
                 "chamber_steps": len(seg.chamber_steps), "first_seq": book.seq_base + 1}))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the run fails with its reason
            log.exception("run %s: delegated start failed", dr.run_id)
            await self._finish(dr, ("failed", f"{type(exc).__name__}: {exc}"))
            return
        dr.seen_t_s = book.t_offset_s
        dr.following = True
        self._follow(dr.instrument_id)

    async def _adopt(self, inst: OpenInstrument, dr: DelegatedRun, barcode: str,
                     exc: InstrumentError) -> int:
        """The test running on the channel under this run's barcode, or ``exc`` again."""
        reading = (await inst.worker.call(inst.driver.inquire, [dr.bts]))[dr.bts]
        if reading.barcode != barcode or not reading.test_id:
            raise exc
        log.warning("run %s: start failed (%s), but test %s on %s carries its barcode: "
                    "following it", dr.run_id, exc, reading.test_id, dr.bts)
        inst.driver.owned_test_ids.add(int(reading.test_id))
        return int(reading.test_id)

    async def _pin(self, dr: DelegatedRun) -> None:
        """The test id into the run's position before any sample is stored, so a restart
        follows this test. A database that cannot take it now does not stop the
        following (the program runs already): every position committed with the samples
        carries the test id too."""
        try:
            async with session_scope(self.node.maker) as s:
                await s.execute(update(m.Run).where(m.Run.id == dr.run_id)
                                .values(position=dr.book.position()))
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("run %s: test id %s not stored yet (%s); it goes with the samples",
                        dr.run_id, dr.book.test_id, exc)

    async def _wait_resume(self, dr: DelegatedRun) -> bool:
        """Paused before the program started: True on resume, False on stop."""
        while True:
            if "stop" in dr.commands:
                await self._end_unstarted(dr, ("stopped", "stop requested"))
                return False
            if "resume" in dr.commands:
                dr.commands.clear()
                return True
            await asyncio.sleep(self.node.poll_s)

    async def resume(self, run: m.Run, channel: m.Channel, inst: OpenInstrument,
                     why: str, note: dict[str, Any] | None = None) -> None:
        """Follow a run a previous engine (or a lost instrument) left: its pinned test
        from its position; records made meanwhile are harvested, none twice. ``note``
        goes into the data of the interruption event that closes the gap."""
        resolved = ResolvedProtocol.model_validate(run.plan)
        pos = dict(run.position or {})
        if "delegated" not in pos or not pos["delegated"].get("test_id"):
            reason = "no pinned test id to follow (stopped before its program started?)"
            self.node.recorder.event(RunEvent(run.id, "interruption", "warning", reason,
                                              {"cause": "engine_restart"}))
            self.node.recorder.finished(run.id, ("interrupted", reason), None)
            return
        # The records already committed: the position is committed with them.
        async with session_scope(self.node.maker) as s:
            last = await s.scalar(select(m.Sample.seq).where(m.Sample.run_id == run.id)
                                  .order_by(m.Sample.seq.desc()).limit(1))
        book = RecordBook(run.id, resolved, {})
        book.restore(pos)
        sf = translate(resolved, sample_name="", record_period_s=run.sample_period_s)
        book.step_map = sf.segments[book.test_segment].step_map
        book.speed = self.node.clock.speed
        if int(last or 0) != book.seq:
            reason = (f"the saved position (record {book.seq}) does not match the last "
                      f"committed sample ({last})")
            self.node.recorder.finished(run.id, ("interrupted", reason), None)
            return
        inst.driver.owned_test_ids.add(int(book.test_id))
        dr = DelegatedRun(run.id, inst.row_id, book.bts_channel, resolved,
                          run.sample_period_s, book, seen_t_s=book.t_s,
                          lost_from_t_s=book.t_s, lost_cause=why, lost_note=dict(note or {}),
                          segments=sf.segments,
                          clock0=self.node.clock.now() - book.t_s)
        self.runs[run.id] = dr
        if book.segment > book.test_segment:
            # Stopped while it held the chamber between two programs: hold the rest of
            # them and start the next program (the gap's event comes when it is seen).
            self.node.aux.wiring[run.id] = dict(channel.aux or {})
            dr.starting = asyncio.create_task(self._start(dr, inst), name=f"start-{run.id}")
            return
        dr.following = True
        self._follow(inst.row_id)

    # -- commands -----------------------------------------------------------------------
    def command(self, run_id: int, action: str) -> None:
        dr = self.runs.get(run_id)
        if dr is None:
            return
        dr.commands.append(action)
        if action == "stop" and dr.starting is not None and dr.in_chamber:
            dr.starting.cancel()  # in its chamber steps: nothing runs on the cycler now
            self._spawn(self._end_unstarted(dr, ("stopped", "stop requested")))

    # -- following ------------------------------------------------------------------------
    def _follow(self, instrument_id: int) -> None:
        task = self.followers.get(instrument_id)
        if task is None or task.done():
            self.followers[instrument_id] = asyncio.create_task(
                self._follower(instrument_id), name=f"follow-{instrument_id}")

    async def _follower(self, instrument_id: int) -> None:
        node = self.node
        inst = node.instruments[instrument_id]
        while True:
            # (A run with an outcome stays until the cycler says its program stopped.)
            runs = [r for r in self.runs.values()
                    if r.instrument_id == instrument_id and r.following]
            if not runs:
                return
            t_next = node.clock.now() + min(r.period_s for r in runs)
            try:
                await self._round(inst, runs)
            except Exception:  # noqa: BLE001 - the follower must outlive one bad round
                log.exception("instrument %s: follower round failed", inst.name)
            await node.clock.sleep_until(t_next)

    async def _round(self, inst: OpenInstrument, runs: list[DelegatedRun]) -> None:
        drv = inst.driver
        try:
            readings = await inst.worker.call(drv.inquire, [r.bts for r in runs])
        except InstrumentError as exc:
            for r in runs:
                if r.lost_from_t_s is None:
                    r.lost_from_t_s, r.lost_cause = r.seen_t_s, "link_lost"
                    log.warning("run %s: BTS server not answering (%s); the program runs on",
                                r.run_id, exc)
            node_hb = self.node.heartbeat.instruments
            node_hb[inst.name] = f"lost: {type(exc).__name__}: {exc}"
            return
        self.node.heartbeat.instruments[inst.name] = INSTRUMENT_OK
        self.live.put([self._live_row(r, readings[r.bts]) for r in runs
                       if readings[r.bts].test_id == r.book.test_id])
        for r in runs:
            try:
                await self._follow_one(inst, r, readings[r.bts])
            except InstrumentError as exc:  # the link went during this run's turn
                if r.lost_from_t_s is None:
                    r.lost_from_t_s, r.lost_cause = r.seen_t_s, "link_lost"
                log.warning("run %s: %s", r.run_id, exc)

    def _live_row(self, r: DelegatedRun, rd: Any) -> dict[str, Any]:
        """An inquired reading as a ``live_readings`` row (NaN: not reported)."""
        book = r.book
        index = book.step_map.get(rd.step, book.cur_index or 0)

        def num(x: float) -> float | None:
            return None if math.isnan(x) else x

        # As the records will be numbered (RecordBook.absorb); a later program whose first
        # record is not harvested yet goes on in the open cycle.
        cycle = (book.cycle.cycle_index if book.cycle_shift is None
                 else rd.cycle + book.offsets.get(index, 0) + book.cycle_shift)
        return {"run_id": r.run_id, "t_s": book.t_offset_s + rd.test_time_s,
                "ts_utc": self.node.wall_clock(), "voltage_v": num(rd.voltage_v),
                "current_a": num(rd.current_a), "temperature_c": num(rd.temperature_c),
                "step_index": index, "cycle_index": cycle,
                "state": rd.workstatus[:20], "last_seq": book.seq}

    async def _follow_one(self, inst: OpenInstrument, r: DelegatedRun, rd: Any) -> None:
        drv, book = inst.driver, r.book
        mine = rd.test_id == book.test_id
        t_seen = book.t_offset_s + rd.test_time_s if mine else r.seen_t_s
        if r.lost_from_t_s is not None:
            self._seen_again(r, t_seen)
        r.seen_t_s = max(r.seen_t_s, t_seen)
        state, reason = (rd.workstatus, rd.reason) if mine else await self._ended_as(inst, r)
        await self._commands(inst, r, state)
        if mine and state in ("working", "pause") and r.outcome is None:
            await self._check(inst, r, t_seen, rd.voltage_v, rd.current_a, rd.temperature_c,
                              "inquired")
        # (record indices count from 1 in each program: seq_base is where this one began)
        records = await inst.worker.call(drv.download_all, r.bts, book.test_id,
                                         book.seq - book.seq_base)
        h = book.absorb(records)
        # Handed to the writer before anything else can fail: the book has moved past them.
        await self._store(book, h)
        if r.outcome is None:
            for row in h.rows:
                temp = math.nan if row[8] is None else row[8]
                if await self._check(inst, r, row[2], row[6], row[7], temp, "harvested",
                                     seq=row[1]):
                    break
        if (r.outcome is None and state == "finish"
                and book.test_segment + 1 < len(r.segments)):
            await self._next_segment(inst, r, t_seen)
            return
        if r.outcome is None and state in ENDED:
            outcome = ENDED[state]
            if state == "protect":
                why = reason or "the cycler's protection tripped"
                self.node.recorder.event(SafetyTrip(
                    r.run_id, "safety", "critical",
                    f"the cycler's own protection stopped the program: {why}",
                    {"limit": "instrument_protection", "reason": why, "source": "instrument",
                     "seq": book.seq, "t_s": t_seen, "channel": r.bts}))
                r.outcome = (outcome, f"instrument protection: {why}")
            elif state == "stop":
                r.outcome = (outcome, "stopped at the cycler")
            else:
                r.outcome = (outcome, "program finished")
        if r.outcome is not None and state in ENDED:
            await self._store(book, book.close(), final=True)
            await self._finish(r, r.outcome)

    async def _next_segment(self, inst: OpenInstrument, r: DelegatedRun,
                            t_seen: float) -> None:
        """A segment's program finished: its last step is stored, then the next
        segment's chamber steps are held and its program started (:meth:`_start`)."""
        book = r.book
        await self._store(book, book.close_segment(), final=True)
        book.begin_segment(book.test_segment + 1)
        await self._pin(r)  # a restart now holds the next chamber steps, not this end
        r.following, r.in_chamber = False, True  # a stop from now ends it at once
        r.clock0 = self.node.clock.now() - t_seen
        r.starting = asyncio.create_task(self._start(r, inst), name=f"start-{r.run_id}")

    async def _end_unstarted(self, dr: DelegatedRun, outcome: tuple[str, str]) -> None:
        """End a run while no program of it runs (holding chamber steps): what the
        programs before recorded closes its last step and cycle first."""
        await self._store(dr.book, dr.book.close(), final=True)
        await self._finish(dr, outcome)

    async def _ended_as(self, inst: OpenInstrument, r: DelegatedRun) -> tuple[str, str]:
        """How the pinned test ended when the channel already runs another one (seen
        after a lost link or a restart): the last state in the test's log."""
        log_rows = await inst.worker.call(inst.driver.downloadlog, r.bts, r.book.test_id)
        for row in reversed(log_rows):
            if row.get("event") in ENDED:
                return row["event"], row.get("reason", "")
        return "stop", ""

    async def _commands(self, inst: OpenInstrument, r: DelegatedRun, state: str) -> None:
        drv, cmds = inst.driver, r.commands
        while cmds:
            action = cmds[0]  # taken off once sent: a lost link keeps it for the next round
            if state not in ("working", "pause"):
                if action == "stop" and r.book.test_segment + 1 < len(r.segments):
                    # Between two programs: the next one is not started.
                    r.outcome = ("stopped", "stop requested")
                cmds.pop(0)
                continue
            if action == "stop":
                await inst.worker.call(drv.stop, [r.bts])
                r.outcome = ("stopped", "stop requested")
            elif action == "pause" and state == "working":
                await inst.worker.call(drv.pause, [r.bts])
                state = "pause"
            elif action == "resume" and state == "pause":
                await inst.worker.call(drv.resume, [r.bts])
                state = "working"
            cmds.pop(0)

    async def _check(self, inst: OpenInstrument, r: DelegatedRun, t_s: float, v: float,
                     i: float, temp: float, where: str, seq: int | None = None) -> bool:
        """Second layer of safety on one reading: a breach stops the program at once."""
        lim = r.resolved.limits
        found = breach(lim, v, i, temp)
        if found is None:
            r.breach_since_t_s.pop(where, None)
            return False
        since = r.breach_since_t_s.setdefault(where, t_s)
        if t_s - since < lim.breach_duration_s:
            return False
        t_wall = time.monotonic()
        await inst.worker.call(inst.driver.stop, [r.bts])
        off_s = time.monotonic() - t_wall
        name, value, bound = found
        source = lim.sources.get(name, "")
        why = f"{name}: measured {value:.6g}, limit {bound:.6g}"
        r.outcome = ("aborted_safety", f"{why} (limit from {source or 'unknown'})")
        self.node.recorder.event(SafetyTrip(
            r.run_id, "safety", "critical",
            f"safety limit crossed, the cycler's program stopped: {why} "
            f"(limit from {source or 'unknown'}; {where} reading)",
            {"limit": name, "value": value, "bound": bound, "t_s": t_s, "seq": seq,
             "reading": where, "source": source, "stop_sent_s": off_s, "channel": r.bts}))
        return True

    def _seen_again(self, r: DelegatedRun, t_s: float) -> None:
        frm = r.lost_from_t_s
        assert frm is not None
        r.lost_from_t_s = None
        self.node.recorder.event(RunEvent(
            r.run_id, "interruption", "warning",
            f"labdaq could not see channel {r.bts} from t {frm:.1f} s to {t_s:.1f} s "
            f"({r.lost_cause}); the program ran on and its records were harvested: no "
            "sample is missing",
            {"cause": r.lost_cause, "from_t_s": frm, "to_t_s": t_s, "gap_s": t_s - frm,
             "last_seq": r.book.seq, "samples_missing": 0, "channel": r.bts,
             **r.lost_note}))
        r.lost_note = {}

    async def _store(self, book: RecordBook, h: Harvest, final: bool = False) -> None:
        if h.rows:
            from labdaq.engine.ledger import Ledger

            await self.node.writer.put(h.rows, Ledger(
                positions=[book.full_position()], steps=h.steps, cycles=h.cycles))
        elif h.steps or h.cycles:
            # No row to travel with (the program's end, after its last record was
            # stored): written with the final state, after the samples are flushed.
            assert final
            await self.node.writer.flush()
            for st in h.steps:
                self.node.recorder.row("step", m.Step, **st)
            for c in h.cycles:
                self.node.recorder.row("cycle", m.Cycle, **c)

    # -- ending -------------------------------------------------------------------------
    async def _finish(self, r: DelegatedRun, outcome: tuple[str, str]) -> None:
        self.runs.pop(r.run_id, None)
        self.node.aux.wiring.pop(r.run_id, None)
        try:
            await self.node.writer.flush()
        except Exception as exc:  # noqa: BLE001 - the state must still be recorded
            log.error("run %s: samples not flushed before finishing: %s", r.run_id, exc)
        self.node.recorder.finished(r.run_id, outcome, None)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)

    async def close(self) -> None:
        """Engine shutdown: stop following (the programs run on; a restart resumes)."""
        await self.waits.close()
        await self.live.close()
        tasks = [*self.followers.values(),
                 *(r.starting for r in self.runs.values() if r.starting is not None)]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, *self._finishing, return_exceptions=True)
        self.followers.clear()
