"""labdaq.analysis on constructed data whose answers are known in closed form, and the
EIS fit on the simulator's spectra with its measurement noise."""

from __future__ import annotations

import numpy as np
import pytest

from labdaq.analysis import (
    capacity_retention,
    circuit_impedance,
    fit_spectrum,
    incremental_capacity,
    pulse_resistances,
    rest_current_for,
    summarise_cycles,
)
from labdaq.sims.cell import CellBank
from labdaq.sims.impedance import ImpedanceParams, impedance

# --------------------------------------------------------------------- a toy cell
CAP_AH, R_OHM, V_LO, V_HI = 2.0, 0.05, 3.0, 4.2


def ocv(soc: np.ndarray) -> np.ndarray:
    return V_LO + (V_HI - V_LO) * soc


def toy_run(plan: list[tuple[float, float]], soc0: float, dt: float = 1.0,
            fade_per_cycle: float = 0.0) -> dict[str, np.ndarray]:
    """Samples of a linear-OCV cell with a series resistance. ``plan``: (current_a,
    duration_s) segments; a segment with duration <= 0 runs to the cut-off. A new cycle
    starts at every charge that follows a discharge."""
    t, v, i, cyc = [0.0], [float(ocv(np.array(soc0)))], [0.0], [1]
    soc, cycle, last_sign, cap = soc0, 1, 0, CAP_AH
    for current, duration in plan:
        sign = int(np.sign(current))
        if sign > 0 and last_sign < 0:
            cycle += 1
            cap *= 1 - fade_per_cycle
        if sign:
            last_sign = sign
        elapsed = 0.0
        while True:
            soc = soc + current * dt / 3600.0 / cap
            volt = V_LO + (V_HI - V_LO) * soc + current * R_OHM
            elapsed += dt
            t.append(t[-1] + dt)
            v.append(volt)
            i.append(current)
            cyc.append(cycle)
            if duration > 0 and elapsed >= duration:
                break
            if duration <= 0 and (volt >= V_HI if current > 0 else volt <= V_LO):
                break
        # The reading after the current step, like the engine's edge sample.
    return {"t_s": np.array(t), "voltage_v": np.array(v), "current_a": np.array(i),
            "cycle_index": np.array(cyc)}


def summary_of(run: dict[str, np.ndarray], **kw: object):  # type: ignore[no-untyped-def]
    return summarise_cycles(run["t_s"], run["voltage_v"], run["current_a"],
                            run["cycle_index"], charge_cutoff_v=V_HI, discharge_cutoff_v=V_LO,
                            **kw)  # type: ignore[arg-type]


def test_states_and_flags_of_a_half_charged_start() -> None:
    cycle = [(1.0, 0), (0.0, 600), (-1.0, 0), (0.0, 600)]
    run = toy_run([(0.0, 600)] + cycle * 3, soc0=0.5)
    s = summary_of(run)
    assert s.cycle_index.tolist() == [1, 2, 3]
    assert s.start_state.tolist() == ["unknown", "empty", "empty"]
    assert s.end_state.tolist() == ["empty", "empty", "empty"]
    assert s.efficiency_valid.tolist() == [False, True, True]
    assert s.rested_before.tolist() == [True, True, True]
    # Half charged: the first cycle charges ~half, discharges everything.
    assert s.coulombic_efficiency[0] > 1.8
    assert s.coulombic_efficiency[1:] == pytest.approx(1.0, rel=1e-3)
    assert s.full_discharge.tolist() == [True, True, True]
    assert s.full_charge.tolist() == [False, True, True]
    # The state before the run, when known from elsewhere, is used for the first cycle.
    assert summary_of(run, initial_state="partial").start_state[0] == "partial"


def test_a_coin_cell_at_tens_of_microamps_is_not_at_rest() -> None:
    """The same cycles at 50 uA (a 0.1 mAh cell at C/2): below the default 0.1 mA rest
    threshold nothing ever moves; the cell's own, C/1000, sees the cycles."""
    cycle = [(1.0, 0), (0.0, 600), (-1.0, 0), (0.0, 600)]
    run = toy_run([(0.0, 600)] + cycle * 2, soc0=0.5)
    run["current_a"] = run["current_a"] * 5e-5
    assert rest_current_for(CAP_AH * 5e-5) == pytest.approx(1e-7)
    assert rest_current_for(2.5) == 1e-4 and rest_current_for(None) == 1e-4
    default = summary_of(run)
    assert default.start_state.tolist() == ["unknown", "unknown"]
    own = summary_of(run, rest_current_a=rest_current_for(CAP_AH * 5e-5))
    assert own.start_state.tolist() == ["unknown", "empty"]
    assert own.efficiency_valid.tolist() == [False, True]


