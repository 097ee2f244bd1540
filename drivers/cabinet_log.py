"""The cabinet's hardware-timed logging: parsing a ``TRAC:DATA?`` block into numpy arrays.

One job: turn the binary block a cabinet answers to ``TRAC:DATA? <from>,(@list)``
(docs/instruments/cabinet.md, "Buffered logging") into a :class:`LoggedReadings` —
checked against its own header and the channel count, so a block of the wrong length is
a :class:`~labdaq.drivers.errors.GarbledReply`, never misread data. The commands
themselves are :class:`~labdaq.drivers.cabinet.CyclerCabinet` methods and properties.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numpy.typing import NDArray

from .errors import GarbledReply
from .transport.blocks import FramingError, block_payload, starts_block

OVERRANGE_THRESHOLD = 9.0e37  # 9.9E+37 over range, 9.91E+37 NaN (open sensor)
_HEADER = np.dtype(">f8")
HEADER_BYTES = 2 * _HEADER.itemsize  # first index held, readings in the block


def reading_dtype(channels: int) -> np.dtype:
    """One reading in a block (big-endian, FORM:BORD NORM): index, instrument time,
    then V, I, T of each listed channel."""
    return np.dtype([("index", ">f8"), ("t_s", ">f8"), ("vit", ">f4", (channels, 3))])


class LoggedReadings(NamedTuple):
    """Readings from a cabinet's logging ring, oldest first.

    ``first_held``: the oldest index the ring still held when it answered (0: nothing
    logged yet); indices asked for below it were overwritten before they were fetched,
    and are lost. ``indices`` and ``t_s`` (instrument seconds) have one entry per reading;
    ``voltage_v``, ``current_a`` and ``temperature_c`` are ``(readings, channels)``, NaN
    where the instrument reported over range or an open sensor."""

    first_held: int
    indices: NDArray[np.int64]
    t_s: NDArray[np.float64]
    voltage_v: NDArray[np.float64]
    current_a: NDArray[np.float64]
    temperature_c: NDArray[np.float64]

    def lost_before(self, start: int) -> int:
        """How many indices from ``start`` on were overwritten before this fetch."""
        return max(0, self.first_held - start) if self.first_held else 0


def parse_logged(reply: bytes, channels: int, start: int, *, instrument: str = "",
                 command: str = "") -> LoggedReadings:
    """The readings in a ``TRAC:DATA? <start>`` block for ``channels`` listed channels."""

    def garbled(why: str) -> GarbledReply:
        return GarbledReply(why, reply=reply[:64], instrument=instrument, command=command,
                            expected=f"a TRAC:DATA? block for {channels} channels")

    if not starts_block(reply):
        raise garbled("not a binary block")
    try:
        payload = block_payload(reply)
    except FramingError as exc:
        raise garbled(str(exc)) from None
    if len(payload) < HEADER_BYTES:
        raise garbled(f"block of {len(payload)} bytes, shorter than its header")
    first_f, count_f = np.frombuffer(payload, _HEADER, 2).tolist()
    rec = reading_dtype(channels)
    body = len(payload) - HEADER_BYTES
    if count_f != int(count_f) or first_f != int(first_f) or count_f < 0 or first_f < 0:
        raise garbled(f"header {first_f!r}, {count_f!r} is not two counts")
    count, first = int(count_f), int(first_f)
    if body != count * rec.itemsize:
        raise garbled(f"{body} bytes of readings, the header says {count} of "
                      f"{rec.itemsize}")
    data = np.frombuffer(payload, rec, count, HEADER_BYTES)
    index = data["index"].astype(np.int64)
    if count and (index[0] != max(start, first) or (np.diff(index) != 1).any()):
        raise garbled(f"indices {index[0]}..{index[-1]} for a fetch from {start} with "
                      f"{first} the first held")
    vit = data["vit"].astype(np.float64)
    vit[np.abs(vit) >= OVERRANGE_THRESHOLD] = np.nan
    return LoggedReadings(first, index, data["t_s"].astype(np.float64), vit[:, :, 0],
                          vit[:, :, 1], vit[:, :, 2])
