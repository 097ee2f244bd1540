"""Heat of the simulated cells checked against references built here, not in labdaq.sims.

* A 2C discharge from full is compared with the lumped model (Thevenin circuit, Bernardi
  heat with the reversible term, Newton cooling) integrated by scipy from the spec's YAML
  file read directly: ``reference_discharge`` imports nothing from ``labdaq.sims``.
* The reversible heat changes sign with the current at one SOC.
* Runaway: the decomposition reproduces the ARC points it was fitted to (self-heating
  0.02 degC/min at T1, 1 degC/s at T2), climbs in degC per second and ends near T3.
"""

from __future__ import annotations

import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from scipy.integrate import solve_ivp

from labdaq.sims.cell import CellBank, load_cell_spec

CHEMISTRIES = ["lfp", "nmc811", "nca", "lto", "sodium_ion"]
KELVIN = 273.15
GAS_CONSTANT = 8.314462618


def raw_spec(name: str) -> dict[str, Any]:
    path = Path(str(resources.files("labdaq.seeds") / "cells" / f"{name}.yaml"))
    data: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data


def entropic(ocv: dict[str, Any], soc: float) -> float:
    dudt = ocv.get("entropic_coefficient_v_per_k", 0.0)
    if isinstance(dudt, list):
        return float(np.interp(min(max(soc, 0.0), 1.0), ocv["entropic_soc"], dudt))
    return float(dudt)


def reference_discharge(spec: dict[str, Any], current_a: float, duration_s: float,
                        ambient_c: float, reversible: bool = True) -> float:
    """Cell temperature after ``duration_s`` at constant ``current_a`` (+ = charge) from a
    full, relaxed cell at ambient: the documented lumped equations, integrated by scipy.

        dz/dt  = I / (3600 Q)
        dv_k/dt = (I R_k(T, z) - v_k) / tau_k
        m cp dT/dt = I^2 R0 + I (v1 + v2) + I T dU/dT - h (T - T_amb)
    with R(T, z) = R_ref * factor(z) * exp(Ea/R_gas (1/T - 1/T_ref)).
    """
    res, th = spec["resistance"], spec["thermal"]
    q_as = spec["capacity_ah"] * 3600.0
    mcp = th["mass_kg"] * th["cp_j_per_kg_k"]
    h = th["h_w_per_k"]
    t_ref_k = res["reference_temperature_c"] + KELVIN
    ea0 = res.get("r0_activation_energy_j_per_mol", 20000.0) / GAS_CONSTANT
    earc = res.get("rc_activation_energy_j_per_mol", 40000.0) / GAS_CONSTANT

    def rhs(_t: float, y: np.ndarray) -> list[float]:
        z, v1, v2, temp_c = y
        t_k = temp_c + KELVIN
        base = float(np.interp(min(max(z, 0.0), 1.0), res["soc"], res["factor"]))
        r0 = res["r0_ohm"] * base * math.exp(ea0 * (1 / t_k - 1 / t_ref_k))
        rc = base * math.exp(earc * (1 / t_k - 1 / t_ref_k))
        r1, r2 = res["r1_ohm"] * rc, res["r2_ohm"] * rc
        i = current_a
        heat = i * i * r0 + i * (v1 + v2)
        if reversible:
            heat += i * t_k * entropic(spec["ocv"], z)
        return [i / q_as, (i * r1 - v1) / res["tau1_s"], (i * r2 - v2) / res["tau2_s"],
                (heat - h * (temp_c - ambient_c)) / mcp]

    sol = solve_ivp(rhs, (0.0, duration_s), [1.0, 0.0, 0.0, ambient_c], method="LSODA",
                    rtol=1e-9, atol=1e-10, max_step=5.0)
    assert sol.success
    return float(sol.y[3, -1])


