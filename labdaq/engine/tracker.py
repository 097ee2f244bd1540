"""Online step and cycle accounting: capacity and energy by trapezoidal integration."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class StepAccumulator:
    """Capacity and energy within one step (magnitudes, so discharge counts up too)."""

    start_t_s: float
    capacity_ah: float = 0.0
    energy_wh: float = 0.0


@dataclass
class CycleAccumulator:
    cycle_index: int
    start_t_s: float
    end_t_s: float = 0.0
    charge_ah: float = 0.0
    discharge_ah: float = 0.0
    charge_wh: float = 0.0
    discharge_wh: float = 0.0
    charge_v_s: float = 0.0  # ∫V dt while charging, for the mean charge voltage
    charge_s: float = 0.0
    discharge_v_s: float = 0.0
    discharge_s: float = 0.0

    def summary(self) -> dict[str, float | int | None]:
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
        }


@dataclass
class Integrator:
    """Integrates successive (t, V, I) samples into step and cycle totals."""

    last_t_s: float | None = None
    last_v: float = 0.0
    last_i: float = 0.0
    step: StepAccumulator = field(default_factory=lambda: StepAccumulator(0.0))
    cycle: CycleAccumulator = field(default_factory=lambda: CycleAccumulator(1, 0.0))

    def add(self, t_s: float, voltage_v: float, current_a: float) -> None:
        if self.last_t_s is not None:
            dt_s = t_s - self.last_t_s
            if dt_s > 0:
                # Trapezoids: exact for piecewise-linear signals, and what analysis tools
                # (numpy.trapezoid over stored samples) will reproduce from the database.
                i_mid = 0.5 * (current_a + self.last_i)
                p_mid = 0.5 * (current_a * voltage_v + self.last_i * self.last_v)
                v_mid = 0.5 * (voltage_v + self.last_v)
                dq_ah = i_mid * dt_s / 3600.0
                de_wh = p_mid * dt_s / 3600.0
                self.step.capacity_ah += abs(dq_ah)
                self.step.energy_wh += abs(de_wh)
                c = self.cycle
                if dq_ah > 0:
                    c.charge_ah += dq_ah
                    c.charge_wh += abs(de_wh)
                    c.charge_v_s += v_mid * dt_s
                    c.charge_s += dt_s
                elif dq_ah < 0:
                    c.discharge_ah -= dq_ah
                    c.discharge_wh += abs(de_wh)
                    c.discharge_v_s += v_mid * dt_s
                    c.discharge_s += dt_s
                c.end_t_s = t_s
        self.last_t_s, self.last_v, self.last_i = t_s, voltage_v, current_a

    def new_step(self, t_s: float) -> None:
        self.step = StepAccumulator(t_s)

    def new_cycle(self, cycle_index: int, t_s: float) -> None:
        self.cycle = CycleAccumulator(cycle_index, t_s, end_t_s=t_s)
