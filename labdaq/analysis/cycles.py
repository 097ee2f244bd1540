"""Per-cycle summaries from stored samples alone, numpy-vectorised: one ``reduceat`` per
quantity over the whole run, no Python loop over samples (the states are read off the
samples next to each cycle's edges).

Conventions (the engine's, so a summary recomputed here agrees with the ``cycles``
table): the interval between samples ``j-1`` and ``j`` is integrated with the trapezoid
rule and counts for the cycle of sample ``j``; it is charge or discharge by the sign of
its trapezoid; an interval that ends at a paused sample is skipped (nothing moved, the
output was off); mean voltages are time-weighted over the charging (discharging)
intervals. Current is positive when charging.

Efficiencies are only meaningful for a cycle that starts and ends at the same defined
state. Each cycle therefore states where it started and ended — ``full`` (the last
current before it was a charge that reached the charge cut-off), ``empty`` (a discharge
that reached the discharge cut-off) or ``partial``/``unknown`` — whether the cell had
rested before its current began, and whether it is complete. A cycle whose efficiencies
are not comparable keeps them, with ``efficiency_valid`` false and the reason in
``note``: a simulated cell that starts half charged shows a coulombic efficiency near 2
in its first cycle, and that number must never reach a report unflagged.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = [
    "STATES", "CycleSummary", "summarise_cycles", "Retention", "capacity_retention",
    "cell_state_at", "rest_current_for",
]

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]
BoolArray = NDArray[np.bool_]

#: State codes: where a cycle (or a half-cycle) started or ended.
STATES = ("unknown", "full", "empty", "partial")
_UNKNOWN, _FULL, _EMPTY, _PARTIAL = range(4)

#: Sample flag the engine sets on readings taken while a run was paused.
FLAG_PAUSED = 2
#: Default rest threshold, and the fraction of the cell's 1C current below which a small
#: cell is at rest (see rest_current_for).
REST_CURRENT_A = 1e-4
REST_FRACTION_OF_1C = 1e-3


def rest_current_for(capacity_ah: float | None) -> float:
    """The current below which a cell of ``capacity_ah`` is at rest: 0.1 mA, or C/1000
    for a cell so small that 0.1 mA is a working current (a coin cell cycled at tens of
    µA, as in other labs' imported files, would otherwise never leave rest)."""
    if capacity_ah is None or not capacity_ah > 0:
        return REST_CURRENT_A
    return min(REST_CURRENT_A, REST_FRACTION_OF_1C * capacity_ah)


@dataclass(frozen=True)
class CycleSummary:
    """One entry per cycle, each field an array over cycles (in cycle order)."""

    cycle_index: IntArray
    start_t_s: FloatArray
    end_t_s: FloatArray
    n_samples: IntArray
    charge_capacity_ah: FloatArray
    discharge_capacity_ah: FloatArray
    charge_energy_wh: FloatArray
    discharge_energy_wh: FloatArray
    coulombic_efficiency: FloatArray  # NaN without charge
    energy_efficiency: FloatArray
    mean_charge_voltage_v: FloatArray  # NaN without charge
    mean_discharge_voltage_v: FloatArray
    max_voltage_v: FloatArray
    min_voltage_v: FloatArray
    start_state: NDArray[np.str_]
    end_state: NDArray[np.str_]
    rested_before: BoolArray
    # The discharge (charge) went from full to empty (empty to full): its capacity is the
    # cell's capacity at that rate, usable for retention even if the cycle's CE is not.
    full_discharge: BoolArray
    full_charge: BoolArray
    complete: BoolArray
    efficiency_valid: BoolArray
    note: NDArray[np.str_]

    def __len__(self) -> int:
        return int(self.cycle_index.size)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per cycle with plain Python values (NaN becomes None)."""
        cols = {f.name: getattr(self, f.name).tolist() for f in fields(self)}
        out = []
        for k in range(len(self)):
            row = {}
            for name, col in cols.items():
                value = col[k]
                row[name] = None if isinstance(value, float) and value != value else value
            out.append(row)
        return out


def _state_code(v: FloatArray, i: FloatArray, k: int, charge_cutoff_v: float,
                discharge_cutoff_v: float, rest_current_a: float, tol_v: float) -> int:
    """The state at sample k: from the last current-carrying sample at or before it."""

    def active(lo: int, hi: int) -> BoolArray:
        return np.abs(i[lo:hi]) > rest_current_a

    a = _last(active, 0, k + 1)
    if a < 0:
        return _UNKNOWN
    if i[a] > 0 and v[a] >= charge_cutoff_v - tol_v:
        return _FULL
    if i[a] < 0 and v[a] <= discharge_cutoff_v + tol_v:
        return _EMPTY
    return _PARTIAL


def cell_state_at(
    voltage_v: ArrayLike, current_a: ArrayLike, k: int, *, charge_cutoff_v: float,
    discharge_cutoff_v: float, rest_current_a: float = 1e-4, cutoff_tolerance_v: float = 0.02,
) -> str:
    """The cell's state (one of :data:`STATES`) at sample ``k``, by the rule the cycle
    summary uses: from the last sample at or before ``k`` that carried current."""
    v = np.asarray(voltage_v, dtype=np.float64)
    i = np.asarray(current_a, dtype=np.float64)
    if k < 0:
        return "unknown"
    return STATES[_state_code(v, i, k, charge_cutoff_v, discharge_cutoff_v, rest_current_a,
                              cutoff_tolerance_v)]


def _first(pred: Any, lo: int, hi: int) -> int:
    """First index in [lo, hi) where ``pred(a, b)`` (a bool array for a..b-1) is true, or
    -1; windows grow 8× so a hit near ``lo`` costs a few dozen elements."""
    w, a = 64, lo
    while a < hi:
        b = min(hi, a + w)
        nz = np.flatnonzero(pred(a, b))
        if nz.size:
            return a + int(nz[0])
        a, w = b, w * 8
    return -1


def _last(pred: Any, lo: int, hi: int) -> int:
    """Last index in [lo, hi) where ``pred`` is true, or -1 (searching backwards)."""
    w, b = 64, hi
    while b > lo:
        a = max(lo, b - w)
        nz = np.flatnonzero(pred(a, b))
        if nz.size:
            return a + int(nz[-1])
        b, w = a, w * 8
    return -1


def summarise_cycles(
    t_s: ArrayLike,
    voltage_v: ArrayLike,
    current_a: ArrayLike,
    cycle_index: ArrayLike,
    *,
    charge_cutoff_v: float,
    discharge_cutoff_v: float,
    flags: ArrayLike | None = None,
    rest_current_a: float = 1e-4,
    cutoff_tolerance_v: float = 0.02,
    min_rest_s: float = 300.0,
    initial_state: str = "unknown",
) -> CycleSummary:
    """Summarise every cycle of one run from its samples (ordered by time, cycle index
    non-decreasing).

    ``charge_cutoff_v``/``discharge_cutoff_v`` are the cell's cut-offs: a charge whose
    last reading is within ``cutoff_tolerance_v`` of the upper one left the cell full (a
    CV phase holds it there), a discharge reaching the lower one left it empty.
    ``rest_current_a``: below this the cell is at rest. ``initial_state`` is the state
    before the first sample when known from elsewhere (e.g. the cell's previous run).
    """
    t = np.asarray(t_s, dtype=np.float64)
    v = np.asarray(voltage_v, dtype=np.float64)
    i = np.asarray(current_a, dtype=np.float64)
    cyc = np.asarray(cycle_index, dtype=np.int64)
    n = t.size
    if not (v.size == i.size == cyc.size == n):
        raise ValueError("t_s, voltage_v, current_a and cycle_index must have equal length")
    if initial_state not in STATES:
        raise ValueError(f"initial_state must be one of {STATES}")
    if n < 2:
        return _empty_summary()

    # -- per interval (j-1, j), labelled with the cycle of sample j ---------------------
    # In place into a few buffers: at 10 M samples every fresh temporary is 80 MB of new
    # pages, and faulting them in costs more than the arithmetic.
    dt = np.subtract(t[1:], t[:-1])
    if flags is not None:
        paused = (np.asarray(flags, dtype=np.int64)[1:] & FLAG_PAUSED) != 0
        dt[paused] = 0.0
    np.maximum(dt, 0.0, out=dt)
    dq = np.add(i[1:], i[:-1])
    dq *= dt
    dq *= 0.5 / 3600.0
    de = np.multiply(i, v)
    de = np.add(de[1:], de[:-1])
    de *= dt
    np.abs(de, out=de)
    de *= 0.5 / 3600.0
    vdt = np.add(v[1:], v[:-1])
    vdt *= dt
    vdt *= 0.5
    chg = dq > 0
    dis = dq < 0

    lab = cyc[1:]
    bounds = np.flatnonzero(lab[1:] != lab[:-1]) + 1
    starts = np.concatenate(([0], bounds))
    labels = lab[starts]
    if labels.size > 1 and np.any(np.diff(labels) <= 0):
        raise ValueError("cycle_index must be non-decreasing in sample order")
    ends = np.concatenate((bounds, [n - 1]))  # exclusive, in interval indices

    buf = np.empty_like(dq)

    def seg_sum(x: FloatArray, mask: BoolArray) -> FloatArray:
        np.multiply(x, mask, out=buf)
        return np.add.reduceat(buf, starts)

    q_chg = seg_sum(dq, chg)
    q_dis = -seg_sum(dq, dis)
    e_chg = seg_sum(de, chg)
    e_dis = seg_sum(de, dis)
    vs_chg = seg_sum(vdt, chg)
    vs_dis = seg_sum(vdt, dis)
    s_chg = seg_sum(dt, chg)
    s_dis = seg_sum(dt, dis)
    v_end = v[1:]
    v_max = np.maximum.reduceat(v_end, starts)
    v_min = np.minimum.reduceat(v_end, starts)

    with np.errstate(divide="ignore", invalid="ignore"):
        ce = np.where(q_chg > 0, q_dis / q_chg, np.nan)
        ee = np.where(e_chg > 0, e_dis / e_chg, np.nan)
        mv_chg = np.where(s_chg > 0, vs_chg / s_chg, np.nan)
        mv_dis = np.where(s_dis > 0, vs_dis / s_dis, np.nan)

    # -- states -------------------------------------------------------------------------
    # Each is read off the samples near a cycle's edges, searched outwards from the edge
    # in growing windows, so this part costs per cycle, not per sample.
    def active(lo: int, hi: int) -> BoolArray:
        return np.abs(i[lo:hi]) > rest_current_a

    def state_at(k: int) -> int:
        return _state_code(v, i, k, charge_cutoff_v, discharge_cutoff_v, rest_current_a,
                           cutoff_tolerance_v)

    m = starts.size
    start_code = np.empty(m, np.int64)
    end_code = np.empty(m, np.int64)
    rested = np.zeros(m, bool)
    full_dis = np.zeros(m, bool)
    full_chg = np.zeros(m, bool)
    for c in range(m):
        # Intervals starts[c] .. ends[c]-1; interval j runs from sample j to sample j+1,
        # so the cycle starts at sample starts[c] (the previous cycle's last) and ends at
        # sample ends[c].
        s0, e0 = int(starts[c]), int(ends[c])
        start_code[c] = state_at(s0)
        end_code[c] = state_at(e0)
        first_active = _first(active, s0 + 1, e0 + 1)
        if first_active >= 0:
            before = _last(active, 0, s0 + 1)
            t_before = t[before] if before >= 0 else t[0]
            rested[c] = t[first_active] - t_before >= min_rest_s
        full_dis[c] = _half_cycle(dis, i, -1.0, rest_current_a, s0, e0, state_at,
                                  _FULL, _EMPTY)
        full_chg[c] = _half_cycle(chg, i, 1.0, rest_current_a, s0, e0, state_at,
                                  _EMPTY, _FULL)
    # The first cycle starts at the run's first reading, which says nothing about what
    # came before: only a state known from elsewhere counts.
    start_code[0] = STATES.index(initial_state)

    both = (q_chg > 0) & (q_dis > 0)
    defined_end = (end_code == _FULL) | (end_code == _EMPTY)
    complete = both & defined_end
    defined_start = (start_code == _FULL) | (start_code == _EMPTY)
    valid = complete & defined_start & (end_code == start_code)

    names = np.asarray(STATES)
    note = np.where(
        valid, "",
        np.where(~both, "not a cycle with both charge and discharge: no efficiency",
                 np.where(~defined_end, "ended before reaching a cut-off: incomplete",
                          np.where(~defined_start,
                                   "started from an undefined state (no full or empty "
                                   "reference before it): efficiencies not comparable",
                                   "ended at another state than it started: "
                                   "efficiencies not comparable"))))
    return CycleSummary(
        cycle_index=labels,
        start_t_s=t[starts],
        end_t_s=t[ends],
        n_samples=(ends - starts).astype(np.int64),
        charge_capacity_ah=q_chg,
        discharge_capacity_ah=q_dis,
        charge_energy_wh=e_chg,
        discharge_energy_wh=e_dis,
        coulombic_efficiency=ce,
        energy_efficiency=ee,
        mean_charge_voltage_v=mv_chg,
        mean_discharge_voltage_v=mv_dis,
        max_voltage_v=v_max,
        min_voltage_v=v_min,
        start_state=names[start_code],
        end_state=names[end_code],
        rested_before=rested,
        full_discharge=full_dis,
        full_charge=full_chg,
        complete=complete,
        efficiency_valid=valid,
        note=note.astype(np.str_),
    )


def _half_cycle(
    mask: BoolArray, current: FloatArray, sign: float, rest_current_a: float,
    s0: int, e0: int, state_at: Any, from_code: int, to_code: int,
) -> bool:
    """Did the cycle's charging (discharging) intervals — ``mask`` over intervals
    [s0, e0) — start at ``from_code`` and end at ``to_code``?"""

    def hit(a: int, b: int) -> BoolArray:
        return mask[a:b]

    first = _first(hit, s0, e0)
    if first < 0:
        return False
    last = _last(hit, s0, e0)
    # Interval j runs from sample j to j+1. The half-cycle's current starts at sample j,
    # or at j+1 if sample j still had the previous current (a step edge): the state
    # before it comes from the samples before that.
    began = first if sign * current[first] > rest_current_a else first + 1
    before = state_at(began - 1) if began > 0 else _UNKNOWN
    return before == from_code and state_at(last + 1) == to_code


def _empty_summary() -> CycleSummary:
    f = np.zeros(0)
    b = np.zeros(0, bool)
    s = np.zeros(0, np.str_)
    z = np.zeros(0, np.int64)
    return CycleSummary(z, f, f, z, f, f, f, f, f, f, f, f, f, f, s, s, b, b, b, b, b, s)


@dataclass(frozen=True)
class Retention:
    """Capacity retention over the cycles whose discharge went from full to empty."""

    cycle_index: IntArray
    discharge_capacity_ah: FloatArray
    retention: FloatArray  # / the reference (first usable) discharge capacity
    reference_ah: float
    fade_ah_per_cycle: float  # least-squares slope (negative when fading)
    fade_pct_per_cycle: float  # the slope relative to the reference, in %
    cycles_to_80pct: int | None  # first cycle index below 80 % of the reference


def capacity_retention(summary: CycleSummary, *, threshold: float = 0.8) -> Retention:
    """Retention and linear fade rate; cycles with a partial discharge are left out."""
    sel = summary.full_discharge
    idx = summary.cycle_index[sel]
    cap = summary.discharge_capacity_ah[sel]
    if cap.size == 0:
        nan = float("nan")
        return Retention(idx, cap, cap, nan, nan, nan, None)
    ref = float(cap[0])
    ret = cap / ref
    if cap.size >= 2:
        slope = float(np.polyfit(idx.astype(np.float64), cap, 1)[0])
    else:
        slope = float("nan")
    below = np.flatnonzero(ret < threshold)
    return Retention(
        cycle_index=idx,
        discharge_capacity_ah=cap,
        retention=ret,
        reference_ah=ref,
        fade_ah_per_cycle=slope,
        fade_pct_per_cycle=100.0 * slope / ref,
        cycles_to_80pct=int(idx[below[0]]) if below.size else None,
    )
