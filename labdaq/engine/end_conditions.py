"""End conditions of the runs' current phases, evaluated for all runs of a group at once.

A phase ends at the first reading at or past any of its conditions (voltage above or
below, |current| below, duration, step capacity, dV/dt below, temperature above, or its
auxiliary step done). NaN thresholds never fire, and a condition no run of the group has
is not evaluated at all. The reading that showed the end is where the engine acts; where
the threshold was crossed between the two readings around it is recorded as well
(:func:`crossing`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from labdaq.engine.channel import ChannelRun, Phase
from labdaq.engine.run_arrays import BoolArray, FloatArray, RunArrays

# In the order a reason is named when several conditions hold at once.
_REASONS = ("voltage_above", "voltage_below", "current_below", "capacity", "dvdt_below",
            "temperature_above", "duration")


class EndConditions:
    """The phases' thresholds as arrays (same order as the group's runs); rebuilt when a
    phase changes or a run joins or leaves."""

    def __init__(self, phases: list[Phase], runs: list[ChannelRun]) -> None:
        self.voltage_above_v = np.array([p.voltage_above_v for p in phases], float)
        self.voltage_below_v = np.array([p.voltage_below_v for p in phases], float)
        self.current_below_a = np.array([p.current_below_a for p in phases], float)
        self.deadline_t_s = np.array([p.deadline_t_s for p in phases], float)
        self.capacity_ah = np.array([p.capacity_ah for p in phases], float)
        self.dvdt_below_v_per_s = np.array([p.dvdt_below_v_per_s for p in phases], float)
        self.temperature_above_c = np.array([p.temperature_above_c for p in phases], float)
        self.phase_t0_s = np.array([r.phase_t0_s for r in runs], float)
        self.aux = np.array([p.aux is not None for p in phases], bool)
        self.any_aux = bool(self.aux.any())
        # Which conditions any run has at all: the others are not evaluated per tick.
        self.present = {
            name: bool((~np.isnan(arr)).any())
            for name, arr in (
                ("voltage_above", self.voltage_above_v),
                ("voltage_below", self.voltage_below_v),
                ("current_below", self.current_below_a), ("capacity", self.capacity_ah),
                ("dvdt_below", self.dvdt_below_v_per_s),
                ("temperature_above", self.temperature_above_c),
            )
        }
        self.present["duration"] = bool(np.isfinite(self.deadline_t_s).any())

    def evaluate(self, runs: list[ChannelRun], state: RunArrays, t: FloatArray,
                 v: FloatArray, i: FloatArray, temp: FloatArray,
                 look_s: FloatArray) -> Hits:
        """Which runs' phases end at this reading (paused and breaching runs not excluded
        yet); ``look_s`` is each run's period between looks. Moves the dV/dt reference
        points on (``state``)."""
        n = len(runs)
        none = np.zeros(n, bool)
        has = self.present
        dvdt = none
        if has["dvdt_below"]:
            window = np.maximum(10 * look_s, 30.0)
            no_ref = np.isnan(state.dvdt_ref_voltage_v)
            slope_due = (t - state.dvdt_ref_t_s) >= window
            with np.errstate(invalid="ignore", divide="ignore"):
                slope = np.abs(v - state.dvdt_ref_voltage_v) / (t - state.dvdt_ref_t_s)
            dvdt = slope_due & ~no_ref & (slope < self.dvdt_below_v_per_s)
            reset_ref = slope_due | no_ref
            state.dvdt_ref_t_s = np.where(reset_ref, t, state.dvdt_ref_t_s)
            state.dvdt_ref_voltage_v = np.where(reset_ref, v, state.dvdt_ref_voltage_v)
        aux_done = none
        if self.any_aux:
            aux_done = self.aux & np.fromiter((r.aux_done for r in runs), bool, n)
        hits = {
            "voltage_above": v >= self.voltage_above_v if has["voltage_above"] else none,
            "voltage_below": v <= self.voltage_below_v if has["voltage_below"] else none,
            # The first reading of a CV phase may still carry the CC current: skip it.
            "current_below": (
                (np.abs(i) <= self.current_below_a) & (t - self.phase_t0_s > look_s * 1.5)
                if has["current_below"] else none
            ),
            "capacity": (state.step_capacity_ah >= self.capacity_ah
                         if has["capacity"] else none),
            "dvdt_below": dvdt,
            "temperature_above": (temp >= self.temperature_above_c
                                  if has["temperature_above"] else none),
            "duration": t >= self.deadline_t_s - 1e-9 if has["duration"] else none,
        }
        ended = aux_done.copy()
        for hit in hits.values():
            ended |= hit
        return Hits(hits, aux_done, ended)

    def crossing(self, k: int, reason: str, prev: Previous, state: RunArrays,
                 t: FloatArray, v: FloatArray, i: FloatArray, temp: FloatArray) -> float:
        """Run time at which run ``k``'s end condition was crossed, located between the
        previous reading and this one by linear interpolation (a deadline is exact).

        The engine acts at the reading that showed the end, so the step boundary stays
        there; this is the *recorded* crossing (steps.end_crossing_t_s). Without a
        previous reading in the phase (a run that just joined), or for dV/dt and
        auxiliary steps, which have no single threshold crossing, it is the reading's
        time.
        """
        t1 = float(t[k])
        t0 = float(prev.t_s[k])
        if reason == "duration":
            return min(max(float(self.deadline_t_s[k]), t0), t1)
        pairs = {
            "voltage_above": (prev.voltage_v, v, self.voltage_above_v),
            "voltage_below": (prev.voltage_v, v, self.voltage_below_v),
            "current_below": (prev.current_a, i, self.current_below_a),
            "capacity": (prev.step_capacity_ah, state.step_capacity_ah, self.capacity_ah),
            "temperature_above": (prev.temperature_c, temp, self.temperature_above_c),
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


@dataclass
class Hits:
    by_reason: dict[str, BoolArray]
    aux_done: BoolArray
    ended: BoolArray

    def reason(self, k: int) -> str:
        """Which condition ended run ``k``'s phase (the first in _REASONS that holds)."""
        if self.aux_done[k]:
            return "done"
        for name in _REASONS:
            if self.by_reason[name][k]:
                return name
        return "unknown"


@dataclass
class Previous:
    """The readings before this one (the integration anchor), for crossings."""

    t_s: FloatArray
    voltage_v: FloatArray
    current_a: FloatArray
    temperature_c: FloatArray
    step_capacity_ah: FloatArray
