"""Store an :class:`~labdaq.imports.data.ImportedData` as a read-only run: samples, steps
and cycles like a run labdaq acquired, so labdaq.analysis, the evaluation and the exports
work on it unchanged.

The run is in state ``imported`` (terminal: the engine never claims it, and pause, resume
and stop are refused with 409) on a channel of the disabled instrument ``import``, one
channel per format. The same file (by SHA-256) imported again is the same run. Sync; the
API calls it through ``session.run_sync``.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from labdaq.analysis import rest_current_for, summarise_cycles
from labdaq.errors import Invalid, NotFound
from labdaq.imports.data import ImportedData, segment_starts
from labdaq.imports.readers import read_file
from labdaq.imports.template import check_template
from labdaq.protocol import CellLimits
from labdaq.protocol.limits import EffectiveLimits
from labdaq.protocol.program import ResolvedProtocol
from labdaq.storage import models as m

__all__ = ["ImportResult", "file_sha256", "import_file", "store_import", "safe_filename",
           "IMPORT_INSTRUMENT"]

IMPORT_INSTRUMENT = "import"
_CHUNK_ROWS = 20_000


@dataclass(frozen=True)
class ImportResult:
    run_id: int
    import_id: int
    created: bool  # False: the file had been imported before (the same run)


def safe_filename(name: str | None) -> str:
    """The base name of an uploaded file, without path, control characters or anything
    a file system or the database could refuse; its suffix kept (readers go by it)."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = re.sub(r"[^\w.+@()\[\] -]", "_", base).strip(" .")[:200]
    return base or "upload"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _existing(session: Session, digest: str) -> ImportResult | None:
    row = session.scalar(select(m.Import).where(m.Import.file_sha256 == digest))
    return None if row is None else ImportResult(row.run_id, row.id, False)


def import_file(session: Session, path: Path, *, actor: str, cell_serial: str | None = None,
                fmt: str | None = None, filename: str | None = None,
                template: str | None = None) -> ImportResult:
    """Read ``path`` and store it (or find it stored already: then ``template`` is not
    applied, :func:`~.template.set_template` changes it). ``template``: the shipped
    protocol template the other lab's test followed. Flushes; the caller commits."""
    check_template(template)
    digest = file_sha256(path)
    found = _existing(session, digest)
    if found is not None:
        return found
    data = read_file(path, fmt)
    return store_import(session, data, digest=digest, filename=safe_filename(filename or path.name),
                        actor=actor, cell_serial=cell_serial, template=template)


def _channel(session: Session, fmt: str) -> m.Channel:
    inst = session.scalar(select(m.Instrument).where(m.Instrument.name == IMPORT_INSTRUMENT))
    if inst is None:
        # Disabled: the engine opens no instrument for it, the lab overview lists none.
        inst = m.Instrument(name=IMPORT_INSTRUMENT, driver="import", resource="file",
                            options={}, enabled=False)
        session.add(inst)
        session.flush()
    name = f"{IMPORT_INSTRUMENT}/{fmt}"
    ch = session.scalar(select(m.Channel).where(m.Channel.name == name))
    if ch is None:
        count = len(session.scalars(select(m.Channel.id).where(
            m.Channel.instrument_id == inst.id)).all())
        ch = m.Channel(name=name, instrument_id=inst.id, index=count + 1, enabled=False)
        session.add(ch)
        session.flush()
    return ch


def _cell(session: Session, data: ImportedData, serial: str | None, digest: str) -> m.Cell:
    if serial is not None:
        cell = session.scalar(select(m.Cell).where(m.Cell.serial == serial))
        if cell is None:
            raise NotFound(f"no cell with serial {serial!r} (register it first, or import "
                           "without one to create it from the file)")
        return cell
    serial = f"import-{digest[:12]}"
    cell = session.scalar(select(m.Cell).where(m.Cell.serial == serial))
    if cell is not None:
        return cell
    # What the file shows of the cell: its voltage window and largest capacity. A
    # technician edits the cell (PATCH /api/v1/cells/{id}) with its datasheet values.
    cap = float(np.max(np.abs(data.current_a))) or 1.0
    cell = m.Cell(serial=serial, chemistry="unknown", capacity_ah=cap,
                  charge_cutoff_v=float(np.nanmax(data.voltage_v)),
                  discharge_cutoff_v=float(np.nanmin(data.voltage_v)),
                  notes="created by an import from the file's voltage window; "
                        "capacity_ah is a placeholder")
    session.add(cell)
    session.flush()
    return cell


