"""Safety limits, checked on every reading of every channel (vectorised per group).

The group turns the outputs of breaching runs off before anything else it does with a
reading; this module says which runs breach: a reading outside the run's window (voltage,
charge/discharge current, temperature, charge moved in the step) that has lasted the
limit's debounce time, or a run with a temperature limit whose wired temperature sensor is
lost (labdaq.engine.aux_temps): a limit nothing can check any more stops the run.
"""

from __future__ import annotations

import math
from typing import Any

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
        self.has_temperature_limit = ~(np.isnan(tmin) & np.isnan(tmax))
        self.max_capacity_ah = np.array(
            [math.inf if x.max_capacity_ah is None else x.max_capacity_ah for x in lim], float)
        self.breach_duration_s = np.array([x.breach_duration_s for x in lim], float)

    def outside(self, sel: slice | IntArray, v: FloatArray, i: FloatArray,
                temp: FloatArray, capacity_ah: FloatArray | None = None,
                sensor_lost: BoolArray | None = None) -> BoolArray:
        """Readings of runs ``sel`` outside their window (NaN never is); ``capacity_ah``
        is the charge each has moved in its step, ``sensor_lost`` whether its wired
        temperature sensor is lost."""
        over = ((v > self.max_voltage_v[sel])
                | (v < self.min_voltage_v[sel])
                | (i > self.max_charge_current_a[sel])
                | (-i > self.max_discharge_current_a[sel])
                | (temp > self.max_temperature_c[sel])
                | (temp < self.min_temperature_c[sel]))
        if capacity_ah is not None:
            over |= capacity_ah > self.max_capacity_ah[sel]
        if sensor_lost is not None:
            over |= sensor_lost & self.has_temperature_limit[sel]
        return np.asarray(over, bool)

    def breaching(self, sel: slice | IntArray, t: FloatArray, v: FloatArray, i: FloatArray,
                  temp: FloatArray, since: FloatArray, capacity_ah: FloatArray | None = None,
                  sensor_lost: BoolArray | None = None) -> tuple[BoolArray, FloatArray]:
        """(breach mask, new ``since``): outside the window for at least the debounce
        time; ``since`` holds when each run was first outside (NaN: inside)."""
        over = self.outside(sel, v, i, temp, capacity_ah, sensor_lost)
        first = np.where(over, np.where(np.isnan(since), t, since), np.nan)
        return over & (t - first >= self.breach_duration_s[sel]), first


#: The name a lost temperature sensor trips under (its "source" is the temperature limit's).
SENSOR_LOST = "temperature_sensor_lost"


def which_limit(limits: Limits, run: ChannelRun, k: int, v: float, i: float,
                temp: float, capacity_ah: float = math.nan,
                sensor_lost: bool = False) -> tuple[str, float, float]:
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
    if lim.min_temperature_c is not None and temp < lim.min_temperature_c:
        return "min_temperature_c", temp, lim.min_temperature_c
    if capacity_ah > limits.max_capacity_ah[k]:
        return "max_capacity_ah", capacity_ah, float(limits.max_capacity_ah[k])
    if sensor_lost:
        # Whichever temperature limit the run has can no longer be checked.
        bound = lim.max_temperature_c if lim.max_temperature_c is not None \
            else lim.min_temperature_c
        return SENSOR_LOST, math.nan, float(math.nan if bound is None else bound)
    return "min_temperature_c", temp, float(lim.min_temperature_c or math.nan)


def breach_event(limits: Limits, r: ChannelRun, k: int, v: float, i: float, temp: float,
                 t: float, off_s: float, ack_s: float, capacity_ah: float = math.nan,
                 sensor: dict[str, Any] | None = None) -> SafetyTrip:
    """The safety event of run ``k``'s breach; sets the run's outcome (aborted).
    ``sensor`` describes the run's wired temperature sensor when it is lost."""
    lim, val, bound = which_limit(limits, r, k, v, i, temp, capacity_ah, sensor is not None)
    if lim == SENSOR_LOST:
        assert sensor is not None
        temp_lim = "max_temperature_c" if r.limits.max_temperature_c is not None \
            else "min_temperature_c"
        why = (f"temperature sensor lost ({sensor['where']}: "
               f"{sensor['error'] or sensor['cause']}); {temp_lim} {bound:.6g} can no "
               "longer be checked")
        source = r.limits.sources.get(temp_lim, "")
    else:
        why = f"{lim}: measured {val:.6g}, limit {bound:.6g}"
        source = r.limits.sources.get(lim, "")
    r.outcome = ("aborted_safety", f"{why} (limit from {source or 'unknown'})")
    return SafetyTrip(
        r.run_id, "safety", "critical",
        f"safety limit crossed, output turned off: {why} (limit from {source or 'unknown'})",
        {
            "limit": lim,
            "value": val,
            "bound": bound,
            "seq": r.seq,
            "t_s": t,
            "step_index": r.step.index if r.step is not None else None,
            "breach_to_off_s": off_s,
            "breach_to_off_ack_s": ack_s,
            "source": source,
            **({"sensor": sensor} if lim == SENSOR_LOST and sensor is not None else {}),
        },
    )
