"""The records a run's program produces: the phase the instrument is in, a finished step,
a cycle's running totals, and what a phase end hands back (:mod:`labdaq.engine.channel`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

NAN = math.nan


@dataclass
class Phase:
    """What the instrument does now and when the phase ends (absolute run times in s)."""

    mode: str  # "off" | "cc" | "cv"
    current_a: float = 0.0  # cc: signed set point; cv: current limit (magnitude)
    voltage_v: float = NAN  # cv: set point; cc: compliance voltage
    # cc: where an instrument with a lower compliance holds a discharge that ends on
    # voltage (see group._apply); NaN = no clamp.
    voltage_low_v: float = NAN
    voltage_above_v: float = NAN
    voltage_below_v: float = NAN
    current_below_a: float = NAN
    deadline_t_s: float = math.inf
    capacity_ah: float = NAN
    dvdt_below_v_per_s: float = NAN
    temperature_above_c: float = NAN
    name: str = ""
    # EIS sweeps and chamber set points run on other instruments, as a task of their own;
    # the phase ends when that task is done (the output stays off meanwhile).
    aux: Any = None


@dataclass
class CycleTotals:
    cycle_index: int
    start_t_s: float
    end_t_s: float = 0.0
    charge_ah: float = 0.0
    discharge_ah: float = 0.0
    charge_wh: float = 0.0
    discharge_wh: float = 0.0
    charge_v_s: float = 0.0
    charge_s: float = 0.0
    discharge_v_s: float = 0.0
    discharge_s: float = 0.0
    gaps: int = 0  # outages the cycle was resumed across

    def summary(self) -> dict[str, Any]:
        ce = self.discharge_ah / self.charge_ah if self.charge_ah > 0 else None
        ee = self.discharge_wh / self.charge_wh if self.charge_wh > 0 else None
        return {
            "cycle_index": self.cycle_index,
            "start_t_s": self.start_t_s,
            "end_t_s": self.end_t_s,
            "charge_capacity_ah": self.charge_ah,
            "discharge_capacity_ah": self.discharge_ah,
            "charge_energy_wh": self.charge_wh,
            "discharge_energy_wh": self.discharge_wh,
            "coulombic_efficiency": ce,
            "energy_efficiency": ee,
            "mean_charge_voltage_v": self.charge_v_s / self.charge_s if self.charge_s else None,
            "mean_discharge_voltage_v": (
                self.discharge_v_s / self.discharge_s if self.discharge_s else None
            ),
            "spans_gap": self.gaps > 0,
        }


@dataclass
class StepRecord:
    """A finished step, as written to the steps table."""

    step_number: int
    step_index: int
    cycle_index: int
    kind: str
    start_t_s: float
    end_t_s: float
    end_reason: str
    capacity_ah: float
    energy_wh: float
    end_voltage_v: float | None
    dcir_ohm: float | None = None
    # Where the end condition was crossed, interpolated between the two readings around
    # it (end_t_s is the reading that showed it, where the engine acted).
    end_crossing_t_s: float | None = None


@dataclass
class Transition:
    """What happened at a phase end: records to write and the next phase (None = done)."""

    step: StepRecord | None = None
    cycles: list[dict[str, Any]] = field(default_factory=list)
    next_phase: Phase | None = None
    done: bool = False
