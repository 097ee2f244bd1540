"""Pydantic schemas of a run's analysis answers: dQ/dV curves and impedance fits."""

from __future__ import annotations

from pydantic import BaseModel, Field


class DqdvOut(BaseModel):
    cycle_index: int
    direction: str = Field(description="charge or discharge")
    capacity_ah: float | None = Field(description="capacity moved in the half-cycle")
    voltage_v: list[float] = Field(description="uniform voltage grid")
    dqdv_ah_per_v: list[float] = Field(description="incremental capacity, positive")
    note: str | None = Field(description="why a cycle has no curve (arrays empty)")


class EisFitOut(BaseModel):
    spectrum_id: int
    cycle_index: int
    step_index: int
    fitted: bool = Field(description="the least-squares fit converged")
    note: str | None = Field(description="why a spectrum could not be fitted")
    params: dict[str, float] = Field(
        description="R0 + two R||CPE arcs + Warburg (labdaq.analysis.eis), units in names")
    stderr: dict[str, float | None] = Field(
        description="one standard error per parameter, same units; null: not determined")
    rmse_rel: float | None = Field(description="RMS residual relative to |Z|")
    frequency_hz: list[float] = Field(description="the fitted curve's frequencies")
    z_real_ohm: list[float]
    z_imag_ohm: list[float]
