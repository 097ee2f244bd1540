"""One put's sample rows as numpy columns, and their compact binary form for the writer process.

An instrument group stores the due samples of a tick as one :class:`SampleBatch`: a numpy
column per sample field (``SAMPLE_COLUMNS`` order) and one ``ts_utc`` for the tick,
instead of a Python tuple per row (a block of logged readings, taken at different times,
carries a ``ts_utc`` column instead: :func:`concat`). The sink turns it into what it inserts
(:meth:`SampleBatch.rows`): the in-process writer at once, the writer process in its
child, so the engine's event loop neither builds row tuples nor pickles them.

Wire form (:func:`encode`, :func:`decode`), one ``Connection.send_bytes`` message per put,
little-endian::

    header   24 bytes  magic b"LDQB", version (1), flags (bit 0: a ledger is present,
                       bit 1: a ts_utc column follows the columns), fast-array count
                       (uint16), rows n (uint32), slow-part length (uint32), ts_utc
                       (float64; the first row's with a ts_utc column)
    counts   8 bytes × fast-array count: rows of each fast array (uint64)
    columns  n × 8 bytes each, in COLUMNS order: int64 or float64 (temperature and its
                       age NaN = none); then ts_utc (float64) when flag bit 1 is set
    fast     each fast-state array (ledger.FAST_COLUMNS wide, float64, row-major)
    slow     pickle of the ledger's (positions, steps, cycles, gaps) when any is non-empty

Every section is a multiple of 8 bytes, so each column is decoded in place with
``numpy.frombuffer`` (no copy). Messages that do not start with the magic are pickled
tuples (flush, close, and rows handed over as plain sequences).
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import repeat
from typing import Any

import numpy as np
from numpy.typing import NDArray

from labdaq.engine.ledger import FAST_COLUMNS, Ledger

MAGIC = b"LDQB"
VERSION = 2
_HAS_LEDGER = 0x01
_HAS_TS_COLUMN = 0x02
_HEAD = struct.Struct("<4sBBHIId")
_FAST_WIDTH = len(FAST_COLUMNS)

#: The batch's columns in SAMPLE_COLUMNS order (``ts_utc`` is one value per batch), with
#: their wire types.
COLUMNS = (
    ("run_id", "<i8"),
    ("seq", "<i8"),
    ("t_s", "<f8"),
    ("step_index", "<i8"),
    ("cycle_index", "<i8"),
    ("voltage_v", "<f8"),
    ("current_a", "<f8"),
    ("temperature_c", "<f8"),
    ("step_capacity_ah", "<f8"),
    ("step_energy_wh", "<f8"),
    ("flags", "<i8"),
    ("temperature_age_s", "<f8"),
)


@dataclass
class SampleBatch:
    """Sample rows as aligned columns; ``temperature_c`` and ``temperature_age_s`` NaN
    store NULL."""

    run_id: NDArray[np.int64]
    seq: NDArray[np.int64]
    t_s: NDArray[np.float64]
    ts_utc: float | NDArray[np.float64]  # one for every row, or one per row
    step_index: NDArray[np.int64]
    cycle_index: NDArray[np.int64]
    voltage_v: NDArray[np.float64]
    current_a: NDArray[np.float64]
    temperature_c: NDArray[np.float64]
    step_capacity_ah: NDArray[np.float64]
    step_energy_wh: NDArray[np.float64]
    flags: NDArray[np.int64]
    temperature_age_s: NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.run_id)

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.rows())

    def rows(self) -> list[tuple[Any, ...]]:
        """The rows as tuples in ``SAMPLE_COLUMNS`` order, as the writer inserts them."""
        return list(
            zip(  # noqa: B905 - the repeat()s are endless; every list has n rows
                self.run_id.tolist(),
                self.seq.tolist(),
                self.t_s.tolist(),
                (self.ts_utc.tolist() if isinstance(self.ts_utc, np.ndarray)
                 else repeat(self.ts_utc)),
                self.step_index.tolist(),
                self.cycle_index.tolist(),
                self.voltage_v.tolist(),
                self.current_a.tolist(),
                _nullable(self.temperature_c),
                self.step_capacity_ah.tolist(),
                self.step_energy_wh.tolist(),
                self.flags.tolist(),
                _nullable(self.temperature_age_s),
            )
        )


def concat(batches: list[SampleBatch]) -> SampleBatch:
    """Several batches as one, rows in order; each row keeps its batch's ``ts_utc`` (a
    column when they differ)."""
    if len(batches) == 1:
        return batches[0]
    ts = np.concatenate([np.broadcast_to(np.asarray(b.ts_utc, np.float64), (len(b),))
                         for b in batches])
    cols = {name: np.concatenate([np.asarray(getattr(b, name)) for b in batches])
            for name, _ in COLUMNS}
    return SampleBatch(ts_utc=ts, **cols)


def _nullable(x: NDArray[np.float64]) -> Any:
    """Values of a nullable column: NaN -> NULL (None)."""
    nan = np.isnan(x)
    if nan.all():
        return repeat(None)
    if not nan.any():
        return x.tolist()  # the common case: no per-value test
    return [None if v != v else v for v in x.tolist()]


def encode(batch: SampleBatch, ledger: Ledger | None = None) -> bytes:
    """The wire form of one put: ``batch`` and the ledger that goes with it."""
    n = len(batch)
    fast = ledger.fast if ledger is not None else []
    slow = b""
    if ledger is not None and (ledger.positions or ledger.steps or ledger.cycles
                               or ledger.gaps):
        slow = pickle.dumps((ledger.positions, ledger.steps, ledger.cycles, ledger.gaps),
                            protocol=pickle.HIGHEST_PROTOCOL)
    ts = batch.ts_utc
    ts_col = isinstance(ts, np.ndarray)
    if isinstance(ts, np.ndarray):
        ts_first = float(ts[0]) if len(ts) else 0.0
    else:
        ts_first = float(ts)
    flags = (_HAS_LEDGER if ledger is not None else 0) | (_HAS_TS_COLUMN if ts_col else 0)
    parts = [
        _HEAD.pack(MAGIC, VERSION, flags, len(fast), n, len(slow), ts_first),
        np.array([len(f) for f in fast], "<u8").tobytes(),
    ]
    for name, dtype in COLUMNS:
        col = np.asarray(getattr(batch, name), dtype)
        if col.shape != (n,):
            raise ValueError(f"column {name}: shape {col.shape}, expected ({n},)")
        parts.append(col.tobytes())
    if ts_col:
        col = np.asarray(batch.ts_utc, "<f8")
        if col.shape != (n,):
            raise ValueError(f"column ts_utc: shape {col.shape}, expected ({n},)")
        parts.append(col.tobytes())
    for f in fast:
        parts.append(np.ascontiguousarray(f, "<f8").tobytes())
    if slow:
        # Padded to 8 bytes like every other section (the length says where it ends).
        parts.append(slow + bytes(-len(slow) % 8))
    return b"".join(parts)


def is_batch(buf: bytes | bytearray | memoryview) -> bool:
    """True for a message :func:`encode` wrote (not a pickled one)."""
    return bytes(buf[:4]) == MAGIC


def decode(buf: bytes | bytearray | memoryview) -> tuple[SampleBatch, Ledger | None]:
    """A message from :func:`encode` back to its batch and ledger (columns are read-only
    views on ``buf``). ValueError for anything that is not exactly such a message."""
    mv = memoryview(buf)
    if len(mv) < _HEAD.size:
        raise ValueError(f"sample batch: {len(mv)} bytes, shorter than its header")
    magic, version, flags, n_fast, n, slow_len, ts_utc = _HEAD.unpack_from(mv, 0)
    if magic != MAGIC or version != VERSION:
        raise ValueError(f"not a sample batch (magic {magic!r}, version {version})")
    off = _HEAD.size
    end = off + 8 * n_fast
    if end > len(mv):
        raise ValueError("sample batch: truncated in its fast-array counts")
    counts = np.frombuffer(mv, "<u8", n_fast, off).tolist()
    off = end
    ncols = len(COLUMNS) + (1 if flags & _HAS_TS_COLUMN else 0)
    size = off + 8 * n * ncols + 8 * _FAST_WIDTH * sum(counts)
    size += slow_len + (-slow_len % 8)
    if size != len(mv):
        raise ValueError(f"sample batch: {len(mv)} bytes, its header says {size}")
    cols: dict[str, Any] = {}
    for name, dtype in COLUMNS:
        cols[name] = np.frombuffer(mv, dtype, n, off)
        off += 8 * n
    if flags & _HAS_TS_COLUMN:
        ts_utc = np.frombuffer(mv, "<f8", n, off)
        off += 8 * n
    fast = []
    for c in counts:
        fast.append(np.frombuffer(mv, "<f8", c * _FAST_WIDTH, off).reshape(c, _FAST_WIDTH))
        off += 8 * _FAST_WIDTH * c
    batch = SampleBatch(ts_utc=ts_utc, **cols)
    if not flags & _HAS_LEDGER:
        return batch, None
    ledger = Ledger(fast=fast)
    if slow_len:
        ledger.positions, ledger.steps, ledger.cycles, ledger.gaps = pickle.loads(
            mv[off:off + slow_len])
    return batch, ledger
