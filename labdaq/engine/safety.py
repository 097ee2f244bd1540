"""Safety limits, checked on every reading of every channel (vectorised per group).

The group turns the outputs of breaching runs off before anything else it does with a
reading; this module says which runs breach: a reading outside the run's window (voltage,
charge/discharge current, temperature) that has lasted the limit's debounce time.
"""

from __future__ import annotations

import math

import numpy as np

from labdaq.engine.channel import ChannelRun
from labdaq.engine.events import SafetyTrip
from labdaq.engine.run_arrays import BoolArray, FloatArray, IntArray

#: A current more than this fraction above the tightest limit trips the interlock; the
#: band covers set-point accuracy and noise of typical cyclers (0.05 % – 1 % of range).
CURRENT_TOLERANCE = 1.05


def _nan(x: float | None) -> float:
    return math.nan if x is None else float(x)


class Limits:
    """The runs' limits as arrays (same order as the group's runs); rebuilt only when a
    run joins or leaves."""

    def __init__(self, runs: list[ChannelRun]) -> None:
        lim = [r.limits for r in runs]
        self.min_voltage_v = np.array([x.min_voltage_v for x in lim], float)
        self.max_voltage_v = np.array([x.max_voltage_v for x in lim], float)
        self.max_charge_current_a = np.array(
            [x.max_charge_current_a * CURRENT_TOLERANCE for x in lim], float)
        self.max_discharge_current_a = np.array(
            [x.max_discharge_current_a * CURRENT_TOLERANCE for x in lim], float)
        tmin = np.array([_nan(x.min_temperature_c) for x in lim], float)
        tmax = np.array([_nan(x.max_temperature_c) for x in lim], float)
        # An unset temperature limit never trips (comparisons with ±inf are False).
        self.min_temperature_c = np.where(np.isnan(tmin), -np.inf, tmin)
        self.max_temperature_c = np.where(np.isnan(tmax), np.inf, tmax)
        self.breach_duration_s = np.array([x.breach_duration_s for x in lim], float)

    def outside(self, sel: slice | IntArray, v: FloatArray, i: FloatArray,
                temp: FloatArray) -> BoolArray:
        """Readings of runs ``sel`` outside their window (NaN never is)."""
        return np.asarray(
            (v > self.max_voltage_v[sel])
            | (v < self.min_voltage_v[sel])
            | (i > self.max_charge_current_a[sel])
            | (-i > self.max_discharge_current_a[sel])
            | (temp > self.max_temperature_c[sel])
            | (temp < self.min_temperature_c[sel]),
            bool,
        )

    def breaching(self, sel: slice | IntArray, t: FloatArray, v: FloatArray, i: FloatArray,
                  temp: FloatArray, since: FloatArray) -> tuple[BoolArray, FloatArray]:
        """(breach mask, new ``since``): outside the window for at least the debounce
        time; ``since`` holds when each run was first outside (NaN: inside)."""
        over = self.outside(sel, v, i, temp)
        first = np.where(over, np.where(np.isnan(since), t, since), np.nan)
        return over & (t - first >= self.breach_duration_s[sel]), first


def which_limit(limits: Limits, run: ChannelRun, k: int, v: float, i: float,
                temp: float) -> tuple[str, float, float]:
    """(limit name, measured value, bound) of run ``k``'s breach, for the event."""
    lim = run.limits
    if v > limits.max_voltage_v[k]:
        return "max_voltage_v", v, lim.max_voltage_v
    if v < limits.min_voltage_v[k]:
        return "min_voltage_v", v, lim.min_voltage_v
    if i > limits.max_charge_current_a[k]:
        return "max_charge_current_a", i, lim.max_charge_current_a
    if -i > limits.max_discharge_current_a[k]:
        return "max_discharge_current_a", -i, lim.max_discharge_current_a
    if lim.max_temperature_c is not None and temp > lim.max_temperature_c:
        return "max_temperature_c", temp, lim.max_temperature_c
    return "min_temperature_c", temp, float(lim.min_temperature_c or math.nan)


def breach_event(limits: Limits, r: ChannelRun, k: int, v: float, i: float, temp: float,
                 t: float, off_s: float, ack_s: float) -> SafetyTrip:
    """The safety event of run ``k``'s breach; sets the run's outcome (aborted)."""
    lim, val, bound = which_limit(limits, r, k, v, i, temp)
    r.outcome = ("aborted_safety", f"{lim}: measured {val:.6g}, limit {bound:.6g}")
    return SafetyTrip(
        r.run_id, "safety", "critical",
        f"safety limit crossed, output turned off: {lim}: measured {val:.6g}, "
        f"limit {bound:.6g}",
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
