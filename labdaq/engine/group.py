"""InstrumentGroup: one acquisition loop per instrument, vectorised over its channels.

Each tick reads every active channel of the instrument in one call (one query on a
cabinet), then checks safety limits, integrates capacity and energy and evaluates end
conditions for all channels with a handful of numpy operations, so the per-sample Python
work stays small (docs/architecture.md, "Processes"). Only step and phase boundaries run
per-channel Python (:mod:`labdaq.engine.channel`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from labdaq.engine.channel import ChannelRun, Phase, StepRecord, Transition
from labdaq.engine.clock import EngineClock
from labdaq.engine.writer import SampleWriter

log = logging.getLogger(__name__)

#: Sample flags.
FLAG_BREACH = 1
FLAG_PAUSED = 2
FLAG_RESUMED = 4

#: A current more than this fraction above the tightest limit trips the interlock; the
#: band covers set-point accuracy and noise of typical cyclers (0.05 % – 1 % of range).
CURRENT_TOLERANCE = 1.05


@dataclass
class Callbacks:
    """How the group reports to the node (which owns the database)."""

    on_step: Callable[[int, StepRecord], Awaitable[None]]
    on_cycle: Callable[[int, dict[str, Any]], Awaitable[None]]
    on_event: Callable[[int, str, str, str, dict[str, Any]], Awaitable[None]]
    on_finish: Callable[[ChannelRun], Awaitable[None]]
    on_aux: Callable[[ChannelRun, Phase], Awaitable[None]]


class InstrumentGroup:
    def __init__(
        self,
        name: str,
        driver: Any,
        call: Callable[..., Awaitable[Any]],
        clock: EngineClock,
        writer: SampleWriter,
        callbacks: Callbacks,
        control_period_s: float = 1.0,
    ) -> None:
        self.name = name
        # Limits and end conditions are checked at least this often (simulated seconds),
        # however long the storage period: a 10 s sample period must not let the voltage
        # run 250 mV past a cut-off at the knee of a discharge curve.
        self.control_period_s = control_period_s
        self.driver = driver
        self.call = call
        self.clock = clock
        self.writer = writer
        self.cb = callbacks
        self.runs: list[ChannelRun] = []
        self._phases: list[Phase] = []
        self._t0: list[float] = []  # clock time at each run's t_s = 0
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._closing = False
        self.lateness_s: list[float] = []  # wall seconds late per tick (for benchmarks)
        self.breach_to_off_s: list[float] = []
        self._rebuild()

    # -- membership --------------------------------------------------------------------
    async def add(self, run: ChannelRun, phase: Phase, t0_clock_s: float) -> None:
        await self._apply(run, phase)
        self.runs.append(run)
        self._phases.append(phase)
        self._t0.append(t0_clock_s)
        self._rebuild()
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._loop(), name=f"group-{self.name}")

    def _remove(self, k: int) -> None:
        del self.runs[k], self._phases[k], self._t0[k]
        self._rebuild()

    def _rebuild(self) -> None:
        """Per-channel state as arrays; rebuilt only when a run joins or leaves."""
        runs = self.runs
        n = len(runs)
        self.chans = [r.channel for r in runs]
        self.a_t0 = np.array(self._t0, float)
        self.a_run = [r.run_id for r in runs]
        self.a_period = np.array([r.period_s for r in runs], float)
        self.a_next_due = np.array([r.t_s + r.period_s for r in runs], float) if n else np.zeros(0)
        self.a_last_t = np.array([r.t_s for r in runs], float)
        self.a_last_v = np.full(n, np.nan)
        self.a_last_i = np.zeros(n)
        lim = [r.limits for r in runs]
        self.a_vmin = np.array([x.min_voltage_v for x in lim], float)
        self.a_vmax = np.array([x.max_voltage_v for x in lim], float)
        self.a_ichg = np.array([x.max_charge_current_a * CURRENT_TOLERANCE for x in lim], float)
        self.a_idis = np.array([x.max_discharge_current_a * CURRENT_TOLERANCE for x in lim])
        self.a_tmin = np.array([_nan(x.min_temperature_c) for x in lim], float)
        self.a_tmax = np.array([_nan(x.max_temperature_c) for x in lim], float)
        self.a_capmax = np.array([_nan(x.max_capacity_ah) for x in lim], float)
        self.a_debounce = np.array([x.breach_duration_s for x in lim], float)
        self.a_first_breach = np.full(n, np.nan)
        self.a_dvdt_ref_t = np.array([r.t_s for r in runs], float)
        self.a_dvdt_ref_v = np.full(n, np.nan)
        self._load_phases()

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
        self.e_cv = np.array([p.mode == "cv" for p in ph], bool)

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
            await self.call(self.driver.set_current, ch, phase.current_a, phase.voltage_v)
        elif phase.mode == "cv":
            await self.call(self.driver.set_voltage, ch, phase.voltage_v, phase.current_a)
        await self.call(self.driver.output, ch, True)

    # -- the loop ----------------------------------------------------------------------
    async def _loop(self) -> None:
        next_t = self.clock.now()
        while self.runs and not self._closing:
            period = min(float(self.a_period.min()), self.control_period_s)
            next_t += period
            now = self.clock.now()
            if next_t < now - period:
                # Fell behind by more than a tick: re-anchor instead of bursting.
                next_t = now
            await self.clock.sleep_until(next_t)
            self.lateness_s.append(self.clock.wall_lateness_s(next_t))
            if len(self.lateness_s) > 100_000:
                del self.lateness_s[:50_000]
            try:
                await self._tick()
            except Exception as exc:  # noqa: BLE001 - make every channel safe, then report
                log.exception("instrument %s: acquisition failed", self.name)
                await self._fail_all(f"{type(exc).__name__}: {exc}")
        self._task = None

    async def _tick(self) -> None:
        await self._handle_requests()
        if not self.runs:
            return
        meas = await self.call(self.driver.measure, self.chans)
        now_clock = self.clock.now()
        ts_utc = time.time()
        meas = np.asarray(meas, float).reshape(len(self.chans), 3)
        v, i, temp = meas[:, 0], meas[:, 1], meas[:, 2]
        t = now_clock - self.a_t0

        # 1. Safety first, on every measurement of every channel.
        tnan = np.isnan(temp)
        over = (
            (v > self.a_vmax)
            | (v < self.a_vmin)
            | (i > self.a_ichg)
            | (-i > self.a_idis)
            | (~tnan & ~np.isnan(self.a_tmax) & (temp > self.a_tmax))
            | (~tnan & ~np.isnan(self.a_tmin) & (temp < self.a_tmin))
        )
        first = np.where(
            over, np.where(np.isnan(self.a_first_breach), t, self.a_first_breach), np.nan
        )
        self.a_first_breach = first
        breach = over & (t - first >= self.a_debounce)
        breached = np.flatnonzero(breach)
        if breached.size:
            t_breach = time.perf_counter()
            for k in breached:
                # Output off before anything else, one command per channel.
                try:
                    await self.call(self.driver.output, self.chans[k], False)
                except Exception as exc:  # noqa: BLE001
                    log.error("could not turn %s ch %s off: %s", self.name, self.chans[k], exc)
            self.breach_to_off_s.append(time.perf_counter() - t_breach)

        # 2. Integrate (trapezoids) since the previous sample.
        dt = np.maximum(t - self.a_last_t, 0.0)
        has_prev = ~np.isnan(self.a_last_v)
        i_mid = np.where(has_prev, 0.5 * (i + self.a_last_i), i)
        p_mid = np.where(has_prev, 0.5 * (i * v + self.a_last_i * self.a_last_v), i * v)
        v_mid = np.where(has_prev, 0.5 * (v + self.a_last_v), v)
        paused = np.array([r.paused for r in self.runs], bool)
        dq = np.where(paused, 0.0, i_mid * dt / 3600.0)
        de = np.where(paused, 0.0, p_mid * dt / 3600.0)
        for k, r in enumerate(self.runs):
            q, e = float(dq[k]), float(de[k])
            if q == 0.0:
                continue
            r.step_cap_ah += abs(q)
            r.step_en_wh += abs(e)
            c = r.cycle
            if q > 0:
                c.charge_ah += q
                c.charge_wh += abs(e)
                c.charge_v_s += float(v_mid[k] * dt[k])
                c.charge_s += float(dt[k])
            else:
                r.step_dis_ah -= q
                c.discharge_ah -= q
                c.discharge_wh += abs(e)
                c.discharge_v_s += float(v_mid[k] * dt[k])
                c.discharge_s += float(dt[k])
            c.end_t_s = float(t[k])
        step_cap = np.array([r.step_cap_ah for r in self.runs], float)

        # 3. End conditions, all channels at once; NaN thresholds never fire.
        step_t = t - self.e_phase_t0
        window = np.maximum(10 * np.minimum(self.a_period, self.control_period_s), 30.0)
        slope_due = (t - self.a_dvdt_ref_t) >= window
        with np.errstate(invalid="ignore", divide="ignore"):
            slope = np.abs(v - self.a_dvdt_ref_v) / (t - self.a_dvdt_ref_t)
        dvdt_hit = slope_due & ~np.isnan(self.a_dvdt_ref_v) & (slope < self.e_dvdt)
        self.a_dvdt_ref_t = np.where(slope_due | np.isnan(self.a_dvdt_ref_v), t, self.a_dvdt_ref_t)
        self.a_dvdt_ref_v = np.where(slope_due | np.isnan(self.a_dvdt_ref_v), v, self.a_dvdt_ref_v)
        hit_vabove = v >= self.e_vabove
        hit_vbelow = v <= self.e_vbelow
        # The first sample of a CV phase may still carry the CC current: skip it.
        hit_ibelow = (np.abs(i) <= self.e_ibelow) & (
            step_t > np.minimum(self.a_period, self.control_period_s) * 1.5
        )
        hit_time = t >= self.e_deadline - 1e-9
        hit_cap = step_cap >= self.e_cap
        hit_temp = ~tnan & (temp >= self.e_tabove)
        aux_done = np.array(
            [
                r.aux_done and p.aux is not None
                for r, p in zip(self.runs, self._phases, strict=True)
            ],
            bool,
        )
        ended = (
            (hit_vabove | hit_vbelow | hit_ibelow | hit_time | hit_cap | dvdt_hit | hit_temp)
            | aux_done
        ) & (~paused & ~breach)

        # 4. Store due samples (every breach and every phase end is stored too).
        due = (t >= self.a_next_due - 1e-9) | breach | ended
        self.a_next_due = np.where(due, self.a_next_due + self.a_period, self.a_next_due)
        behind = self.a_next_due <= t
        self.a_next_due = np.where(behind, t + self.a_period, self.a_next_due)
        idx = np.flatnonzero(due)
        if idx.size:
            rows = []
            for k in idx.tolist():
                r = self.runs[k]
                r.seq += 1
                r.t_s = float(t[k])
                tk = float(temp[k])
                flags = (FLAG_BREACH if breach[k] else 0) | (FLAG_PAUSED if paused[k] else 0)
                st = r.step
                rows.append(
                    (
                        r.run_id,
                        r.seq,
                        r.t_s,
                        ts_utc,
                        st.index if st is not None else -1,
                        r.cycle.cycle_index,
                        float(v[k]),
                        float(i[k]),
                        None if math.isnan(tk) else tk,
                        r.step_cap_ah,
                        r.step_en_wh,
                        flags,
                    )
                )
            await self.writer.put(rows)
        self.a_last_t, self.a_last_v, self.a_last_i = t, v, i

        # 5. Per-channel Python only where something happened.
        done: list[int] = []
        for k in breached.tolist():
            r = self.runs[k]
            lim, val, bound = _which_limit(self, k, float(v[k]), float(i[k]), float(temp[k]))
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
                    "t_s": float(t[k]),
                    "step_index": r.step.index if r.step is not None else None,
                    "breach_to_off_s": self.breach_to_off_s[-1],
                    "source": r.limits.sources.get(lim, ""),
                },
            )
            r.outcome = ("aborted_safety", f"{lim}: measured {val:.6g}, limit {bound:.6g}")
            done.append(k)
        for k, r in enumerate(self.runs):
            if r.aux_error is not None and k not in done:
                r.outcome = ("failed", r.aux_error)
                done.append(k)
        for k in np.flatnonzero(ended).tolist():
            if k in done:
                continue
            r = self.runs[k]
            if aux_done[k]:
                reason, t_end = "done", float(t[k])
            else:
                reason, t_end = _reason(
                    self,
                    k,
                    hit_vabove,
                    hit_vbelow,
                    hit_ibelow,
                    hit_time,
                    hit_cap,
                    dvdt_hit,
                    hit_temp,
                    v,
                    t,
                )
            prev_i, prev_v = float(i[k]), float(v[k])
            tr = r.phase_ended(reason, t_end, float(v[k]), float(i[k]))
            if await self._transition(k, r, tr):
                done.append(k)
                continue
            if r.phase_name == "pulse.on" or r.phase_name == "pulse.rest":
                # DCIR: the voltage just before the current step and right after it.
                m2 = await self.call(self.driver.measure, [r.channel])
                r.pulse_edge(prev_v, prev_i, float(m2[0][0]), float(m2[0][1]))
        for k in sorted(set(done), reverse=True):
            r = self.runs[k]
            self._remove(k)
            await self.cb.on_finish(r)

    async def _transition(self, k: int, r: ChannelRun, tr: Transition) -> bool:
        """Apply a phase/step transition; True when the run is finished."""
        if tr.step is not None:
            await self.cb.on_step(r.run_id, tr.step)
        for c in tr.cycles:
            await self.cb.on_cycle(r.run_id, c)
        if tr.done or tr.next_phase is None:
            await self.call(self.driver.output, r.channel, False)
            r.outcome = r.outcome or ("completed", "all steps done")
            return True
        await self._apply(r, tr.next_phase)
        self._phases[k] = tr.next_phase
        self._load_phases()
        self.a_dvdt_ref_v[k] = np.nan
        # The current steps at a phase change: a trapezoid across the change would smear
        # the old current into the new step, so the next interval uses the new current.
        self.a_last_v[k] = np.nan
        return False

    async def _handle_requests(self) -> None:
        done = []
        for k, r in enumerate(self.runs):
            if r.stop_requested:
                await self.call(self.driver.output, r.channel, False)
                r.outcome = ("stopped", "stop requested")
                done.append(k)
            elif r.pause_requested and not r.paused:
                await self.call(self.driver.output, r.channel, False)
                r.paused = True
                r.pause_t_s = self.clock.now() - self._t0[k]
            elif r.paused and not r.pause_requested:
                # Resume: the paused time does not count toward the phase's deadline.
                paused_for = self.clock.now() - self._t0[k] - r.pause_t_s
                p = self._phases[k]
                p.deadline_t_s += paused_for
                r.step_t0_s += paused_for
                r.phase_t0_s += paused_for
                await self._apply(r, p)
                r.paused = False
                self._load_phases()
        for k in reversed(done):
            r = self.runs[k]
            self._remove(k)
            await self.cb.on_finish(r)

    async def _fail_all(self, reason: str) -> None:
        for k in reversed(range(len(self.runs))):
            r = self.runs[k]
            try:
                await self.call(self.driver.output, r.channel, False)
            except Exception as exc:  # noqa: BLE001
                log.error("%s ch %s: output off failed: %s", self.name, r.channel, exc)
            r.outcome = ("failed", reason)
            self._remove(k)
            await self.cb.on_finish(r)

    async def close(self) -> None:
        self._closing = True
        for r in self.runs:
            r.stop_requested = True
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


def _reason(
    g: InstrumentGroup,
    k: int,
    va: Any,
    vb: Any,
    ib: Any,
    tm: Any,
    cap: Any,
    dv: Any,
    tp: Any,
    v: Any,
    t: Any,
) -> tuple[str, float]:
    """Which condition ended the phase, and when (voltage crossings located by
    interpolation between the previous and this sample, not at the sample)."""
    t_k = float(t[k])
    t_prev, v_prev = float(g.a_last_t[k]), float(g.a_last_v[k])
    for hit, name, thr in ((va, "voltage_above", g.e_vabove), (vb, "voltage_below", g.e_vbelow)):
        if hit[k]:
            thr_k = float(thr[k])
            if not math.isnan(v_prev) and v[k] != v_prev:
                frac = (thr_k - v_prev) / (float(v[k]) - v_prev)
                if 0.0 <= frac <= 1.0:
                    return name, t_prev + frac * (t_k - t_prev)
            return name, t_k
    for hit, name in (
        (ib, "current_below"),
        (cap, "capacity"),
        (dv, "dvdt_below"),
        (tp, "temperature_above"),
    ):
        if hit[k]:
            return name, t_k
    if tm[k]:
        # A deadline falls between samples: the phase ended at the deadline.
        return "duration", min(t_k, float(g.e_deadline[k]))
    return "unknown", t_k
