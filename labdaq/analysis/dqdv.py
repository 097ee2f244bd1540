"""Incremental capacity (dQ/dV) of one charge or discharge, smoothed.

The capacity moved is integrated from the samples (trapezoids), resampled on a uniform
voltage grid, differentiated and smoothed with a Savitzky–Golay filter. Resampling on a
voltage grid (rather than differentiating sample by sample) is what keeps the curve from
exploding on the flat plateaus of the OCV, where dV between two readings is at the
resolution of the voltmeter. Voltage is made monotonic first (a running maximum while
charging, minimum while discharging), so measurement noise cannot fold the curve back.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["IncrementalCapacity", "incremental_capacity"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class IncrementalCapacity:
    voltage_v: FloatArray
    dqdv_ah_per_v: FloatArray  # positive for charge and discharge alike
    capacity_ah: float  # total moved in the selection


def incremental_capacity(
    t_s: ArrayLike,
    voltage_v: ArrayLike,
    current_a: ArrayLike,
    *,
    direction: str = "charge",
    resolution_v: float = 0.005,
    window_v: float = 0.05,
    rest_current_a: float = 1e-4,
) -> IncrementalCapacity:
    """dQ/dV of the charging (``direction="charge"``) or discharging samples given.

    Pass the samples of one half-cycle (e.g. one cycle's CC charge). ``resolution_v`` is
    the grid step, ``window_v`` the Savitzky–Golay window (order 2), both in volts.
    """
    from scipy.signal import savgol_filter

    if direction not in ("charge", "discharge"):
        raise ValueError("direction must be 'charge' or 'discharge'")
    t = np.asarray(t_s, dtype=np.float64)
    v = np.asarray(voltage_v, dtype=np.float64)
    i = np.asarray(current_a, dtype=np.float64)
    sign = 1.0 if direction == "charge" else -1.0
    moving = sign * i > rest_current_a
    dq = np.concatenate(([0.0], 0.5 * (i[1:] + i[:-1]) * np.diff(t) / 3600.0)) * sign
    q = np.cumsum(np.where(moving, dq, 0.0))[moving]
    vv = v[moving]
    if vv.size < 3:
        raise ValueError("too few samples carrying current in that direction")
    vv = np.maximum.accumulate(vv) if sign > 0 else -np.maximum.accumulate(-vv)
    # Where the voltage did not move (a plateau at the meter's resolution), keep the
    # last capacity reached at that voltage.
    last = np.concatenate((np.flatnonzero(np.diff(vv) != 0), [vv.size - 1]))
    v_u, q_u = vv[last], q[last]
    if sign < 0:  # ascending voltage for interpolation
        v_u, q_u = v_u[::-1], q_u[::-1]
    grid = np.arange(v_u[0], v_u[-1] + resolution_v / 2, resolution_v)
    if grid.size < 5:
        raise ValueError("voltage range too small for the resolution")
    q_g = np.interp(grid, v_u, q_u)
    dqdv = np.gradient(q_g, grid)
    win = max(5, int(round(window_v / resolution_v)) | 1)
    if win < grid.size:
        dqdv = savgol_filter(dqdv, win, 2)
    return IncrementalCapacity(voltage_v=grid, dqdv_ah_per_v=np.abs(dqdv),
                               capacity_ah=float(q[-1]))
