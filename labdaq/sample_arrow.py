"""The samples table as Arrow: column types, the chunk query and row filters.

Kept free of SQLAlchemy and the rest of labdaq so that the export reader child process
(labdaq.export_reader) starts quickly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa

#: The stored sample columns, in export order, with their Arrow types.
SCHEMA = pa.schema(
    [
        ("seq", pa.int64()),
        ("t_s", pa.float64()),
        ("ts_utc", pa.float64()),
        ("step_index", pa.int32()),
        ("cycle_index", pa.int32()),
        ("voltage_v", pa.float64()),
        ("current_a", pa.float64()),
        ("temperature_c", pa.float64()),
        ("step_capacity_ah", pa.float64()),
        ("step_energy_wh", pa.float64()),
        ("flags", pa.int32()),
        # Engine seconds from the wired sensor's reading to the sample (NULL: no reading).
        ("temperature_age_s", pa.float64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
#: The columns that may be NULL: each is read as a value and a null flag (chunk_sql).
NULLABLE = ("temperature_c", "temperature_age_s")


@dataclass(frozen=True)
class SampleFilter:
    """Which samples of a run: a time window (``t_s``, inclusive) and/or one cycle or step."""

    t_from: float | None = None
    t_to: float | None = None
    cycle: int | None = None
    step: int | None = None

    def conditions(self) -> list[tuple[str, float | int]]:
        out: list[tuple[str, float | int]] = []
        if self.t_from is not None:
            out.append(("t_s >= {}", self.t_from))
        if self.t_to is not None:
            out.append(("t_s <= {}", self.t_to))
        if self.cycle is not None:
            out.append(("cycle_index = {}", self.cycle))
        if self.step is not None:
            out.append(("step_index = {}", self.step))
        return out


def chunk_sql(style: str, where: SampleFilter, columns: tuple[str, ...] = COLUMNS) -> str:
    # COALESCE + IS NULL: the SQLite driver infers a column's Arrow type from its first
    # rows, so a temperature column that starts with NULLs would be typed INT64 and fail
    # on the first real value; reading value and null flag apart keeps the type fixed.
    cols = [c if c not in NULLABLE else f"COALESCE({c}, 0.0)" for c in columns]
    cols.extend(f"CASE WHEN {c} IS NULL THEN 1 ELSE 0 END" for c in NULLABLE)
    conds = ["run_id = {}", "seq > {}", "seq <= {}", *(c for c, _ in where.conditions())]
    marks = ["?" if style == "qmark" else f"${i + 1}" for i in range(len(conds) + 1)]
    sql_where = " AND ".join(c.format(mark) for c, mark in zip(conds, marks, strict=False))
    return (
        f"SELECT {', '.join(cols)} FROM samples WHERE {sql_where} "
        f"ORDER BY seq LIMIT {marks[-1]}"
    )


def to_batch(table: pa.Table) -> pa.RecordBatch:
    arrays: list[pa.Array] = []
    null_flags = {c: table.column(len(COLUMNS) + j).to_numpy().astype(bool)
                  for j, c in enumerate(NULLABLE)}
    for i, f in enumerate(SCHEMA):
        col = table.column(i)
        arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
        if f.name in null_flags:
            values = arr.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
            arrays.append(pa.array(values, type=pa.float64(), mask=null_flags[f.name]))
        else:
            arrays.append(arr.cast(f.type))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)
