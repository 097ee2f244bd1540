"""Server-side downsampling of a run's samples for plots (``?points=N``).

MinMaxLTTB as tsdownsample implements it (min-max preselection of 4 × N points, then
Largest-Triangle-Three-Buckets down to N), with the preselection done chunk by chunk over
the keyset-paginated read of :mod:`labdaq.export`, so memory is bounded by one chunk and
4 × N rows whatever the run's length. Voltage and current are both kept in shape: half of
the points are chosen on each and the union returned (at most N rows, in seq order), so a
current pulse is not lost on a flat voltage curve.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
from tsdownsample import LTTBDownsampler, MinMaxDownsampler

from labdaq.export import SCHEMA, SampleFilter, connect, iter_sample_batches

#: Min-max preselection ratio (tsdownsample's MinMaxLTTB default).
MINMAX_RATIO = 4
SIGNALS = ("voltage_v", "current_a")


def count_sql(style: str, where: SampleFilter) -> str:
    """How many of a run's samples up to a seq match ``where`` (parameters: run id, the
    seq, then ``where``'s values)."""
    conds = ["run_id = {}", "seq <= {}", *(c for c, _ in where.conditions())]
    marks = ["?" if style == "qmark" else f"${i + 1}" for i in range(len(conds))]
    return "SELECT COUNT(*) FROM samples WHERE " + " AND ".join(
        c.format(mk) for c, mk in zip(conds, marks, strict=True)
    )


def count_samples(url: str, run_id: int, max_seq: int, where: SampleFilter) -> int:
    conn, style = connect(url)
    try:
        sql = count_sql(style, where)
        cur = conn.cursor()
        cur.execute(sql, (run_id, max_seq, *(v for _, v in where.conditions())))
        row = cur.fetchone()
        cur.close()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def _minmax(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    n_out = max(2, n_out + (n_out % 2))  # MinMax picks pairs
    if len(y) <= n_out:
        return np.arange(len(y))
    return np.asarray(MinMaxDownsampler().downsample(x, y, n_out=n_out), dtype=np.int64)


def downsample(
    url: str, run_id: int, max_seq: int, points: int, where: SampleFilter
) -> tuple[pa.Table, int]:
    """At most ``points`` samples that keep the shape of voltage and current, and the
    number of samples they were chosen from."""
    n = count_samples(url, run_id, max_seq, where)
    batches = []
    for batch in iter_sample_batches(url, run_id, max_seq, where=where):
        if n <= points:
            batches.append(batch)
            continue
        x = batch.column("t_s").to_numpy()
        share = math.ceil(batch.num_rows * points * MINMAX_RATIO / n)
        # A chunk's first and last rows too, so the run's ends are always kept (as
        # MinMaxLTTB keeps them).
        ends = np.array([0, batch.num_rows - 1], dtype=np.int64)
        keep = np.unique(np.concatenate(
            [ends, *(_minmax(x, batch.column(s).to_numpy(), share) for s in SIGNALS)]
        ))
        batches.append(batch.take(pa.array(keep)))
    table = pa.Table.from_batches(batches, schema=SCHEMA).combine_chunks()
    if table.num_rows <= points:
        return table, n
    x = table.column("t_s").to_numpy()
    half = max(3, points // 2)
    chosen = [
        np.asarray(LTTBDownsampler().downsample(x, table.column(s).to_numpy(), n_out=k))
        for s, k in zip(SIGNALS, (half, max(3, points - half)), strict=True)
    ]
    keep = np.unique(np.concatenate(chosen))[:points]
    return table.take(pa.array(keep)), n