def _plan(data: ImportedData, cell: m.Cell, digest: str) -> ResolvedProtocol:
    i_max = max(float(np.max(np.abs(data.current_a))), 1e-9)
    v_lo, v_hi = float(np.nanmin(data.voltage_v)), float(np.nanmax(data.voltage_v))
    limits = CellLimits(
        capacity_ah=cell.capacity_ah, charge_cutoff_v=cell.charge_cutoff_v,
        discharge_cutoff_v=cell.discharge_cutoff_v,
        max_charge_current_a=cell.max_charge_current_a or i_max,
        max_discharge_current_a=cell.max_discharge_current_a or i_max)
    return ResolvedProtocol(
        name=f"import:{data.format}", protocol_hash=f"sha256:{digest}", cell=limits,
        limits=EffectiveLimits(min_voltage_v=v_lo, max_voltage_v=v_hi,
                               max_charge_current_a=i_max, max_discharge_current_a=i_max,
                               sources={"min_voltage_v": "file", "max_voltage_v": "file"}),
        program=[])


def _step_rows(run_id: int, data: ImportedData, step_cap: np.ndarray,
               step_energy: np.ndarray) -> list[dict[str, Any]]:
    starts = segment_starts((data.cycle_index, data.step_index))
    ends = np.append(starts[1:], data.t_s.size) - 1
    mean_i = np.add.reduceat(data.current_a, starts) / (ends - starts + 1)
    rows = []
    for n, (a, b) in enumerate(zip(starts, ends, strict=True)):
        kind = ("charge" if mean_i[n] > 1e-6 else "discharge" if mean_i[n] < -1e-6
                else "rest")
        rows.append({
            "run_id": run_id, "step_number": n + 1, "step_index": int(data.step_index[a]),
            "cycle_index": int(data.cycle_index[a]), "kind": kind,
            "start_t_s": float(data.t_s[a]), "end_t_s": float(data.t_s[b]),
            "end_reason": "imported", "capacity_ah": float(step_cap[b]),
            "energy_wh": float(step_energy[b]), "end_voltage_v": float(data.voltage_v[b]),
        })
    return rows


def _step_totals(data: ImportedData) -> tuple[np.ndarray, np.ndarray]:
    """|charge| and |energy| moved since each step began (the engine's step_capacity_ah),
    trapezoids, per sample."""
    t, v, i = data.t_s, data.voltage_v, data.current_a
    dq = np.zeros_like(t)
    de = np.zeros_like(t)
    dt = np.diff(t)
    dq[1:] = np.abs(0.5 * (i[1:] + i[:-1]) * dt) / 3600.0
    de[1:] = np.abs(0.5 * (i[1:] * v[1:] + i[:-1] * v[:-1]) * dt) / 3600.0
    starts = segment_starts((data.cycle_index, data.step_index))
    dq[starts] = 0.0
    de[starts] = 0.0
    cq, ce = np.cumsum(dq), np.cumsum(de)
    seg = np.repeat(np.arange(starts.size), np.diff(np.append(starts, t.size)))
    return cq - cq[starts][seg], ce - ce[starts][seg]


def _insert_samples(session: Session, run_id: int, cols: dict[str, list[Any]]) -> None:
    """Driver-level executemany of tuples, in chunks: the ORM's insert of dicts is several
    times slower (docs/architecture.md, Storage), and a file may hold millions of rows."""
    conn = session.connection()
    names = ["run_id", *cols]
    style = conn.dialect.paramstyle
    marks = [{"qmark": "?", "format": "%s", "pyformat": "%s"}.get(style, "")
             or {"numeric_dollar": f"${k}", "numeric": f":{k}"}.get(style, f":{name}")
             for k, name in enumerate(names, start=1)]
    sql = f"INSERT INTO samples ({', '.join(names)}) VALUES ({', '.join(marks)})"
    n = len(cols["seq"])
    for lo in range(0, n, _CHUNK_ROWS):
        hi = min(n, lo + _CHUNK_ROWS)
        rows = list(zip([run_id] * (hi - lo), *(c[lo:hi] for c in cols.values()),
                        strict=True))
        if style == "named":
            conn.exec_driver_sql(sql, [dict(zip(names, r, strict=True)) for r in rows])
        else:
            conn.exec_driver_sql(sql, rows)


