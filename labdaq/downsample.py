"""Server-side downsampling of a run's samples for plots (``?points=N``).

MinMaxLTTB as tsdownsample implements it (min-max preselection of 4 × N points, then
Largest-Triangle-Three-Buckets down to N), with the preselection done chunk by chunk over
the keyset-paginated read of :mod:`labdaq.export`, so memory is bounded by one chunk and
4 × N rows whatever the run's length. Voltage and current are both kept in shape: half of
the points are chosen on each and the union returned (at most N rows, in seq order), so a
current pulse is not lost on a flat voltage curve.

A result is kept (:class:`DownsampleCache`) under the run, the number of points and the
filter, with the run's last committed ``seq`` when it was computed: samples are never
changed once stored, so while that seq is still the run's last the answer is the same,
and a plot of a finished run, or one polled faster than the run samples, is not
recomputed. Once the run has stored more, the next answer replaces the entry: a run's
last seq only grows, so an answer for an older one would never be asked for again.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np
import pyarrow as pa
from tsdownsample import LTTBDownsampler, MinMaxDownsampler

from labdaq.export import SCHEMA, SampleFilter, batches_on

#: Min-max preselection ratio (tsdownsample's MinMaxLTTB default).
MINMAX_RATIO = 4
SIGNALS = ("voltage_v", "current_a")


def _marks(style: str, n: int) -> list[str]:
    return ["?" if style == "qmark" else f"${i + 1}" for i in range(n)]


def count_sql(style: str, where: SampleFilter) -> str:
    """How many of a run's samples up to a seq match ``where`` (parameters: run id, the
    seq, then ``where``'s values)."""
    conds = ["run_id = {}", "seq <= {}", *(c for c, _ in where.conditions())]
    return "SELECT COUNT(*) FROM samples WHERE " + " AND ".join(
        c.format(mk) for c, mk in zip(conds, _marks(style, len(conds)), strict=True)
    )


def count_samples(conn: Any, style: str, run_id: int, max_seq: int, where: SampleFilter) -> int:
    sql = count_sql(style, where)
    cur = conn.cursor()
    try:
        cur.execute(sql, (run_id, max_seq, *(v for _, v in where.conditions())))
        row = cur.fetchone()
    finally:
        cur.close()
    return int(row[0]) if row else 0


def last_seq(conn: Any, style: str, run_id: int) -> int | None:
    """The run's last stored ``seq`` (-1: none yet), or None if there is no such run."""
    mark = _marks(style, 1)[0]
    cur = conn.cursor()
    try:
        cur.execute("SELECT id, (SELECT MAX(seq) FROM samples WHERE samples.run_id = runs.id)"
                    f" FROM runs WHERE id = {mark}", (run_id,))
        row = cur.fetchone()
    finally:
        cur.close()
    if row is None:
        return None
    return -1 if row[1] is None else int(row[1])


def _minmax(x: np.ndarray, y: np.ndarray, n_out: int) -> np.ndarray:
    n_out = max(2, n_out + (n_out % 2))  # MinMax picks pairs
    if len(y) <= n_out:
        return np.arange(len(y))
    return np.asarray(MinMaxDownsampler().downsample(x, y, n_out=n_out), dtype=np.int64)


def downsample(
    conn: Any, style: str, run_id: int, max_seq: int, points: int, where: SampleFilter
) -> tuple[pa.Table, int]:
    """At most ``points`` samples with ``seq <= max_seq`` that keep the shape of voltage
    and current, and the number of samples they were chosen from (on a connection from
    :func:`labdaq.export.connect`)."""
    n = count_samples(conn, style, run_id, max_seq, where)
    batches = []
    for batch in batches_on(conn, style, run_id, max_seq, where=where):
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


_Key = tuple[int, int, SampleFilter]


class DownsampleCache:
    """Downsampled results by (run, points, filter), each with the last seq it was
    computed up to; least recently used out first, at most ``max_rows`` rows in all.
    Shared by the API's worker threads.

    One entry per key, not one per (key, last seq): a live run's last seq changes every
    sample period, and entries for the seqs before it, never asked for again, filled the
    cache to ``max_rows`` (the API's memory kept growing under the standard API load
    until they did; tests/test_soak_api_load.py)."""

    def __init__(self, max_rows: int = 200_000) -> None:
        self.max_rows = max_rows
        self._rows = 0
        self._entries: OrderedDict[_Key, tuple[int, pa.Table, int]] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def rows(self) -> int:
        """Rows held now, in all entries."""
        return self._rows

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: _Key, seq: int) -> tuple[pa.Table, int] | None:
        """The answer for ``key`` computed up to ``seq``, if that is the one kept."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is None or hit[0] != seq:
                return None
            self._entries.move_to_end(key)
            return hit[1], hit[2]

    def put(self, key: _Key, seq: int, value: tuple[pa.Table, int]) -> None:
        """Keep ``value``, computed up to ``seq``, for ``key`` unless a later seq's answer
        is kept already (two requests may race: the older answer does not replace it)."""
        rows = value[0].num_rows
        if rows > self.max_rows:
            return
        with self._lock:
            old = self._entries.get(key)
            if old is not None:
                if old[0] > seq:
                    return
                del self._entries[key]
                self._rows -= old[1].num_rows
            self._entries[key] = (seq, *value)
            self._rows += rows
            while self._rows > self.max_rows:
                _, dropped = self._entries.popitem(last=False)
                self._rows -= dropped[1].num_rows


def downsampled(
    conn: Any, style: str, run_id: int, points: int, where: SampleFilter,
    cache: DownsampleCache | None = None,
) -> tuple[pa.Table, int] | None:
    """:func:`downsample` of everything the run has stored now, from ``cache`` when it
    was computed before for the same last seq; None if there is no such run."""
    top = last_seq(conn, style, run_id)
    if top is None:
        return None
    key = (run_id, points, where)
    hit = cache.get(key, top) if cache is not None else None
    if hit is not None:
        return hit
    out = downsample(conn, style, run_id, top, points, where)
    if cache is not None:
        cache.put(key, top, out)
    return out
