"""The engine's clock: monotonic seconds, optionally accelerated to match a simulated lab."""

from __future__ import annotations

import asyncio
import time


class EngineClock:
    """Monotonic time scaled by ``speed``.

    The simulators run their cells on ``monotonic() * speed`` as well, so with the same
    speed the engine's integration of current over time matches the cells' own coulomb
    counting. With ``speed=1`` this is plain wall time (a real lab).
    """

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"clock speed must be positive, got {speed}")
        self.speed = float(speed)
        self._t0 = time.monotonic()

    def now(self) -> float:
        return (time.monotonic() - self._t0) * self.speed

    async def sleep_until(self, t_s: float) -> None:
        delay_s = (t_s - self.now()) / self.speed
        if delay_s > 0:
            await asyncio.sleep(delay_s)

    def wall_lateness_s(self, t_s: float) -> float:
        """How late (in wall seconds) we are with respect to simulated deadline ``t_s``."""
        return (self.now() - t_s) / self.speed
