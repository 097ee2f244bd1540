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

__all__ = ["ImportedData", "VendorCounters", "cycles_from_current", "steps_from_current",
           "vendor_cycle_summary"]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

#: Below this the cell is taken to be at rest when numbering steps and cycles.
REST_CURRENT_A = 1e-6


@dataclass
class VendorCounters:
    """The cycler's own capacity and energy counters, per sample (Ah, Wh, non-negative):
    what its per-cycle summary is made of. Each may reset at step or cycle starts."""

    charge_capacity_ah: FloatArray
    discharge_capacity_ah: FloatArray
    charge_energy_wh: FloatArray | None = None
    discharge_energy_wh: FloatArray | None = None


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
        cut = {name: getattr(self, name)[keep] for name in (
            "t_s", "voltage_v", "current_a", "cycle_index", "step_index")}
        temp = None if self.temperature_c is None else self.temperature_c[keep]
        return replace(self, **cut, temperature_c=temp,
                       details={**self.details, "rows_dropped": int((~keep).sum())})


def _segments(keys: tuple[IntArray, ...]) -> IntArray:
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


def vendor_cycle_summary(cycle_index: IntArray, step_index: IntArray,
                         counters: VendorCounters) -> list[dict[str, Any]]:
    """The cycler's per-cycle totals from its own counters: every (cycle, step) segment
    adds its counter's rise, its largest value less the value it started from — the
    reading before the segment when the counter went on from it, zero when the counter
    was reset (its first value in the segment is below the one before). That is right
    whether the cycler resets a counter at each step (Neware, Maccor), at each cycle or
    never (Arbin), and counts the interval that ends at a segment's first reading."""
    starts = _segments((cycle_index, step_index))
    cyc_of_seg = cycle_index[starts]

    def per_cycle(x: FloatArray | None) -> dict[int, float] | None:
        if x is None:
            return None
        before = x[np.maximum(starts - 1, 0)]
        base = np.where(x[starts] >= before, before, 0.0)
        rise = np.maximum.reduceat(x, starts) - base
        cycles, inverse = np.unique(cyc_of_seg, return_inverse=True)
        total = np.bincount(inverse, weights=rise, minlength=cycles.size)
        return {int(c): float(v) for c, v in zip(cycles, total, strict=True)}

    qc = per_cycle(counters.charge_capacity_ah)
    qd = per_cycle(counters.discharge_capacity_ah)
    ec = per_cycle(counters.charge_energy_wh)
    ed = per_cycle(counters.discharge_energy_wh)
    assert qc is not None and qd is not None
    out = []
    for c in sorted(qc):
        row: dict[str, Any] = {"cycle_index": c, "charge_capacity_ah": qc[c],
                               "discharge_capacity_ah": qd[c]}
        if ec is not None and ed is not None:
            row["charge_energy_wh"] = ec[c]
            row["discharge_energy_wh"] = ed[c]
        row["coulombic_efficiency"] = qd[c] / qc[c] if qc[c] > 0 else None
        out.append(row)
    return out