def test_incomplete_last_cycle_and_a_cycle_from_full() -> None:
    # Starts full (known), discharges, charges: a valid full-to-full cycle; then a
    # discharge stopped half way (the run was stopped).
    run = toy_run([(-1.0, 0), (0.0, 300), (1.0, 0), (0.0, 300), (-1.0, 1800)], soc0=1.0)
    run["cycle_index"][:] = 1
    run["cycle_index"][np.flatnonzero(np.diff(run["current_a"]) < -0.5)[-1] + 1:] = 2
    s = summary_of(run, initial_state="full")
    assert s.start_state.tolist() == ["full", "full"]
    assert s.end_state.tolist() == ["full", "partial"]
    assert s.efficiency_valid.tolist() == [True, False]
    assert s.complete.tolist() == [True, False]
    assert "incomplete" in s.note[1] or "both" in s.note[1]


def test_paused_intervals_are_not_integrated_and_order_is_checked() -> None:
    run = toy_run([(1.0, 3600)], soc0=0.0)
    flags = np.zeros(run["t_s"].size, np.int64)
    flags[1001:2001] = 2  # paused: these intervals moved nothing
    s = summary_of(run, flags=flags)
    # 3600 one-second intervals at 1 A, the first a half trapezoid (from rest), 1000 paused.
    assert s.charge_capacity_ah[0] == pytest.approx((3600 - 0.5 - 1000) / 3600, rel=1e-9)
    bad = {**run, "cycle_index": run["cycle_index"].copy()}
    bad["cycle_index"][10:20] = 2
    with pytest.raises(ValueError, match="non-decreasing"):
        summary_of(bad)


def test_retention_and_fade() -> None:
    cycle = [(1.0, 0), (0.0, 600), (-1.0, 0), (0.0, 600)]
    run = toy_run(cycle * 12, soc0=0.0, dt=5.0, fade_per_cycle=0.03)
    s = summary_of(run)
    ret = capacity_retention(s)
    assert ret.cycle_index.tolist() == list(range(1, 13))
    # Capacity falls 3 % per cycle (geometric): retention of cycle k is 0.97^(k-1)
    # within one sample period's worth of charge.
    want = 0.97 ** np.arange(12)
    assert ret.retention == pytest.approx(want, abs=2 * 5.0 / 3600 / CAP_AH)
    assert ret.cycles_to_80pct == int(np.argmax(want < 0.8)) + 1
    assert ret.fade_pct_per_cycle == pytest.approx(-2.6, abs=0.3)


def test_dcir_of_a_pure_resistance_and_after_10_s() -> None:
    t = np.arange(0.0, 200.0, 1.0)
    i = np.where((t >= 50) & (t < 70), -2.0, 0.0) + np.where((t >= 120) & (t < 130), 1.5, 0.0)
    # Ohmic 20 mΩ plus a slow polarisation that grows 1 mΩ per second of the pulse.
    r0 = 0.02
    pol = np.zeros_like(t)
    for lo, hi in ((50, 70), (120, 130)):
        k = (t >= lo) & (t < hi)
        pol[k] = 0.001 * (t[k] - lo)
    v = 3.7 + i * (r0 + pol)
    res = pulse_resistances(t, v, i)
    assert res.t_s.tolist() == [50, 70, 120, 130]
    assert res.resistance_ohm[[0, 2]] == pytest.approx([r0, r0], rel=1e-9)
    # 10 s into each pulse: r0 + 10 mΩ; the 10 s pulse ends at 10 s, so its current did
    # not hold: NaN.
    assert res.resistance_after_ohm[0] == pytest.approx(r0 + 0.010, rel=1e-9)
    assert np.isnan(res.resistance_after_ohm[2])
    only = pulse_resistances(t, v, i, np.where(t >= 100, 7, 3), steps=[7])
    assert only.t_s.tolist() == [120, 130]


