"""InstrumentGroup: one acquisition loop per instrument, vectorised over its channels.

Each tick reads every active channel of the instrument in one call (one query on a
cabinet), lays the wired thermocouples' last readings over its temperatures
(:mod:`.aux_temps`), then integrates capacity and energy, checks safety limits, evaluates
end conditions and builds the sample rows for all channels with a handful of numpy
operations, so the per-sample Python work stays small (docs/architecture.md,
"Processes"). Only step and phase boundaries run per-channel Python
(:mod:`labdaq.engine.channel`).

Per-run state that changes every tick lives in arrays (:mod:`.run_arrays`), safety
limits and end conditions have modules of their own (:mod:`.safety`,
:mod:`.end_conditions`). Rows go to the sample sink with their ledger: the runs' fast state
after them, and at phase boundaries the runs' full positions and the steps and cycles the
boundary completed (:mod:`.ledger`), so positions are committed with the rows they count.
What the group has to tell the node it emits as typed events (:mod:`.events`); commands
reach it through its inbox (:meth:`InstrumentGroup.command`).

Order of work in a tick: measure → integrate (numpy only, nothing awaited; the step's
charge is a limit) → safety (outputs off first) → end conditions → store → transitions
(instrument commands first, then records). A phase change is followed by one more
measurement of the channels that changed ("edge" sample): it is stored, so the stored
samples show the current step and integrate exactly like the engine did, and it gives the
DC internal resistance of pulse steps.

Why ~650 lines, over the engine's ~450: the loop, runs joining and leaving, the commands
it takes and the wired temperatures laid over its readings all change the same per-run
arrays under one lock (``_busy``); split further, each part would reach into the others'
state.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from labdaq.drivers.roles import Cycler
from labdaq.engine.aux_temps import FLAG_TEMP_LOST, Overlay, WiredTemperatures
from labdaq.engine.channel import ChannelRun, Phase, Transition
from labdaq.engine.clock import EngineClock
from labdaq.engine.end_conditions import EndConditions, Previous
from labdaq.engine.events import (
    AuxRequested,
    Command,
    Emit,
    InstrumentLost,
    RunEnded,
    RunEvent,
)
from labdaq.engine.gaps import FLAG_GAP, gap_record, missed, outage_missed
from labdaq.engine.ledger import Ledger
from labdaq.engine.run_arrays import BoolArray, FloatArray, IntArray, RunArrays
from labdaq.engine.safety import Limits, breach_event
from labdaq.engine.setpoints import LOST_INSTRUMENT, Outputs
from labdaq.engine.sink import SampleSink, SinkLost
from labdaq.storage.models import SampleFlag

log = logging.getLogger(__name__)


# Sample flags as plain ints for numpy (SampleFlag is the definition).
FLAG_BREACH = int(SampleFlag.BREACH)
FLAG_PAUSED = int(SampleFlag.PAUSED)
FLAG_RESUMED = int(SampleFlag.RESUMED)
FLAG_EDGE = int(SampleFlag.EDGE)

#: Lateness/breach statistics kept for benchmarks (bounded; oldest half dropped).
_STATS_MAX = 100_000

class InstrumentGroup:
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
        self.state = RunArrays()
        self._prev_runs: list[ChannelRun] = []
        self._requests = False  # a command is waiting in the inbox
        self.chans: list[int] = []
        self._limits_changed()
        self._load_phases()

    # -- membership --------------------------------------------------------------------
    async def add(self, run: ChannelRun, phase: Phase, t0_clock_s: float) -> None:
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

    async def _measure(self, chans: list[int]) -> Any:
        """Every channel in one query: on the loop's thread where the driver can
        (``ameasure``: no worker-thread hand-off each tick), else in the worker thread."""
        meas = await self.driver.ameasure(chans)
        if meas is not None:
            return meas
        return await self.call(self.driver.measure, chans)

    def command(self, run_id: int, cmd: Command, detail: str | None = None) -> None:
        """Queue a command for a run (``detail``: why an auxiliary step failed); the
        group acts on it at its next tick, at a safe point of its loop."""
        self._inbox.setdefault(run_id, []).append((cmd, detail))
        self._requests = True
        self._wake.set()

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

    def _temperatures(self, sel: slice | IntArray, now_clock: float,
                      temp: FloatArray) -> Overlay | None:
        """The wired sensors' readings for runs ``sel``, and which runs' sensors are lost
        (None: no run has a wired sensor and none is or was lost)."""
        wired = None
        if self._tc_any and self.temperatures is not None:
            wired = self.temperatures.overlay(self._tc_slot[sel], now_clock, temp)
        if not self._own_sensor:
            return wired
        own = np.isnan(temp)
        if wired is not None:
            own &= self._tc_slot[sel] < 0
        if not own.any() and not self._sensor_lost[sel].any():
            return wired
        if wired is None:
            wired = Overlay(temp, temp, np.full(len(temp), np.nan),
                            np.zeros(len(temp), np.int64), np.zeros(len(temp), bool))
        return Overlay(wired.check_c, wired.stored_c, wired.age_s,
                       wired.flags | np.where(own, FLAG_TEMP_LOST, 0), wired.lost | own)

    def _sensor_info(self, k: int) -> dict[str, Any]:
        """Run ``k``'s temperature sensor, for events: ``where`` names it."""
        slot = int(self._tc_slot[k]) if k < len(self._tc_slot) else -1
        if slot >= 0 and self.temperatures is not None:
            info = self.temperatures.describe(slot)
            return {**info, "where": f"{info['logger']} channel {info['channel']}"}
        ch = self.runs[k].channel
        return {"instrument": self.name, "channel": ch, "cause": "open",
                "error": "no reading (open or dropped out)",
                "where": f"{self.name} channel {ch} (the cycler's own sensor)"}

    async def _sensor_changes(self, sel: IntArray, lost: BoolArray) -> None:
        """An event for each run whose wired sensor was lost or came back (``lost`` for
        runs ``sel``, after their rows were stored)."""
        for j, k in enumerate(sel.tolist()):
            if bool(lost[j]) == bool(self._sensor_lost[k]):
                continue
            self._sensor_lost[k] = bool(lost[j])
            r = self.runs[k]
            info = self._sensor_info(k)
            data = {**info, "t_s": float(self.state.t_s[k]), "seq": int(self.state.seq[k])}
            where = info["where"]
            if lost[j]:
                await self.emit(RunEvent(
                    r.run_id, "sensor", "error",
                    f"temperature sensor lost: {where}: {info['error'] or info['cause']}",
                    data))
            else:
                await self.emit(RunEvent(r.run_id, "sensor", "info",
                                         f"temperature sensor reads again: {where}", data))

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
        await self.outputs.apply(run.channel, phase)
        if phase.aux is not None:
            run.aux_done, run.aux_error = False, None
            await self.emit(AuxRequested(run, phase))

    async def _outputs_off(self, chans: Sequence[int]) -> float:
        return await self.outputs.off(chans)

    # -- the loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        period = min(float(self.state.period_s.min()), self.control_period_s)
        deadline = self.clock.now() + self.phase * period - period
        while self.runs and not self._closing:
            period = min(float(self.state.period_s.min()), self.control_period_s)
            deadline += period
            await self.clock.sleep_until(deadline)
            # Lateness against the tick's own deadline, also when ticks were missed.
            late = self.clock.wall_lateness_s(deadline)
            self.lateness_s.append(late)
            if len(self.lateness_s) > _STATS_MAX:
                del self.lateness_s[: _STATS_MAX // 2]
            if late * self.clock.speed > period:
                # Fell behind by more than a tick: re-anchor instead of bursting.
                deadline = self.clock.now()
            try:
                async with self._busy:
                    await self._tick(deadline, period)
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
        self._task = None

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
        self.ticks += 1
        meas = np.asarray(meas, float).reshape(n, 3)
        v, i, temp = meas[:, 0].copy(), meas[:, 1].copy(), meas[:, 2].copy()
        t = now_clock - self.state.t0_clock_s
        # Wired sensors: their last scan (aux_temps.py); a stale one is checked by nothing.
        wired = self._temperatures(slice(None), now_clock, temp)
        temp_rows, temp_flags, temp_age = temp, None, None
        if wired is not None:
            temp, temp_rows, temp_flags = wired.check_c, wired.stored_c, wired.flags
            temp_age = wired.age_s

        # 1. Integrate (trapezoids) since the previous reading: numpy only, nothing
        # awaited, so it does not delay the safety check, which needs the charge moved.
        # The previous reading and step capacity stay at hand: an end condition's crossing
        # lies between the two.
        st = self.state
        paused = st.paused
        prev = Previous(st.last_t_s, st.last_voltage_v, st.last_current_a,
                        st.last_temperature_c,
                        st.step_capacity_ah.copy() if self.ends.present["capacity"]
                        else st.step_capacity_ah)
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
        due_t_s = st.next_due_t_s
        on_grid = reach > due_t_s
        due = on_grid | breach | ended
        # Only a row on the storage grid moves the next storage time on: a row stored off
        # it (a phase end, a breach) is extra, and the period after it is still sampled.
        next_due = np.where(on_grid, due_t_s + st.period_s, due_t_s)
        # A later storage time is due as well (a late tick): the tick serves the last
        # one, the ones before it went by unsampled (missed periods, gaps.py), and the
        # run goes on with the storage time after it — on its grid, no catch-up burst.
        skipped = next_due < reach
        miss = None
        if skipped.any():
            miss = missed(reach, due_t_s, st.period_s, skipped)
            next_due = np.where(skipped, due_t_s + (miss + 1) * st.period_s, next_due)
        st.next_due_t_s = next_due
        idx = np.flatnonzero(due)
        if idx.size:
            flags: Any = np.where(breach[idx], FLAG_BREACH, 0) | np.where(paused[idx],
                                                                          FLAG_PAUSED, 0)
            if temp_flags is not None:
                flags = flags | temp_flags[idx]
            ledger = None if miss is None else self._gaps(idx, miss, due_t_s, flags, ts_utc)
            await self._put(idx, st.rows(idx, t[idx], v[idx], i[idx], temp_rows[idx], ts_utc,
                                         flags, None if temp_age is None else temp_age[idx]),
                            ledger)
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
                await self._apply(r, tr.next_phase)
                self._phases[k] = tr.next_phase
                self.state.dvdt_ref_voltage_v[k] = np.nan
                changed.append(k)
                before[k] = (float(v[k]), float(i[k]))
            finished.append((k, tr))
        if changed:
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

    async def _check(
        self,
        sel: slice | IntArray,
        t: FloatArray,
        v: FloatArray,
        i: FloatArray,
        temp: FloatArray,
        t_meas: float,
        sensor_lost: BoolArray | None = None,
    ) -> BoolArray:
        """Limits of runs ``sel`` against one reading each (aligned arrays) and the charge
        each moved in its step; outputs off for every run whose breach has lasted its
        debounce time, before anything else. Returns the breach mask; ``t_meas``
        (perf_counter when the reading arrived) is where the breach-to-off time starts."""
        breach, since = self.limits.breaching(sel, t, v, i, temp,
                                              self.state.breach_since_t_s[sel],
                                              self.state.step_capacity_ah[sel], sensor_lost)
        self.state.breach_since_t_s[sel] = since
        if breach.any():
            ks = np.arange(len(self.runs))[sel][breach].tolist()
            sent_s = await self._outputs_off([self.chans[k] for k in ks])
            # From the breaching reading to the off command on the wire, and to the
            # instrument having acknowledged it (its error queue read back empty).
            ack_s = time.perf_counter() - t_meas
            off_s = sent_s - t_meas  # NaN when no off command could be sent
            for stats, x in ((self.breach_to_off_s, off_s), (self.breach_to_ack_s, ack_s)):
                if math.isfinite(x):
                    stats.append(x)
                if len(stats) > _STATS_MAX:
                    del stats[: _STATS_MAX // 2]
            for k in ks:
                self._breach_to_off[self.runs[k].run_id] = (off_s, ack_s)
            if sensor_lost is not None:
                lost_ids = np.asarray(self.state.run_id[sel])[breach & sensor_lost]
                self._lost_at_breach.update(lost_ids.tolist())
        return np.asarray(breach, bool)

    async def _report_breach(self, k: int, v: float, i: float, temp: float, t: float) -> None:
        """The event and outcome of run ``k``'s breach (its output is already off and the
        breaching reading stored)."""
        self._pull(k)
        r = self.runs[k]
        off_s, ack_s = self._breach_to_off.pop(r.run_id, (math.nan, math.nan))
        sensor = self._sensor_info(k) if r.run_id in self._lost_at_breach else None
        self._lost_at_breach.discard(r.run_id)
        await self.emit(breach_event(self.limits, r, k, v, i, temp, t, off_s, ack_s,
                                     float(self.state.step_capacity_ah[k]), sensor))

    def _gaps(self, idx: IntArray, miss: IntArray, due_t_s: FloatArray, flags: NDArray[Any],
              ts_utc: float) -> Ledger:
        """The gaps of runs ``idx`` that missed storage times (``miss``, by run; the first
        missed one is ``due_t_s``) for the ledger of their next rows; flags those rows
        GAP (``flags``, aligned with ``idx``, in place)."""
        ledger = Ledger()
        st = self.state
        for j, k in enumerate(idx.tolist()):
            n = int(miss[k])
            if n <= 0:
                continue
            r = self.runs[k]
            r.missed_periods += n
            flags[j] |= FLAG_GAP
            ledger.gaps.append(gap_record(
                r.run_id, int(st.seq[k]) + 1, n, float(due_t_s[k]), float(st.period_s[k]),
                ts_utc, r.missed_periods, "late"))
        return ledger

    async def _put(self, idx: IntArray, rows: list[tuple[Any, ...]],
                   ledger: Ledger | None = None) -> None:
        """Hand runs ``idx``'s new rows to the sink with their fast state (and ``ledger``):
        the positions committed with them count exactly these rows."""
        if ledger is None:
            ledger = Ledger()
        ledger.fast.append(self.state.fast(idx))
        await self.writer.put(rows, ledger)

    async def _edge(
        self,
        changed: list[int],
        before: dict[int, tuple[float, float]],
        flags: int,
        integrate: bool = True,
        ledger: Ledger | None = None,
        resumed_from_t_s: float | None = None,
    ) -> list[int]:
        """Measure the channels whose set points just changed; check it against the
        limits like any reading, store it and make it the integration anchor (integrating
        up to it unless the run has just joined). ``ledger`` (the runs' new positions,
        steps and cycles their last phase completed) goes with the rows. Returns the runs
        that breached. ``resumed_from_t_s`` (one run, resumed after an outage): the time
        of its last stored sample; the storage times since then are a gap."""
        idx = np.asarray(changed, np.int64)
        now_clock = self.clock.now()
        t2 = now_clock - self.state.t0_clock_s[idx]  # before the query, as in _tick
        ts_utc = time.time()
        m2 = await self.call(self.driver.measure, [self.chans[k] for k in changed])
        t_meas = time.perf_counter()
        m2 = np.asarray(m2, float).reshape(len(changed), 3)
        v2, i2, temp2 = m2[:, 0].copy(), m2[:, 1].copy(), m2[:, 2].copy()
        wired = self._temperatures(idx, now_clock, temp2)
        temp_rows, temp_age = temp2, None
        if wired is not None:
            temp2, temp_rows, temp_age = wired.check_c, wired.stored_c, wired.age_s
        if integrate:
            self.state.integrate(idx, t2, v2, i2, np.ones(len(changed), bool))
        breach = await self._check(idx, t2, v2, i2, temp2, t_meas,
                                   None if wired is None else wired.lost)
        st = self.state
        st.last_t_s[idx], st.last_voltage_v[idx], st.last_current_a[idx] = t2, v2, i2
        st.last_temperature_c[idx] = temp2
        row_flags: Any = np.full(len(changed), flags) | np.where(breach, FLAG_BREACH, 0)
        if wired is not None:
            row_flags = row_flags | wired.flags
        n_missed = 0
        if resumed_from_t_s is not None:
            r0 = self.runs[changed[0]]
            n_missed = outage_missed(resumed_from_t_s, float(t2[0]), r0.period_s)
            if n_missed:
                row_flags[0] |= FLAG_GAP
                ledger = ledger or Ledger()
                ledger.gaps.append(gap_record(
                    r0.run_id, int(self.state.seq[changed[0]]) + 1, n_missed,
                    resumed_from_t_s + r0.period_s, r0.period_s, ts_utc,
                    r0.missed_periods + n_missed, "interruption"))
        await self._put(idx, self.state.rows(idx, t2, v2, i2, temp_rows, ts_utc, row_flags,
                                             temp_age),
                        ledger)
        if n_missed:
            self.runs[changed[0]].missed_periods += n_missed
        if wired is not None and (wired.lost != self._sensor_lost[idx]).any():
            await self._sensor_changes(idx, wired.lost)
        breached: list[int] = []
        for j, k in enumerate(changed):
            if breach[j]:
                await self._report_breach(
                    k, float(v2[j]), float(i2[j]), float(temp2[j]), float(t2[j])
                )
                breached.append(k)
                continue
            r = self.runs[k]
            if r.phase_name in ("pulse.on", "pulse.rest") and k in before:
                # DCIR: the voltage just before the current step and right after it.
                v_before, i_before = before[k]
                r.pulse_edge(v_before, i_before, float(v2[j]), float(i2[j]))
        return breached

    def _take_commands(self) -> None:
        """Commands in the inbox → the runs' request flags."""
        for r in self.runs:
            for cmd, detail in self._inbox.pop(r.run_id, ()):
                if cmd is Command.STOP:
                    r.stop_requested = True
                elif cmd is Command.SAFETY_STOP:
                    r.stop_requested = True
                    r.safety_stop = detail or "safety stop requested"
                elif cmd is Command.PAUSE:
                    r.pause_requested = True
                elif cmd is Command.RESUME:
                    r.pause_requested = False
                elif cmd is Command.AUX_DONE:
                    r.aux_done = True
                elif cmd is Command.AUX_FAILED:
                    r.aux_error = detail or "auxiliary step failed"

    async def _handle_requests(self) -> None:
        if not self._requests:
            return
        self._requests = False
        self._take_commands()
        done: list[int] = []
        resumed: list[int] = []
        for k, r in enumerate(self.runs):
            if r.stop_requested:
                await self._outputs_off([r.channel])
                r.outcome = (("aborted_safety", r.safety_stop) if r.safety_stop
                             else ("stopped", "stop requested"))
                done.append(k)
            elif r.pause_requested and not r.paused:
                await self._outputs_off([r.channel])
                r.paused = True
                self.state.paused[k] = True
                r.pause_t_s = self.clock.now() - float(self.state.t0_clock_s[k])
            elif r.paused and not r.pause_requested:
                # Resume: the paused time, up to the set point being back in place, does
                # not count toward the phase's deadline.
                p = self._phases[k]
                await self._apply(r, p)
                paused_for = self.clock.now() - float(self.state.t0_clock_s[k]) - r.pause_t_s
                p.deadline_t_s += paused_for
                r.step_t0_s += paused_for
                r.phase_t0_s += paused_for
                r.paused = False
                self.state.paused[k] = False
                resumed.append(k)
        if resumed:
            self._load_phases()
            # A reading right after the set point is back, stored and made the integration
            # anchor: integrating from the last paused reading instead would count the
            # output as on for up to a tick before it was.
            done += await self._edge(
                resumed, {}, FLAG_EDGE, integrate=False,
                ledger=Ledger(positions=[self._full_position(k) for k in resumed]))
        for k in sorted(set(done), reverse=True):
            r = self.runs[k]
            self._remove(k)
            await self.emit(RunEnded(r))

    async def _interrupt_all(self, exc: Exception) -> None:
        """The instrument stopped answering: try to turn its outputs off (its own watchdog
        does if the link is gone for good), record an open-ended interruption event from
        each run's last stored sample, and hand the runs to the node, which resumes them
        when the instrument answers again (or ends them ``interrupted``)."""
        await self._outputs_off(list(self.chans))
        reason = f"instrument {self.name} lost: {type(exc).__name__}: {exc}"
        lost: list[ChannelRun] = []
        for k in reversed(range(len(self.runs))):
            r = self.runs[k]
            self._pull(k)
            await self.emit(RunEvent(
                r.run_id, "interruption", "warning", reason,
                {"cause": "instrument_lost", "instrument": self.name, "channel": r.channel,
                 "from_t_s": float(self.state.t_s[k]), "last_seq": int(self.state.seq[k]),
                 "to_t_s": None, "error": str(exc)},
            ))
            self._remove(k)
            lost.append(r)
        if lost:
            await self.emit(InstrumentLost(lost, reason))

    async def _fail_all(self, reason: str) -> None:
        await self._outputs_off(list(self.chans))
        for k in reversed(range(len(self.runs))):
            r = self.runs[k]
            r.outcome = ("failed", reason)
            self._remove(k)
            await self.emit(RunEnded(r))

    async def halt(self) -> None:
        """End the loop after its current tick, leaving the runs where they are (the
        engine is stopping; a restart resumes them)."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.wait([self._task], timeout=10)

    async def close(self) -> None:
        self._closing = True
        for r in self.runs:
            self.command(r.run_id, Command.STOP)
        if self._task is not None:
            await asyncio.wait([self._task], timeout=10)


def _add_records(ledger: Ledger, run_id: int, tr: Transition) -> None:
    """A transition's steps and cycles rows into ``ledger``."""
    if tr.step is not None:
        ledger.steps.append({"run_id": run_id, **tr.step.__dict__})
    for c in tr.cycles:
        ledger.cycles.append({"run_id": run_id, **c})
