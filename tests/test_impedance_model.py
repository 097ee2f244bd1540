"""Tests of the simulated impedance spectrum (labdaq.sims.impedance)."""

from __future__ import annotations

import numpy as np
import pytest

from labdaq.sims.cell import CellBank
from labdaq.sims.impedance import (
    ImpedanceParams,
    fit_equivalent_circuit,
    impedance,
)

# Wide enough to show both arcs of the time-domain RC pairs (tau up to a few hundred s).
FREQS_HZ = np.geomspace(1e4, 1e-5, 91)


def test_shape_and_high_frequency_intercept_is_r0() -> None:
    bank = CellBank("nmc811", n=3, soc=[0.2, 0.5, 0.9])
    z = impedance(bank, FREQS_HZ)
    assert z.shape == (3, FREQS_HZ.size)
    assert z.dtype == np.complex128
    assert z[:, 0].real == pytest.approx(bank.r0_ohm, rel=1e-3)
    assert np.all(np.abs(z[:, 0].imag) < 0.01 * bank.r0_ohm)


@pytest.mark.parametrize("name", ["lfp", "nmc811", "nca", "lto", "sodium_ion"])
def test_arcs_match_r1_and_r2(name: str) -> None:
    bank = CellBank(name, n=1, soc=0.5)
    p = ImpedanceParams.from_bank(bank)
    r0, r1, r2 = bank.r0_ohm[0], bank.r1_ohm[0], bank.r2_ohm[0]

    def only(**changes: float) -> ImpedanceParams:
        # The circuit with the Warburg tail (and optionally one arc) switched off.
        values = {**p.as_dict(), "warburg_sigma_ohm_per_sqrt_s": 0.0, **changes}
        return ImpedanceParams.from_mapping(values)

    f_dc = np.array([1e-4 / (2 * np.pi * p.tau2_s[0])])
    assert impedance(only(), f_dc)[0, 0].real == pytest.approx(r0 + r1 + r2, rel=0.02)
    assert impedance(only(r2_ohm=0.0), f_dc)[0, 0].real == pytest.approx(r0 + r1, rel=0.02)
    assert impedance(only(r1_ohm=0.0), f_dc)[0, 0].real == pytest.approx(r0 + r2, rel=0.02)
    # Each arc peaks at f = 1/(2*pi*tau), depressed by its CPE exponent:
    # max(-Im Z) = R/2 * tan(n*pi/4).
    for r, tau, n, arc in ((r1, p.tau1_s[0], p.cpe1_n[0], only(r2_ohm=0.0)),
                           (r2, p.tau2_s[0], p.cpe2_n[0], only(r1_ohm=0.0))):
        f_peak = 1.0 / (2 * np.pi * tau)
        f = np.geomspace(f_peak / 30, f_peak * 30, 301)
        z = impedance(arc, f)[0]
        k = int(np.argmax(-z.imag))
        assert f[k] == pytest.approx(f_peak, rel=0.03)
        assert -z.imag[k] == pytest.approx(r / 2 * np.tan(n * np.pi / 4), rel=0.01)


def test_fit_recovers_the_parameters() -> None:
    bank = CellBank("nmc811", n=1, soc=0.5)
    p = ImpedanceParams.from_bank(bank)
    z = impedance(bank, FREQS_HZ)[0]
    fit = fit_equivalent_circuit(FREQS_HZ, z)
    assert fit["success"]
    for key, true in p.as_dict().items():
        assert fit[key] == pytest.approx(float(true[0]), rel=0.02), key


@pytest.mark.parametrize("name", ["lfp", "lto", "sodium_ion"])
def test_fit_with_seeded_noise(name: str) -> None:
    bank = CellBank(name, n=1, soc=0.5)
    z = impedance(bank, FREQS_HZ, noise_rel=0.001, rng=42)[0]
    fit = fit_equivalent_circuit(FREQS_HZ, z)
    assert fit["r0_ohm"] == pytest.approx(bank.r0_ohm[0], rel=0.02)
    assert fit["r1_ohm"] == pytest.approx(bank.r1_ohm[0], rel=0.02)
    assert fit["r2_ohm"] == pytest.approx(bank.r2_ohm[0], rel=0.02)
    assert fit["rmse_rel"] < 0.005


def test_fit_result_feeds_back_into_impedance() -> None:
    bank = CellBank("lfp", n=1, soc=0.6)
    z = impedance(bank, FREQS_HZ)[0]
    fit = fit_equivalent_circuit(FREQS_HZ, z)
    assert impedance(fit, FREQS_HZ) == pytest.approx(z, rel=1e-6)


def test_spectrum_follows_temperature_soc_and_ageing() -> None:
    cold = CellBank("nca", n=1, soc=0.5, ambient_c=0.0)
    warm = CellBank("nca", n=1, soc=0.5, ambient_c=25.0)
    low = CellBank("nca", n=1, soc=0.05, ambient_c=25.0)
    f = np.array([1e4, 1e-2])
    z_cold, z_warm, z_low = (impedance(b, f)[0] for b in (cold, warm, low))
    assert z_cold[0].real > 1.5 * z_warm[0].real  # electrolyte Arrhenius
    assert z_cold[1].real > z_warm[1].real
    assert z_low[1].real > z_warm[1].real  # SOC table: higher resistance near empty

    aged = CellBank("nca", n=1, soc=1.0, ambient_c=25.0)
    for _ in range(365):
        aged.step(0.0, 86400.0)
    aged.soc = 0.5
    aged.step(0.0, 1.0)
    warm.step(0.0, 1.0)
    growth = aged.resistance_growth[0]
    assert growth > 0.02
    z_aged = impedance(aged, f)[0]
    assert z_aged[0].real / impedance(warm, f)[0][0].real == pytest.approx(
        1.0 + growth, rel=0.01)


def test_noise_is_reproducible_with_a_seed() -> None:
    bank = CellBank("lto", n=2, soc=0.5)
    a = impedance(bank, FREQS_HZ, noise_rel=0.01, rng=7)
    b = impedance(bank, FREQS_HZ, noise_rel=0.01, rng=np.random.default_rng(7))
    c = impedance(bank, FREQS_HZ, noise_rel=0.01, rng=8)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.array_equal(impedance(bank, FREQS_HZ), impedance(bank, FREQS_HZ))


def test_rejects_bad_input() -> None:
    bank = CellBank("lto")
    with pytest.raises(ValueError):
        impedance(bank, [0.0, 1.0])
    with pytest.raises(ValueError):
        fit_equivalent_circuit([1.0, 2.0], [1 + 0j, 2 + 0j])
