"""InstrumentGroup: one acquisition loop per instrument, vectorised over its channels.

Each tick reads every active channel of the instrument in one call (one query on a
cabinet), lays the wired thermocouples' last readings over its temperatures
(:mod:`.group_sensors`), then integrates capacity and energy, checks safety limits,
evaluates end conditions and builds the sample rows for all channels with a handful of
numpy operations, so the per-sample Python work stays small (docs/architecture.md,
"Processes"). Only step and phase boundaries run per-channel Python
(:mod:`labdaq.engine.channel`).

This module holds the group's state, runs joining and leaving, and the hot loop (about
480 lines: joining in one step, ``add_many``, must interleave with the loop's ticks under
the same lock and arrays, so it stays next to the loop). Its
other jobs have modules of their own, which the class inherits because they change the
same per-run arrays under the same lock (``_busy``): breaches, edge samples, gaps and
the hand-off of rows (:mod:`.group_edges`), commands and losing the instrument
(:mod:`.group_commands`), temperature sensors (:mod:`.group_sensors`). Per-run state that
changes every tick lives in arrays (:mod:`.run_arrays`); safety limits and end conditions
are :mod:`.safety` and :mod:`.end_conditions`. Rows go to the sample sink with their
ledger: the runs' fast state after them, and at phase boundaries the runs' full positions
and the steps and cycles the boundary completed (:mod:`.ledger`), so positions are
committed with the rows they count. What the group has to tell the node it emits as typed
events (:mod:`.events`); commands reach it through its inbox
(:meth:`InstrumentGroup.command`).

Order of work in a tick: measure → integrate (numpy only, nothing awaited; the step's
charge is a limit) → safety (outputs off first) → end conditions → store → transitions
(instrument commands first, then records). A phase change is followed by one more
measurement of the channels that changed ("edge" sample): it is stored, so the stored
samples show the current step and integrate exactly like the engine did, and it gives the
DC internal resistance of pulse steps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np

from labdaq.drivers.roles import Cycler
from labdaq.engine.aux_temps import WiredTemperatures
from labdaq.engine.channel import ChannelRun, Phase, Transition
from labdaq.engine.clock import EngineClock
from labdaq.engine.end_conditions import EndConditions
from labdaq.engine.events import AuxRequested, Command, Emit, RunEnded
from labdaq.engine.group_buffered import GroupBuffered, is_buffered
from labdaq.engine.group_edges import (  # noqa: F401 - the flags are imported from here
    _STATS_MAX,
    FLAG_BREACH,
    FLAG_EDGE,
    FLAG_PAUSED,
    FLAG_RESUMED,
    _add_records,
)
from labdaq.engine.ledger import Ledger
from labdaq.engine.run_arrays import RunArrays
from labdaq.engine.safety import Limits
from labdaq.engine.setpoints import LOST_INSTRUMENT, Outputs
from labdaq.engine.sink import SampleSink, SinkLost

log = logging.getLogger(__name__)


class InstrumentGroup(GroupBuffered):
    def __init__(
        self,
        name: str,
        driver: Cycler,
        call: Callable[..., Awaitable[Any]],
        clock: EngineClock,
        writer: SampleSink,
        emit: Emit,
        control_period_s: float = 1.0,
        phase: float = 0.0,
        temperatures: WiredTemperatures | None = None,
    ) -> None:
        self.name = name
        # The channels' wired temperature sensors (aux_temps.py); their readings replace
        # the cycler's own temperature (an SMU has none) in every sample.
        self.temperatures = temperatures
        self._tc_slot = np.zeros(0, np.int64)  # per run: its sensor's slot, -1 none
        self._tc_any = False
        self._sensor_lost = np.zeros(0, bool)  # per run: its wired sensor is lost
        self._lost_at_breach: set[int] = set()  # runs whose breach came with a lost sensor
        # A cycler with a sensor per channel (a cabinet): its NaN temperature is a lost
        # sensor too, for the runs without a wired thermocouple.
        self._own_sensor = bool(getattr(driver, "has_temperature_sensor", False))
        # Where in its period this loop ticks (0..1): groups of one node are spread over
        # the period so their ticks do not all fall due at the same moment and wait for
        # each other on the one event loop.
        self.phase = phase % 1.0
        # Limits and end conditions are checked at least this often (simulated seconds),
        # however long the storage period: a 10 s sample period must not let the voltage
        # run 250 mV past a cut-off at the knee of a discharge curve.
        self.control_period_s = control_period_s
        self.driver = driver
        self.call = call
        self.clock = clock
        self.writer = writer
        # The group's one outlet (events.py); it never calls into the node otherwise.
        self.emit = emit
        # Commands for its runs by run id, taken at the next tick (or when the run joins).
        self._inbox: dict[int, list[tuple[Command, str | None]]] = {}
        self.runs: list[ChannelRun] = []
        self._phases: list[Phase] = []
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._busy = asyncio.Lock()  # a tick, or a run joining
        self._closing = False
        self.ticks = 0
        self.lateness_s: list[float] = []  # wall seconds late per tick (for benchmarks)
        self.breach_to_off_s: list[float] = []  # measurement in → output-off command sent
        self.breach_to_ack_s: list[float] = []  # measurement in → output-off acknowledged
        # run id → its breach's (to command sent, to acknowledged) times
        self._breach_to_off: dict[int, tuple[float, float]] = {}
        self.outputs = Outputs(name, driver, call)
        # Set points of runs joining from outside the loop: each command waits while a
        # tick is due (call_between_ticks).
        self._join_outputs = Outputs(name, driver, self.call_between_ticks)
        # The deadline of the tick the loop waits for, until that tick has measured
        # (inf: none due); set when it has.
        self._due_s = math.inf
        self._measured = asyncio.Event()
        self.state = RunArrays()
        self._prev_runs: list[ChannelRun] = []
        self._requests = False  # a command is waiting in the inbox
        self.chans: list[int] = []
        # The instrument logs on its own clock and the loop fetches blocks of readings
        # (group_buffered.py) instead of one query per tick.
        self.buffered = is_buffered(driver)
        self._buffered_init()
        self._limits_changed()
        self._load_phases()

    # -- membership --------------------------------------------------------------------
    async def add(self, run: ChannelRun, phase: Phase, t0_clock_s: float) -> None:
        await self._logging_for([run.period_s])  # buffered acquisition only
        # Not in the middle of a tick: it holds arrays sized for the runs it measured.
        async with self._busy:
            await self._add(run, phase, t0_clock_s)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"group-{self.name}")

    async def _add(self, run: ChannelRun, phase: Phase, t0_clock_s: float) -> None:
        before = self.clock.now()
        # A run resumed while paused (its engine restarted) keeps its output off until a
        # resume request, which applies the set point as after any pause.
        rejoin_paused = run.pause_requested and not run.paused
        if rejoin_paused:
            await self._outputs_off([run.channel])
            run.paused = True
        else:
            await self._apply(run, phase)
        # The run's clock starts when its set point is in place, not when it was asked
        # for: programming an instrument takes round trips (tens of ms each on a link
        # with delayed ACKs), which the first step's duration must not lose.
        t0_clock_s += self.clock.now() - before
        self.runs.append(run)
        self._phases.append(phase)
        self._requests = True  # it may have been sent a command before it joined
        k = self.state.append(run, t0_clock_s)
        if rejoin_paused:
            run.pause_t_s = self.clock.now() - t0_clock_s
        self.chans = [r.channel for r in self.runs]
        self._limits_changed()
        self._load_phases()
        # The first stored sample is taken right after the set point is applied, so the
        # stored samples start where the engine's integration starts; a resumed run's
        # first sample after the gap says so in its flags.
        flags = (FLAG_EDGE | (FLAG_RESUMED if run.seq else 0)
                 | (FLAG_PAUSED if run.paused else 0))
        try:
            breached = await self._edge(
                [k], {}, flags, integrate=False,
                ledger=Ledger(positions=[self._full_position(k)]),
                # The storage times a resumed run was away for are missed (gaps.py).
                resumed_from_t_s=run.resumed_from_t_s if run.seq else None)
        except BaseException:
            # A join that did not complete leaves no trace here: the caller still owns
            # the run (it may wait for a lost instrument and join again), and this loop
            # must not also hand it on. The failing measurement came before any row.
            self._remove(k)
            raise
        if breached:
            self._remove(k)
            await self.emit(RunEnded(run))

    async def add_many(self, items: Sequence[tuple[ChannelRun, Phase]],
                       t0_clock_s: float) -> None:
        """Runs starting together (a scheduler round's claims on this instrument) join in
        one step, so their joining does not stall the loop for the runs already here.

        Their channels are programmed before the group's lock is taken: the loop does not
        measure them yet, so it ticks on meanwhile, and the instrument's worker thread
        keeps its commands in order with the loop's (a tick waits for at most the one
        exchange in flight). Only the joiners' first reading (one query for all of them)
        and growing the arrays once happen under the lock, between two ticks; their first
        storage period starts from that reading, so no period is owed before they exist.
        A resumed run (``seq`` > 0) or one rejoining paused joins alone (:meth:`add`)."""
        fresh: list[tuple[ChannelRun, Phase]] = []
        for r, p in items:
            if r.seq or (r.pause_requested and not r.paused):
                await self.add(r, p, t0_clock_s)
            else:
                fresh.append((r, p))
        if not fresh:
            return
        await self._logging_for([r.period_s for r, _ in fresh])  # buffered acquisition only
        before = self.clock.now()
        await self._apply_many(fresh, self._join_outputs)
        # As in _add: the runs' clocks start when their set points are in place.
        t0_clock_s += self.clock.now() - before
        async with self._busy:
            await self._join(fresh, t0_clock_s)
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"group-{self.name}")

    async def _join(self, items: list[tuple[ChannelRun, Phase]], t0_clock_s: float) -> None:
        """Fresh runs whose set points are in place into the arrays, and their first,
        stored reading (one query for all of them)."""
        runs = [r for r, _ in items]
        self.runs.extend(runs)
        self._phases.extend(p for _, p in items)
        self._requests = True  # a command may have come before they joined
        ks = self.state.extend(runs, t0_clock_s)
        self.chans = [r.channel for r in self.runs]
        self._limits_changed()
        self._load_phases()
        try:
            breached = await self._edge(
                ks, {}, FLAG_EDGE, integrate=False,
                ledger=Ledger(positions=[self._full_position(k) for k in ks]))
        except BaseException:
            # As in _add: a join that did not complete leaves no trace here.
            for k in reversed(ks):
                self._remove(k)
            raise
        for k in sorted(breached, reverse=True):
            r = self.runs[k]
            self._remove(k)
            await self.emit(RunEnded(r))

    async def _measure(self, chans: list[int]) -> Any:
        """Every channel in one query: on the loop's thread where the driver can
        (``ameasure``: no worker-thread hand-off each tick), else in the worker thread."""
        meas = await self.driver.ameasure(chans)
        if meas is not None:
            return meas
        return await self.call(self.driver.measure, chans)

    @property
    def phases(self) -> list[Phase]:
        """The phase each run (same order as ``runs``) is in (read-only use)."""
        return self._phases

    def _remove(self, k: int) -> None:
        self._pull(k)
        self._inbox.pop(self.runs[k].run_id, None)
        del self.runs[k], self._phases[k]
        self.state.delete(k)
        self.chans = [r.channel for r in self.runs]
        self._limits_changed()
        self._load_phases()

    def _limits_changed(self) -> None:
        self.limits = Limits(self.runs)
        if self.temperatures is not None:
            periods = np.minimum(self.state.period_s, self.control_period_s).tolist()
            self._tc_slot = self.temperatures.update_group(
                self.name, [(r.run_id, p) for r, p in zip(self.runs, periods, strict=True)])
            self._tc_any = bool((self._tc_slot >= 0).any())
        lost = {r.run_id for r, was in zip(self._prev_runs, self._sensor_lost, strict=True)
                if was}
        self._sensor_lost = np.array([r.run_id in lost for r in self.runs], bool)
        self._prev_runs = list(self.runs)

    def _load_phases(self) -> None:
        self.ends = EndConditions(self._phases, self.runs)

    def _push(self, k: int) -> None:
        self.state.push(k, self.runs[k])

    def _pull(self, k: int) -> None:
        self.state.pull(k, self.runs[k])

    def _full_position(self, k: int) -> dict[str, Any]:
        """Run ``k``'s whole position now (ledger.Ledger.positions)."""
        self._pull(k)
        r = self.runs[k]
        return {
            "run_id": r.run_id,
            "step_index": r.step.index if r.step is not None else r.pc,
            "step_count": len(r.program),
            "cycle_index": r.cycle.cycle_index,
            "position": r.position(),
        }

    async def _apply(self, run: ChannelRun, phase: Phase) -> None:
        await self._apply_many([(run, phase)])

    async def _apply_many(self, items: list[tuple[ChannelRun, Phase]],
                          outputs: Outputs | None = None) -> None:
        """Set points for runs' new phases (channels with the same ones in one command
        where the instrument takes lists), then each auxiliary step's request."""
        await (outputs or self.outputs).apply_many(
            [(run.channel, phase) for run, phase in items])
        for run, phase in items:
            if phase.aux is not None:
                run.aux_done, run.aux_error = False, None
                await self.emit(AuxRequested(run, phase))

    async def _outputs_off(self, chans: Sequence[int]) -> float:
        return await self.outputs.off(chans)

    async def call_between_ticks(self, fn: Callable[..., Any], *args: Any) -> Any:
        """A command from outside the loop (a run joining, its protection): sent only
        while no tick is due. The instrument's worker keeps commands in submission order,
        so a tick waits for the exchange in flight when it falls due; without this, a
        joining run's next command could go out between the deadline and the moment the
        loop's coroutine gets to submit its measurement (a busy event loop resumes the
        joiner first), and every command of a join could stand in front of it."""
        while self.clock.now() >= self._due_s:
            await self._measured.wait()
        return await self.call(fn, *args)

    def _tick_measured(self) -> None:
        self._due_s = math.inf
        self._measured.set()

    # -- the loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        if self.buffered:
            try:
                await self._loop_buffered()
            finally:
                self._task = None
            return
        try:
            await self._loop_ticks()
        finally:
            # Also a loop cancelled while it waited for a deadline: no joiner waits on it.
            self._tick_measured()
            self._task = None

    async def _loop_ticks(self) -> None:
        period = min(float(self.state.period_s.min()), self.control_period_s)
        deadline = self.clock.now() + self.phase * period - period
        while self.runs and not self._closing:
            period = min(float(self.state.period_s.min()), self.control_period_s)
            deadline += period
            self._measured.clear()
            self._due_s = deadline
            await self.clock.sleep_until(deadline)
            # Lateness against the tick's own deadline, also when ticks were missed.
            late = self.clock.wall_lateness_s(deadline)
            self.lateness_s.append(late)
            if len(self.lateness_s) > _STATS_MAX:
                del self.lateness_s[: _STATS_MAX // 2]
            if late * self.clock.speed > period:
                # Fell behind by more than a tick: re-anchor instead of bursting.
                deadline = self.clock.now()

            async def tick(deadline: float = deadline, period: float = period) -> None:
                async with self._busy:
                    await self._tick(deadline, period)

            try:
                await self._guarded(tick)
            finally:
                self._tick_measured()  # also a tick that ended before its measurement

    async def _guarded(self, step: Callable[[], Awaitable[None]]) -> None:
        """One tick (or one fetch of the buffered loop), with the loop's handling of its
        failures."""
        try:
            await step()
        except LOST_INSTRUMENT as exc:
            # The transport has already reconnected with backoff and given up.
            log.error("instrument %s lost: %s", self.name, exc)
            await self._interrupt_all(exc)
        except SinkLost as exc:
            # Neither the instrument's fault nor the runs': outputs off, runs kept. The
            # node stops and is restarted, and resumes them from their committed samples.
            log.error("instrument %s: outputs off, sample writer gone: %s", self.name, exc)
            await self._outputs_off(list(self.chans))
            self._closing = True
        except Exception as exc:  # noqa: BLE001 - make every channel safe, then report
            log.exception("instrument %s: acquisition failed", self.name)
            await self._fail_all(f"{type(exc).__name__}: {exc}")

    async def _tick(self, deadline: float | None = None, tick_s: float | None = None) -> None:
        """One look at every channel. ``deadline`` is the tick's scheduled time on the
        engine clock and ``tick_s`` the loop's period (None: now, and each run's own)."""
        await self._handle_requests()
        runs = self.runs
        n = len(runs)
        if not n:
            return
        # A sample's time is when its query went out: the instrument takes the reading
        # after that and before it replies, so the time never follows the reading, and
        # no reply transfer, parse or loop wake-up is added to it (pulse/DCIR analysis
        # relies on it). The tick's lateness is in lateness_s.
        now_clock = self.clock.now()
        ts_utc = time.time()
        meas = await self._measure(self.chans)
        t_meas = time.perf_counter()
        self._tick_measured()
        self.ticks += 1
        meas = np.asarray(meas, float).reshape(n, 3)
        v, i, temp = meas[:, 0].copy(), meas[:, 1].copy(), meas[:, 2].copy()
        t = now_clock - self.state.t0_clock_s
        # Wired sensors: their last scan (aux_temps.py); a stale one is checked by nothing.
        wired, temp, temp_rows, temp_flags, temp_age = self._reading_temperatures(
            now_clock, temp)

        # 1. Integrate (trapezoids) since the previous reading: numpy only, nothing
        # awaited, so it does not delay the safety check, which needs the charge moved.
        # The previous reading and step capacity stay at hand: an end condition's crossing
        # lies between the two.
        st = self.state
        paused = st.paused
        prev = self._previous()
        st.integrate(slice(None), t, v, i, ~paused)

        # 2. Safety, on every measurement of every channel; outputs off at once.
        breach = await self._check(slice(None), t, v, i, temp, t_meas,
                                   None if wired is None else wired.lost)
        breached = np.flatnonzero(breach).tolist()

        # 3. End conditions, all runs at once.
        fast = np.minimum(st.period_s, self.control_period_s)
        hits = self.ends.evaluate(runs, st, t, v, i, temp, fast)
        ended = hits.ended & ~paused & ~breach

        # 4. Store due samples (every breach and every phase end is stored too). A run's
        # storage time goes to the tick *scheduled* nearest to it: judged on the measured
        # time, a storage time half a tick from the tick grid (a run joins at any moment)
        # would fall before or after a tick by timer jitter alone, one sample early and
        # the next one a tick late, losing a sample period.
        half = 0.5 * (fast if tick_s is None else tick_s)
        t_sched = t if deadline is None else deadline - self.state.t0_clock_s
        reach = t_sched + half  # the tick serves the storage times before this
        idx, miss, due_t_s = self._due(reach, breach | ended)
        if idx.size:
            rows, ledger = self._due_rows(idx, t, v, i, temp_rows, temp_age, temp_flags,
                                          breach, miss, due_t_s, ts_utc)
            await self._put(idx, rows, ledger)
        st.last_t_s, st.last_voltage_v, st.last_current_a, st.last_temperature_c = t, v, i, temp

        # 5. Per-channel Python only where something happened.
        if wired is not None and (wired.lost != self._sensor_lost).any():
            await self._sensor_changes(np.arange(n), wired.lost)
        done: list[int] = []
        for k in breached:
            await self._report_breach(k, float(v[k]), float(i[k]), float(temp[k]), float(t[k]))
            done.append(k)
        for k, r in enumerate(runs):
            if r.aux_error is not None and k not in done:
                r.outcome = ("failed", r.aux_error)
                done.append(k)
        changed: list[int] = []
        before: dict[int, tuple[float, float]] = {}
        finished: list[tuple[int, Transition]] = []
        for k in np.flatnonzero(ended).tolist():
            if k in done:
                continue
            r = runs[k]
            t_end = float(t[k])
            reason = hits.reason(k)
            self._pull(k)
            crossing = self.ends.crossing(k, reason, prev, st, t, v, i, temp)
            tr = r.phase_ended(reason, t_end, float(v[k]), float(i[k]), crossing)
            # Back into the arrays before anything awaits: positions are built from them.
            self._push(k)
            # Instrument first: the next set point (or output off) before any record.
            if tr.done or tr.next_phase is None:
                await self._outputs_off([r.channel])
                r.outcome = r.outcome or ("completed", "all steps done")
                done.append(k)
            else:
                self._phases[k] = tr.next_phase  # its set points follow, all at once
                self.state.dvdt_ref_voltage_v[k] = np.nan
                changed.append(k)
                before[k] = (float(v[k]), float(i[k]))
            finished.append((k, tr))
        if changed:
            # Channels whose new phases ask for the same set points get them in one
            # command (most end together at the same step of the same protocol).
            await self._apply_many([(runs[k], self._phases[k]) for k in changed])
            self._load_phases()
            # The steps and cycles these phase ends completed, and the runs' new
            # positions, are committed with the first rows of the new phases.
            ledger = Ledger(positions=[self._full_position(k) for k in changed])
            for k, tr in finished:
                if k in before:
                    _add_records(ledger, runs[k].run_id, tr)
            done += await self._edge(changed, before, FLAG_EDGE, ledger=ledger)
        for k, tr in finished:
            if k not in before:
                # Ended: recorded once its last samples are committed (the node flushes).
                runs[k].closing.append(tr)
        for k in sorted(set(done), reverse=True):
            r = runs[k]
            self._remove(k)
            await self.emit(RunEnded(r))
