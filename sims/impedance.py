"""Impedance spectra of simulated cells: one job — turn the cell model's present parameters
into Z(f), and fit that equivalent circuit back to a measured spectrum.

Circuit: ``Z = R0 + R1/(1 + (j*w*tau1)^n1) + R2/(1 + (j*w*tau2)^n2) + sigma*(1 - j)/sqrt(w)``,
i.e. R0 in series with two R||CPE arcs (CPE ``Q = tau^n / R``) and a semi-infinite Warburg
element. R0, R1, R2, tau1, tau2 are the very values the time-domain model in
:mod:`labdaq.sims.cell` uses at this SOC, temperature and age, so the high-frequency
intercept is the cell's R0 and the arcs move with SOC, temperature and ageing. The fit uses
plain ``scipy.optimize.least_squares`` with a few starting points; no EIS library.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

if TYPE_CHECKING:
    from labdaq.sims.cell import CellBank

FloatArray = NDArray[np.float64]
ComplexArray = NDArray[np.complex128]

PARAM_NAMES = (
    "r0_ohm", "r1_ohm", "tau1_s", "cpe1_n", "r2_ohm", "tau2_s", "cpe2_n",
    "warburg_sigma_ohm_per_sqrt_s",
)


@dataclass(frozen=True)
class ImpedanceParams:
    """Circuit parameters, each an array over cells (or scalars for one circuit)."""

    r0_ohm: FloatArray
    r1_ohm: FloatArray
    tau1_s: FloatArray
    cpe1_n: FloatArray
    r2_ohm: FloatArray
    tau2_s: FloatArray
    cpe2_n: FloatArray
    warburg_sigma_ohm_per_sqrt_s: FloatArray

    @classmethod
    def from_bank(cls, bank: CellBank) -> ImpedanceParams:
        """Parameters of every cell in ``bank`` in its present state."""
        spec = bank.spec
        ones = np.ones(bank.n)
        r1 = bank.r1_ohm
        # Diffusion slows with the same kinetics as the RC pairs: scale sigma like R1.
        rc_scale = r1 / spec.resistance.r1_ohm
        return cls(
            r0_ohm=bank.r0_ohm,
            r1_ohm=r1,
            tau1_s=ones * spec.resistance.tau1_s,
            cpe1_n=ones * spec.impedance.cpe1_n,
            r2_ohm=bank.r2_ohm,
            tau2_s=ones * spec.resistance.tau2_s,
            cpe2_n=ones * spec.impedance.cpe2_n,
            warburg_sigma_ohm_per_sqrt_s=rc_scale * spec.impedance.warburg_sigma_ohm_per_sqrt_s,
        )

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> ImpedanceParams:
        """From a dict with PARAM_NAMES keys (e.g. the result of fit_equivalent_circuit)."""
        return cls(**{k: np.asarray(values[k], dtype=float) for k in PARAM_NAMES})

    def as_dict(self) -> dict[str, FloatArray]:
        return {k: getattr(self, k) for k in PARAM_NAMES}


def _model(freqs_hz: FloatArray, r0: Any, r1: Any, tau1: Any, n1: Any, r2: Any, tau2: Any,
           n2: Any, sigma: Any) -> ComplexArray:
    w = 2.0 * np.pi * freqs_hz
    jw = 1j * w
    z = (r0 + r1 / (1.0 + (jw * tau1) ** n1) + r2 / (1.0 + (jw * tau2) ** n2)
         + sigma * (1.0 - 1j) / np.sqrt(w))
    return np.asarray(z, dtype=np.complex128)


def impedance(
    bank_or_params: CellBank | ImpedanceParams | dict[str, Any],
    freqs_hz: ArrayLike,
    *,
    noise_rel: float = 0.0,
    rng: np.random.Generator | int | None = None,
) -> ComplexArray:
    """Complex impedance (ohm), shape ``(n_cells, n_freqs)`` for a bank (or broadcast shape
    of the parameters). ``noise_rel`` adds complex Gaussian noise of that fraction of |Z|
    drawn from ``rng`` (a Generator or a seed; a seed makes the noise reproducible)."""
    if isinstance(bank_or_params, ImpedanceParams):
        p = bank_or_params
    elif isinstance(bank_or_params, dict):
        p = ImpedanceParams.from_mapping(bank_or_params)
    else:
        p = ImpedanceParams.from_bank(bank_or_params)
    f = np.asarray(freqs_hz, dtype=float)
    if np.any(f <= 0):
        raise ValueError("frequencies must be > 0 Hz")

    def col(x: FloatArray) -> FloatArray:
        a = np.asarray(x, dtype=float)
        return a[..., None] if a.ndim else a

    z = _model(f, col(p.r0_ohm), col(p.r1_ohm), col(p.tau1_s), col(p.cpe1_n), col(p.r2_ohm),
               col(p.tau2_s), col(p.cpe2_n), col(p.warburg_sigma_ohm_per_sqrt_s))
    if noise_rel > 0.0:
        gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        mag = np.abs(z)
        z = z + noise_rel * mag * (gen.standard_normal(z.shape) + 1j * gen.standard_normal(z.shape))
    return z


def fit_equivalent_circuit(freqs_hz: ArrayLike, z: ArrayLike) -> dict[str, float]:
    """Fit R0 + (R1||CPE1) + (R2||CPE2) + Warburg to one spectrum.

    Returns PARAM_NAMES plus ``q1``/``q2`` (CPE coefficients, F*s^(n-1)), ``rmse_rel`` (RMS
    residual relative to |Z|) and ``success``. The faster arc is reported as arc 1.
    """
    from scipy.optimize import least_squares

    f = np.asarray(freqs_hz, dtype=float)
    zz = np.asarray(z, dtype=np.complex128)
    if f.shape != zz.shape or f.ndim != 1 or f.size < 8:
        raise ValueError("need one spectrum: 1-D freqs and z of equal length (>= 8 points)")
    order = np.argsort(f)
    f, zz = f[order], zz[order]
    weight = 1.0 / np.abs(zz)

    def unpack(x: FloatArray) -> tuple[float, ...]:
        r0, r1, t1, n1, r2, t2, n2, sg = x
        return (np.exp(r0), np.exp(r1), np.exp(t1), n1, np.exp(r2), np.exp(t2), n2, sg)

    def residual(x: FloatArray) -> FloatArray:
        d = (_model(f, *unpack(x)) - zz) * weight
        return np.concatenate([d.real, d.imag])

    # Starting points: R0 from the high-frequency real part, the arcs sharing what is left
    # at low frequency, time constants first from the peaks of -Im(Z) (one arc per peak),
    # then, only if that fit is poor, from a grid spanning the measured band.
    r0_guess = max(float(zz.real[-1]), 1e-9)
    rest = max(float(zz.real[0]) - r0_guess, 1e-9)
    tau_lo, tau_hi = 1.0 / (2 * np.pi * f[-1]), 1.0 / (2 * np.pi * f[0])
    log_r_lo, log_r_hi = np.log(r0_guess * 1e-4), np.log(r0_guess * 1e4 + rest * 1e2)
    lower = [log_r_lo, log_r_lo, np.log(tau_lo / 100), 0.3,
             log_r_lo, np.log(tau_lo / 100), 0.3, 0.0]
    upper = [log_r_hi, log_r_hi, np.log(tau_hi * 100), 1.0,
             log_r_hi, np.log(tau_hi * 100), 1.0, np.inf]

    def start(t1: float, t2: float, r1: float, r2: float) -> Any:
        x0 = np.array([np.log(r0_guess), np.log(r1), np.log(t1), 0.9,
                       np.log(r2), np.log(t2), 0.85, 0.0])
        x0 = np.clip(x0, np.array(lower) + 1e-9, np.array(upper) - 1e-9)
        return least_squares(residual, x0, bounds=(lower, upper), method="trf",
                             x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=400)

    # An R||C arc peaks in -Im(Z) at f = 1/(2*pi*tau) with height R/2.
    # Light smoothing so measurement noise does not create spurious peaks.
    neg_im = np.convolve(-zz.imag, np.ones(3) / 3.0, mode="same")
    neg_im[0], neg_im[-1] = -zz.imag[0], -zz.imag[-1]
    floor = 0.05 * float(neg_im.max())
    peaks = [k for k in range(2, f.size - 2)
             if neg_im[k] > floor and neg_im[k] >= neg_im[k - 1] and neg_im[k] >= neg_im[k + 1]]
    top = sorted(sorted(peaks, key=lambda k: neg_im[k], reverse=True)[:2], key=lambda k: -f[k])
    arcs = [(1.0 / (2 * np.pi * f[k]), 2.0 * float(neg_im[k])) for k in top]
    if len(arcs) == 1:
        arcs.append((min(arcs[0][0] * 50, tau_hi), arcs[0][1]))
    candidates: list[tuple[float, float, float, float]] = []
    if len(arcs) == 2:
        (t1, r1), (t2, r2) = arcs
        # The peak estimate, then the same estimate shifted, which confirms (or escapes) it.
        candidates += [(t1, t2, r1, r2), (t1 * 0.5, t2 * 2.0, r1, r2), (t1 * 2.0, t2 * 0.5, r1, r2)]
    taus = np.geomspace(tau_lo * 10, tau_hi / 3, 5)
    r_guess = min(rest / 3, 2.0 * float(max(neg_im.max(), 1e-9)))
    candidates += [(float(a), float(b), r_guess, r_guess)
                   for i, a in enumerate(taus) for b in taus[i + 1:]]
    best = None
    good_enough = 1e-8 * f.size
    for cand in candidates:
        with np.errstate(over="ignore", invalid="ignore"):
            sol = start(*cand)
        # Two different starting points landing on the same minimum (or a near-exact fit)
        # is taken as the global minimum: no need to try the rest of the grid.
        agree = best is not None and abs(sol.cost - best.cost) <= 1e-6 * best.cost
        if best is None or sol.cost < best.cost:
            best = sol
        rmse_rel = float(np.sqrt(2.0 * best.cost / (2 * f.size)))
        if best.cost < good_enough or (agree and rmse_rel < 0.005):
            break
    assert best is not None
    r0, r1, t1, n1, r2, t2, n2, sg = (float(v) for v in unpack(best.x))
    if t1 > t2:
        r1, t1, n1, r2, t2, n2 = r2, t2, n2, r1, t1, n1
    rmse = float(np.sqrt(np.mean(best.fun ** 2)))
    return {
        "r0_ohm": r0, "r1_ohm": r1, "tau1_s": t1, "cpe1_n": n1,
        "r2_ohm": r2, "tau2_s": t2, "cpe2_n": n2, "warburg_sigma_ohm_per_sqrt_s": sg,
        "q1": t1 ** n1 / r1, "q2": t2 ** n2 / r2, "rmse_rel": rmse, "success": bool(best.success),
    }
