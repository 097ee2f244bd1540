"""A cell's specification: chemistry, OCV table, resistances, capacity against temperature,
thermal, ageing and impedance parameters, each with its source (seeds/cells/*.yaml),
validated, and loaded by name (:class:`labdaq.sims.cell.CellBank` simulates cells of one).
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from numpy.typing import ArrayLike, NDArray
from pydantic import BaseModel, ConfigDict, Field, model_validator

FloatArray = NDArray[np.float64]

GAS_CONSTANT_J_PER_MOL_K = 8.314462618
KELVIN_OFFSET = 273.15
SECONDS_PER_HOUR = 3600.0
SECONDS_PER_DAY = 86400.0
SECONDS_PER_MONTH = 30.4375 * SECONDS_PER_DAY


def _const(value: float) -> FloatArray:
    return np.array(value, dtype=float)


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_table(x: list[float], ys: dict[str, list[float]], what: str) -> None:
    if len(x) < 2:
        raise ValueError(f"{what}: need at least two points")
    if any(b <= a for a, b in zip(x, x[1:], strict=False)):
        raise ValueError(f"{what}: abscissa must increase strictly")
    for name, y in ys.items():
        if len(y) != len(x):
            raise ValueError(f"{what}: {name} has {len(y)} points, abscissa has {len(x)}")


class OcvTable(_Frozen):
    """Open-circuit voltage against SOC; ``discharge_v`` omitted means no hysteresis."""

    soc: list[float]
    charge_v: list[float]
    discharge_v: list[float] | None = None
    hysteresis_soc: float = Field(default=0.05, gt=0)
    overcharge_v_per_soc: float = Field(default=4.0, ge=0)
    # dU/dT of the full cell: one number, or a table against ``entropic_soc`` (entropic
    # coefficients change size and sign with SOC).
    entropic_coefficient_v_per_k: float | list[float] = 0.0
    entropic_soc: list[float] | None = None

    @model_validator(mode="after")
    def _tables(self) -> OcvTable:
        ys = {"charge_v": self.charge_v}
        if self.discharge_v is not None:
            ys["discharge_v"] = self.discharge_v
        _check_table(self.soc, ys, "ocv")
        if abs(self.soc[0]) > 1e-12 or abs(self.soc[-1] - 1.0) > 1e-12:
            raise ValueError("ocv: soc table must run from 0 to 1")
        dudt = self.entropic_coefficient_v_per_k
        if isinstance(dudt, list):
            if self.entropic_soc is None:
                raise ValueError("ocv: a table entropic_coefficient_v_per_k needs entropic_soc")
            _check_table(self.entropic_soc, {"entropic_coefficient_v_per_k": dudt},
                         "ocv.entropic_soc")
        elif self.entropic_soc is not None:
            raise ValueError("ocv: entropic_soc given but entropic_coefficient_v_per_k is "
                             "one number")
        return self

    def entropic_v_per_k(self, soc: ArrayLike) -> FloatArray:
        """dU/dT at this SOC (clamped to the table), V/K."""
        x = np.clip(np.asarray(soc, dtype=float), 0.0, 1.0)
        dudt = self.entropic_coefficient_v_per_k
        if isinstance(dudt, list):
            assert self.entropic_soc is not None
            return np.interp(x, self.entropic_soc, dudt)
        return np.full_like(x, dudt)


class ResistanceModel(_Frozen):
    """R0 and two RC pairs at the reference temperature and mid SOC, with their scaling."""

    r0_ohm: float = Field(gt=0)
    r1_ohm: float = Field(gt=0)
    tau1_s: float = Field(gt=0)
    r2_ohm: float = Field(gt=0)
    tau2_s: float = Field(gt=0)
    soc: list[float]
    factor: list[float]
    r0_activation_energy_j_per_mol: float = Field(default=20000.0, ge=0)
    rc_activation_energy_j_per_mol: float = Field(default=40000.0, ge=0)
    reference_temperature_c: float = 25.0

    @model_validator(mode="after")
    def _tables(self) -> ResistanceModel:
        _check_table(self.soc, {"factor": self.factor}, "resistance")
        return self


class CapacityTemperature(_Frozen):
    """Fraction of capacity that can be delivered at a cell temperature."""

    temperature_c: list[float]
    factor: list[float]

    @model_validator(mode="after")
    def _tables(self) -> CapacityTemperature:
        _check_table(self.temperature_c, {"factor": self.factor}, "available_capacity")
        if any(not 0 < f <= 1.0 for f in self.factor):
            raise ValueError("available_capacity: factors must be in (0, 1]")
        return self


# ARC conventions (Feng et al. 2018): T1 is where self-heating is first detected, at
# 0.02 degC/min; T2, the trigger, is where it reaches 1 degC/s.
ARC_ONSET_RATE_C_PER_S = 0.02 / 60.0
ARC_TRIGGER_RATE_C_PER_S = 1.0


class ThermalModel(_Frozen):
    """Lumped heat balance and the cell's ARC runaway characteristics.

    The decomposition is one Arrhenius reaction with first-order depletion (Townsend & Tou's
    ARC kinetics): ``d(alpha)/dt = A*exp(-Ea/(R*T))*(1 - alpha)`` above T1, releasing
    ``m*cp*(T3 - T1)`` in all. ``A`` and ``Ea`` follow from the two ARC points: the onset
    rate at T1 and the trigger rate at T2 on the adiabatic path. A one-step reaction climbs
    far faster at its end than a cell can (heat spreads through the jelly roll, the cell
    vents), so the rate is capped at the peak rate ARC shows, ``runaway_max_rate_c_per_s``.
    """

    mass_kg: float = Field(gt=0)
    cp_j_per_kg_k: float = Field(gt=0)
    h_w_per_k: float = Field(gt=0)
    self_heating_onset_c: float
    runaway_onset_c: float
    runaway_peak_c: float
    runaway_max_rate_c_per_s: float = Field(gt=ARC_TRIGGER_RATE_C_PER_S)

    @model_validator(mode="after")
    def _order(self) -> ThermalModel:
        if not self.self_heating_onset_c < self.runaway_onset_c < self.runaway_peak_c:
            raise ValueError("thermal: need self_heating_onset_c < runaway_onset_c "
                             "< runaway_peak_c")
        return self

    @property
    def heat_capacity_j_per_k(self) -> float:
        return self.mass_kg * self.cp_j_per_kg_k

    @property
    def adiabatic_rise_c(self) -> float:
        """Temperature rise the whole decomposition gives without cooling (T3 - T1)."""
        return self.runaway_peak_c - self.self_heating_onset_c

    def arrhenius_constants(self) -> tuple[float, float]:
        """(ln A in 1/s, Ea/R in K) from the onset and trigger points."""
        t1_k = self.self_heating_onset_c + KELVIN_OFFSET
        t2_k = self.runaway_onset_c + KELVIN_OFFSET
        k1 = ARC_ONSET_RATE_C_PER_S / self.adiabatic_rise_c
        k2 = ARC_TRIGGER_RATE_C_PER_S / (self.runaway_peak_c - self.runaway_onset_c)
        ea_r = math.log(k2 / k1) / (1.0 / t1_k - 1.0 / t2_k)
        return math.log(k1) + ea_r / t1_k, ea_r

    def self_heating_rate_c_per_s(self, temperature_c: ArrayLike,
                                  conversion: ArrayLike = 0.0) -> FloatArray:
        """Adiabatic self-heating rate at a temperature and reacted fraction (0 below T1)."""
        t = np.asarray(temperature_c, dtype=float)
        ln_a, ea_r = self.arrhenius_constants()
        k = np.exp(ln_a - ea_r / (t + KELVIN_OFFSET))
        rate = self.adiabatic_rise_c * k * (1.0 - np.asarray(conversion, dtype=float))
        rate = np.minimum(rate, self.runaway_max_rate_c_per_s)
        return np.where(t >= self.self_heating_onset_c, rate, 0.0)


class AgeingModel(_Frozen):
    cycle_capacity_fade_per_efc: float = Field(ge=0)
    cycle_resistance_growth_per_efc: float = Field(ge=0)
    calendar_capacity_fade_per_day: float = Field(ge=0)
    calendar_resistance_growth_per_day: float = Field(ge=0)
    activation_energy_j_per_mol: float = Field(default=50000.0, ge=0)
    reference_temperature_c: float = 25.0


class ImpedanceExtras(_Frozen):
    """Spectrum-only parameters: CPE exponents of the two arcs and the Warburg coefficient."""

    cpe1_n: float = Field(default=0.92, gt=0, le=1)
    cpe2_n: float = Field(default=0.85, gt=0, le=1)
    warburg_sigma_ohm_per_sqrt_s: float = Field(default=0.001, ge=0)


class Variation(_Frozen):
    """Cell-to-cell manufacturing spread (1 sigma, relative); used only for seeded banks."""

    capacity_rel: float = Field(default=0.005, ge=0)
    resistance_rel: float = Field(default=0.03, ge=0)


class CellSpec(_Frozen):
    """One cell type: datasheet limits plus the model parameters behind them."""

    name: str
    chemistry: str
    format: str = ""
    reference_cell: str = ""
    capacity_ah: float = Field(gt=0)
    nominal_voltage_v: float = Field(gt=0)
    charge_cutoff_v: float
    discharge_cutoff_v: float
    max_charge_current_a: float = Field(gt=0)
    max_discharge_current_a: float = Field(gt=0)
    self_discharge_pct_per_month: float = Field(ge=0)
    ocv: OcvTable
    resistance: ResistanceModel
    available_capacity: CapacityTemperature
    thermal: ThermalModel
    ageing: AgeingModel
    impedance: ImpedanceExtras = ImpedanceExtras()
    variation: Variation = Variation()
    sources: list[str] = Field(min_length=1)

    @model_validator(mode="after")
    def _limits(self) -> CellSpec:
        if not self.discharge_cutoff_v < self.nominal_voltage_v < self.charge_cutoff_v:
            raise ValueError("need discharge_cutoff_v < nominal_voltage_v < charge_cutoff_v")
        return self

    @property
    def has_hysteresis(self) -> bool:
        return self.ocv.discharge_v is not None and self.ocv.discharge_v != self.ocv.charge_v

    def ocv_v(
        self, soc: ArrayLike, branch: Literal["charge", "discharge", "mean"] = "mean"
    ) -> FloatArray:
        """OCV at 25 degC from the table (SOC clamped to [0, 1]) on one hysteresis branch."""
        x = np.clip(np.asarray(soc, dtype=float), 0.0, 1.0)
        chg = np.interp(x, self.ocv.soc, self.ocv.charge_v)
        if self.ocv.discharge_v is None:
            return chg
        dis = np.interp(x, self.ocv.soc, self.ocv.discharge_v)
        return {"charge": chg, "discharge": dis, "mean": 0.5 * (chg + dis)}[branch]

    def capacity_factor(self, temperature_c: ArrayLike) -> FloatArray:
        """Deliverable fraction of capacity at this cell temperature (1 at and above 25 degC)."""
        t = np.asarray(temperature_c, dtype=float)
        return np.interp(t, self.available_capacity.temperature_c, self.available_capacity.factor)

    def arrhenius(self, activation_energy_j_per_mol: float, temperature_c: ArrayLike,
                  reference_temperature_c: float = 25.0) -> FloatArray:
        """exp(Ea/R * (1/T - 1/T_ref)): >1 below the reference temperature."""
        t_k = np.asarray(temperature_c, dtype=float) + KELVIN_OFFSET
        t_ref_k = reference_temperature_c + KELVIN_OFFSET
        return np.exp(activation_energy_j_per_mol / GAS_CONSTANT_J_PER_MOL_K
                      * (1.0 / t_k - 1.0 / t_ref_k))


def _cells_dir() -> Path:
    return Path(str(resources.files("labdaq.seeds") / "cells"))


def list_cell_specs() -> list[str]:
    """Names of the shipped cell specifications (file stems in seeds/cells)."""
    return sorted(p.stem for p in _cells_dir().glob("*.yaml"))


@lru_cache(maxsize=64)
def load_cell_spec(name: str) -> CellSpec:
    """Load a shipped spec by name (``"lfp"``) or a YAML file by path."""
    path = Path(name)
    if path.suffix not in (".yaml", ".yml") or not path.exists():
        path = _cells_dir() / f"{name}.yaml"
        if not path.exists():
            raise KeyError(f"unknown cell spec {name!r}; known: {', '.join(list_cell_specs())}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return CellSpec.model_validate(data)
