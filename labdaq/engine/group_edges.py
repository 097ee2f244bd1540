"""An instrument group's breach, edge and gap handling, and the hand-off of its rows.

One job of :class:`~labdaq.engine.group.InstrumentGroup` (which inherits it), shared by
its tick, runs joining and runs resuming:

* safety (:meth:`GroupEdges._check`): limits against a reading, outputs off at once for
  every run whose breach has lasted its debounce time, the breach-to-off times kept for
  benchmarks; the breach's event afterwards (:meth:`GroupEdges._report_breach`);
* edge samples (:meth:`GroupEdges._edge`): one more reading right after a set point
  changed (a phase change, a run joining or resuming), stored and made the integration
  anchor; it gives the DC internal resistance of pulse steps;
* gaps (:meth:`GroupEdges._gaps`): storage times a late tick or an outage missed, flagged
  on the next row and recorded in its ledger (:mod:`.gaps`);
* the hand-off (:meth:`GroupEdges._put`): rows to the sample sink with the runs' fast
  state (:mod:`.ledger`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from labdaq.drivers.roles import Cycler
from labdaq.engine.channel import Transition
from labdaq.engine.clock import EngineClock
from labdaq.engine.end_conditions import EndConditions, Previous
from labdaq.engine.gaps import FLAG_GAP, gap_record, missed, outage_missed
from labdaq.engine.group_sensors import GroupSensors
from labdaq.engine.ledger import Ledger
from labdaq.engine.run_arrays import BoolArray, FloatArray, IntArray
from labdaq.engine.safety import Limits, breach_event
from labdaq.engine.sample_batch import SampleBatch
from labdaq.engine.sink import SampleSink
from labdaq.storage.models import SampleFlag

# Sample flags as plain ints for numpy (SampleFlag is the definition).
FLAG_BREACH = int(SampleFlag.BREACH)
FLAG_PAUSED = int(SampleFlag.PAUSED)
FLAG_RESUMED = int(SampleFlag.RESUMED)
FLAG_EDGE = int(SampleFlag.EDGE)

#: Lateness/breach statistics kept for benchmarks (bounded; oldest half dropped).
_STATS_MAX = 100_000


class GroupEdges(GroupSensors):
    """Breaches, edge samples, gaps and rows out (the state is the group's, see group.py)."""

    driver: Cycler
    call: Callable[..., Awaitable[Any]]
    clock: EngineClock
    writer: SampleSink
    limits: Limits
    chans: list[int]
    breach_to_off_s: list[float]
    breach_to_ack_s: list[float]
    _breach_to_off: dict[int, tuple[float, float]]
    _lost_at_breach: set[int]
    _outputs_off: Callable[[Sequence[int]], Awaitable[float]]
    _measure: Callable[[list[int]], Awaitable[Any]]
    _pull: Callable[[int], None]
    ends: EndConditions

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

    def _previous(self) -> Previous:
        """The runs' last reading and step capacity, kept before a new reading is
        integrated: an end condition's crossing lies between the two."""
        st = self.state
        return Previous(st.last_t_s, st.last_voltage_v, st.last_current_a,
                        st.last_temperature_c,
                        st.step_capacity_ah.copy() if self.ends.present["capacity"]
                        else st.step_capacity_ah)

    def _due(self, reach: FloatArray, extra: BoolArray,
             valid: BoolArray | None = None) -> tuple[IntArray, IntArray | None, FloatArray]:
        """Which runs store this reading: those whose next storage time falls before
        ``reach`` (the time the reading serves up to), and ``extra`` ones (a breach, a
        phase end: stored off the grid). Moves each run's next storage time on; a storage
        time before the one served went by unsampled (a missed period). ``valid``: the
        runs this reading counts for (None: all). Returns (runs to store, missed periods
        by run or None, the storage times they were due at)."""
        st = self.state
        due_t_s = st.next_due_t_s
        on_grid = reach > due_t_s
        if valid is not None:
            on_grid &= valid
        due = on_grid | extra
        # Only a row on the storage grid moves the next storage time on: a row stored off
        # it (a phase end, a breach) is extra, and the period after it is still sampled.
        next_due = np.where(on_grid, due_t_s + st.period_s, due_t_s)
        # A later storage time is due as well (a late tick): the reading serves the last
        # one, the ones before it went by unsampled (missed periods, gaps.py), and the
        # run goes on with the storage time after it — on its grid, no catch-up burst.
        skipped = next_due < reach
        if valid is not None:
            skipped &= valid
        miss = None
        if skipped.any():
            miss = missed(reach, due_t_s, st.period_s, skipped)
            next_due = np.where(skipped, due_t_s + (miss + 1) * st.period_s, next_due)
        st.next_due_t_s = next_due
        return np.flatnonzero(due), miss, due_t_s

    def _due_rows(self, idx: IntArray, t: FloatArray, v: FloatArray, i: FloatArray,
                  temp_rows: FloatArray, temp_age: FloatArray | None,
                  temp_flags: IntArray | None, breach: BoolArray, miss: IntArray | None,
                  due_t_s: FloatArray, ts_utc: float, gap_cause: str = "late"
                  ) -> tuple[SampleBatch, Ledger | None]:
        """The rows of runs ``idx`` (from :meth:`_due`) with their flags, and the ledger of
        the gaps they close (None: no period was missed)."""
        st = self.state
        flags: Any = (np.where(breach[idx], FLAG_BREACH, 0)
                      | np.where(st.paused[idx], FLAG_PAUSED, 0))
        if temp_flags is not None:
            flags = flags | temp_flags[idx]
        ledger = (None if miss is None
                  else self._gaps(idx, miss, due_t_s, flags, ts_utc, gap_cause))
        rows = st.batch(idx, t[idx], v[idx], i[idx], temp_rows[idx], ts_utc, flags,
                        None if temp_age is None else temp_age[idx])
        return rows, ledger

    def _gaps(self, idx: IntArray, miss: IntArray, due_t_s: FloatArray, flags: NDArray[Any],
              ts_utc: float, cause: str = "late") -> Ledger:
        """The gaps of runs ``idx`` that missed storage times (``miss``, by run; the first
        missed one is ``due_t_s``) for the ledger of their next rows; flags those rows
        GAP (``flags``, aligned with ``idx``, in place). ``cause``: "late" (a tick came
        late), "overflow" (a logging instrument's ring overwrote readings first)."""
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
                ts_utc, r.missed_periods, cause))
        return ledger

    async def _put(self, idx: IntArray, rows: SampleBatch,
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
        # On the loop's thread where the driver can, as a tick's reading: a phase change
        # on many channels is many edges, and each worker-thread hand-off costs GIL turns.
        m2 = await self._measure([self.chans[k] for k in changed])
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
        await self._put(idx, self.state.batch(idx, t2, v2, i2, temp_rows, ts_utc, row_flags,
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


def _add_records(ledger: Ledger, run_id: int, tr: Transition) -> None:
    """A transition's steps and cycles rows into ``ledger``."""
    if tr.step is not None:
        ledger.steps.append({"run_id": run_id, **tr.step.__dict__})
    for c in tr.cycles:
        ledger.cycles.append({"run_id": run_id, **c})
