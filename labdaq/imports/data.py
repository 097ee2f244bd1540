"""What every cycler-file reader returns (:class:`ImportedData`): labdaq's columns as numpy
arrays in labdaq's units and sign convention (current positive while charging), and the
cycler's own per-cycle summary where the file carries one.

Readers differ only in how they get there; what follows the reader — cycle and step
numbering when a file has none, the vendor summary from the cycler's own capacity
counters, storage — is shared here and in :mod:`.store`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["ImportedData", "VendorCounters", "cycles_from_current", "segment_starts",
           "steps_from_current", "vendor_cycle_summary"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: labdaq.storage.models.SampleFlag.EDGE: a reading at the start of a step.
EDGE_FLAG = 8
#: Below this the cell is taken to be at rest when numbering steps and cycles.
REST_CURRENT_A = 1e-6
#: A step whose current differs from the step before's by more than this (relative to
#: the larger) changed its set point at its start; smaller changes (a CC phase handing
#: over to CV) are continuous, and their first reading is the step's own.
SWITCH_JUMP_REL = 0.1


@dataclass
class VendorCounters:
    """The cycler's own capacity and energy counters, per sample (Ah, Wh, non-negative):
    what its per-cycle summary is made of. Each may reset at step or cycle starts.

    A cycler with one counter for both directions (Maccor's ``Amp-hr``) gives it as both
    and ``direction`` (+1 charge, -1 discharge, 0 rest, per sample): a segment's rise
    then counts for the direction it was in."""

    charge_capacity_ah: FloatArray
    discharge_capacity_ah: FloatArray
    charge_energy_wh: FloatArray | None = None
    discharge_energy_wh: FloatArray | None = None
    direction: IntArray | None = None


@dataclass
class ImportedData:
    format: str
    reader: str  # package and version, or "labdaq <version>" for labdaq's own
    reader_licence: str
    t_s: FloatArray
    voltage_v: FloatArray
    current_a: FloatArray  # positive while charging
    cycle_index: IntArray
    step_index: IntArray
    temperature_c: FloatArray | None = None
    start_utc: float | None = None  # POSIX seconds of t_s = 0, when the file says
    current_measured: bool = True
    # The cycler's own per-cycle summary (labdaq's column names), or None.
    vendor_cycles: list[dict[str, Any]] | None = None
    details: dict[str, Any] = field(default_factory=dict)
    # Time since the step began, where the file records it (Arbin Step_Time, Maccor
    # Step (Sec)): says when a step began before its first reading.
    step_time_s: FloatArray | None = None
    # Sample flags (labdaq.storage.models.SampleFlag); None: all 0.
    flags: IntArray | None = None

    def __post_init__(self) -> None:
        n = self.t_s.size
        for name in ("voltage_v", "current_a", "cycle_index", "step_index"):
            if getattr(self, name).size != n:
                raise ValueError(f"{name} has {getattr(self, name).size} values, t_s {n}")
        if n == 0:
            raise ValueError("the file holds no data rows")

    def finite(self) -> ImportedData:
        """Without the rows whose time, voltage or current is not a number (a cycler's
        blank or overflow readings); ValueError if none is left."""
        keep = np.isfinite(self.t_s) & np.isfinite(self.voltage_v) & np.isfinite(self.current_a)
        if keep.all():
            return self
        if not keep.any():
            raise ValueError("no row has a finite time, voltage and current")
        cut: dict[str, Any] = {name: getattr(self, name)[keep] for name in (
            "t_s", "voltage_v", "current_a", "cycle_index", "step_index")}
        for name in ("temperature_c", "step_time_s", "flags"):
            value = getattr(self, name)
            cut[name] = None if value is None else value[keep]
        return replace(self, **cut,
                       details={**self.details, "rows_dropped": int((~keep).sum())})

    def with_step_starts(self) -> ImportedData:
        """Readings where steps began, where the file's step time says the log missed
        them. A step's current holds from its start (a set point is applied at once);
        the trapezoid between the readings around a step start instead ramps linearly
        from the current before to the one after, over a whole logging interval, and the
        capacity of the difference is lost. Two cases, each an added reading with the
        ``EDGE`` flag, counted in ``details``:

        * ``step_start_readings``: the step began after the reading before it and before
          its own first reading (its step time there is > 0: Arbin, Maccor). The added
          reading is at the start, with the step's first current and the voltage
          interpolated between the readings around it.
        * ``step_switch_readings``: the step's first reading is at its start (step time
          0) and shows the current before the output switched — nearer the previous
          step's last current than its own next reading, which differs by more than
          :data:`SWITCH_JUMP_REL` (a set point changed, not a CC-CV hand-over). The
          added reading, at that same instant, is the step's next reading (current and
          voltage) held back to the start: the cycler's own counter, integrated far
          more often than the log is written, counts the step's current from there.

        What each case changed on the public files is in docs/imports.md.
        """
        if self.step_time_s is None or self.t_s.size < 2:
            return self
        starts = segment_starts((self.cycle_index, self.step_index))
        ends = np.append(starts[1:], self.t_s.size)  # one past each step's last reading
        first, nxt_start = starts[1:], ends[1:]
        t, i = self.t_s, self.current_a
        prev, own = t[first - 1], t[first]
        began = own - self.step_time_s[first]
        # The two clocks (test and step time) differ by rounding: a step that began "just
        # before" the reading before it began at that reading.
        slack = 0.01 * (own - prev)
        inside = (began > prev - slack) & (began < own - slack)
        at_before = first[inside]

        has_next = first + 1 < nxt_start
        nxt = np.minimum(first + 1, t.size - 1)
        at_start = self.step_time_s[first] <= 0.01 * np.maximum(t[nxt] - own, 0.0)
        i_prev, i_first, i_next = i[first - 1], i[first], i[nxt]
        jump = np.abs(i_next - i_prev)
        switched = (has_next & at_start & ~inside
                    & (np.abs(i_first - i_prev) < np.abs(i_first - i_next))
                    & (jump > REST_CURRENT_A)
                    & (jump > SWITCH_JUMP_REL * np.maximum(np.abs(i_next), np.abs(i_prev))))
        at_switch = first[switched]
        if at_before.size == 0 and at_switch.size == 0:
            return self

        # Before the step's first reading: at its start, the step's first current.
        t0 = np.maximum(began[inside], prev[inside])
        w = (t0 - t[at_before - 1]) / (t[at_before] - t[at_before - 1])
        v0 = self.voltage_v[at_before - 1] + w * (
            self.voltage_v[at_before] - self.voltage_v[at_before - 1])
        # After it (same instant): the step's next reading, held back to the start.
        src_before, src_switch = at_before, at_switch + 1
        pos = np.concatenate([at_before, at_switch + 1])
        src = np.concatenate([src_before, src_switch])
        order = np.argsort(pos, kind="stable")
        pos, src = pos[order], src[order]
        new_t = np.concatenate([t0, t[at_switch]])[order]
        new_v = np.concatenate([v0, self.voltage_v[src_switch]])[order]
        new_step_t = np.concatenate([np.zeros(at_before.size),
                                     self.step_time_s[at_switch]])[order]

        def put(x: NDArray[Any], values: Any) -> NDArray[Any]:
            return np.insert(x, pos, values)

        flags = np.zeros(t.size, np.int64) if self.flags is None else self.flags
        temp = self.temperature_c
        details = dict(self.details)
        if at_before.size:
            details["step_start_readings"] = int(at_before.size)
        if at_switch.size:
            details["step_switch_readings"] = int(at_switch.size)
        return replace(
            self, t_s=put(t, new_t), voltage_v=put(self.voltage_v, new_v),
            current_a=put(i, i[src]),
            cycle_index=put(self.cycle_index, self.cycle_index[src]),
            step_index=put(self.step_index, self.step_index[src]),
            temperature_c=None if temp is None else put(temp, temp[src]),
            step_time_s=put(self.step_time_s, new_step_t),
            flags=put(flags, EDGE_FLAG), details=details)


def segment_starts(keys: tuple[IntArray, ...]) -> IntArray:
    """Start index of every run of equal consecutive key tuples."""
    n = keys[0].size
    change = np.zeros(n, dtype=bool)
    change[0] = True
    for k in keys:
        change[1:] |= k[1:] != k[:-1]
    return np.flatnonzero(change)


def steps_from_current(current_a: FloatArray) -> IntArray:
    """Step numbers for a file without them: a new step at each change of direction
    (charge, discharge, rest)."""
    sign = np.sign(np.where(np.abs(current_a) > REST_CURRENT_A, current_a, 0.0)).astype(np.int64)
    change = np.zeros(sign.size, dtype=np.int64)
    change[1:] = sign[1:] != sign[:-1]
    return np.cumsum(change)


def cycles_from_current(current_a: FloatArray) -> IntArray:
    """Cycle numbers (from 1) for a file without them: a cycle begins with each charge
    that follows a discharge."""
    sign = np.sign(np.where(np.abs(current_a) > REST_CURRENT_A, current_a, 0.0))
    active = np.flatnonzero(sign != 0)
    starts = np.zeros(current_a.size, dtype=np.int64)
    if active.size > 1:
        s = sign[active]
        begin = active[1:][(s[1:] > 0) & (s[:-1] < 0)]
        starts[begin] = 1
    return 1 + np.cumsum(starts)


def vendor_cycle_summary(cycle_index: IntArray, segment: IntArray,
                         counters: VendorCounters) -> list[dict[str, Any]]:
    """The cycler's per-cycle totals from its own counters: every segment (equal cycle
    and ``segment``, a step or the cycler's half cycle) adds its counter's rise, its
    largest value less the value it started from — the reading before the segment when
    the counter went on from it, zero when the counter was reset (its first value in the
    segment is below the one before). That is right whether the cycler resets a counter at
    each step (Neware, Maccor), at each cycle or never (Arbin), and counts the interval
    that ends at a segment's first reading."""
    direction = counters.direction
    keys = (cycle_index, segment) if direction is None else (cycle_index, segment, direction)
    starts = segment_starts(keys)
    cycles, inverse = np.unique(cycle_index[starts], return_inverse=True)

    def rise(x: FloatArray) -> FloatArray:
        # A blank counter reading (NaN) is no reading: fmax skips it.
        x = np.asarray(x, dtype=np.float64)
        before = np.nan_to_num(x[np.maximum(starts - 1, 0)])
        first = np.nan_to_num(x[starts])
        base = np.where(first >= before, before, 0.0)
        return np.nan_to_num(np.fmax.reduceat(x, starts) - base)

    def per_cycle(x: FloatArray | None, sign: int) -> FloatArray | None:
        if x is None:
            return None
        r = rise(x)
        if direction is not None:
            r = np.where(direction[starts] == sign, r, 0.0)
        return np.bincount(inverse, weights=r, minlength=cycles.size).astype(np.float64)

    qc = per_cycle(counters.charge_capacity_ah, 1)
    qd = per_cycle(counters.discharge_capacity_ah, -1)
    ec = per_cycle(counters.charge_energy_wh, 1)
    ed = per_cycle(counters.discharge_energy_wh, -1)
    assert qc is not None and qd is not None
    out = []
    for k, c in enumerate(cycles.tolist()):
        row: dict[str, Any] = {"cycle_index": int(c), "charge_capacity_ah": float(qc[k]),
                               "discharge_capacity_ah": float(qd[k])}
        if ec is not None and ed is not None:
            row["charge_energy_wh"] = float(ec[k])
            row["discharge_energy_wh"] = float(ed[k])
        row["coulombic_efficiency"] = float(qd[k] / qc[k]) if qc[k] > 0 else None
        out.append(row)
    return out
