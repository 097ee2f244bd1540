"""Physical model of simulated battery cells: one job — advance N cells' electrical,
thermal and ageing state in time for the instrument simulators.

Model (per cell, vectorised over a bank with numpy; current positive = charge):

* terminal voltage ``V = OCV(SOC, h, T) + I*R0 + v1 + v2`` — a Thevenin model with two RC
  pairs (Plett, *Battery Management Systems* Vol. I, ch. 2), updated with the exact
  exponential solution for constant current over ``dt`` so any step size is stable;
* one-state hysteresis ``h`` in [-1, 1] blending the discharge and charge OCV branches (LFP);
* a cold cell's shortfall of deliverable charge as a *depletion* state ``d`` (SOC units):
  the OCV is read at ``SOC - d``; a cold discharge builds ``d`` up as charge is drawn, so
  that it delivers the ``available_capacity`` table's fraction, and at rest or on charge
  ``d`` relaxes to 0 with the slower RC time constant (a resting cold cell's voltage
  recovers; cooling at rest does not lower it);
* lumped thermal model ``m*cp*dT/dt = Q - h_tr*(T - T_amb)`` with Bernardi's heat written
  for current positive on charge, ``Q = I^2*R0 + I*(v1 + v2) + I*T*dU/dT`` (Bernardi's own
  ``I_d*(U - V) - I_d*T*dU/dT`` with ``I_d = -I``; derivation in docs/cells.md), dU/dT a
  constant or a SOC table, plus short-circuit, abuse and decomposition heat; updated
  exactly for constant heat over ``dt``;
* R0/R1/R2 scale with Arrhenius temperature factors, a SOC table and ageing growth;
* ageing: capacity fade and resistance growth per equivalent full cycle and per day, both
  accelerated by an Arrhenius factor of cell temperature; self-discharge always acts;
* abuse: OCV rises steeply above SOC 1, the excess is dissipated as heat; above the ARC
  self-heating onset T1 a one-step Arrhenius decomposition (Townsend & Tou's ARC kinetics,
  fitted to the onset T1, the trigger T2 where self-heating reaches 1 degC/s and the
  maximum T3, with a peak rate in degC/s) heats the cell; past T2 the separator fails and
  an internal short collapses the voltage to ~0 V.

Parameters come from YAML files in ``labdaq.seeds/cells`` (see docs/cells.md), read and
validated by :mod:`labdaq.sims.cell_spec`.

One class, :class:`CellBank`, holds the integrator: its ``step`` is a single vectorised
update whose state arrays the electrical, thermal, ageing and abuse parts all read and
write within the same step (the heat depends on the overpotentials, the resistances on
the temperature and ageing, the short on the decomposition). Its read-only views of those
arrays (``voltage_v``, ``soc``, ``heat_w`` ...) are :mod:`labdaq.sims.cell_readings`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .cell_readings import CellReadings
from .cell_spec import (  # noqa: F401 - re-exported: callers import them from here
    GAS_CONSTANT_J_PER_MOL_K,
    KELVIN_OFFSET,
    SECONDS_PER_DAY,
    SECONDS_PER_HOUR,
    SECONDS_PER_MONTH,
    AgeingModel,
    CapacityTemperature,
    CellSpec,
    ImpedanceExtras,
    OcvTable,
    ResistanceModel,
    ThermalModel,
    Variation,
    _const,
    list_cell_specs,
    load_cell_spec,
)

FloatArray = NDArray[np.float64]
# Which cells a fault applies to: one index, a slice, indices or a boolean mask.
CellIndex = int | slice | list[int] | NDArray[np.intp] | NDArray[np.bool_]

# Below SOC 0 (over-discharge) the OCV falls linearly to 0 V over this SOC span, so a
# shorted or over-discharged cell stops draining itself instead of sitting at OCV(0).
_OVERDISCHARGE_SOC_SPAN = 0.02
# SOC is allowed slightly out of [0, 1] for abuse; these bounds only keep numbers finite.
_SOC_MIN = -0.05
_SOC_MAX = 5.0
# After runaway starts the separator fails: an internal short of this resistance grows in
# as the reaction proceeds, which is what drives the terminal voltage to ~0 V.
_RUNAWAY_SHORT_OHM = 0.005
# Temperature climb after the runaway starts (T2, or a forced trigger) over which the
# separator fails and the voltage collapses completely.
_RUNAWAY_COLLAPSE_SPAN_C = 30.0
# While the decomposition runs, sub-steps are short enough that no cell's adiabatic rise
# in one exceeds this: the Arrhenius rate grows ~e-fold every ~10 K near T2.
_MAX_RISE_PER_SUBSTEP_C = 2.0
# ... but never shorter than this fraction of the step, so a step's cost stays bounded.
_MIN_SUBSTEP_FRACTION = 1e-4
# Distinct step lengths whose coefficients are kept (emptied when full).
_DT_CACHE_SIZE = 16


class CellBank(CellReadings):
    """N cells of one spec advanced together; every state is a numpy array of length N.

    Hot-path notes: a step is ~60 small numpy operations, so per-call overhead dominates at
    N=64. Scalars from the spec are copied to plain attributes once, flags skip work that is
    rarely needed (abuse, shorts, cold cells), and ageing is integrated every step but folded
    into capacity and resistance only every ``ageing_refresh_s`` of simulated time.
    """

    ageing_refresh_s = 60.0

    def __init__(
        self,
        spec: CellSpec | str,
        n: int = 1,
        soc: ArrayLike = 1.0,
        ambient_c: ArrayLike = 25.0,
        seed: int | None = None,
        *,
        temperature_c: ArrayLike | None = None,
        reversible_heat: bool = True,
    ) -> None:
        if isinstance(spec, str):
            spec = load_cell_spec(spec)
        if n < 1:
            raise ValueError("n must be >= 1")
        self.spec = spec
        self.n = int(n)
        self.reversible_heat = reversible_heat
        self.rng = np.random.default_rng(seed)
        shape = (self.n,)
        self._shape = shape

        # Lookup tables as arrays once, so a step does no Python-level conversion.
        self._ocv_soc = np.asarray(spec.ocv.soc, dtype=float)
        self._ocv_chg = np.asarray(spec.ocv.charge_v, dtype=float)
        self._ocv_dis = (np.asarray(spec.ocv.discharge_v, dtype=float)
                         if spec.ocv.discharge_v is not None else self._ocv_chg)
        self._hysteresis = spec.has_hysteresis
        self._hyst_ah = spec.ocv.hysteresis_soc
        self._k_over = spec.ocv.overcharge_v_per_soc
        dudt = spec.ocv.entropic_coefficient_v_per_k
        self._dudt_soc: FloatArray | None = None
        self._dudt_table: FloatArray | None = None
        if isinstance(dudt, list):
            self._dudt_soc = np.asarray(spec.ocv.entropic_soc, dtype=float)
            self._dudt_table = np.asarray(dudt, dtype=float)
            dudt = 0.0
        self._r_soc = np.asarray(spec.resistance.soc, dtype=float)
        self._r_factor = np.asarray(spec.resistance.factor, dtype=float)
        self._cap_t = np.asarray(spec.available_capacity.temperature_c, dtype=float)
        self._cap_f = np.asarray(spec.available_capacity.factor, dtype=float)
        # Above this temperature every cell delivers its full capacity: skip the remap.
        full = [t for t, f in zip(self._cap_t, self._cap_f, strict=True) if f >= 1.0]
        self._t_full_c = min(full) if full else math.inf

        res = spec.resistance
        self._ea0_r = res.r0_activation_energy_j_per_mol / GAS_CONSTANT_J_PER_MOL_K
        self._earc_r = res.rc_activation_energy_j_per_mol / GAS_CONSTANT_J_PER_MOL_K
        self._inv_tref_r = 1.0 / (res.reference_temperature_c + KELVIN_OFFSET)
        self._eaage_r = spec.ageing.activation_energy_j_per_mol / GAS_CONSTANT_J_PER_MOL_K
        self._inv_tref_age = 1.0 / (spec.ageing.reference_temperature_c + KELVIN_OFFSET)
        self.tau1_s = res.tau1_s
        self.tau2_s = res.tau2_s
        ag = spec.ageing
        self._k_fade = (ag.cycle_capacity_fade_per_efc, ag.calendar_capacity_fade_per_day)
        self._k_growth = (ag.cycle_resistance_growth_per_efc,
                          ag.calendar_resistance_growth_per_day)
        th = spec.thermal
        self._mcp = th.heat_capacity_j_per_k
        self._h = th.h_w_per_k
        self._t1_c = th.self_heating_onset_c
        self._onset_c = th.runaway_onset_c
        self._peak_c = th.runaway_peak_c
        self._ln_a, self._ea_r = th.arrhenius_constants()
        self._rise_ad_c = th.adiabatic_rise_c
        self._max_conv_per_s = th.runaway_max_rate_c_per_s / th.adiabatic_rise_c
        self._self_discharge_per_s = spec.self_discharge_pct_per_month / 100.0 / SECONDS_PER_MONTH
        self._inv_2q_as = 1.0 / (2.0 * spec.capacity_ah * SECONDS_PER_HOUR)

        # Manufacturing spread only when seeded: an unseeded bank is N identical cells.
        if seed is None:
            self._cap_var = np.ones(shape)
            self._r_var = np.ones(shape)
        else:
            v = spec.variation
            self._cap_var = np.clip(1.0 + self.rng.normal(0.0, v.capacity_rel, shape), 0.5, 1.5)
            self._r_var = np.clip(1.0 + self.rng.normal(0.0, v.resistance_rel, shape), 0.5, 2.0)
        self._fresh_capacity_ah = spec.capacity_ah * self._cap_var

        # State.
        self._soc = np.broadcast_to(np.asarray(soc, dtype=float), shape).copy()
        # A full cell has just been charged, an empty one discharged; in between, mid-branch.
        self._h_state = np.clip(2.0 * self._soc - 1.0, -1.0, 1.0)
        self._v1 = np.zeros(shape)
        self._v2 = np.zeros(shape)
        self._depletion = np.zeros(shape)
        self._any_depleted = False
        self._ambient = np.broadcast_to(np.asarray(ambient_c, dtype=float), shape).copy()
        t0 = self._ambient if temperature_c is None else np.asarray(temperature_c, dtype=float)
        self._temp_c = np.broadcast_to(t0, shape).astype(float).copy()
        self._efc = np.zeros(shape)
        # Arrhenius-weighted EFC and days: fade/growth are linear in these two.
        self._w_efc = np.zeros(shape)
        self._w_days = np.zeros(shape)
        self._fade = np.zeros(shape)
        self._growth = np.zeros(shape)
        self._capacity_ah = self._fresh_capacity_ah.copy()
        self._inv_cap_as = 1.0 / (self._capacity_ah * SECONDS_PER_HOUR)
        self._r0_age = res.r0_ohm * self._r_var
        self._r1_age = res.r1_ohm * self._r_var
        self._r2_age = res.r2_ohm * self._r_var
        # Constants used against arrays in the hot path are 0-d arrays: numpy 2 combines
        # those with an array ~3x faster than a Python float (no scalar promotion).
        self._c_kelvin = _const(KELVIN_OFFSET)
        self._c_inv_tref = _const(self._inv_tref_r)
        self._c_ea0 = _const(self._ea0_r)
        self._c_earc = _const(self._earc_r)
        self._c_neg_eaage = _const(-self._eaage_r)
        self._c_age_shift = _const(self._eaage_r * (self._inv_tref_age - self._inv_tref_r))
        self._c_dudt = _const(dudt)
        self._c_inv_h = _const(1.0 / self._h)
        self._since_refresh_s = 0.0
        self._current_a: FloatArray = np.zeros(shape)
        self._cell_current_a: FloatArray = np.zeros(shape)
        self._heat_w: FloatArray = np.zeros(shape)
        self._runaway = np.zeros(shape, dtype=bool)
        # Decomposition: reacted fraction, and cells whose reaction a fault forces.
        self._conversion = np.zeros(shape)
        self._forced = np.zeros(shape, dtype=bool)
        self._any_forced = False
        self._reacting = False
        self._update_reacting()
        self._rev_parts: tuple[FloatArray, FloatArray, FloatArray] | None = None
        self._runaway_start_c = np.zeros(shape)
        self._collapse = np.zeros(shape)
        self._g_int = np.zeros(shape)
        self._g_ext = np.zeros(shape)
        self._g_total = np.zeros(shape)
        self._shorted = False
        self._any_runaway = False
        self._soc_min = float(self._soc.min())
        self._soc_max = float(self._soc.max())
        self.sensor_dropout = np.zeros(shape, dtype=bool)
        self.time_s = 0.0
        self._cache: tuple[FloatArray, ...] | None = None
        # A logging cabinet steps reading to reading: t - t_prev on its timer's grid comes
        # out as a handful of floats a last bit apart, so one remembered dt missed nearly
        # every step; a few kept hit.
        self._dt_cache: dict[float, tuple[FloatArray, ...]] = {}

    # ------------------------------------------------------------------ evaluation
    def _eval(self) -> tuple[FloatArray, ...]:
        """(ocv_v, r0, r1, r2, T_kelvin, ageing acceleration, dU/dT) for the present state;
        cached until the next step."""
        if self._cache is not None:
            return self._cache
        temp_c = self._temp_c
        t_k = temp_c + self._c_kelvin
        d_inv_t = np.reciprocal(t_k) - self._c_inv_tref
        soc = self._soc
        socc = soc if 0.0 <= self._soc_min and self._soc_max <= 1.0 else np.clip(soc, 0.0, 1.0)
        base = np.interp(socc, self._r_soc, self._r_factor)
        r0 = self._r0_age * base * np.exp(self._c_ea0 * d_inv_t)
        rc = base * np.exp(self._c_earc * d_inv_t)
        r1 = self._r1_age * rc
        r2 = self._r2_age * rc
        accel = np.exp(self._c_neg_eaage * d_inv_t + self._c_age_shift)
        if self._dudt_table is not None:
            assert self._dudt_soc is not None
            dudt = np.interp(socc, self._dudt_soc, self._dudt_table)
        else:
            dudt = self._c_dudt

        # Cold cells cannot deliver their full charge: the OCV is read at SOC minus the
        # depletion state, which a cold discharge builds up (step) and a rest relaxes.
        if self._any_depleted:
            x = soc - self._depletion
            x_min = float(x.min())
        else:
            x = soc
            x_min = self._soc_min
        xc = x if 0.0 <= x_min and self._soc_max <= 1.0 else np.clip(x, 0.0, 1.0)
        ocv = np.interp(xc, self._ocv_soc, self._ocv_dis)
        if self._hysteresis:
            ocv_c = np.interp(xc, self._ocv_soc, self._ocv_chg)
            ocv = ocv + 0.5 * (self._h_state + 1.0) * (ocv_c - ocv)
        if self._soc_max > 1.0:
            ocv = ocv + self._k_over * np.maximum(soc - 1.0, 0.0)
        if x_min < 0.0:
            ocv = ocv * np.clip(1.0 + x / _OVERDISCHARGE_SOC_SPAN, 0.0, 1.0)
        if self._any_runaway:
            ocv = ocv * (1.0 - self._collapse)
        self._cache = (ocv, r0, r1, r2, t_k, accel, dudt)
        return self._cache

    def _dt_coeffs(self, dt_s: float) -> tuple[FloatArray, ...]:
        """Per-dt constants (exp(-dt/tau), step-mean weights, thermal decay, ...) as 0-d
        arrays; computed once per distinct dt."""
        cached = self._dt_cache.get(dt_s)
        if cached is None:
            a1 = math.exp(-dt_s / self.tau1_s)
            a2 = math.exp(-dt_s / self.tau2_s)
            b1 = self.tau1_s / dt_s * (1.0 - a1)
            b2 = self.tau2_s / dt_s * (1.0 - a2)
            a_th = math.exp(-dt_s * self._h / self._mcp)
            values = (a1, a2, b1, b2, a_th, dt_s, self._self_discharge_per_s * dt_s,
                      dt_s / SECONDS_PER_DAY, dt_s * self._inv_2q_as)
            if len(self._dt_cache) >= _DT_CACHE_SIZE:
                self._dt_cache.clear()
            cached = self._dt_cache[dt_s] = tuple(_const(v) for v in values)
        return cached

    def _refresh_ageing(self) -> None:
        """Fold the integrated ageing into capacity and resistances."""
        kc, kd = self._k_fade
        self._fade = kc * self._w_efc + kd * self._w_days
        kc, kd = self._k_growth
        self._growth = kc * self._w_efc + kd * self._w_days
        self._capacity_ah = self._fresh_capacity_ah * np.maximum(1.0 - self._fade, 0.01)
        self._inv_cap_as = 1.0 / (self._capacity_ah * SECONDS_PER_HOUR)
        r_age = self._r_var * (1.0 + self._growth)
        res = self.spec.resistance
        self._r0_age = res.r0_ohm * r_age
        self._r1_age = res.r1_ohm * r_age
        self._r2_age = res.r2_ohm * r_age
        self._since_refresh_s = 0.0
        self._cache = None

    # ------------------------------------------------------------------ dynamics
    def step(self, current_a: ArrayLike, dt_s: float) -> None:
        """Advance every cell by ``dt_s`` with ``current_a`` (A, + = charge) held constant."""
        dt = float(dt_s)
        if dt < 0.0:
            raise ValueError("dt_s must be >= 0")
        i_ext = np.asarray(current_a, dtype=float)
        if i_ext.shape != self._shape:
            i_ext = (np.full(self._shape, float(i_ext)) if i_ext.ndim == 0
                     else np.broadcast_to(i_ext, self._shape).copy())
        if dt == 0.0:
            self._current_a = i_ext
            return
        ocv, r0, r1, r2, t_k, accel, dudt = self._eval()
        a1, a2, b1, b2, a_th, c_dt, c_sd, c_days, c_efc = self._dt_coeffs(dt)
        v1 = self._v1
        v2 = self._v2

        if self._shorted:
            # Shorts are conductances across the terminals: solve V with the RC voltages
            # frozen at the start of the step, then the cell's own current is what is left.
            g = self._g_total
            v_term = (ocv + v1 + v2 + i_ext * r0) / (1.0 + r0 * g)
            i_cell = i_ext - v_term * g
            heat_short: FloatArray | None = v_term * v_term * self._g_int
        else:
            i_cell = i_ext
            heat_short = None

        # Exact RC update for constant current: v -> s + (v - s)*exp(-dt/tau), s = I*R.
        s1 = i_cell * r1
        s2 = i_cell * r2
        d1 = v1 - s1
        d2 = v2 - s2
        self._v1 = s1 + d1 * a1
        self._v2 = s2 + d2 * a2
        # Joule + polarisation heat uses the exact mean of v_rc over the step (s + d*b), so
        # the thermal result does not depend on dt. Bernardi's reversible term is
        # -I_d*T*dU/dT with I_d positive on discharge, i.e. +I*T*dU/dT here (I + = charge):
        # a discharge heats a cell whose dU/dT is negative.
        drop = i_cell * r0 + (s1 + d1 * b1) + (s2 + d2 * b2)
        if self.reversible_heat:
            drop = drop + dudt * t_k
            self._rev_parts = (i_cell, t_k, dudt)
        heat = i_cell * drop
        if heat_short is not None:
            heat = heat + heat_short
        soc = self._soc
        if self._soc_max > 1.0:
            # Charge pushed beyond full goes into side reactions (electrolyte oxidation,
            # plating): the steep OCV excess is dissipated rather than stored.
            over = np.maximum(i_cell, 0.0) * (self._k_over * np.maximum(soc - 1.0, 0.0))
            if self._any_runaway:
                # A cell whose voltage has collapsed no longer turns the charger's energy
                # into side reactions; without this a runaway cell kept heating past its peak.
                over = over * (1.0 - self._collapse)
            heat = heat + over

        temp_old = self._temp_c
        amb = self._ambient
        if self._reacting:
            temp, heat = self._decompose(heat, temp_old, amb, dt)
        else:
            # Exact solution of m*cp*dT/dt = Q - h*(T - T_amb) for constant Q over dt.
            t_ss = amb + heat * self._c_inv_h
            temp = t_ss + (temp_old - t_ss) * a_th
        self._temp_c = temp
        if float(temp.max()) >= self._t1_c or self._any_forced:
            self._update_reacting()
            new = (temp >= self._onset_c) & ~self._runaway
            if new.any():
                # The climb is measured from the step's start: a step can take a cell from
                # below T2 to near T3 at once.
                self._runaway_start_c = np.where(new, np.minimum(temp_old, temp),
                                                 self._runaway_start_c)
                self._runaway |= new
                self._any_runaway = True
        else:
            self._reacting = False
        if self._any_runaway:
            self._update_runaway(temp)

        # Calendar/cycle ageing and self-discharge share one Arrhenius factor of T.
        abs_i = np.abs(i_cell)
        soc_before = soc
        soc = soc + i_cell * self._inv_cap_as * c_dt - c_sd * accel
        lo = float(soc.min())
        hi = float(soc.max())
        if lo < _SOC_MIN or hi > _SOC_MAX:
            soc = np.clip(soc, _SOC_MIN, _SOC_MAX)
            lo, hi = max(lo, _SOC_MIN), min(hi, _SOC_MAX)
        self._soc = soc
        self._soc_min = lo
        self._soc_max = hi
        d_efc = abs_i * c_efc
        if self._hysteresis:
            target = np.sign(i_cell)
            decay = np.exp(d_efc * (-2.0 * self.spec.capacity_ah / self._hyst_ah)
                           / self._capacity_ah)
            self._h_state = target + (self._h_state - target) * decay
        if self._any_depleted or float(temp.min()) < self._t_full_c:
            self._deplete(i_cell, soc_before, soc, temp, a2)
        self._efc = self._efc + d_efc
        self._w_efc = self._w_efc + d_efc * accel
        self._w_days = self._w_days + accel * c_days
        self._since_refresh_s += dt
        if self._since_refresh_s >= self.ageing_refresh_s:
            self._refresh_ageing()

        self._current_a = i_ext
        self._cell_current_a = i_cell
        self._heat_w = heat
        self.time_s += dt
        self._cache = None

    def _decompose(self, heat: FloatArray, temp_c: FloatArray, ambient_c: FloatArray,
                   dt_s: float) -> tuple[FloatArray, FloatArray]:
        """Advance temperature and the decomposition together over ``dt_s``; returns the
        new temperature and the step's mean heat including the reaction's.

        The reaction rate depends steeply on temperature, so this sub-steps (each exact
        for constant heat) until no cell rises more than ``_MAX_RISE_PER_SUBSTEP_C`` per
        sub-step. Only runs while some cell is above T1 or forced.
        """
        mcp, h = self._mcp, self._h
        conv = self._conversion
        q_rx_j = np.zeros(self._shape)
        t = 0.0
        temp = temp_c
        # The tolerance stops a last sub-step of rounding size (left ~1e-16 s).
        while dt_s - t > 1e-9 * dt_s:
            # A forced cell (fault injection: a local hot spot) reacts at least at T2's rate.
            t_eff = (np.where(self._forced, np.maximum(temp, self._onset_c), temp)
                     if self._any_forced else temp)
            k = np.where(t_eff >= self._t1_c,
                         np.exp(self._ln_a - self._ea_r / (t_eff + KELVIN_OFFSET)), 0.0)
            rate = np.minimum(k * (1.0 - conv), self._max_conv_per_s)  # 1/s
            left = dt_s - t
            max_rise = float(rate.max()) * self._rise_ad_c * left
            sub = left
            if max_rise > _MAX_RISE_PER_SUBSTEP_C:
                sub = max(left * _MAX_RISE_PER_SUBSTEP_C / max_rise,
                          dt_s * _MIN_SUBSTEP_FRACTION)
                sub = min(sub, left)
            # Exact first-order depletion for constant k over the sub-step, then the cap.
            d_conv = np.minimum((1.0 - conv) * -np.expm1(-k * sub),
                                self._max_conv_per_s * sub)
            conv = conv + d_conv
            q = heat + d_conv * (mcp * self._rise_ad_c / sub)
            q_rx_j = q_rx_j + d_conv * (mcp * self._rise_ad_c)
            # expm1 keeps a nearly adiabatic cell (tiny h) exact: t_ss*(1 - a) -> Q*dt/(m*cp).
            temp = temp + (ambient_c + q / h - temp) * -math.expm1(-sub * h / mcp)
            t += sub
        self._conversion = np.minimum(conv, 1.0)
        return temp, heat + q_rx_j / dt_s

    def _update_reacting(self) -> None:
        """Whether any cell still has something to decompose and is above T1 (or forced):
        only then does a step take the sub-stepped path."""
        live = (self._temp_c >= self._t1_c) | self._forced
        self._reacting = bool(np.any(live & (self._conversion < 1.0 - 1e-9)))

    def _update_runaway(self, temp_c: FloatArray) -> None:
        progress = np.where(self._runaway,
                            (temp_c - self._runaway_start_c) / _RUNAWAY_COLLAPSE_SPAN_C, 0.0)
        # Separator failure is irreversible: the collapse only ever grows.
        self._collapse = np.maximum(self._collapse, np.clip(progress, 0.0, 1.0))
        self._update_conductance()

    def _update_conductance(self) -> None:
        g_rw = self._collapse / _RUNAWAY_SHORT_OHM if self._any_runaway else 0.0
        self._g_total = self._g_int + self._g_ext + g_rw
        self._shorted = bool(np.any(self._g_total > 0.0))

    def _deplete(self, i_cell: FloatArray, soc_before: FloatArray, soc: FloatArray,
                 temp_c: FloatArray, a2: FloatArray) -> None:
        """Update the depletion state at the end of a step (SOC and temperature already
        advanced). A discharge adds ``1/f(T) - 1`` for each unit of SOC drawn, so a cold
        cell delivers ``f(T)`` of the charge it held, and a discharge from full reaches
        the empty end of the OCV curve after ``f(T)`` of its capacity, as the
        ``available_capacity`` table says; never more than that table's
        ``(1 - SOC)(1/f(T) - 1)`` (a cell warming as it works). Otherwise (a rest, a
        charge) it relaxes to 0 with the slower RC pair's time constant."""
        depletion = self._depletion * a2  # relaxed; the discharging cells' come next
        discharging = i_cell < 0.0
        if discharging.any():
            # f is in (0, 1] (the spec's check), so k and the cap are never negative.
            k = 1.0 / np.interp(temp_c, self._cap_t, self._cap_f) - 1.0
            drawn = np.maximum(soc_before - soc, 0.0)
            cap = (1.0 - np.minimum(soc, 1.0)) * k
            grown = np.minimum(self._depletion + drawn * k, cap)
            depletion = np.where(discharging, grown, depletion)
        self._depletion = depletion
        # A negligible depletion is dropped, and with it the remap (the hot path skips it).
        self._any_depleted = bool(float(self._depletion.max()) > 1e-9)
        if not self._any_depleted:
            self._depletion.fill(0.0)

    # ------------------------------------------------------------------ instantaneous
    def terminal_voltage(self, current_a: ArrayLike) -> FloatArray:
        """Terminal voltage if ``current_a`` flowed now (no state change)."""
        ocv, r0 = self._eval()[:2]
        i = np.asarray(current_a, dtype=float)
        e = ocv + self._v1 + self._v2
        if self._shorted:
            return (e + i * r0) / (1.0 + r0 * self._g_total)
        return e + i * r0

    def current_for_voltage(self, target_v: ArrayLike) -> FloatArray:
        """Current that would hold the terminal voltage at ``target_v`` now (CV, clamping)."""
        ocv, r0 = self._eval()[:2]
        v = np.asarray(target_v, dtype=float)
        e = ocv + self._v1 + self._v2
        if self._shorted:
            return (v * (1.0 + r0 * self._g_total) - e) / r0
        return (v - e) / r0

    def current_to_reach_voltage(self, target_v: ArrayLike, dt_s: float) -> FloatArray:
        """Constant current that brings the terminal voltage to ``target_v`` at the *end* of
        a ``dt_s`` step: the implicit CV step.

        ``current_for_voltage`` holds V only at the start of the step; used as a CV loop with
        large steps it overshoots and can oscillate when R1 + R2 > R0 (cold cells). This
        solves ``V_end(I) = target`` with the exact RC update and the OCV slope, so a CV
        hold is stable and tapers smoothly at any step size. Clamp the result to the
        channel's limits before passing it to :meth:`step`.
        """
        ocv, r0, r1, r2 = self._eval()[:4]
        v = np.asarray(target_v, dtype=float)
        dt = float(dt_s)
        a1 = math.exp(-dt / self.tau1_s)
        a2 = math.exp(-dt / self.tau2_s)
        # dOCV/dSOC from the table around the present SOC (both branches move together).
        x = np.clip(self._soc, 0.0, 1.0)
        delta = 0.01
        slope = (np.interp(x + delta, self._ocv_soc, self._ocv_dis)
                 - np.interp(x - delta, self._ocv_soc, self._ocv_dis)) / (2 * delta)
        slope = slope + np.where(self._soc > 1.0, self._k_over, 0.0)
        k_ocv = np.maximum(slope, 0.0) * dt / (SECONDS_PER_HOUR * self._capacity_ah)
        free_v = ocv + a1 * self._v1 + a2 * self._v2
        i_cell = (v - free_v) / (r0 + (1.0 - a1) * r1 + (1.0 - a2) * r2 + k_ocv)
        if self._shorted:
            # The shorts draw V*G at the held voltage on top of the cell's own current.
            return i_cell + v * self._g_total
        return i_cell

    def reset_cells(self, index: CellIndex, soc: float = 1.0,
                    temperature_c: float | None = None) -> None:
        """Put fresh cells in these positions (a technician swapped them): new SOC, relaxed,
        at ambient (or ``temperature_c``), unaged, no faults."""
        self._soc[index] = soc
        self._h_state[index] = min(max(2.0 * soc - 1.0, -1.0), 1.0)
        self._v1[index] = 0.0
        self._v2[index] = 0.0
        self._depletion[index] = 0.0
        self._temp_c[index] = self._ambient[index] if temperature_c is None else temperature_c
        for arr in (self._efc, self._w_efc, self._w_days, self._collapse, self._g_int,
                    self._g_ext, self._runaway_start_c):
            arr[index] = 0.0
        self._runaway[index] = False
        self._forced[index] = False
        self._conversion[index] = 0.0
        self.sensor_dropout[index] = False
        self._any_runaway = bool(self._runaway.any())
        self._any_forced = bool(self._forced.any())
        self._update_reacting()
        self._soc_min = float(self._soc.min())
        self._soc_max = float(self._soc.max())
        self._update_conductance()
        self._refresh_ageing()

    # ------------------------------------------------------------------ faults
    def set_internal_short(self, index: CellIndex,
                           resistance_ohm: float | None) -> None:
        """Put (or with None remove) a resistance across the cell inside its can."""
        self._g_int[index] = 0.0 if resistance_ohm is None else 1.0 / float(resistance_ohm)
        self._update_conductance()
        self._cache = None

    def set_external_short(self, index: CellIndex,
                           resistance_ohm: float | None) -> None:
        """Put (or with None remove) a resistance across the cell's terminals outside it."""
        self._g_ext[index] = 0.0 if resistance_ohm is None else 1.0 / float(resistance_ohm)
        self._update_conductance()
        self._cache = None

    def trigger_thermal_runaway(self, index: CellIndex) -> None:
        """Start a runaway now regardless of temperature (fault injection): the
        decomposition proceeds at least at its T2 (trigger) rate, as if a hot spot inside the
        cell had reached T2, and the separator is taken to have failed."""
        start = np.where(self._runaway, self._runaway_start_c, self._temp_c)
        self._runaway[index] = True
        self._forced[index] = True
        self._runaway_start_c = np.where(self._runaway, start, 0.0)
        self._any_runaway = True
        self._any_forced = True
        self._update_reacting()
        self._cache = None