@pytest.mark.parametrize("name", CHEMISTRIES)
def test_2c_discharge_heats_as_the_lumped_bernardi_solution(name: str) -> None:
    spec = raw_spec(name)
    ambient_c = 25.0
    current_a = -2.0 * spec["capacity_ah"]
    duration_s = 1700.0  # 2C from full to SOC ~0.06: stays inside the OCV table
    bank = CellBank(name, n=1, soc=1.0, ambient_c=ambient_c)
    for _ in range(int(duration_s)):
        bank.step(current_a, 1.0)
    rise_c = float(bank.cell_temperature_c[0]) - ambient_c
    reference_rise_c = reference_discharge(spec, current_a, duration_s, ambient_c) - ambient_c
    assert rise_c > 1.0
    # The reference does not model the decomposition: the cell must stay below T1.
    assert float(bank.cell_temperature_c[0]) < spec["thermal"]["self_heating_onset_c"]
    assert rise_c == pytest.approx(reference_rise_c, rel=0.01)
    # The reversible term matters here: without it (or with its sign flipped, which moves
    # the rise twice as far) the rise is off by far more than the tolerance.
    irreversible_rise_c = reference_discharge(spec, current_a, duration_s, ambient_c,
                                              reversible=False) - ambient_c
    assert abs(rise_c - irreversible_rise_c) > 0.05 * reference_rise_c
    # Bernardi: a discharge over SOCs where dU/dT is negative on average heats the cell more.
    mean_dudt = np.mean([entropic(spec["ocv"], z) for z in np.linspace(0.06, 1.0, 200)])
    assert mean_dudt < 0 and rise_c > irreversible_rise_c


@pytest.mark.parametrize("name", CHEMISTRIES)
def test_reversible_heat_changes_sign_with_current(name: str) -> None:
    spec = load_cell_spec(name)
    soc = 0.3
    dudt = float(spec.ocv.entropic_v_per_k(soc))
    assert dudt != 0.0
    current_a = spec.capacity_ah
    heat: dict[tuple[bool, float], float] = {}
    for reversible in (True, False):
        for i in (current_a, -current_a):
            bank = CellBank(spec, n=1, soc=soc, ambient_c=25.0, reversible_heat=reversible)
            bank.step(i, 1.0)
            heat[reversible, i] = float(bank.heat_w[0])
    q_rev_charge = heat[True, current_a] - heat[False, current_a]
    q_rev_discharge = heat[True, -current_a] - heat[False, -current_a]
    # Opposite signs, equal size: +I*T*dU/dT with I + = charge.
    assert np.sign(q_rev_charge) == -np.sign(q_rev_discharge) == np.sign(dudt)
    assert q_rev_charge == pytest.approx(current_a * 298.15 * dudt, rel=1e-6)
    assert q_rev_discharge == pytest.approx(-q_rev_charge, rel=1e-9)
    # The irreversible heat is the same both ways (fresh, relaxed cell): the difference
    # between discharge and charge heat is the reversible heat alone.
    assert heat[False, current_a] == pytest.approx(heat[False, -current_a], rel=1e-9)
    # The read-out agrees with the heat balance.
    bank = CellBank(spec, n=1, soc=soc, ambient_c=25.0)
    bank.step(-current_a, 1.0)
    assert float(bank.reversible_heat_w[0]) == pytest.approx(q_rev_discharge, rel=1e-9)


def test_entropic_table_is_read_by_soc() -> None:
    spec = load_cell_spec("nmc811")
    assert isinstance(spec.ocv.entropic_coefficient_v_per_k, list)
    bank = CellBank(spec, n=3, soc=[0.05, 0.5, 1.0])
    dudt = bank.entropic_coefficient_v_per_k
    # Negative at low SOC, positive near full (O'Regan et al. 2022 for this chemistry).
    assert dudt[0] < 0.0 < dudt[1] < dudt[2]
    assert dudt == pytest.approx(spec.ocv.entropic_v_per_k([0.05, 0.5, 1.0]))


# ---------------------------------------------------------------------------- runaway
@pytest.mark.parametrize("name", CHEMISTRIES)
def test_self_heating_matches_the_arc_points_it_was_fitted_to(name: str) -> None:
    th = load_cell_spec(name).thermal
    t1, t2, t3 = th.self_heating_onset_c, th.runaway_onset_c, th.runaway_peak_c
    assert float(th.self_heating_rate_c_per_s(t1 - 1.0)) == 0.0
    assert float(th.self_heating_rate_c_per_s(t1)) == pytest.approx(0.02 / 60, rel=1e-9)
    # On the adiabatic path the reacted fraction at T2 is (T2 - T1)/(T3 - T1).
    alpha2 = (t2 - t1) / (t3 - t1)
    assert float(th.self_heating_rate_c_per_s(t2, alpha2)) == pytest.approx(1.0, rel=1e-9)
    assert float(th.self_heating_rate_c_per_s(t3 - 1.0, 0.0)) == th.runaway_max_rate_c_per_s
    assert float(th.self_heating_rate_c_per_s(t2, 1.0)) == 0.0  # nothing left to react


