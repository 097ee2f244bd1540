"""InstrumentGroup: one acquisition loop per instrument, vectorised over its channels.

Each tick reads every active channel of the instrument in one call (one query on a
cabinet), then checks safety limits, integrates capacity and energy, evaluates end
conditions and builds the sample rows for all channels with a handful of numpy
operations, so the per-sample Python work stays small (docs/architecture.md,
"Processes"). Only step and phase boundaries run per-channel Python
(:mod:`labdaq.engine.channel`).

Per-run state that changes every tick (integration anchor, accumulators, sequence
numbers, next storage time, breach debounce) lives in arrays here, one element per run,
and is copied to and from the :class:`ChannelRun` only at phase boundaries and when the
node publishes progress (:meth:`InstrumentGroup.sync_all`). Runs joining or leaving keep
every other run's state untouched.

Order of work in a tick: measure → safety (outputs off first) → integrate → end
conditions → store → transitions (instrument commands first, then records). A phase
change is followed by one more measurement of the channels that changed ("edge" sample):
it is stored, so the stored samples show the current step and integrate exactly like the
engine did, and it gives the DC internal resistance of pulse steps.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
from numpy.typing import NDArray

from labdaq.drivers.errors import ConnectionFailed, GarbledReply, InstrumentTimeout
from labdaq.engine.channel import ChannelRun, Phase, StepRecord, Transition
from labdaq.engine.clock import EngineClock
from labdaq.engine.writer import SampleWriter
from labdaq.engine.writer_process import WriterProcess, WriterProcessDied

log = logging.getLogger(__name__)

# Errors that mean the instrument is gone, not that a run did something wrong.
LOST_INSTRUMENT = (ConnectionFailed, InstrumentTimeout, GarbledReply)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

#: Sample flags.
FLAG_BREACH = 1
FLAG_PAUSED = 2
FLAG_RESUMED = 4
#: The sample right after a phase change (set points just applied), see module docstring.
FLAG_EDGE = 8

#: A current more than this fraction above the tightest limit trips the interlock; the
#: band covers set-point accuracy and noise of typical cyclers (0.05 % – 1 % of range).
CURRENT_TOLERANCE = 1.05

#: Lateness/breach statistics kept for benchmarks (bounded; oldest half dropped).
_STATS_MAX = 100_000

# Per-run state arrays: name -> (dtype, value for a run that joins, from ChannelRun or
# a constant). Kept in this order; see _push/_pull for the ChannelRun side.
_FLOAT_STATE = (
    "a_t0",  # clock time at the run's t_s = 0
    "a_period",  # storage period (s)
    "a_next_due",  # next storage time (run time)
    "a_last_t",  # integration anchor: time, voltage, current of the previous reading
    "a_last_v",
    "a_last_i",
    "a_last_temp",  # temperature of the previous reading (NaN: none), for crossings
    "a_first_breach",  # run time a limit was first exceeded (debounce), NaN = not
    "a_dvdt_ref_t",  # dV/dt end condition: reference point
    "a_dvdt_ref_v",
    "a_t_s",  # run time of the last stored sample
    "a_step_cap",  # |charge| moved in the step (Ah), |energy| (Wh), charge discharged (Ah)
    "a_step_en",
    "a_step_dis",
    "c_chg_ah",  # open cycle's totals (CycleTotals)
    "c_dis_ah",
    "c_chg_wh",
    "c_dis_wh",
    "c_chg_vs",
    "c_chg_s",
    "c_dis_vs",
    "c_dis_s",
    "c_end_t",
)
_INT_STATE = ("a_run_id", "a_seq", "a_step_idx", "a_cyc_idx")


@dataclass
class Callbacks:
    """How the group reports to the node (which owns the database).

    ``on_step``, ``on_cycle`` and ``on_event`` must return promptly (the node queues the
    records): they are awaited inside the acquisition loop.
    """

    on_step: Callable[[int, StepRecord], Awaitable[None]]
    on_cycle: Callable[[int, dict[str, Any]], Awaitable[None]]
    on_event: Callable[[int, str, str, str, dict[str, Any]], Awaitable[None]]
    on_finish: Callable[[ChannelRun], Awaitable[None]]
    on_aux: Callable[[ChannelRun, Phase], Awaitable[None]]
    # The instrument stopped answering: these runs left the group (positions synced) and
    # wait for it to return. None: they end ``interrupted`` instead.
    on_lost: Callable[[list[ChannelRun], str], Awaitable[None]] | None = None


class InstrumentGroup:
    a_t0: FloatArray
    a_period: FloatArray
    a_next_due: FloatArray
    a_last_t: FloatArray
    a_last_v: FloatArray
    a_last_i: FloatArray
    a_last_temp: FloatArray
    a_first_breach: FloatArray
    a_dvdt_ref_t: FloatArray
    a_dvdt_ref_v: FloatArray
    a_t_s: FloatArray
    a_step_cap: FloatArray
    a_step_en: FloatArray
    a_step_dis: FloatArray
    c_chg_ah: FloatArray
    c_dis_ah: FloatArray
    c_chg_wh: FloatArray
    c_dis_wh: FloatArray
    c_chg_vs: FloatArray
    c_chg_s: FloatArray
    c_dis_vs: FloatArray
    c_dis_s: FloatArray
    c_end_t: FloatArray
    a_run_id: IntArray
    a_seq: IntArray
    a_step_idx: IntArray
    a_cyc_idx: IntArray

    def __init__(
        self,
        name: str,
        driver: Any,
        call: Callable[..., Awaitable[Any]],
        clock: EngineClock,
        writer: SampleWriter | WriterProcess,
        callbacks: Callbacks,
        control_period_s: float = 1.0,
        phase: float = 0.0,
    ) -> None:
        self.name = name
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
        self._ameasure = getattr(driver, "ameasure", None)
        self.clock = clock
        self.writer = writer
        # Puts under way: their rows are numbered (the runs' seq moved on) but not yet
        # handed to the writer, so a position taken now could not be matched to them.
        self.putting = 0
        self.cb = callbacks
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
        # A multi-channel instrument switches a list of channels in one command.
        self._lists = hasattr(driver, "channel_total")
        # Instruments with a lower compliance voltage in current mode (cycler cabinets).
        self._low_clamp = hasattr(driver, "voltage_limit_low_v")
        for nm in _FLOAT_STATE:
            setattr(self, nm, np.zeros(0))
        for nm in _INT_STATE:
            setattr(self, nm, np.zeros(0, np.int64))
        self.a_paused = np.zeros(0, bool)
        self._requests = False  # a run's stop or pause request is waiting
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
        run.on_request = self._poke
        self._requests = True  # it may have been asked to pause before it joined
        self.a_paused = np.append(self.a_paused, run.paused)
        for nm in _FLOAT_STATE:
            setattr(self, nm, np.append(getattr(self, nm), 0.0))
        for nm in _INT_STATE:
            setattr(self, nm, np.append(getattr(self, nm), 0))
        k = len(self.runs) - 1
        self.a_t0[k] = t0_clock_s
        if rejoin_paused:
            run.pause_t_s = self.clock.now() - t0_clock_s
        self.a_period[k] = run.period_s
        self.a_next_due[k] = run.t_s + run.period_s
        self.a_last_t[k] = run.t_s
        self.a_last_v[k] = np.nan  # no anchor yet: the first reading integrates from t_s
        self.a_last_temp[k] = np.nan
        self.a_first_breach[k] = np.nan
        self.a_dvdt_ref_t[k] = run.t_s
        self.a_dvdt_ref_v[k] = np.nan
        self.a_run_id[k] = run.run_id
        self._push(k)
        self.chans = [r.channel for r in self.runs]
        self._limits_changed()
        self._load_phases()
        # The first stored sample is taken right after the set point is applied, so the
        # stored samples start where the engine's integration starts; a resumed run's
        # first sample after the gap says so in its flags.
        flags = (FLAG_EDGE | (FLAG_RESUMED if run.seq else 0)
                 | (FLAG_PAUSED if run.paused else 0))
        try:
            breached = await self._edge([k], {}, flags, integrate=False)
        except BaseException:
            # A join that did not complete leaves no trace here: the caller still owns
            # the run (it may wait for a lost instrument and join again), and this loop
            # must not also hand it on. The failing measurement came before any row.
            self._remove(k)
            raise
        if breached:
            self._remove(k)
            await self.cb.on_finish(run)

    async def _measure(self, chans: list[int]) -> Any:
        """Every channel in one query: on the loop's thread where the driver can
        (``ameasure``: no worker-thread hand-off each tick), else in the worker thread."""
        if self._ameasure is not None:
            meas = await self._ameasure(chans)
            if meas is not None:
                return meas
        return await self.call(self.driver.measure, chans)

    def _poke(self) -> None:
        self._requests = True

    @property
    def phases(self) -> list[Phase]:
        """The phase each run (same order as ``runs``) is in (read-only use)."""
        return self._phases

    def _remove(self, k: int) -> None:
        self._pull(k)
        self.runs[k].on_request = None
        del self.runs[k], self._phases[k]
        self.a_paused = np.delete(self.a_paused, k)
        for nm in _FLOAT_STATE + _INT_STATE:
            setattr(self, nm, np.delete(getattr(self, nm), k))
        self.chans = [r.channel for r in self.runs]
        self._limits_changed()
        self._load_phases()

    def _limits_changed(self) -> None:
        """Limit arrays; rebuilt only when a run joins or leaves."""
        lim = [r.limits for r in self.runs]
        self.a_vmin = np.array([x.min_voltage_v for x in lim], float)
        self.a_vmax = np.array([x.max_voltage_v for x in lim], float)
        self.a_ichg = np.array([x.max_charge_current_a * CURRENT_TOLERANCE for x in lim], float)
        self.a_idis = np.array(
            [x.max_discharge_current_a * CURRENT_TOLERANCE for x in lim], float
        )
        tmin = np.array([_nan(x.min_temperature_c) for x in lim], float)
        tmax = np.array([_nan(x.max_temperature_c) for x in lim], float)
        # An unset temperature limit never trips (comparisons with ±inf are False).
        self.a_tmin = np.where(np.isnan(tmin), -np.inf, tmin)
        self.a_tmax = np.where(np.isnan(tmax), np.inf, tmax)
        self.a_debounce = np.array([x.breach_duration_s for x in lim], float)

    def _load_phases(self) -> None:
        ph = self._phases
        self.e_vabove = np.array([p.voltage_above_v for p in ph], float)
        self.e_vbelow = np.array([p.voltage_below_v for p in ph], float)
        self.e_ibelow = np.array([p.current_below_a for p in ph], float)
        self.e_deadline = np.array([p.deadline_t_s for p in ph], float)
        self.e_cap = np.array([p.capacity_ah for p in ph], float)
        self.e_dvdt = np.array([p.dvdt_below_v_per_s for p in ph], float)
        self.e_tabove = np.array([p.temperature_above_c for p in ph], float)
        self.e_phase_t0 = np.array([r.phase_t0_s for r in self.runs], float)
        self.e_aux = np.array([p.aux is not None for p in ph], bool)
        # Which end conditions any run has at all: the others are not evaluated per tick.
        self.has_end = {
            name: bool((~np.isnan(arr)).any()) if name != "deadline" else bool(
                np.isfinite(arr).any())
            for name, arr in (
                ("vabove", self.e_vabove), ("vbelow", self.e_vbelow),
                ("ibelow", self.e_ibelow), ("deadline", self.e_deadline),
                ("cap", self.e_cap), ("dvdt", self.e_dvdt), ("tabove", self.e_tabove),
            )
        }
        self.any_aux = bool(self.e_aux.any())

    # -- arrays <-> ChannelRun ------------------------------------------------------------
    def _push(self, k: int) -> None:
        """ChannelRun → arrays (after the run's position changed in Python)."""
        r = self.runs[k]
        c = r.cycle
        self.a_seq[k] = r.seq
        self.a_t_s[k] = r.t_s
        self.a_step_cap[k] = r.step_cap_ah
        self.a_step_en[k] = r.step_en_wh
        self.a_step_dis[k] = r.step_dis_ah
        self.a_step_idx[k] = r.step.index if r.step is not None else -1
        self.a_cyc_idx[k] = c.cycle_index
        self.c_chg_ah[k] = c.charge_ah
        self.c_dis_ah[k] = c.discharge_ah
        self.c_chg_wh[k] = c.charge_wh
        self.c_dis_wh[k] = c.discharge_wh
        self.c_chg_vs[k] = c.charge_v_s
        self.c_chg_s[k] = c.charge_s
        self.c_dis_vs[k] = c.discharge_v_s
        self.c_dis_s[k] = c.discharge_s
        self.c_end_t[k] = c.end_t_s

    def _pull(self, k: int) -> None:
        """Arrays → ChannelRun (before Python reads or changes the run's position)."""
        r = self.runs[k]
        c = r.cycle
        r.seq = int(self.a_seq[k])
        r.t_s = float(self.a_t_s[k])
        r.step_cap_ah = float(self.a_step_cap[k])
        r.step_en_wh = float(self.a_step_en[k])
        r.step_dis_ah = float(self.a_step_dis[k])
        c.charge_ah = float(self.c_chg_ah[k])
        c.discharge_ah = float(self.c_dis_ah[k])
        c.charge_wh = float(self.c_chg_wh[k])
        c.discharge_wh = float(self.c_dis_wh[k])
        c.charge_v_s = float(self.c_chg_vs[k])
        c.charge_s = float(self.c_chg_s[k])
        c.discharge_v_s = float(self.c_dis_vs[k])
        c.discharge_s = float(self.c_dis_s[k])
        c.end_t_s = float(self.c_end_t[k])

    def sync_all(self) -> None:
        """Bring every ChannelRun up to date (the node does this before saving positions)."""
        for k in range(len(self.runs)):
            self._pull(k)

    # -- instrument commands -----------------------------------------------------------
    async def _apply(self, run: ChannelRun, phase: Phase) -> None:
        ch = run.channel
        if phase.mode == "off":
            await self.call(self.driver.output, ch, False)
            if phase.aux is not None:
                run.aux_done, run.aux_error = False, None
                await self.cb.on_aux(run, phase)
            return
        if phase.mode == "cc":
            if self._low_clamp:
                # A discharge that ends on voltage is held just below its end voltage by
                # the instrument's lower compliance (a cycler's VLIM:LOW clamps to CV and
                # never reverses the current). Always set: a clamp left from an earlier
                # step would stop a later one short; 0 V = none. SMUs have no lower
                # compliance in current mode (a voltage source limited to the current
                # would be one, but it charges a cell that falls below its set point, a
                # shorted one included), so there only the interlock guards the window.
                low = 0.0 if math.isnan(phase.voltage_low_v) else phase.voltage_low_v
                await self.call(self.driver.voltage_limit_low_v.set, low, ch)
            await self.call(self.driver.set_current, ch, phase.current_a, phase.voltage_v)
        elif phase.mode == "cv":
            await self.call(self.driver.set_voltage, ch, phase.voltage_v, phase.current_a)
        await self.call(self.driver.output, ch, True)

    async def _outputs_off(self, chans: Sequence[int]) -> float:
        """Switch channels off: one command on a multi-channel instrument, else one each.

        Returns when (perf_counter) the first off command went out to the instrument, NaN
        if none did. Never raises: a channel that cannot be switched off is logged and the
        others are still tried (the instrument's own protection is the layer below).
        """
        sent_s = math.nan
        if self._lists and len(chans) > 1:
            try:
                return await self.call(_switch_off, self.driver, list(chans))
            except Exception as exc:  # noqa: BLE001 - fall back to one command per channel
                log.error("could not turn %s ch %s off at once: %s", self.name, chans, exc)
                # A command can fail only in the error-queue check after it: then it was
                # sent, and counts.
                sent_s = _marked_send_s(self.driver)
        for ch in chans:
            try:
                at = await self.call(_switch_off, self.driver, ch)
            except LOST_INSTRUMENT as exc:
                # Each further try would wait out the transport's reconnect backoff again.
                log.error("could not turn %s off, instrument not answering: %s", self.name, exc)
                break
            except Exception as exc:  # noqa: BLE001
                log.error("could not turn %s ch %s off: %s", self.name, ch, exc)
                at = _marked_send_s(self.driver)
            if math.isnan(sent_s):
                sent_s = at
        return sent_s

    # -- the loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        period = min(float(self.a_period.min()), self.control_period_s)
        deadline = self.clock.now() + self.phase * period - period
        while self.runs and not self._closing:
            period = min(float(self.a_period.min()), self.control_period_s)
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
            except WriterProcessDied as exc:
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
        t = now_clock - self.a_t0

        # 1. Safety first, on every measurement of every channel; outputs off at once.
        breach = await self._check(slice(None), t, v, i, temp, t_meas)
        breached = np.flatnonzero(breach).tolist()

        # 2. Integrate (trapezoids) since the previous reading. The previous reading and
        # step capacity stay at hand: an end condition's crossing lies between the two.
        paused = self.a_paused
        prev = (self.a_last_t, self.a_last_v, self.a_last_i, self.a_last_temp,
                self.a_step_cap.copy() if self.has_end["cap"] else self.a_step_cap)
        self._integrate(slice(None), t, v, i, ~paused)

        # 3. End conditions, all channels at once; NaN thresholds never fire, and a
        # condition no run has is not evaluated at all.
        has = self.has_end
        none = np.zeros(n, bool)
        fast = np.minimum(self.a_period, self.control_period_s)
        dvdt_hit = none
        if has["dvdt"]:
            window = np.maximum(10 * fast, 30.0)
            no_ref = np.isnan(self.a_dvdt_ref_v)
            slope_due = (t - self.a_dvdt_ref_t) >= window
            with np.errstate(invalid="ignore", divide="ignore"):
                slope = np.abs(v - self.a_dvdt_ref_v) / (t - self.a_dvdt_ref_t)
            dvdt_hit = slope_due & ~no_ref & (slope < self.e_dvdt)
            reset_ref = slope_due | no_ref
            self.a_dvdt_ref_t = np.where(reset_ref, t, self.a_dvdt_ref_t)
            self.a_dvdt_ref_v = np.where(reset_ref, v, self.a_dvdt_ref_v)
        hit_vabove = v >= self.e_vabove if has["vabove"] else none
        hit_vbelow = v <= self.e_vbelow if has["vbelow"] else none
        # The first sample of a CV phase may still carry the CC current: skip it.
        hit_ibelow = (
            (np.abs(i) <= self.e_ibelow) & (t - self.e_phase_t0 > fast * 1.5)
            if has["ibelow"]
            else none
        )
        hit_time = t >= self.e_deadline - 1e-9 if has["deadline"] else none
        hit_cap = self.a_step_cap >= self.e_cap if has["cap"] else none
        hit_temp = temp >= self.e_tabove if has["tabove"] else none
        aux_done = none
        if self.any_aux:
            aux_done = self.e_aux & np.fromiter((r.aux_done for r in runs), bool, n)
        ended = hit_vabove | hit_vbelow | hit_ibelow | hit_time | hit_cap | dvdt_hit
        ended |= hit_temp | aux_done
        ended &= ~paused & ~breach

        # 4. Store due samples (every breach and every phase end is stored too). A run's
        # storage time goes to the tick *scheduled* nearest to it: judged on the measured
        # time, a storage time half a tick from the tick grid (a run joins at any moment)
        # would fall before or after a tick by timer jitter alone, one sample early and
        # the next one a tick late, losing a sample period.
        half = 0.5 * (fast if tick_s is None else tick_s)
        t_sched = t if deadline is None else deadline - self.a_t0
        due = (t_sched + half > self.a_next_due) | breach | ended
        next_due = np.where(due, self.a_next_due + self.a_period, self.a_next_due)
        self.a_next_due = np.where(next_due <= t_sched, t_sched + self.a_period, next_due)
        idx = np.flatnonzero(due)
        if idx.size:
            flags = np.where(breach[idx], FLAG_BREACH, 0) | np.where(paused[idx], FLAG_PAUSED, 0)
            await self._put(self._rows(idx, t[idx], v[idx], i[idx], temp[idx], ts_utc, flags))
        self.a_last_t, self.a_last_v, self.a_last_i, self.a_last_temp = t, v, i, temp

        # 5. Per-channel Python only where something happened.
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
            if aux_done[k]:
                reason = "done"
            else:
                reason = _reason(
                    k, hit_vabove, hit_vbelow, hit_ibelow, hit_time, hit_cap, dvdt_hit, hit_temp
                )
            self._pull(k)
            crossing = self._crossing(k, reason, prev, t, v, i, temp)
            tr = r.phase_ended(reason, t_end, float(v[k]), float(i[k]), crossing)
            # Back into the arrays before anything awaits: the node copies arrays → runs
            # (sync_all) whenever it publishes progress.
            self._push(k)
            # Instrument first: the next set point (or output off) before any record.
            if tr.done or tr.next_phase is None:
                await self._outputs_off([r.channel])
                r.outcome = r.outcome or ("completed", "all steps done")
                done.append(k)
            else:
                await self._apply(r, tr.next_phase)
                self._phases[k] = tr.next_phase
                self.a_dvdt_ref_v[k] = np.nan
                changed.append(k)
                before[k] = (float(v[k]), float(i[k]))
            finished.append((k, tr))
        if changed:
            self._load_phases()
            done += await self._edge(changed, before, FLAG_EDGE)
        for k, tr in finished:
            r = runs[k]
            if tr.step is not None:
                await self.cb.on_step(r.run_id, tr.step)
            for c in tr.cycles:
                await self.cb.on_cycle(r.run_id, c)
        for k in sorted(set(done), reverse=True):
            r = runs[k]
            self._remove(k)
            await self.cb.on_finish(r)

    def _crossing(
        self, k: int, reason: str,
        prev: tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray],
        t: FloatArray, v: FloatArray, i: FloatArray, temp: FloatArray,
    ) -> float:
        """Run time at which run ``k``'s end condition was crossed, located between the
        previous reading and this one by linear interpolation (a deadline is exact).

        The engine acts at the reading that showed the end, so the step boundary stays
        there; this is the *recorded* crossing (steps.end_crossing_t_s). Without a
        previous reading in the phase (a run that just joined), or for dV/dt and
        auxiliary steps, which have no single threshold crossing, it is the reading's
        time.
        """
        t1 = float(t[k])
        t0 = float(prev[0][k])
        if reason == "duration":
            return min(max(float(self.e_deadline[k]), t0), t1)
        pairs = {
            "voltage_above": (prev[1], v, self.e_vabove),
            "voltage_below": (prev[1], v, self.e_vbelow),
            "current_below": (prev[2], i, self.e_ibelow),
            "capacity": (prev[4], self.a_step_cap, self.e_cap),
            "temperature_above": (prev[3], temp, self.e_tabove),
        }
        if reason not in pairs:
            return t1
        before, after, bound = pairs[reason]
        y0, y1, thr = float(before[k]), float(after[k]), float(bound[k])
        if reason == "current_below":  # the condition is on |I|
            y0, y1 = abs(y0), abs(y1)
        if not (math.isfinite(y0) and math.isfinite(t0)) or t0 >= t1 or y0 == y1:
            return t1
        frac = (thr - y0) / (y1 - y0)
        if not 0.0 <= frac <= 1.0:
            # Already past at the previous reading (e.g. the phase began beyond it).
            return t1 if frac > 1.0 else t0
        return t0 + frac * (t1 - t0)

    async def _check(
        self,
        sel: slice | IntArray,
        t: FloatArray,
        v: FloatArray,
        i: FloatArray,
        temp: FloatArray,
        t_meas: float,
    ) -> BoolArray:
        """Limits of runs ``sel`` against one reading each (aligned arrays); outputs off
        for every run whose breach has lasted its debounce time, before anything else.
        Returns the breach mask; ``t_meas`` (perf_counter when the reading arrived) is
        where the breach-to-off time starts."""
        # NaN compares False everywhere: a missing temperature never trips.
        over = (
            (v > self.a_vmax[sel])
            | (v < self.a_vmin[sel])
            | (i > self.a_ichg[sel])
            | (-i > self.a_idis[sel])
            | (temp > self.a_tmax[sel])
            | (temp < self.a_tmin[sel])
        )
        prev = self.a_first_breach[sel]
        first = np.where(over, np.where(np.isnan(prev), t, prev), np.nan)
        self.a_first_breach[sel] = first
        breach = over & (t - first >= self.a_debounce[sel])
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
        return np.asarray(breach, bool)

    async def _report_breach(self, k: int, v: float, i: float, temp: float, t: float) -> None:
        """The event and outcome of run ``k``'s breach (its output is already off and the
        breaching reading stored)."""
        r = self.runs[k]
        self._pull(k)
        lim, val, bound = _which_limit(self, k, v, i, temp)
        off_s, ack_s = self._breach_to_off.pop(r.run_id, (math.nan, math.nan))
        msg = (
            f"safety limit crossed, output turned off: {lim}: measured {val:.6g}, "
            f"limit {bound:.6g}"
        )
        await self.cb.on_event(
            r.run_id,
            "safety",
            "critical",
            msg,
            {
                "limit": lim,
                "value": val,
                "bound": bound,
                "seq": r.seq,
                "t_s": t,
                "step_index": r.step.index if r.step is not None else None,
                "breach_to_off_s": off_s,
                "breach_to_off_ack_s": ack_s,
                "source": r.limits.sources.get(lim, ""),
            },
        )
        r.outcome = ("aborted_safety", f"{lim}: measured {val:.6g}, limit {bound:.6g}")

    def _integrate(
        self, sel: slice | IntArray, t: FloatArray, v: FloatArray, i: FloatArray,
        active: BoolArray,
    ) -> None:
        """Add the trapezoid from each run's anchor to (t, v, i) to its accumulators.

        ``sel`` picks the runs (all, or the ones an edge measurement covers); ``t, v, i``
        and ``active`` are aligned with it. Positive charge moved counts as charge,
        negative as discharge, as in the cycle summary.
        """
        last_t, last_v, last_i = self.a_last_t[sel], self.a_last_v[sel], self.a_last_i[sel]
        dt = np.maximum(t - last_t, 0.0)
        if np.isnan(last_v).any():  # no reading yet to integrate from: a rectangle
            has_prev = ~np.isnan(last_v)
            i_mid = np.where(has_prev, 0.5 * (i + last_i), i)
            p_mid = np.where(has_prev, 0.5 * (i * v + last_i * last_v), i * v)
            v_dt = np.where(has_prev, 0.5 * (v + last_v), v) * dt
        else:
            i_mid = 0.5 * (i + last_i)
            p_mid = 0.5 * (i * v + last_i * last_v)
            v_dt = 0.5 * (v + last_v) * dt
        if not active.all():
            i_mid = i_mid * active
            p_mid = p_mid * active
        dq = i_mid * dt / 3600.0
        de = np.abs(p_mid * dt / 3600.0)
        chg = dq > 0.0
        dis = dq < 0.0
        self.a_step_cap[sel] += np.abs(dq)
        self.a_step_en[sel] += de
        self.a_step_dis[sel] -= np.where(dis, dq, 0.0)
        self.c_chg_ah[sel] += np.where(chg, dq, 0.0)
        self.c_dis_ah[sel] -= np.where(dis, dq, 0.0)
        self.c_chg_wh[sel] += np.where(chg, de, 0.0)
        self.c_dis_wh[sel] += np.where(dis, de, 0.0)
        self.c_chg_vs[sel] += np.where(chg, v_dt, 0.0)
        self.c_chg_s[sel] += np.where(chg, dt, 0.0)
        self.c_dis_vs[sel] += np.where(dis, v_dt, 0.0)
        self.c_dis_s[sel] += np.where(dis, dt, 0.0)
        self.c_end_t[sel] = np.where(dq != 0.0, t, self.c_end_t[sel])

    def _rows(
        self, idx: IntArray, t: FloatArray, v: FloatArray, i: FloatArray, temp: FloatArray,
        ts_utc: float, flags: NDArray[Any],
    ) -> list[tuple[Any, ...]]:
        """Sample rows (SAMPLE_COLUMNS order) for runs ``idx``; advances their seq."""
        seq = self.a_seq[idx] + 1
        self.a_seq[idx] = seq
        self.a_t_s[idx] = t
        nan_t = np.isnan(temp)
        temps: Any = (
            repeat(None)
            if nan_t.all()
            else [None if x != x else x for x in temp.tolist()]  # NaN -> NULL
        )
        return list(
            zip(
                self.a_run_id[idx].tolist(),
                seq.tolist(),
                t.tolist(),
                repeat(ts_utc),
                self.a_step_idx[idx].tolist(),
                self.a_cyc_idx[idx].tolist(),
                v.tolist(),
                i.tolist(),
                temps,
                self.a_step_cap[idx].tolist(),
                self.a_step_en[idx].tolist(),
                np.asarray(flags, np.int64).tolist(),
            )
        )

    async def _put(self, rows: list[tuple[Any, ...]]) -> None:
        self.putting += 1
        try:
            await self.writer.put(rows)
        finally:
            self.putting -= 1

    async def _edge(
        self,
        changed: list[int],
        before: dict[int, tuple[float, float]],
        flags: int,
        integrate: bool = True,
    ) -> list[int]:
        """Measure the channels whose set points just changed; check it against the
        limits like any reading, store it and make it the integration anchor (integrating
        up to it unless the run has just joined). Returns the runs that breached."""
        idx = np.asarray(changed, np.int64)
        t2 = self.clock.now() - self.a_t0[idx]  # before the query, as in _tick
        ts_utc = time.time()
        m2 = await self.call(self.driver.measure, [self.chans[k] for k in changed])
        t_meas = time.perf_counter()
        m2 = np.asarray(m2, float).reshape(len(changed), 3)
        v2, i2, temp2 = m2[:, 0].copy(), m2[:, 1].copy(), m2[:, 2].copy()
        breach = await self._check(idx, t2, v2, i2, temp2, t_meas)
        if integrate:
            self._integrate(idx, t2, v2, i2, np.ones(len(changed), bool))
        self.a_last_t[idx], self.a_last_v[idx], self.a_last_i[idx] = t2, v2, i2
        self.a_last_temp[idx] = temp2
        row_flags = np.full(len(changed), flags) | np.where(breach, FLAG_BREACH, 0)
        await self._put(self._rows(idx, t2, v2, i2, temp2, ts_utc, row_flags))
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

    async def _handle_requests(self) -> None:
        if not self._requests:
            return
        self._requests = False
        done: list[int] = []
        resumed: list[int] = []
        for k, r in enumerate(self.runs):
            if r.stop_requested:
                await self._outputs_off([r.channel])
                r.outcome = ("stopped", "stop requested")
                done.append(k)
            elif r.pause_requested and not r.paused:
                await self._outputs_off([r.channel])
                r.paused = True
                self.a_paused[k] = True
                r.pause_t_s = self.clock.now() - float(self.a_t0[k])
            elif r.paused and not r.pause_requested:
                # Resume: the paused time, up to the set point being back in place, does
                # not count toward the phase's deadline.
                p = self._phases[k]
                await self._apply(r, p)
                paused_for = self.clock.now() - float(self.a_t0[k]) - r.pause_t_s
                p.deadline_t_s += paused_for
                r.step_t0_s += paused_for
                r.phase_t0_s += paused_for
                r.paused = False
                self.a_paused[k] = False
                resumed.append(k)
        if resumed:
            self._load_phases()
            # A reading right after the set point is back, stored and made the integration
            # anchor: integrating from the last paused reading instead would count the
            # output as on for up to a tick before it was.
            done += await self._edge(resumed, {}, FLAG_EDGE, integrate=False)
        for k in sorted(set(done), reverse=True):
            r = self.runs[k]
            self._remove(k)
            await self.cb.on_finish(r)

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
            await self.cb.on_event(
                r.run_id, "interruption", "warning", reason,
                {"cause": "instrument_lost", "instrument": self.name, "channel": r.channel,
                 "from_t_s": float(self.a_t_s[k]), "last_seq": int(self.a_seq[k]),
                 "to_t_s": None, "error": str(exc)},
            )
            self._remove(k)
            if self.cb.on_lost is None:
                r.outcome = ("interrupted", reason)
                await self.cb.on_finish(r)
            else:
                lost.append(r)
        if lost and self.cb.on_lost is not None:
            await self.cb.on_lost(lost, reason)

    async def _fail_all(self, reason: str) -> None:
        await self._outputs_off(list(self.chans))
        for k in reversed(range(len(self.runs))):
            r = self.runs[k]
            r.outcome = ("failed", reason)
            self._remove(k)
            await self.cb.on_finish(r)

    async def close(self) -> None:
        self._closing = True
        for r in self.runs:
            r.stop_requested = True  # pokes the group
        if self._task is not None:
            await asyncio.wait([self._task], timeout=10)


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


