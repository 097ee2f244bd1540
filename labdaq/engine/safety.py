"""Per-sample safety check against the run's limits (with optional debounce)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from labdaq.engine.plan import Limits


@dataclass(frozen=True)
class Breach:
    limit: str
    value: float
    bound: float

    def describe(self) -> str:
        return f"{self.limit}: measured {self.value:.6g}, limit {self.bound:.6g}"


class SafetyMonitor:
    """Checks every sample; a breach must persist ``breach_duration_s`` to count."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits
        self._first_breach_t_s: float | None = None

    def check(
        self, t_s: float, voltage_v: float, current_a: float, temperature_c: float
    ) -> Breach | None:
        lim = self.limits
        breach: Breach | None = None
        if voltage_v > lim.voltage_max_v:
            breach = Breach("voltage_max_v", voltage_v, lim.voltage_max_v)
        elif voltage_v < lim.voltage_min_v:
            breach = Breach("voltage_min_v", voltage_v, lim.voltage_min_v)
        elif abs(current_a) > lim.current_max_a:
            breach = Breach("current_max_a", abs(current_a), lim.current_max_a)
        elif not math.isnan(temperature_c):
            if temperature_c > lim.temperature_max_c:
                breach = Breach("temperature_max_c", temperature_c, lim.temperature_max_c)
            elif temperature_c < lim.temperature_min_c:
                breach = Breach("temperature_min_c", temperature_c, lim.temperature_min_c)
        if breach is None:
            self._first_breach_t_s = None
            return None
        if self._first_breach_t_s is None:
            self._first_breach_t_s = t_s
        if t_s - self._first_breach_t_s >= lim.breach_duration_s:
            return breach
        return None
