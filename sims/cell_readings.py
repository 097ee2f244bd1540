"""Read-outs of a simulated cell bank: the views (voltage, SOC, temperature, capacity,
resistances, heat, ageing, runaway) that the instrument simulators and tests read from
:class:`labdaq.sims.cell.CellBank`'s state arrays; copies, so a reader cannot change the
state. Two setters (``soc``, ``ambient_c``) are the ways a test or fault sets that state."""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

FloatArray = NDArray[np.float64]


class CellReadings:
    """The read-outs :class:`~labdaq.sims.cell.CellBank` inherits; the state they read is
    set by its ``__init__`` and ``step``."""

    # State arrays and scalars owned by CellBank (declared here for the type checker).
    spec: Any
    sensor_dropout: NDArray[np.bool_]
    _shape: Any
    _current_a: Any
    _cell_current_a: Any
    _soc: FloatArray
    _soc_min: float
    _soc_max: float
    _cache: Any
    _temp_c: FloatArray
    _ambient: FloatArray
    _k_fade: Any
    _k_growth: Any
    _w_efc: Any
    _w_days: Any
    _fresh_capacity_ah: Any
    _cap_t: Any
    _cap_f: Any
    _v1: FloatArray
    _v2: FloatArray
    _h_state: FloatArray
    _heat_w: Any
    _rev_parts: Any
    _conversion: FloatArray
    _efc: FloatArray
    _runaway: NDArray[np.bool_]

    def _eval(self) -> tuple[FloatArray, ...]:
        raise NotImplementedError

    def terminal_voltage(self, current_a: ArrayLike) -> FloatArray:
        raise NotImplementedError

    @property
    def voltage_v(self) -> FloatArray:
        """Terminal voltage at the last applied current."""
        return self.terminal_voltage(self._current_a)

    @property
    def current_a(self) -> FloatArray:
        """Last applied (external) current, A, + = charge."""
        return np.broadcast_to(self._current_a, self._soc.shape).copy()

    @property
    def cell_current_a(self) -> FloatArray:
        """Current through the electrochemistry in the last step (external minus shorts)."""
        return np.array(self._cell_current_a, dtype=float)

    @property
    def ocv_v(self) -> FloatArray:
        return self._eval()[0].copy()

    @property
    def soc(self) -> FloatArray:
        return self._soc.copy()

    @soc.setter
    def soc(self, value: ArrayLike) -> None:
        self._soc = np.broadcast_to(np.asarray(value, dtype=float), self._soc.shape).copy()
        self._soc_min = float(self._soc.min())
        self._soc_max = float(self._soc.max())
        self._cache = None

    @property
    def temperature_c(self) -> FloatArray:
        """Reported temperature: NaN where the sensor has dropped out."""
        if self.sensor_dropout.any():
            return np.where(self.sensor_dropout, np.nan, self._temp_c)
        return self._temp_c.copy()

    @property
    def cell_temperature_c(self) -> FloatArray:
        """True cell temperature (ignores sensor dropout)."""
        return self._temp_c.copy()

    @property
    def ambient_c(self) -> FloatArray:
        return self._ambient.copy()

    @ambient_c.setter
    def ambient_c(self, value: ArrayLike) -> None:
        self._ambient = np.broadcast_to(np.asarray(value, dtype=float), self._soc.shape).copy()

    @property
    def capacity_fade(self) -> FloatArray:
        """Relative capacity lost to ageing so far (0 = fresh)."""
        kc, kd = self._k_fade
        return kc * self._w_efc + kd * self._w_days

    @property
    def resistance_growth(self) -> FloatArray:
        """Relative growth of all resistances from ageing so far (0 = fresh)."""
        kc, kd = self._k_growth
        return kc * self._w_efc + kd * self._w_days

    @property
    def capacity_ah(self) -> FloatArray:
        """Present (faded) capacity at the reference temperature."""
        return self._fresh_capacity_ah * np.maximum(1.0 - self.capacity_fade, 0.01)

    @property
    def available_capacity_ah(self) -> FloatArray:
        """Present capacity times the deliverable fraction at the cell's temperature."""
        return self.capacity_ah * np.interp(self._temp_c, self._cap_t, self._cap_f)

    @property
    def soh(self) -> FloatArray:
        """State of health: present capacity over the cell's fresh capacity."""
        return self.capacity_ah / self._fresh_capacity_ah

    @property
    def r0_ohm(self) -> FloatArray:
        """Present series resistance (temperature, SOC and ageing applied)."""
        return self._eval()[1].copy()

    @property
    def r1_ohm(self) -> FloatArray:
        return self._eval()[2].copy()

    @property
    def r2_ohm(self) -> FloatArray:
        return self._eval()[3].copy()

    @property
    def v_rc1_v(self) -> FloatArray:
        return self._v1.copy()

    @property
    def v_rc2_v(self) -> FloatArray:
        return self._v2.copy()

    @property
    def hysteresis_state(self) -> FloatArray:
        """-1 on the discharge OCV branch, +1 on the charge branch."""
        return self._h_state.copy()

    @property
    def heat_w(self) -> FloatArray:
        """Heat generated inside each cell during the last step (mean over the step)."""
        return np.array(self._heat_w)

    @property
    def reversible_heat_w(self) -> FloatArray:
        """Reversible (entropic) part of ``heat_w`` in the last step, ``I*T*dU/dT`` with I
        positive on charge: positive (heating) on discharge where dU/dT < 0."""
        if self._rev_parts is None:
            return np.zeros(self._shape)
        i_cell, t_k, dudt = self._rev_parts
        return np.asarray(i_cell * t_k * dudt, dtype=float)

    @property
    def entropic_coefficient_v_per_k(self) -> FloatArray:
        """dU/dT at each cell's present SOC, V/K."""
        return np.broadcast_to(self._eval()[6], self._shape).astype(float)

    @property
    def decomposed_fraction(self) -> FloatArray:
        """Fraction of the runaway decomposition already reacted (0 = none)."""
        return self._conversion.copy()

    @property
    def equivalent_full_cycles(self) -> FloatArray:
        return self._efc.copy()

    @property
    def throughput_ah(self) -> FloatArray:
        """Charge moved through the cell either way, Ah."""
        return self._efc * (2.0 * self.spec.capacity_ah)

    @property
    def runaway(self) -> NDArray[np.bool_]:
        """True for cells in (or after) thermal runaway."""
        return self._runaway.copy()
