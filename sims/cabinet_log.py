"""Hardware-timed logging of a simulated cabinet: a bounded ring of readings and its fetch.

One job: keep the readings a cabinet takes on its own clock (``TRIG:TIM`` apart, from
``INIT`` until ``ABOR``) in a ring of ``TRAC:POIN`` readings, and answer
``TRAC:DATA? <from>[,(@list)]`` with every reading still held from index ``from`` on, as
one IEEE 488.2 definite-length block (docs/instruments/cabinet.md, "Buffered logging")::

    header   2 x float64: the first index the ring still holds (0: none yet), and the
             number of readings in this block
    reading  float64 index (1, 2, ...), float64 instrument time (s), then float32 V, I, T
             per listed channel, in list order

big-endian under ``FORM:BORD NORM``, little-endian under ``SWAP``. A reading overwritten
before it was fetched is gone: the header's first index says where the ring starts, so the
client knows exactly which indices it lost.

The cabinet (:class:`labdaq.sims.cabinet.CabinetSim`) decides *when* readings are taken
and what they are: it advances its cells reading by reading (each at its exact instrument
time, under the set points in force then) whenever anything asks it to move on, so a set
command takes effect for the readings after it and not for those before.
"""

from __future__ import annotations

import functools

import numpy as np
from numpy.typing import NDArray

from .scpi import NOT_A_NUMBER, ScpiError, format_block

POINTS_MIN = 10
POINTS_MAX = 100_000
POINTS_DEFAULT = 1000  # 10 s at 100 Hz
PERIOD_MIN_S = 0.001
PERIOD_MAX_S = 60.0
PERIOD_DEFAULT_S = 0.01
HEADER_FIELDS = 2  # first index held, readings in the block


@functools.lru_cache(maxsize=64)
def reading_dtype(channels: int, byte_order: str = "NORM") -> np.dtype:
    """One reading of a ``TRAC:DATA?`` block for ``channels`` listed channels (built once
    per list length and order: making a structured dtype costs about as much as
    answering a block of a few readings)."""
    e = ">" if byte_order == "NORM" else "<"
    return np.dtype([("index", f"{e}f8"), ("t_s", f"{e}f8"), ("vit", f"{e}f4", (channels, 3))])


class ReadingLog:
    """The ring of readings of ``channels`` channels (V, I, T each, float32)."""

    def __init__(self, channels: int) -> None:
        self.channels = channels
        self.points = POINTS_DEFAULT
        self.period_s = PERIOD_DEFAULT_S
        self.running = False
        self.t0_s = 0.0  # instrument time of reading 1
        self.clear()

    def clear(self) -> None:
        """Empty ring (``TRAC:CLE``, ``INIT``); readings are numbered from 1 again."""
        self.count = 0  # readings taken since INIT = the newest index
        self._t = np.zeros(self.points)
        # (reading, V/I/T, channel): a reading's three quantities are rows, so a block of
        # readings goes in with one assignment.
        self._vit = np.zeros((self.points, 3, self.channels), np.float32)

    def set_points(self, points: int) -> None:
        if self.running:
            raise ScpiError(-221, "Settings conflict; ABOR logging before TRAC:POIN")
        self.points = points
        self.clear()

    def set_period(self, period_s: float) -> None:
        if self.running:
            raise ScpiError(-221, "Settings conflict; ABOR logging before TRIG:TIM")
        self.period_s = period_s

    def start(self, now_s: float) -> None:
        """``INIT``: a fresh ring, the first reading at ``now_s``."""
        if self.running:
            raise ScpiError(-213, "Init ignored; logging is already running")
        self.clear()
        self.running = True
        self.t0_s = now_s

    @property
    def next_t_s(self) -> float:
        """Instrument time of the next reading: on the timer's grid from reading 1, so
        the times do not drift by summing periods."""
        return self.t0_s + self.count * self.period_s

    @property
    def first_held(self) -> int:
        """The oldest index still in the ring (0 while empty)."""
        return 0 if self.count == 0 else max(1, self.count - self.points + 1)

    def skip(self, readings: int) -> None:
        """``readings`` readings taken and overwritten at once (nobody asked for the
        cabinet for longer than the ring holds): their times pass, no values kept."""
        self.count += readings

    def due_times(self, most: int, now_s: float) -> list[float]:
        """Instrument times of the next readings, at most ``most``, due by ``now_s``: the
        same grid as :attr:`next_t_s` (the same arithmetic, so the same floats)."""
        times: list[float] = []
        for count in range(self.count, self.count + most):
            t_s = self.t0_s + count * self.period_s
            if t_s > now_s:
                break
            times.append(t_s)
        return times

    def record_block(self, t_s: list[float], voltage_v: list[NDArray[np.float64]],
                     current_a: list[NDArray[np.float64]],
                     temperature_c: list[NDArray[np.float64]]) -> None:
        """Readings ``count + 1`` on, one per time in ``t_s`` (each with every channel's
        V, I and T), into the ring with one assignment per field."""
        n = len(t_s)
        keep = min(n, self.points)  # a block longer than the ring keeps its newest
        slots = (self.count + np.arange(n - keep, n)) % self.points
        self.count += n
        self._t[slots] = t_s[n - keep:]
        block = np.array((voltage_v[n - keep:], current_a[n - keep:], temperature_c[n - keep:]))
        self._vit[slots] = block.transpose(1, 0, 2)

    def fetch(self, start: int, idx: NDArray[np.int64], byte_order: str = "NORM") -> str:
        """The ``TRAC:DATA?`` block of every reading held from index ``start`` on, for
        channels ``idx`` (zero-based, list order)."""
        first = self.first_held
        lo = max(start, first, 1)
        hi = self.count  # newest index
        n = max(0, hi - lo + 1) if first else 0
        e = ">" if byte_order == "NORM" else "<"
        head = np.array([first, n], f"{e}f8").tobytes()
        rec = np.empty(n, reading_dtype(len(idx), byte_order))
        if n:
            index = np.arange(lo, hi + 1)
            slots = (index - 1) % self.points
            rec["index"] = index
            rec["t_s"] = self._t[slots]
            vit = self._vit[slots][:, :, idx]
            # An open sensor (NaN) reads 9.91E+37, as in MEAS:ALL?.
            vit = np.where(np.isnan(vit), np.float32(NOT_A_NUMBER), vit)
            rec["vit"] = vit.transpose(0, 2, 1)
        return format_block(head + rec.tobytes())
