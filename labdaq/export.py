"""Run exports: a run's samples streamed out as CSV, Parquet or Battery Data Format.

Samples are read in chunks by keyset on ``seq`` into Arrow (ADBC on PostgreSQL, the
standard ``sqlite3`` module on SQLite: see :func:`connect`), so memory stays bounded by one chunk
whatever the run's length, and written chunk by chunk: a Parquet row group or a block of
CSV lines per chunk. An export is a snapshot: it ends at the last sample committed when it
started, so a run that is still acquiring exports consistently.

Every export describes itself (:func:`describe`): run, cell, protocol and its content
hash, the channel and the instruments with their identification strings (serial numbers),
the software version, and ``data_sha256``, a digest of the exported values
(:class:`DataDigest`). Parquet carries these as key-value metadata (written in the footer,
where the digest is known); CSV as a ``#`` block before the header, with ``data_sha256``
and the row count on ``#`` lines after the last row (the export streams, so the digest is
known only at the end). ``format=bdf`` follows the Battery Data Format
(https://github.com/battery-data-alliance/battery-data-format, README "Defining the BDF for
Cycler Time-Series Data"): the first line is the header of preferred labels
(``Test Time / s``, ``Voltage / V`` ...), every line has the same columns, so it carries
no ``#`` lines; its description is served as a parallel metadata document.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from sqlalchemy import func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

import labdaq
from labdaq.errors import Invalid, NotFound
from labdaq.sample_arrow import COLUMNS, NULLABLE, SCHEMA, SampleFilter, chunk_sql, to_batch
from labdaq.storage import models as m

ExportFormat = Literal["csv", "parquet", "bdf"]
FORMATS: tuple[str, ...] = ("csv", "parquet", "bdf")
MEDIA_TYPES = {
    "csv": "text/csv; charset=utf-8",
    "bdf": "text/csv; charset=utf-8",
    "parquet": "application/vnd.apache.parquet",
}
SUFFIXES = {"csv": ".csv", "bdf": ".bdf.csv", "parquet": ".parquet"}

#: Battery Data Format preferred labels for labdaq's columns (BDF README, tables of
#: required, recommended and optional quantities). ``Step Count / 1`` is derived: BDF
#: wants a monotonically increasing step counter, while ``step_index`` is the plan's step
#: and repeats in loops. ``seq``, ``flags`` and ``temperature_age_s`` have no BDF quantity
#: and are left out.
BDF_LABELS: dict[str, str] = {
    "t_s": "Test Time / s",
    "ts_utc": "Unix Time / s",
    "voltage_v": "Voltage / V",
    "current_a": "Current / A",
    "cycle_index": "Cycle Count / 1",
    "step_count": "Step Count / 1",
    "step_capacity_ah": "Step Capacity / Ah",
    "step_energy_wh": "Step Energy / Wh",
    "temperature_c": "Surface Temperature T1 / degC",
}

DEFAULT_CHUNK_ROWS = 65_536
#: Chunk of a CSV or BDF export. A row is ~100 bytes of text against ~90 of Arrow, and a
#: chunk is held as a batch, as the writer's text and as the bytes sent, so text exports
#: read smaller chunks: the API's peak RSS over a 10 M-row CSV export grew 46 MiB at
#: 65,536 rows a chunk and 27 MiB at 16,384 (docs/performance.md, "Export memory").
#: Parquet keeps 65,536 (a chunk is a row group; smaller ones compress worse).
TEXT_CHUNK_ROWS = 16_384


# --- reading ---------------------------------------------------------------------------


def connect(url: str, autocommit: bool = False) -> tuple[Any, str]:
    """A DB-API connection for reading samples, and its parameter style.

    ``autocommit``: on PostgreSQL, each query its own transaction (a connection kept
    between requests is then not left idle in a transaction); SQLite's reads never open one.

    PostgreSQL: ADBC, straight into Arrow. SQLite: the standard ``sqlite3`` module, read
    only. Not ADBC there: its driver carries its own copy of the SQLite library, and two
    copies in one process (the API's aiosqlite is the other) break each other's POSIX
    locks; closing the ADBC connection then dropped the other connections' locks and
    checkpointed away a WAL they were still using (writes lost; seen in
    tests/test_live_stream.py). sqlite.org/howtocorrupt.html, section 2.2.1.
    """
    u = make_url(url)
    backend = u.get_backend_name()
    if backend == "sqlite":
        if not u.database or u.database == ":memory:":
            raise Invalid("export needs a database file, not an in-memory SQLite database")
        # check_same_thread off: a streamed response pulls each chunk from whichever
        # worker thread is free; the connection is still used by one at a time.
        conn = sqlite3.connect(
            f"file:{u.database}?mode=ro", uri=True, check_same_thread=False, timeout=10.0
        )
        return conn, "qmark"
    if backend == "postgresql":
        import adbc_driver_postgresql.dbapi as adbc_pg

        uri = u.set(drivername="postgresql").render_as_string(hide_password=False)
        return adbc_pg.connect(uri, autocommit=autocommit), "numeric"
    raise Invalid(f"export does not support {backend} databases")


def _fetch_table(cur: Any, style: str) -> pa.Table:
    if style != "qmark":
        return cur.fetch_arrow_table()
    rows = cur.fetchall()
    types = [*SCHEMA.types, *[pa.int64()] * len(NULLABLE)]
    if not rows:
        return pa.table({str(i): pa.array([], type=t) for i, t in enumerate(types)})
    cols = list(zip(*rows, strict=True))
    return pa.table({str(i): pa.array(cols[i], type=t) for i, t in enumerate(types)})


def warm_up() -> None:
    """Do at start-up what the first read would: pyarrow's first conversion of Python
    values (``pa.array`` of a list, as :func:`_fetch_table` does with SQLite rows) imports
    pandas for its pandas checks, with the GIL held; in a request it stalls every other
    request the API is serving (docs/performance.md)."""
    pa.array([0.0], type=pa.float64())


def iter_sample_batches(
    url: str,
    run_id: int,
    max_seq: int,
    after_seq: int = -1,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    where: SampleFilter | None = None,
    reader_process: bool = False,
) -> Iterator[pa.RecordBatch]:
    """The run's samples with ``after_seq < seq <= max_seq`` as record batches of at most
    ``chunk_rows`` rows, in seq order (keyset pagination: each chunk is one indexed range
    read on the (run_id, seq) primary key, however far into the run it is).

    ``reader_process``: on SQLite, read with ADBC in a child process (labdaq.export_reader)
    and receive Arrow batches over a pipe; worth its start-up for whole-run exports."""
    u = make_url(url)
    if reader_process and u.get_backend_name() == "sqlite" and u.database:
        yield from _batches_from_child(u.database, run_id, max_seq, after_seq, chunk_rows,
                                       where or SampleFilter())
        return
    conn, style = connect(url)
    try:
        yield from batches_on(conn, style, run_id, max_seq, after_seq, chunk_rows, where)
    finally:
        conn.close()


def batches_on(
    conn: Any,
    style: str,
    run_id: int,
    max_seq: int,
    after_seq: int = -1,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    where: SampleFilter | None = None,
) -> Iterator[pa.RecordBatch]:
    """:func:`iter_sample_batches` on a connection the caller holds (:func:`connect`)."""
    cur = conn.cursor()
    try:
        where = where or SampleFilter()
        sql = chunk_sql(style, where)
        extra = [v for _, v in where.conditions()]
        last = after_seq
        while last < max_seq:
            cur.execute(sql, (run_id, last, max_seq, *extra, chunk_rows))
            table = _fetch_table(cur, style)
            if table.num_rows == 0:
                break
            batch = to_batch(table)
            yield batch
            last = int(batch.column(0)[-1].as_py())
            if table.num_rows < chunk_rows:
                break
    finally:
        cur.close()


def _widen_pipe(fd: int, size: int = 1 << 20) -> None:
    """Grow a pipe's buffer from Linux's 64 KiB towards ``size``: a chunk of samples is a
    few MB, and each time the buffer fills the reader process stops until this one is
    scheduled to empty it, a wait that on a loaded machine lasts a time slice or more.
    Best effort: other systems, or a limit below ``size``, keep what they have."""
    setpipe = getattr(fcntl, "F_SETPIPE_SZ", 1031) if sys.platform == "linux" else None
    if setpipe is None:
        return
    with contextlib.suppress(OSError):
        fcntl.fcntl(fd, setpipe, size)


def _batches_from_child(path: str, run_id: int, max_seq: int, after_seq: int,
                        chunk_rows: int, where: SampleFilter) -> Iterator[pa.RecordBatch]:
    args = json.dumps({
        "path": path, "run_id": run_id, "max_seq": max_seq, "after_seq": after_seq,
        "chunk_rows": chunk_rows, "where": dataclasses.asdict(where),
    })
    proc = subprocess.Popen(
        [sys.executable, "-m", "labdaq.export_reader", args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    _widen_pipe(proc.stdout.fileno())
    try:
        try:
            reader = pa.ipc.open_stream(proc.stdout)
        except pa.ArrowInvalid as exc:  # the child failed before writing anything
            raise RuntimeError(proc.stderr.read().decode(errors="replace")) from exc
        yield from reader
        if proc.wait() != 0:
            raise RuntimeError(proc.stderr.read().decode(errors="replace"))
    finally:
        # A client that hung up closes this generator early: stop the child with it.
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


# --- the digest -------------------------------------------------------------------------


class DataDigest:
    """SHA-256 of the exported values, independent of format and chunking.

    Per column (in :data:`COLUMNS` order), the values in seq order as little-endian
    fixed-width numbers (float64, or int64 for integer columns; a missing temperature
    counts as NaN) are hashed; ``data_sha256`` is the SHA-256 of the lines
    ``<column>=<hex digest of that column>\\n``. A reader recomputes it from any of the
    exported files or from the database (tests/test_export.py does).
    """

    def __init__(self) -> None:
        self._h = {c: hashlib.sha256() for c in COLUMNS}
        self.rows = 0

    def update(self, batch: pa.RecordBatch) -> None:
        self.rows += batch.num_rows
        for c in COLUMNS:
            arr = batch.column(c)
            dtype = "<f8" if pa.types.is_floating(arr.type) else "<i8"
            values = arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)
            self._h[c].update(np.ascontiguousarray(values).tobytes())

    def hexdigest(self) -> str:
        lines = "".join(f"{c}={self._h[c].hexdigest()}\n" for c in COLUMNS)
        return hashlib.sha256(lines.encode()).hexdigest()


# --- description ------------------------------------------------------------------------


@dataclass
class ExportPlan:
    """What one export covers and how it describes itself."""

    run_ids: list[int]
    max_seq: dict[int, int]
    metadata: dict[str, Any] = field(default_factory=dict)


def _idn_fields(idn: str | None) -> dict[str, str | None]:
    # IEEE 488.2 *IDN?: maker, model, serial, firmware.
    parts = [p.strip() for p in (idn or "").split(",")]
    parts += [""] * (4 - len(parts))
    return {
        "idn": idn,
        "serial": parts[2] or None,
        "firmware": parts[3] or None,
    }


async def _run_description(session: AsyncSession, run: m.Run) -> dict[str, Any]:
    channel = await session.get(m.Channel, run.channel_id)
    proto = await session.get(m.Protocol, run.protocol_id)
    instruments: list[dict[str, Any]] = []
    names: list[str] = []
    if channel is not None:
        inst = await session.get(m.Instrument, channel.instrument_id)
        if inst is not None:
            names.append(inst.name)
    # Instruments wired to the cell when the run was created (impedance, chamber, logger).
    for _role, ref in (run.wiring or {}).items():
        name = ref.get("logger") if isinstance(ref, dict) else ref
        if isinstance(name, str) and name not in names:
            names.append(name)
    if names:
        rows = await session.scalars(select(m.Instrument).where(m.Instrument.name.in_(names)))
        by_name = {i.name: i for i in rows.all()}
        for n in names:
            i = by_name.get(n)
            if i is not None:
                instruments.append({
                    "name": i.name, "driver": i.driver, "resource": i.resource,
                    **_idn_fields(i.idn),
                })
    return {
        "run_id": run.id,
        "state": run.state,
        "sample_period_s": run.sample_period_s,
        "created_at": run.created_at.isoformat() if run.created_at else None,
        "started_at": run.started_at.isoformat() if run.started_at else None,
        "ended_at": run.ended_at.isoformat() if run.ended_at else None,
        "end_reason": run.end_reason,
        "channel": channel.name if channel is not None else None,
        "protocol": {
            "id": run.protocol_id,
            "name": proto.name if proto else None,
            "content_hash": proto.content_hash if proto else None,
        },
        "wiring": run.wiring,
        "instruments": instruments,
    }


def _cell_description(cell: m.Cell) -> dict[str, Any]:
    return {
        "id": cell.id,
        "serial": cell.serial,
        "spec_name": cell.spec_name,
        "maker": cell.maker,
        "model": cell.model,
        "lot": cell.lot,
        "chemistry": cell.chemistry,
        "capacity_ah": cell.capacity_ah,
        "nominal_voltage_v": cell.nominal_voltage_v,
        "charge_cutoff_v": cell.charge_cutoff_v,
        "discharge_cutoff_v": cell.discharge_cutoff_v,
    }


async def _max_seq(session: AsyncSession, run_id: int) -> int:
    return int(
        await session.scalar(select(func.max(m.Sample.seq)).where(m.Sample.run_id == run_id))
        or -1
    )


def _columns_doc(fmt: str) -> dict[str, str]:
    if fmt == "bdf":
        return dict(BDF_LABELS)
    return {c: c for c in COLUMNS}


async def plan_run_export(session: AsyncSession, run_id: int, fmt: str) -> ExportPlan:
    """Check the run and fix the snapshot (its last committed seq); describe it."""
    _check_format(fmt)
    run = await session.get(m.Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    cell = await session.get(m.Cell, run.cell_id)
    assert cell is not None
    top = await _max_seq(session, run_id)
    meta = {
        "software": {"name": "labdaq", "version": labdaq.__version__},
        "format": fmt,
        "run": await _run_description(session, run),
        "cell": _cell_description(cell),
        "columns": _columns_doc(fmt),
        "units": "SI as in the column names; current positive when charging",
        "last_seq": top,
    }
    return ExportPlan(run_ids=[run_id], max_seq={run_id: top}, metadata=meta)


async def plan_cell_export(session: AsyncSession, cell_id: int, fmt: str) -> ExportPlan:
    """All runs of a cell, oldest first, in one file with a ``run_id`` column."""
    _check_format(fmt)
    if fmt == "bdf":
        raise Invalid(
            "format bdf exports one run",
            [{"loc": "format", "msg": "BDF time restarts with each run; export each run "
              "(GET /api/v1/runs/{id}/export?format=bdf) or use csv or parquet"}],
        )
    cell = await session.get(m.Cell, cell_id)
    if cell is None:
        raise NotFound(f"no cell {cell_id}")
    runs = (await session.scalars(
        select(m.Run).where(m.Run.cell_id == cell_id).order_by(m.Run.id)
    )).all()
    tops = {r.id: await _max_seq(session, r.id) for r in runs}
    meta = {
        "software": {"name": "labdaq", "version": labdaq.__version__},
        "format": fmt,
        "cell": _cell_description(cell),
        "runs": [await _run_description(session, r) for r in runs],
        "columns": {"run_id": "run_id", **_columns_doc(fmt)},
        "units": "SI as in the column names; current positive when charging",
    }
    return ExportPlan(run_ids=[r.id for r in runs], max_seq=tops, metadata=meta)


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise Invalid(
            "unknown export format", [{"loc": "format", "msg": f"one of {list(FORMATS)}"}]
        )


# --- writing ----------------------------------------------------------------------------


class _Drain:
    """A write-only file that hands written bytes out between chunks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._pos = 0
        self.closed = False

    def write(self, b: Any) -> int:
        data = bytes(b)
        self._parts.append(data)
        self._pos += len(data)
        return len(data)

    def tell(self) -> int:
        return self._pos

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    def writable(self) -> bool:
        return True

    def take(self) -> bytes:
        out = b"".join(self._parts)
        self._parts.clear()
        return out


def _bdf_batch(batch: pa.RecordBatch, state: dict[str, Any]) -> pa.RecordBatch:
    step = batch.column("step_index").to_numpy(zero_copy_only=False)
    cycle = batch.column("cycle_index").to_numpy(zero_copy_only=False)
    n = len(step)
    changed = np.empty(n, dtype=bool)
    if n:
        prev = state.get("prev")
        changed[0] = prev is None or prev != (int(step[0]), int(cycle[0]))
        changed[1:] = (step[1:] != step[:-1]) | (cycle[1:] != cycle[:-1])
        state["prev"] = (int(step[-1]), int(cycle[-1]))
    count = state.get("count", 0) + np.cumsum(changed, dtype=np.int64)
    if n:
        state["count"] = int(count[-1])
    cols = {
        "t_s": batch.column("t_s"),
        "ts_utc": batch.column("ts_utc"),
        "voltage_v": batch.column("voltage_v"),
        "current_a": batch.column("current_a"),
        "cycle_index": batch.column("cycle_index"),
        "step_count": pa.array(count, type=pa.int64()),
        "step_capacity_ah": batch.column("step_capacity_ah"),
        "step_energy_wh": batch.column("step_energy_wh"),
        "temperature_c": batch.column("temperature_c"),
    }
    return pa.RecordBatch.from_arrays(
        list(cols.values()), names=[BDF_LABELS[k] for k in cols]
    )


def _with_run_id(batch: pa.RecordBatch, run_id: int) -> pa.RecordBatch:
    rid = pa.array(np.full(batch.num_rows, run_id, dtype=np.int64))
    return pa.RecordBatch.from_arrays([rid, *batch.columns], names=["run_id", *batch.schema.names])


def dictionary_columns(schema: pa.Schema) -> list[str]:
    """The columns worth Parquet dictionary encoding: the repeating integers (step, cycle,
    flags, run_id), not ``seq`` nor the measured floats. A float column is almost all
    distinct values, so a dictionary only costs hashing every value, and with row groups
    of one read chunk the dictionary never outgrows its page limit to fall back to plain
    encoding: the file came out larger and the writer took about 4x the CPU
    (docs/performance.md, "Parquet export")."""
    return [f.name for f in schema if pa.types.is_integer(f.type) and f.name != "seq"]


def _comment_block(meta: dict[str, Any]) -> bytes:
    lines = ["# labdaq export"]
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
        lines.append(f"# {key}: {text}")
    return ("\n".join(lines) + "\n").encode()


def stream_export(
    url: str, plan: ExportPlan, fmt: str, chunk_rows: int | None = None
) -> Iterator[bytes]:
    """The export as a sequence of byte chunks (one per chunk of samples; by default
    :data:`TEXT_CHUNK_ROWS` rows for CSV and BDF, :data:`DEFAULT_CHUNK_ROWS` for Parquet)."""
    if chunk_rows is None:
        chunk_rows = DEFAULT_CHUNK_ROWS if fmt == "parquet" else TEXT_CHUNK_ROWS
    digest = DataDigest()
    multi = len(plan.run_ids) != 1 or "runs" in plan.metadata
    sink = _Drain()
    writer: Any = None
    bdf_state: dict[str, Any] = {}
    if fmt == "csv":
        yield _comment_block(plan.metadata)

    def shaped(batch: pa.RecordBatch, run_id: int) -> pa.RecordBatch:
        if fmt == "bdf":
            return _bdf_batch(batch, bdf_state)
        return _with_run_id(batch, run_id) if multi else batch

    described = {f"labdaq.{k}": json.dumps(v) for k, v in plan.metadata.items()}

    def open_writer(schema: pa.Schema) -> Any:
        if fmt == "parquet":
            # The description goes into the Arrow schema (read_table().schema.metadata);
            # the digest, known only at the end, into the file's footer metadata.
            return pq.ParquetWriter(sink, schema.with_metadata(described), compression="zstd",
                                    use_dictionary=dictionary_columns(schema))
        return pacsv.CSVWriter(sink, schema)

    for run_id in plan.run_ids:
        # A run of one chunk or less is one range read: a reader process would cost more to
        # start (its interpreter and pyarrow) than it saves.
        for batch in iter_sample_batches(url, run_id, plan.max_seq[run_id],
                                         chunk_rows=chunk_rows,
                                         reader_process=plan.max_seq[run_id] > chunk_rows):
            digest.update(batch)
            out = shaped(batch, run_id)
            if writer is None:
                writer = open_writer(out.schema)
            writer.write_batch(out)
            chunk = sink.take()
            if chunk:
                yield chunk
    if writer is None:
        # No samples: still a well-formed file with the header (or an empty row group).
        writer = open_writer(shaped(pa.RecordBatch.from_pylist([], schema=SCHEMA), 0).schema)
    trailer = {"data_sha256": digest.hexdigest(), "rows": str(digest.rows)}
    if fmt == "parquet":
        writer.add_key_value_metadata({f"labdaq.{k}": v for k, v in trailer.items()})
    writer.close()
    tail = sink.take()
    if fmt == "csv":
        tail += "".join(f"# {k}: {v}\n" for k, v in trailer.items()).encode()
    if tail:
        yield tail
    plan.metadata.update(trailer)


def digest_only(url: str, plan: ExportPlan) -> dict[str, Any]:
    """The description with ``data_sha256`` and ``rows``, without writing a file (the
    parallel metadata document of a BDF export)."""
    digest = DataDigest()
    for run_id in plan.run_ids:
        for batch in iter_sample_batches(url, run_id, plan.max_seq[run_id]):
            digest.update(batch)
    plan.metadata.update({"data_sha256": digest.hexdigest(), "rows": str(digest.rows)})
    return plan.metadata


def export_to_file(url: str, plan: ExportPlan, fmt: str, path: str) -> dict[str, Any]:
    """Write an export to a file; returns the description including ``data_sha256``."""
    with open(path, "wb") as fh:
        for chunk in stream_export(url, plan, fmt):
            fh.write(chunk)
    return plan.metadata