def test_dqdv_of_a_known_curve() -> None:
    # Charge at 1 A through an OCV with a plateau: V(Q) = 3.4 + 0.6 Q + 0.05 tanh((Q-1)/0.05)
    # so dQ/dV = 1 / (0.6 + 1/cosh²(...)) peaks... at Q far from 1 and dips at Q = 1.
    # Its integral over V is the capacity moved.
    t = np.arange(0.0, 7200.0, 2.0)
    q = t / 3600.0
    v = 3.4 + 0.6 * q + 0.05 * np.tanh((q - 1.0) / 0.05)
    i = np.ones_like(t)
    ic = incremental_capacity(t, v, i, resolution_v=0.002, window_v=0.02)
    assert ic.capacity_ah == pytest.approx(q[-1], rel=1e-3)
    area = float(np.sum(0.5 * (ic.dqdv_ah_per_v[1:] + ic.dqdv_ah_per_v[:-1])
                        * np.diff(ic.voltage_v)))
    assert area == pytest.approx(q[-1], rel=0.02)
    # Away from the step dQ/dV = 1/0.6; at the step's centre 1/(0.6 + 1) = 0.625.
    far = ic.voltage_v < 3.6
    assert np.median(ic.dqdv_ah_per_v[far]) == pytest.approx(1 / 0.6, rel=0.02)
    v_mid = 3.4 + 0.6 * 1.0
    k = int(np.argmin(np.abs(ic.voltage_v - v_mid)))
    assert ic.dqdv_ah_per_v[k] == pytest.approx(1 / 1.6, rel=0.1)
    # Discharging through the same curve gives the same dQ/dV.
    dis = incremental_capacity(t, v[::-1], -i, direction="discharge", resolution_v=0.002,
                               window_v=0.02)
    assert dis.capacity_ah == pytest.approx(ic.capacity_ah, rel=1e-3)
    assert np.median(dis.dqdv_ah_per_v[dis.voltage_v < 3.6]) == pytest.approx(1 / 0.6,
                                                                               rel=0.02)


# --------------------------------------------------------------------- EIS
FREQS_HZ = np.geomspace(1e4, 1e-5, 91)  # covers both arcs of the cell model
HIOKI_NOISE_REL = 2e-4  # labdaq.sims.hioki_bt4560.HiokiBT4560Sim's default noise


@pytest.mark.parametrize("name", ["nmc811", "lfp"])
def test_eis_fit_returns_the_simulators_parameters_with_uncertainties(name: str) -> None:
    bank = CellBank(name, n=1, soc=0.5)
    true = {k: float(v[0]) for k, v in ImpedanceParams.from_bank(bank).as_dict().items()}
    z = impedance(bank, FREQS_HZ, noise_rel=HIOKI_NOISE_REL, rng=11)[0]
    fit = fit_spectrum(FREQS_HZ, z)
    assert fit.success
    assert fit.rmse_rel == pytest.approx(HIOKI_NOISE_REL, rel=0.3)
    for key, value in true.items():
        assert fit.params[key] == pytest.approx(value, rel=0.02), key
        sd = fit.stderr[key]
        assert 0 < sd < 0.02 * abs(value), (key, sd)
        # The truth lies within 5 standard errors of the estimate.
        assert abs(fit.params[key] - value) < 5 * sd, (key, fit.params[key], value, sd)


def test_eis_uncertainties_match_the_scatter_over_noise_draws() -> None:
    # Ten times the meter's noise so the scatter is well above numerical noise; the
    # reported standard errors must describe the spread of the estimates over draws.
    bank = CellBank("lfp", n=1, soc=0.5)
    keys = ("r0_ohm", "r1_ohm", "r2_ohm", "tau2_s")
    est, sd = [], []
    for seed in range(16):
        fit = fit_spectrum(FREQS_HZ, impedance(bank, FREQS_HZ, noise_rel=2e-3, rng=seed)[0])
        est.append([fit.params[k] for k in keys])
        sd.append([fit.stderr[k] for k in keys])
    scatter = np.std(np.array(est), axis=0, ddof=1)
    reported = np.mean(np.array(sd), axis=0)
    ratio = scatter / reported
    assert np.all((ratio > 0.4) & (ratio < 2.5)), dict(zip(keys, ratio.tolist(), strict=True))


def test_eis_fit_with_lead_inductance() -> None:
    bank = CellBank("nmc811", n=1, soc=0.8)
    true = {k: float(v[0]) for k, v in ImpedanceParams.from_bank(bank).as_dict().items()}
    z = impedance(bank, FREQS_HZ, noise_rel=HIOKI_NOISE_REL, rng=4)[0]
    z = z + 1j * 2 * np.pi * FREQS_HZ * 0.5e-6  # fixture inductance, as the meter sim adds
    fit = fit_spectrum(FREQS_HZ, z, inductance=True)
    assert fit.params["inductance_h"] == pytest.approx(0.5e-6, rel=0.02)
    for key in ("r0_ohm", "r1_ohm", "r2_ohm"):
        assert fit.params[key] == pytest.approx(true[key], rel=0.02), key
    assert circuit_impedance(FREQS_HZ, fit.params) == pytest.approx(z, rel=0.002)
