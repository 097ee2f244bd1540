"""A stored run's incremental capacity (dQ/dV) per cycle and the equivalent-circuit fit of
each of its impedance spectra, as the API and the dashboard's run page show them.

The work is labdaq.analysis's (:func:`incremental_capacity`, :func:`fit_spectrum`); this
module picks the data from the database and shapes the answers. Both computations are
CPU work (a Savitzky–Golay filter; several least-squares starts per spectrum), so they run
in a worker thread, not on the event loop that serves every other request.
"""

from __future__ import annotations

import asyncio
from typing import Any, Literal

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.analysis import circuit_impedance, fit_spectrum, incremental_capacity
from labdaq.analysis.load import read_samples
from labdaq.runs import get_run
from labdaq.storage import models as m

__all__ = ["FIT_CURVE_POINTS", "dqdv_curves", "eis_fits", "warm_up"]

Direction = Literal["charge", "discharge"]
#: Points of each fitted curve, log-spaced over the spectrum's measured band.
FIT_CURVE_POINTS = 120


async def _ended_cycles(session: AsyncSession, run_id: int) -> list[int]:
    return [int(c) for c in await session.scalars(
        select(m.Cycle.cycle_index).where(m.Cycle.run_id == run_id)
        .order_by(m.Cycle.cycle_index))]


def _curves(samples: dict[str, Any], cycles: list[int],
            direction: Direction) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for c in cycles:
        sel = samples["cycle_index"] == c
        try:
            ic = incremental_capacity(samples["t_s"][sel], samples["voltage_v"][sel],
                                      samples["current_a"][sel], direction=direction)
        except ValueError as exc:  # too few samples or too narrow a voltage range
            out.append({"cycle_index": c, "direction": direction, "capacity_ah": None,
                        "voltage_v": [], "dqdv_ah_per_v": [], "note": str(exc)})
            continue
        out.append({"cycle_index": c, "direction": direction,
                    "capacity_ah": ic.capacity_ah, "voltage_v": ic.voltage_v.tolist(),
                    "dqdv_ah_per_v": ic.dqdv_ah_per_v.tolist(), "note": None})
    return out


async def dqdv_curves(session: AsyncSession, run_id: int, cycles: list[int] | None,
                      direction: Direction) -> list[dict[str, Any]]:
    """dQ/dV of the given cycles' charge (or discharge); by default of the first and the
    last ended cycle (the change between them is what an engineer looks for). A cycle
    whose samples do not make a curve comes with empty arrays and a note saying why."""
    await get_run(session, run_id)
    if cycles is None:
        ended = await _ended_cycles(session, run_id)
        cycles = sorted({ended[0], ended[-1]}) if ended else []
    if not cycles:
        return []
    wanted = sorted(set(cycles))
    samples = await session.run_sync(read_samples, run_id, wanted)
    return await asyncio.to_thread(_curves, samples, wanted, direction)


def _fit(spectrum: m.EisSpectrum) -> dict[str, Any]:
    f = np.asarray(spectrum.frequency_hz, dtype=np.float64)
    z = (np.asarray(spectrum.z_real_ohm, dtype=np.float64)
         + 1j * np.asarray(spectrum.z_imag_ohm, dtype=np.float64))
    base: dict[str, Any] = {"spectrum_id": spectrum.id, "cycle_index": spectrum.cycle_index,
                            "step_index": spectrum.step_index}
    try:
        fit = fit_spectrum(f, z)
    except ValueError as exc:
        return {**base, "fitted": False, "note": str(exc), "params": {}, "stderr": {},
                "rmse_rel": None, "frequency_hz": [], "z_real_ohm": [], "z_imag_ohm": []}
    grid = np.geomspace(float(f.min()), float(f.max()), FIT_CURVE_POINTS)
    zf = circuit_impedance(grid, fit.params)
    # A parameter the data do not determine has an infinite or NaN error: JSON has no
    # such numbers, so it goes out as null ("unknown").
    stderr = {k: (v if np.isfinite(v) else None) for k, v in fit.stderr.items()}
    return {**base, "fitted": fit.success, "note": None, "params": fit.params,
            "stderr": stderr, "rmse_rel": fit.rmse_rel, "frequency_hz": grid.tolist(),
            "z_real_ohm": zf.real.tolist(), "z_imag_ohm": zf.imag.tolist()}


async def eis_fits(session: AsyncSession, run_id: int, newest: int) -> list[dict[str, Any]]:
    """The circuit fit of each of the run's ``newest`` spectra (oldest first), with the
    fitted curve; a spectrum too short to fit comes with ``fitted`` false and a note."""
    await get_run(session, run_id)
    rows = list((await session.scalars(
        select(m.EisSpectrum).where(m.EisSpectrum.run_id == run_id)
        .order_by(m.EisSpectrum.id.desc()).limit(newest))).all())
    rows.reverse()
    return await asyncio.to_thread(lambda: [_fit(r) for r in rows])


def warm_up() -> None:
    """Import at start-up what the first dQ/dV and the first circuit fit import: SciPy's
    signal and optimize packages, over a second of CPU time, part of it with the GIL held.
    In a request, on a loaded machine where the API runs niced, that first dQ/dV request
    took minutes and every request beside it slowed (docs/performance.md)."""
    import scipy.optimize  # noqa: F401
    import scipy.signal  # noqa: F401
