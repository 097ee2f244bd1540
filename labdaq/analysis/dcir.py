"""DC internal resistance from current steps in stored samples (HPPC / ISO 12405-4 style).

At every current step — a sample whose current differs from the one before by more than
``min_step_a`` — the resistance is ``|ΔV / ΔI|`` between the reading just before the
step and the first reading after it (the engine stores both: the reading that ended the
phase and one right after the new set point), and, when the new current holds that long,
``|V(t_edge + after_s) - V_before| / |ΔI|`` (the 10 s resistance of the standards, which
includes the fast polarisation). Vectorised over all steps of a run at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["PulseResistance", "pulse_resistances"]

FloatArray = NDArray[np.float64]


@dataclass(frozen=True)
class PulseResistance:
    """One entry per current step found, arrays in time order."""

    sample: NDArray[np.int64]  # index of the first reading after the step
    t_s: FloatArray
    step_index: NDArray[np.int64]
    current_before_a: FloatArray
    current_after_a: FloatArray
    voltage_before_v: FloatArray
    voltage_after_v: FloatArray
    resistance_ohm: FloatArray  # at the first reading after the step
    resistance_after_ohm: FloatArray  # at after_s (NaN when the current did not hold)

    def mean_by_step(self) -> dict[int, float]:
        """Mean edge resistance per step index (the engine's ``steps.dcir_ohm``)."""
        out: dict[int, float] = {}
        for s in np.unique(self.step_index).tolist():
            out[int(s)] = float(self.resistance_ohm[self.step_index == s].mean())
        return out


def pulse_resistances(
    t_s: ArrayLike,
    voltage_v: ArrayLike,
    current_a: ArrayLike,
    step_index: ArrayLike | None = None,
    *,
    steps: ArrayLike | None = None,
    min_step_a: float | None = None,
    after_s: float = 10.0,
    hold_tolerance: float = 0.02,
) -> PulseResistance:
    """Resistances at every current step (only steps in ``steps`` if given, matched on
    the reading after the edge). ``min_step_a`` defaults to 10 % of the largest |I|."""
    t = np.asarray(t_s, dtype=np.float64)
    v = np.asarray(voltage_v, dtype=np.float64)
    i = np.asarray(current_a, dtype=np.float64)
    si = (np.zeros(t.size, np.int64) if step_index is None
          else np.asarray(step_index, dtype=np.int64))
    if min_step_a is None:
        min_step_a = max(0.1 * float(np.abs(i).max(initial=0.0)), 1e-6)
    di = np.diff(i)
    k = np.flatnonzero(np.abs(di) > min_step_a) + 1
    if steps is not None:
        k = k[np.isin(si[k], np.asarray(steps, dtype=np.int64))]
    d_i = i[k] - i[k - 1]
    r = np.abs((v[k] - v[k - 1]) / d_i)
    # The reading at or just after t_edge + after_s, if the current held until then.
    j = np.searchsorted(t, t[k] + after_s - 1e-9, side="left")
    ok = j < t.size
    jj = np.minimum(j, t.size - 1)
    # The current held if no other step lies between k and j and it stayed at its level.
    next_edge = np.searchsorted(np.flatnonzero(np.abs(di) > min_step_a) + 1, k, side="right")
    all_edges = np.flatnonzero(np.abs(di) > min_step_a) + 1
    nxt = np.where(next_edge < all_edges.size,
                   all_edges[np.minimum(next_edge, max(all_edges.size - 1, 0))], t.size)
    held = ok & (jj < nxt) & (np.abs(i[jj] - i[k]) <= hold_tolerance * np.abs(i[k]) + 1e-9)
    r_after = np.where(held, np.abs((v[jj] - v[k - 1]) / d_i), np.nan)
    return PulseResistance(
        sample=k.astype(np.int64), t_s=t[k], step_index=si[k],
        current_before_a=i[k - 1], current_after_a=i[k],
        voltage_before_v=v[k - 1], voltage_after_v=v[k],
        resistance_ohm=r, resistance_after_ohm=r_after,
    )
