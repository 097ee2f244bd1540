"""Seeded measurement noise keyed on what is measured and when, not on call order.

One job: give a simulated instrument's readings noise that is a fixed function of the
seed, the simulated time and the measured quantity (a channel, a frequency), so asking
twice at the same simulated time reads the same and a reading never depends on how many
questions came before it.

Why not one ``default_rng(seed)`` stream drawn in call order: a driver re-sends an
idempotent query after a transport timeout (labdaq.drivers.transport), and on a loaded
machine the instrument may have answered the first copy too. A call-order stream then
draws twice, and every later reading of a seeded ``ManualClock`` run shifts by one draw
(tests/test_faults.py::test_same_seed_same_scenario_same_samples failed that way under
``make test``'s parallel workers). Keyed noise makes the repeated query read what the
first one did.
"""

from __future__ import annotations

import struct

import numpy as np
from numpy.typing import NDArray


def _word(value: float | int) -> int:
    """A non-negative integer that identifies ``value`` exactly (a float by its bits)."""
    if isinstance(value, int | np.integer):
        if value < 0:
            raise ValueError(f"integer noise keys must be >= 0, got {value!r}")
        return int(value)
    return int(struct.unpack("<Q", struct.pack("<d", float(value)))[0])


class KeyedNoise:
    """Standard normal draws for a key such as ``(t_s, channel)``; same seed and key, same
    draws. ``seed=None`` picks fresh entropy once, so an unseeded instrument is noisy but
    still reads the same when asked twice at one simulated time."""

    def __init__(self, seed: int | None) -> None:
        entropy = np.random.SeedSequence(seed).entropy  # the seed itself, or fresh bits
        assert isinstance(entropy, int)
        self._entropy = entropy

    def standard_normal(self, size: int, *key: float | int) -> NDArray[np.float64]:
        """``size`` independent N(0, 1) draws for ``key`` (~10 µs: one generator each)."""
        words: list[int] = [self._entropy, *(_word(k) for k in key)]
        return np.random.default_rng(words).standard_normal(size)