def adiabatic_arc(name: str, dt_s: float) -> tuple[np.ndarray, np.ndarray, CellBank]:
    """Heat-wait-seek ends: the cell sits just above T1 with (almost) no heat loss. Steps
    of ``dt_s`` up to 20 degC below T2, then 0.05 s steps to resolve the climb."""
    spec = load_cell_spec(name)
    th = spec.thermal
    adiabatic = spec.model_copy(update={"thermal": th.model_copy(update={"h_w_per_k": 1e-6})})
    start_c = th.self_heating_onset_c + 0.5
    bank = CellBank(adiabatic, n=1, soc=1.0, ambient_c=start_c, temperature_c=start_c)
    times, temps = [0.0], [start_c]
    while temps[-1] < th.runaway_peak_c - 1.0 and times[-1] < 30 * 86400.0:
        step_s = dt_s if temps[-1] < th.runaway_onset_c - 20.0 else 0.05
        bank.step(0.0, step_s)
        times.append(times[-1] + step_s)
        temps.append(float(bank.cell_temperature_c[0]))
    return np.array(times), np.array(temps), bank


@pytest.mark.parametrize("name", CHEMISTRIES)
def test_adiabatic_runaway_climbs_in_degrees_per_second_to_t3(name: str) -> None:
    th = load_cell_spec(name).thermal
    t, temp, bank = adiabatic_arc(name, dt_s=10.0)
    assert bank.runaway[0] and bank.voltage_v[0] < 0.1
    # The decomposition releases (T3 - T1) in all; the internal short that collapses the
    # voltage over the first 30 degC of the runaway adds a little of the cell's own energy.
    assert bank.decomposed_fraction[0] > 0.97
    assert th.runaway_peak_c - 1.5 < temp[-1] < th.runaway_peak_c + 15.0
    rate = np.diff(temp) / np.diff(t)
    # Slow self-heating near T1 (ARC detects 0.02 degC/min), then the runaway.
    assert rate[0] < 0.1 / 60
    # Capped at the measured peak rate (the collapsing short adds a little on top).
    assert float(rate.max()) <= 1.01 * th.runaway_max_rate_c_per_s
    assert float(rate.max()) > 0.5 * th.runaway_max_rate_c_per_s > 1.0
    # The 1 degC/s trigger is crossed near T2 (first step at or above 1 degC/s).
    k = int(np.argmax(rate >= 1.0))
    assert temp[k] == pytest.approx(th.runaway_onset_c, abs=10.0)
    # Step-size independence: the time to reach T2 - 20 degC with 60 s steps agrees.
    t60, temp60, _ = adiabatic_arc(name, dt_s=60.0)
    mark_c = th.runaway_onset_c - 20.0
    assert float(np.interp(mark_c, temp60, t60)) == pytest.approx(
        float(np.interp(mark_c, temp, t)), rel=0.02)


def test_hot_chamber_below_t1_never_self_heats() -> None:
    spec = load_cell_spec("nmc811")
    chamber_c = spec.thermal.self_heating_onset_c - 5.0
    bank = CellBank(spec, n=1, soc=1.0, ambient_c=chamber_c)
    for _ in range(48):
        bank.step(0.0, 3600.0)
    assert bank.cell_temperature_c[0] == pytest.approx(chamber_c, abs=1e-6)
    assert bank.decomposed_fraction[0] == 0.0 and not bank.runaway[0]


def test_the_documented_heat_equation_is_the_one_checked_here() -> None:
    """docs/cells.md states the heat the reference above integrates (and the code
    computes, as the 2C test shows): the same terms, with the project's sign."""
    docs = Path(__file__).resolve().parents[1] / "docs" / "cells.md"
    text = docs.read_text(encoding="utf-8")
    assert "Q = I·(V − U) + I·T·dU/dT = I²·R0 + I·(v1 + v2) + I·T·dU/dT" in text
    assert "m cp dT/dt = I^2 R0 + I (v1 + v2) + I T dU/dT - h (T - T_amb)" in (
        reference_discharge.__doc__ or "")