def store_import(session: Session, data: ImportedData, *, digest: str, filename: str,
                 actor: str, cell_serial: str | None = None,
                 template: str | None = None) -> ImportResult:
    if np.any(np.diff(data.t_s) < 0):
        raise Invalid("the file's time column goes backwards",
                      [{"loc": "file", "msg": "test time must not decrease"}])
    cell = _cell(session, data, cell_serial, digest)
    channel = _channel(session, data.format)
    plan = _plan(data, cell, digest)
    proto = session.scalar(select(m.Protocol).where(m.Protocol.content_hash == plan.protocol_hash))
    if proto is None:
        proto = m.Protocol(name=plan.name, content_hash=plan.protocol_hash, document={
            "name": plan.name, "imported": {"filename": filename, "format": data.format,
                                            "reader": data.reader}})
        session.add(proto)
        session.flush()
    now = m.utcnow()
    start_utc = data.start_utc if data.start_utc is not None else time.time()
    n = int(data.t_s.size)
    run = m.Run(channel_id=channel.id, cell_id=cell.id, protocol_id=proto.id,
                state=m.RunState.imported.value, plan=plan.model_dump(mode="json"),
                sample_period_s=float(np.median(np.diff(data.t_s))) if n > 1 else 0.0,
                created_at=now, end_reason=f"imported from {filename}",
                # When the other lab's test ran, where the file says.
                started_at=None if data.start_utc is None
                else datetime.fromtimestamp(data.start_utc, UTC),
                ended_at=now if data.start_utc is None
                else datetime.fromtimestamp(data.start_utc + float(data.t_s[-1]), UTC),
                step_count=0, cycle_index=int(data.cycle_index[-1]),
                elapsed_s=float(data.t_s[-1]), last_seq=n)
    session.add(run)
    session.flush()
    rec = m.Import(run_id=run.id, file_sha256=digest, filename=filename[:300],
                   format=data.format, reader=data.reader[:100],
                   reader_licence=data.reader_licence[:60],
                   current_measured=data.current_measured, n_samples=n,
                   vendor_cycles=data.vendor_cycles, details=data.details, imported_by=actor,
                   template=check_template(template))
    session.add(rec)
    try:
        session.flush()
    except IntegrityError:
        # The same file imported concurrently: that import is the run.
        session.rollback()
        found = _existing(session, digest)
        if found is None:
            raise
        return found
    step_cap, step_energy = _step_totals(data)
    temp = data.temperature_c
    cols = {
        "seq": np.arange(1, n + 1).tolist(), "t_s": data.t_s.tolist(),
        "ts_utc": (start_utc + data.t_s).tolist(), "step_index": data.step_index.tolist(),
        "cycle_index": data.cycle_index.tolist(), "voltage_v": data.voltage_v.tolist(),
        "current_a": data.current_a.tolist(),
        "temperature_c": [None] * n if temp is None else
        [None if x != x else x for x in temp.tolist()],
        "step_capacity_ah": step_cap.tolist(), "step_energy_wh": step_energy.tolist(),
        "flags": [0] * n if data.flags is None else data.flags.tolist(),
    }
    _insert_samples(session, run.id, cols)
    session.execute(insert(m.Step), _step_rows(run.id, data, step_cap, step_energy))
    summary = summarise_cycles(data.t_s, data.voltage_v, data.current_a, data.cycle_index,
                               charge_cutoff_v=cell.charge_cutoff_v,
                               discharge_cutoff_v=cell.discharge_cutoff_v,
                               rest_current_a=rest_current_for(cell.capacity_ah))
    cycle_rows = [
        {"run_id": run.id, "cycle_index": r["cycle_index"], "start_t_s": r["start_t_s"],
         "end_t_s": r["end_t_s"], "charge_capacity_ah": r["charge_capacity_ah"],
         "discharge_capacity_ah": r["discharge_capacity_ah"],
         "charge_energy_wh": r["charge_energy_wh"],
         "discharge_energy_wh": r["discharge_energy_wh"],
         "coulombic_efficiency": r["coulombic_efficiency"],
         "energy_efficiency": r["energy_efficiency"],
         "mean_charge_voltage_v": r["mean_charge_voltage_v"],
         "mean_discharge_voltage_v": r["mean_discharge_voltage_v"]}
        for r in summary.rows()]
    if cycle_rows:
        session.execute(insert(m.Cycle), cycle_rows)
    session.add(m.Event(
        run_id=run.id, kind="audit", actor=actor,
        message=f"run imported from {filename} ({data.format}, {n} samples)",
        data={"file_sha256": digest, "format": data.format, "reader": data.reader,
              "cell_serial": cell.serial, "import_id": rec.id, "template": template,
              "before": None, "after": {"state": m.RunState.imported.value}}))
    session.flush()
    return ImportResult(run.id, rec.id, True)
