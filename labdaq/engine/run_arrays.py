"""Per-run state that changes every tick, as numpy arrays: one element per run of a group.

The instrument group's hot loop works on whole arrays (one numpy operation per quantity
per tick, whatever the number of channels). The same quantities live on each
:class:`~labdaq.engine.channel.ChannelRun` in plain Python, where step and phase
boundaries use them; they are copied between the two only at boundaries (:meth:`push`,
:meth:`pull`). Runs joining or leaving keep every other run's elements untouched.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from labdaq.engine.channel import ChannelRun
from labdaq.engine.sample_batch import SampleBatch

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

# name -> value for a run that joins (the rest are set from its ChannelRun by push()).
_FLOATS = (
    "t0_clock_s",  # engine clock time at the run's t_s = 0
    "period_s",  # storage period
    "next_due_t_s",  # next storage time (run time)
    "last_t_s",  # integration anchor: time, voltage, current of the previous reading
    "last_voltage_v",
    "last_current_a",
    "last_temperature_c",  # of the previous reading (NaN: none), for crossings
    "breach_since_t_s",  # run time a limit was first exceeded (debounce); NaN = not
    "dvdt_ref_t_s",  # dV/dt end condition: reference point
    "dvdt_ref_voltage_v",
    "t_s",  # run time of the last stored sample
    # run time from which the instrument reads under the run's present set point (a
    # logging cabinet's readings before it were taken under the previous one)
    "setpoint_t_s",
    "step_capacity_ah",  # |charge| moved in the step
    "step_energy_wh",  # |energy| moved in the step
    "step_discharge_ah",  # charge discharged in the step
    # the open cycle's totals (channel.CycleTotals)
    "cycle_charge_ah",
    "cycle_discharge_ah",
    "cycle_charge_wh",
    "cycle_discharge_wh",
    "cycle_charge_v_s",
    "cycle_charge_s",
    "cycle_discharge_v_s",
    "cycle_discharge_s",
    "cycle_end_t_s",
)
_INTS = ("run_id", "seq", "step_index", "cycle_index")


class RunArrays:
    t0_clock_s: FloatArray
    period_s: FloatArray
    next_due_t_s: FloatArray
    last_t_s: FloatArray
    last_voltage_v: FloatArray
    last_current_a: FloatArray
    last_temperature_c: FloatArray
    breach_since_t_s: FloatArray
    dvdt_ref_t_s: FloatArray
    dvdt_ref_voltage_v: FloatArray
    t_s: FloatArray
    setpoint_t_s: FloatArray
    step_capacity_ah: FloatArray
    step_energy_wh: FloatArray
    step_discharge_ah: FloatArray
    cycle_charge_ah: FloatArray
    cycle_discharge_ah: FloatArray
    cycle_charge_wh: FloatArray
    cycle_discharge_wh: FloatArray
    cycle_charge_v_s: FloatArray
    cycle_charge_s: FloatArray
    cycle_discharge_v_s: FloatArray
    cycle_discharge_s: FloatArray
    cycle_end_t_s: FloatArray
    run_id: IntArray
    seq: IntArray
    step_index: IntArray
    cycle_index: IntArray
    paused: BoolArray

    def __init__(self) -> None:
        for nm in _FLOATS:
            setattr(self, nm, np.zeros(0))
        for nm in _INTS:
            setattr(self, nm, np.zeros(0, np.int64))
        self.paused = np.zeros(0, bool)

    def append(self, run: ChannelRun, t0_clock_s: float) -> int:
        """Add a run's elements (last); returns its index."""
        return self.extend([run], t0_clock_s)[0]

    def extend(self, runs: list[ChannelRun], t0_clock_s: float) -> list[int]:
        """Add the elements of runs joining together (last, in order), every array grown
        once; returns their indices."""
        n0, m = len(self.paused), len(runs)
        for nm in _FLOATS:
            setattr(self, nm, np.concatenate([getattr(self, nm), np.zeros(m)]))
        for nm in _INTS:
            setattr(self, nm, np.concatenate([getattr(self, nm), np.zeros(m, np.int64)]))
        self.paused = np.concatenate([self.paused, [r.paused for r in runs]]).astype(bool)
        ks = list(range(n0, n0 + m))
        for k, run in zip(ks, runs, strict=True):
            self.t0_clock_s[k] = t0_clock_s
            self.period_s[k] = run.period_s
            self.next_due_t_s[k] = run.t_s + run.period_s
            self.last_t_s[k] = run.t_s
            self.last_voltage_v[k] = np.nan  # no anchor yet: the first reading sets it
            self.last_temperature_c[k] = np.nan
            self.breach_since_t_s[k] = np.nan
            self.dvdt_ref_t_s[k] = run.t_s
            self.setpoint_t_s[k] = run.t_s
            self.dvdt_ref_voltage_v[k] = np.nan
            self.run_id[k] = run.run_id
            self.push(k, run)
        return ks

    def delete(self, k: int) -> None:
        for nm in (*_FLOATS, *_INTS, "paused"):
            setattr(self, nm, np.delete(getattr(self, nm), k))

    def push(self, k: int, r: ChannelRun) -> None:
        """ChannelRun → arrays (after the run's position changed in Python)."""
        c = r.cycle
        self.seq[k] = r.seq
        self.t_s[k] = r.t_s
        self.step_capacity_ah[k] = r.step_cap_ah
        self.step_energy_wh[k] = r.step_en_wh
        self.step_discharge_ah[k] = r.step_dis_ah
        self.step_index[k] = r.step.index if r.step is not None else -1
        self.cycle_index[k] = c.cycle_index
        self.cycle_charge_ah[k] = c.charge_ah
        self.cycle_discharge_ah[k] = c.discharge_ah
        self.cycle_charge_wh[k] = c.charge_wh
        self.cycle_discharge_wh[k] = c.discharge_wh
        self.cycle_charge_v_s[k] = c.charge_v_s
        self.cycle_charge_s[k] = c.charge_s
        self.cycle_discharge_v_s[k] = c.discharge_v_s
        self.cycle_discharge_s[k] = c.discharge_s
        self.cycle_end_t_s[k] = c.end_t_s

    def pull(self, k: int, r: ChannelRun) -> None:
        """Arrays → ChannelRun (before Python reads or changes the run's position)."""
        c = r.cycle
        r.seq = int(self.seq[k])
        r.t_s = float(self.t_s[k])
        r.step_cap_ah = float(self.step_capacity_ah[k])
        r.step_en_wh = float(self.step_energy_wh[k])
        r.step_dis_ah = float(self.step_discharge_ah[k])
        c.charge_ah = float(self.cycle_charge_ah[k])
        c.discharge_ah = float(self.cycle_discharge_ah[k])
        c.charge_wh = float(self.cycle_charge_wh[k])
        c.discharge_wh = float(self.cycle_discharge_wh[k])
        c.charge_v_s = float(self.cycle_charge_v_s[k])
        c.charge_s = float(self.cycle_charge_s[k])
        c.discharge_v_s = float(self.cycle_discharge_v_s[k])
        c.discharge_s = float(self.cycle_discharge_s[k])
        c.end_t_s = float(self.cycle_end_t_s[k])

    def fast(self, idx: IntArray) -> FloatArray:
        """Fast-state rows (ledger.FAST_COLUMNS) of runs ``idx``, after their rows."""
        # np.array of a list of arrays is the cheapest way to one block (np.stack costs
        # several times more per call); the ints become float64, exact up to 2**53.
        block = np.array((
            self.run_id, self.seq, self.t_s, self.step_capacity_ah, self.step_energy_wh,
            self.step_discharge_ah, self.cycle_charge_ah, self.cycle_discharge_ah,
            self.cycle_charge_wh, self.cycle_discharge_wh, self.cycle_charge_v_s,
            self.cycle_charge_s, self.cycle_discharge_v_s, self.cycle_discharge_s,
            self.cycle_end_t_s,
        ), dtype=np.float64)
        return np.ascontiguousarray(block[:, idx].T)

    def batch(
        self, idx: IntArray, t: FloatArray, v: FloatArray, i: FloatArray, temp: FloatArray,
        ts_utc: float, flags: NDArray[Any], temp_age_s: FloatArray | None = None,
    ) -> SampleBatch:
        """Sample rows of runs ``idx`` as columns (sample_batch.py); advances their seq.
        ``temp_age_s``: the age of each wired temperature reading (None or NaN: none)."""
        seq = self.seq[idx] + 1
        self.seq[idx] = seq
        self.t_s[idx] = t
        ages = (np.full(len(seq), np.nan) if temp_age_s is None
                else np.asarray(temp_age_s, np.float64))
        return SampleBatch(
            self.run_id[idx], seq, np.asarray(t, np.float64), ts_utc, self.step_index[idx],
            self.cycle_index[idx], np.asarray(v, np.float64), np.asarray(i, np.float64),
            np.asarray(temp, np.float64), self.step_capacity_ah[idx],
            self.step_energy_wh[idx], np.broadcast_to(np.asarray(flags, np.int64), seq.shape),
            ages,
        )

    def integrate(self, sel: slice | IntArray, t: FloatArray, v: FloatArray, i: FloatArray,
                  active: BoolArray) -> None:
        """Add the trapezoid from each run's anchor to (t, v, i) to its accumulators.

        ``sel`` picks the runs (all, or the ones an edge measurement covers); ``t, v, i``
        and ``active`` are aligned with it. Positive charge moved counts as charge,
        negative as discharge, as in the cycle summary.
        """
        last_t, last_v, last_i = self.last_t_s[sel], self.last_voltage_v[sel], \
            self.last_current_a[sel]
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
        self.step_capacity_ah[sel] += np.abs(dq)
        self.step_energy_wh[sel] += de
        self.step_discharge_ah[sel] -= np.where(dis, dq, 0.0)
        self.cycle_charge_ah[sel] += np.where(chg, dq, 0.0)
        self.cycle_discharge_ah[sel] -= np.where(dis, dq, 0.0)
        self.cycle_charge_wh[sel] += np.where(chg, de, 0.0)
        self.cycle_discharge_wh[sel] += np.where(dis, de, 0.0)
        self.cycle_charge_v_s[sel] += np.where(chg, v_dt, 0.0)
        self.cycle_charge_s[sel] += np.where(chg, dt, 0.0)
        self.cycle_discharge_v_s[sel] += np.where(dis, v_dt, 0.0)
        self.cycle_discharge_s[sel] += np.where(dis, dt, 0.0)
        self.cycle_end_t_s[sel] = np.where(dq != 0.0, t, self.cycle_end_t_s[sel])

