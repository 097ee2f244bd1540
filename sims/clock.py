"""Simulated time for the instrument emulators: a scalable wall clock and a manual clock.

Simulators never read ``time.monotonic()`` directly; they ask a clock, so a lab can run
faster than wall time (hundreds of cycles in seconds) and tests can step time exactly.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol, runtime_checkable


@runtime_checkable
class Clock(Protocol):
    """Anything with ``now()`` returning simulated seconds (monotonic, arbitrary origin)."""

    def now(self) -> float: ...


class SimClock:
    """Wall-clock time scaled by ``speed``: ``now() = (monotonic() - t0) * speed``.

    Changing ``speed`` rebases the clock so simulated time never jumps backwards or forwards.
    """

    def __init__(self, speed: float = 1.0) -> None:
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed!r}")
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self._offset = 0.0  # simulated seconds accumulated before the last speed change
        self._speed = float(speed)

    @property
    def speed(self) -> float:
        return self._speed

    @speed.setter
    def speed(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"speed must be > 0, got {value!r}")
        with self._lock:
            now_wall = time.monotonic()
            self._offset += (now_wall - self._t0) * self._speed
            self._t0 = now_wall
            self._speed = float(value)

    def now(self) -> float:
        with self._lock:
            return self._offset + (time.monotonic() - self._t0) * self._speed


class ManualClock:
    """Deterministic clock for tests: time moves only when ``advance()`` is called."""

    speed = 1.0

    def __init__(self, start_s: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._now = float(start_s)

    def advance(self, dt_s: float) -> float:
        """Move simulated time forward by ``dt_s`` seconds and return the new time."""
        if dt_s < 0:
            raise ValueError(f"time cannot go backwards (dt_s={dt_s!r})")
        with self._lock:
            self._now += float(dt_s)
            return self._now

    def now(self) -> float:
        with self._lock:
            return self._now