def _which_limit(
    g: InstrumentGroup,
    k: int,
    v: float,
    i: float,
    temp: float,
) -> tuple[str, float, float]:
    lim = g.runs[k].limits
    if v > g.a_vmax[k]:
        return "max_voltage_v", v, lim.max_voltage_v
    if v < g.a_vmin[k]:
        return "min_voltage_v", v, lim.min_voltage_v
    if i > g.a_ichg[k]:
        return "max_charge_current_a", i, lim.max_charge_current_a
    if -i > g.a_idis[k]:
        return "max_discharge_current_a", -i, lim.max_discharge_current_a
    if lim.max_temperature_c is not None and temp > lim.max_temperature_c:
        return "max_temperature_c", temp, lim.max_temperature_c
    return "min_temperature_c", temp, float(lim.min_temperature_c or math.nan)


def _marked_send_s(driver: Any) -> float:
    """The driver's transport's ``marked_send_s`` (NaN: not stamped, or no transport)."""
    sent_s = getattr(getattr(driver, "transport", None), "marked_send_s", math.nan)
    return sent_s if isinstance(sent_s, float) else math.nan


def _switch_off(driver: Any, channels: int | list[int]) -> float:
    """``driver.output(channels, False)``, run in the instrument's worker thread; returns
    when the off command itself went out (perf_counter), which the error-queue check the
    driver does next would otherwise hide. Without a transport to ask: when it returned."""
    transport = getattr(driver, "transport", None)
    if transport is not None and hasattr(transport, "mark_next_send"):
        transport.mark_next_send()
    driver.output(channels, False)
    sent_s = _marked_send_s(driver)
    return sent_s if math.isfinite(sent_s) else time.perf_counter()


def _reason(
    k: int,
    va: Any,
    vb: Any,
    ib: Any,
    tm: Any,
    cap: Any,
    dv: Any,
    tp: Any,
) -> str:
    """Which condition ended run ``k``'s phase (the first in this order that holds).

    The phase ends at the reading that showed it — not at an interpolated crossing or at
    the deadline between two readings: that reading is when the engine acts, so the next
    step's time (and duration) starts there, and a steps row brackets its samples.
    """
    for hit, name in (
        (va, "voltage_above"),
        (vb, "voltage_below"),
        (ib, "current_below"),
        (cap, "capacity"),
        (dv, "dvdt_below"),
        (tp, "temperature_above"),
        (tm, "duration"),
    ):
        if hit[k]:
            return name
    return "unknown"
