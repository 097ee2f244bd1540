"""Equivalent-circuit fit of an impedance spectrum, with parameter uncertainties.

Circuit (the one the simulated cells use, and a common one for lithium-ion cells):
``Z = L*jw + R0 + R1/(1 + (jw*tau1)^n1) + R2/(1 + (jw*tau2)^n2) + sigma*(1 - j)/sqrt(w)``:
a series inductance (leads, fixture; optional), the ohmic resistance R0, two R||CPE arcs
(CPE ``Q = tau^n / R``) for the fast (SEI / contact) and slow (charge transfer) processes,
and a semi-infinite Warburg element for diffusion.

The fit is ``scipy.optimize.least_squares`` on residuals relative to |Z| (a meter's
error is a fraction of reading), in log-parameters for the positive quantities, from
several starting points (time constants read off the peaks of -Im Z, then a grid). The
uncertainties are the usual linearised ones: covariance ``s² (JᵀJ)⁻¹`` with ``s²`` the
residual variance per degree of freedom, mapped from log-parameters to parameters
(``σ_R = R σ_logR``). They describe the scatter from measurement noise, assuming the
circuit is the right model; a spectrum that does not cover an arc (its peak outside the
measured band) makes that arc's parameters large in uncertainty, which is the signal to
widen the sweep, not to trust the value.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["PARAMS", "EisFit", "circuit_impedance", "fit_spectrum"]

FloatArray = NDArray[np.float64]

PARAMS = (
    "r0_ohm", "r1_ohm", "tau1_s", "cpe1_n", "r2_ohm", "tau2_s", "cpe2_n",
    "warburg_sigma_ohm_per_sqrt_s", "inductance_h",
)
# Fitted in log space (positive, spanning decades).
_LOG = {"r0_ohm", "r1_ohm", "tau1_s", "r2_ohm", "tau2_s"}


@dataclass(frozen=True)
class EisFit:
    params: dict[str, float]
    stderr: dict[str, float]  # one standard error, same units
    rmse_rel: float  # RMS residual relative to |Z|
    dof: int
    success: bool

    def relative_stderr(self) -> dict[str, float]:
        return {k: (self.stderr[k] / abs(v) if v else float("inf"))
                for k, v in self.params.items()}

    def as_dict(self) -> dict[str, Any]:
        return {"params": self.params, "stderr": self.stderr, "rmse_rel": self.rmse_rel,
                "dof": self.dof, "success": self.success}


def circuit_impedance(freqs_hz: ArrayLike, params: dict[str, float]) -> NDArray[np.complex128]:
    """Z(f) of the circuit for the given parameters (missing inductance = 0)."""
    f = np.asarray(freqs_hz, dtype=np.float64)
    w = 2.0 * np.pi * f
    jw = 1j * w
    p = params
    z = (p.get("inductance_h", 0.0) * jw + p["r0_ohm"]
         + p["r1_ohm"] / (1.0 + (jw * p["tau1_s"]) ** p["cpe1_n"])
         + p["r2_ohm"] / (1.0 + (jw * p["tau2_s"]) ** p["cpe2_n"])
         + p["warburg_sigma_ohm_per_sqrt_s"] * (1.0 - 1j) / np.sqrt(w))
    return np.asarray(z, dtype=np.complex128)


def fit_spectrum(freqs_hz: ArrayLike, z: ArrayLike, *, inductance: bool = False) -> EisFit:
    """Fit the circuit to one spectrum (``z`` complex, ohm). ``inductance`` adds the
    series L (fit it when the high-frequency end shows positive imaginary parts)."""
    from scipy.optimize import least_squares

    f = np.asarray(freqs_hz, dtype=np.float64)
    zz = np.asarray(z, dtype=np.complex128)
    names = [n for n in PARAMS if inductance or n != "inductance_h"]
    if f.shape != zz.shape or f.ndim != 1 or f.size < len(names) + 2:
        raise ValueError(f"need one spectrum: 1-D freqs and z of equal length "
                         f"(>= {len(names) + 2} points)")
    order = np.argsort(f)
    f, zz = f[order], zz[order]
    weight = 1.0 / np.abs(zz)
    is_log = np.array([n in _LOG for n in names])

    def unpack(x: FloatArray) -> dict[str, float]:
        vals = np.where(is_log, np.exp(np.where(is_log, x, 0.0)), x)
        return dict(zip(names, vals.tolist(), strict=True))

    def residual(x: FloatArray) -> FloatArray:
        d = (circuit_impedance(f, unpack(x)) - zz) * weight
        return np.concatenate([d.real, d.imag])

    r0_guess = max(float(zz.real[-1]), 1e-9)
    rest = max(float(zz.real[0]) - r0_guess, 1e-9)
    tau_lo, tau_hi = 1.0 / (2 * np.pi * f[-1]), 1.0 / (2 * np.pi * f[0])
    lr_lo, lr_hi = np.log(r0_guess * 1e-4), np.log(r0_guess * 1e4 + rest * 1e2)
    bounds_by_name = {
        "r0_ohm": (lr_lo, lr_hi), "r1_ohm": (lr_lo, lr_hi), "r2_ohm": (lr_lo, lr_hi),
        "tau1_s": (np.log(tau_lo / 100), np.log(tau_hi * 100)),
        "tau2_s": (np.log(tau_lo / 100), np.log(tau_hi * 100)),
        "cpe1_n": (0.3, 1.0), "cpe2_n": (0.3, 1.0),
        "warburg_sigma_ohm_per_sqrt_s": (0.0, np.inf), "inductance_h": (-np.inf, np.inf),
    }
    lower = np.array([bounds_by_name[n][0] for n in names])
    upper = np.array([bounds_by_name[n][1] for n in names])

    def solve(t1: float, t2: float, r1: float, r2: float) -> Any:
        start = {"r0_ohm": np.log(r0_guess), "r1_ohm": np.log(r1), "tau1_s": np.log(t1),
                 "cpe1_n": 0.9, "r2_ohm": np.log(r2), "tau2_s": np.log(t2), "cpe2_n": 0.85,
                 "warburg_sigma_ohm_per_sqrt_s": 0.0, "inductance_h": 0.0}
        x0 = np.clip(np.array([start[n] for n in names]), lower + 1e-9, upper - 1e-9)
        with np.errstate(over="ignore", invalid="ignore"):
            return least_squares(residual, x0, bounds=(lower, upper), method="trf",
                                 x_scale="jac", xtol=1e-12, ftol=1e-12, gtol=1e-12,
                                 max_nfev=500)

    # An R||C arc peaks in -Im(Z) at f = 1/(2*pi*tau) with height ~R/2; light smoothing so
    # noise does not make spurious peaks.
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
        candidates += [(t1, t2, r1, r2), (t1 * 0.5, t2 * 2.0, r1, r2),
                       (t1 * 2.0, t2 * 0.5, r1, r2)]
    taus = np.geomspace(tau_lo * 10, tau_hi / 3, 5)
    r_guess = min(rest / 3, 2.0 * float(max(neg_im.max(), 1e-9)))
    candidates += [(float(a), float(b), r_guess, r_guess)
                   for k, a in enumerate(taus) for b in taus[k + 1:]]
    best = None
    for cand in candidates:
        sol = solve(*cand)
        agree = best is not None and abs(sol.cost - best.cost) <= 1e-6 * best.cost
        if best is None or sol.cost < best.cost:
            best = sol
        # Two starts on the same minimum with a good fit: taken as the global minimum.
        if agree and np.sqrt(2 * best.cost / (2 * f.size)) < 0.005:
            break
    assert best is not None

    x = best.x.copy()
    # The faster arc is arc 1.
    p = unpack(x)
    swap = p["tau1_s"] > p["tau2_s"]
    m, k = 2 * f.size, len(names)
    dof = max(m - k, 1)
    s2 = 2.0 * best.cost / dof
    jac = best.jac
    try:
        cov = np.linalg.inv(jac.T @ jac) * s2
        sd_x = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    except np.linalg.LinAlgError:
        sd_x = np.full(k, np.inf)
    values = np.array([p[n] for n in names])
    sd = np.where(is_log, values * sd_x, sd_x)
    stderr = dict(zip(names, sd.tolist(), strict=True))
    if swap:
        for a, b in (("r1_ohm", "r2_ohm"), ("tau1_s", "tau2_s"), ("cpe1_n", "cpe2_n")):
            p[a], p[b] = p[b], p[a]
            stderr[a], stderr[b] = stderr[b], stderr[a]
    rmse = float(np.sqrt(np.mean(best.fun ** 2)))
    return EisFit(params=p, stderr=stderr, rmse_rel=rmse, dof=dof, success=bool(best.success))
