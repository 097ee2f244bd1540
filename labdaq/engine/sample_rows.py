"""Sample rows held as one float64 array, so the writer inserts them without a Python tuple per row.

The writer process receives an instrument group's samples as numpy columns
(:class:`~labdaq.engine.sample_batch.SampleBatch`). :class:`SampleRows` keeps them as one
``(rows, 13)`` float64 array in ``SAMPLE_COLUMNS`` order (NaN in a nullable column is
NULL) until they reach the database:

* SQLite takes each multi-row INSERT's parameters as one flat list of floats, made by a
  single ``ndarray.tolist()`` after a ``numpy.lexsort`` into primary-key order. The
  integer columns (``run_id``, ``seq``, ``step_index``, ``cycle_index``, ``flags``) are
  bound as whole floats: SQLite's INTEGER affinity stores a REAL that is exactly an
  integer as that INTEGER (https://sqlite.org/datatype3.html, "Type Affinity"), and it
  binds a NaN as NULL. So the stored values and their types are those the tuples gave.
* Everything else (PostgreSQL's COPY, the journal, isolating a refused row) sees a
  ``Sequence`` of tuples with Python ``int``/``float``/``None`` values, built on demand.

Integers are exact in a float64 up to 2**53; :meth:`SampleRows.from_batch` returns None
for a batch with a larger one, and the writer takes that batch's tuples instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, overload

import numpy as np
from numpy.typing import NDArray

from labdaq.engine.sample_batch import COLUMNS, SampleBatch
from labdaq.storage.models import SAMPLE_COLUMNS

#: Positions of the integer and of the nullable columns in ``SAMPLE_COLUMNS``.
INT_COLUMNS = tuple(SAMPLE_COLUMNS.index(n) for n, t in COLUMNS if t == "<i8")
NULLABLE_COLUMNS = (SAMPLE_COLUMNS.index("temperature_c"),
                    SAMPLE_COLUMNS.index("temperature_age_s"))
_WIDTH = len(SAMPLE_COLUMNS)
_EXACT = 2**53  # float64 holds every integer of smaller magnitude exactly

Rows = Sequence[Sequence[Any]]


class SampleRows(Sequence[tuple[Any, ...]]):
    """Rows in ``SAMPLE_COLUMNS`` order as a ``(n, 13)`` float64 array; a Sequence of
    typed tuples (int, float, None) to anything that reads them row by row."""

    __slots__ = ("values",)

    def __init__(self, values: NDArray[np.float64]) -> None:
        if values.ndim != 2 or values.shape[1] != _WIDTH:
            raise ValueError(f"sample rows: shape {values.shape}, expected (n, {_WIDTH})")
        self.values = values

    @classmethod
    def from_batch(cls, batch: SampleBatch) -> SampleRows | None:
        """The batch's rows, or None when an integer in it is too large for a float64."""
        n = len(batch)
        out = np.empty((n, _WIDTH), np.float64)
        for j, name in enumerate(SAMPLE_COLUMNS):
            col = getattr(batch, name)
            if j in INT_COLUMNS and n and int(np.abs(col).max()) >= _EXACT:
                return None
            out[:, j] = col
        return cls(out)

    @classmethod
    def concat(cls, parts: Sequence[SampleRows]) -> SampleRows:
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([p.values for p in parts]))

    def __len__(self) -> int:
        return len(self.values)

    @overload
    def __getitem__(self, i: int) -> tuple[Any, ...]: ...
    @overload
    def __getitem__(self, i: slice) -> SampleRows: ...
    def __getitem__(self, i: int | slice) -> tuple[Any, ...] | SampleRows:
        if isinstance(i, slice):
            return SampleRows(self.values[i])
        return SampleRows(self.values[[i]]).tolist()[0]

    def __iter__(self) -> Iterator[tuple[Any, ...]]:
        return iter(self.tolist())

    def tolist(self) -> list[tuple[Any, ...]]:
        """The rows as tuples: ints for the integer columns, None for a NaN in a nullable
        one (as :meth:`SampleBatch.rows` gives them)."""
        cols: list[Any] = []
        for j in range(_WIDTH):
            col = self.values[:, j]
            if j in INT_COLUMNS:
                cols.append(col.astype(np.int64).tolist())
            elif j in NULLABLE_COLUMNS:
                cols.append([None if v != v else v for v in col.tolist()])
            else:
                cols.append(col.tolist())
        return list(zip(*cols, strict=True))

    def insert_params(self, per_statement: int) -> tuple[list[Any], list[Any]]:
        """SQLite parameters in (run_id, seq) order: flat lists of ``per_statement`` rows
        each for the multi-row INSERT, then one list per row left over. The first entry
        of each is a tuple (SQLAlchemy's ``exec_driver_sql`` checks only that one)."""
        v = self.values
        ordered = v[np.lexsort((v[:, 1], v[:, 0]))]
        whole = len(ordered) - len(ordered) % per_statement
        multi: list[Any] = ordered[:whole].reshape(-1, per_statement * _WIDTH).tolist()
        rest: list[Any] = ordered[whole:].tolist()
        for params in (multi, rest):
            if params:
                params[0] = tuple(params[0])
        return multi, rest


def join(parts: Sequence[Rows]) -> Rows:
    """Several pieces of rows as one, in order: a SampleRows when every piece is one."""
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, SampleRows) for p in parts):
        return SampleRows.concat(parts)  # type: ignore[arg-type]
    return list(itertools.chain.from_iterable(parts))


def rows_of(batch: SampleBatch) -> Rows:
    """What the writer stores for a batch: SampleRows, or tuples when it cannot be one."""
    rows = SampleRows.from_batch(batch)
    return rows if rows is not None else batch.rows()
