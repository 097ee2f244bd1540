"""Cell service: register, edit and look up the physical cells that runs test.

A cell is either built from a shipped specification (``seeds/cells/<name>.yaml``: its
chemistry, capacity, cut-offs and current limits) with any field overridden, or described
in full. Every create and edit writes an audit event (``events`` row, kind ``audit``, no
run) naming who did it and the values before and after, the same mechanism runs use.
"""

from __future__ import annotations

from datetime import date
from functools import cache
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.bounds import MAX_TEMPERATURE_C as T_MAX
from labdaq.bounds import MIN_TEMPERATURE_C as T_MIN
from labdaq.errors import Conflict, Invalid, NotFound
from labdaq.storage import models as m

#: Fields a specification file provides (the electrical description of the cell type).
SPEC_FIELDS = (
    "chemistry",
    "capacity_ah",
    "nominal_voltage_v",
    "charge_cutoff_v",
    "discharge_cutoff_v",
    "max_charge_current_a",
    "max_discharge_current_a",
)
#: Fields a technician may change after the cell is registered.
EDITABLE = (
    "maker",
    "model",
    "lot",
    "received_on",
    "notes",
    *SPEC_FIELDS,
    "min_temperature_c",
    "max_temperature_c",
)


class CellCreate(BaseModel):
    """A new cell: a serial, and either ``spec`` (a shipped specification) or its values."""

    model_config = ConfigDict(extra="forbid")

    serial: str = Field(min_length=1, max_length=100)
    spec: str | None = Field(
        default=None, max_length=100, description="name of a specification in seeds/cells"
    )
    maker: str | None = Field(default=None, max_length=100)
    model: str | None = Field(default=None, max_length=100)
    lot: str | None = Field(default=None, max_length=100)
    received_on: date | None = None
    notes: str | None = Field(default=None, max_length=10_000)
    chemistry: str | None = Field(default=None, min_length=1, max_length=50)
    capacity_ah: float | None = Field(default=None, gt=0, le=1e5)
    nominal_voltage_v: float | None = Field(default=None, gt=0, le=1e4)
    charge_cutoff_v: float | None = Field(default=None, gt=0, le=1e4)
    discharge_cutoff_v: float | None = Field(default=None, gt=0, le=1e4)
    max_charge_current_a: float | None = Field(default=None, gt=0, le=1e5)
    max_discharge_current_a: float | None = Field(default=None, gt=0, le=1e5)
    min_temperature_c: float | None = Field(default=None, ge=T_MIN, le=T_MAX)
    max_temperature_c: float | None = Field(default=None, ge=T_MIN, le=T_MAX)


class CellPatch(BaseModel):
    """Fields to change; absent fields stay as they are."""

    model_config = ConfigDict(extra="forbid")

    maker: str | None = Field(default=None, max_length=100)
    model: str | None = Field(default=None, max_length=100)
    lot: str | None = Field(default=None, max_length=100)
    received_on: date | None = None
    notes: str | None = Field(default=None, max_length=10_000)
    chemistry: str | None = Field(default=None, min_length=1, max_length=50)
    capacity_ah: float | None = Field(default=None, gt=0, le=1e5)
    nominal_voltage_v: float | None = Field(default=None, gt=0, le=1e4)
    charge_cutoff_v: float | None = Field(default=None, gt=0, le=1e4)
    discharge_cutoff_v: float | None = Field(default=None, gt=0, le=1e4)
    max_charge_current_a: float | None = Field(default=None, gt=0, le=1e5)
    max_discharge_current_a: float | None = Field(default=None, gt=0, le=1e5)
    min_temperature_c: float | None = Field(default=None, ge=T_MIN, le=T_MAX)
    max_temperature_c: float | None = Field(default=None, ge=T_MIN, le=T_MAX)


def _specs_dir() -> Any:
    return resources.files("labdaq.seeds") / "cells"


def list_specs() -> list[str]:
    """Names of the shipped cell specifications."""
    return sorted(
        p.name.rsplit(".", 1)[0] for p in _specs_dir().iterdir() if p.name.endswith(".yaml")
    )


@cache
def load_spec(name: str) -> dict[str, Any]:
    """The electrical fields of a shipped specification (read with plain YAML, so the API
    does not import the simulators' cell model)."""
    if name not in list_specs():
        raise Invalid(
            "unknown cell specification",
            [{"loc": "spec", "msg": f"no specification {name!r}; available: {list_specs()}"}],
        )
    doc = yaml.safe_load((_specs_dir() / f"{name}.yaml").read_text())
    return {k: doc.get(k) for k in SPEC_FIELDS}


def _snapshot(cell: m.Cell) -> dict[str, Any]:
    out: dict[str, Any] = {"serial": cell.serial, "spec_name": cell.spec_name}
    for k in EDITABLE:
        v = getattr(cell, k)
        out[k] = v.isoformat() if isinstance(v, date) else v
    return out


def _check_window(values: dict[str, Any]) -> None:
    problems: list[dict[str, Any]] = []
    for k in ("chemistry", "capacity_ah", "charge_cutoff_v", "discharge_cutoff_v"):
        if values.get(k) is None:
            problems.append({"loc": k, "msg": "required (give it, or a spec that has it)"})
    lo, hi = values.get("discharge_cutoff_v"), values.get("charge_cutoff_v")
    if lo is not None and hi is not None and lo >= hi:
        problems.append(
            {"loc": "discharge_cutoff_v", "msg": f"{lo} V must be below charge_cutoff_v {hi} V"}
        )
    t_lo, t_hi = values.get("min_temperature_c"), values.get("max_temperature_c")
    if t_lo is not None and t_hi is not None and t_lo >= t_hi:
        problems.append(
            {"loc": "min_temperature_c",
             "msg": f"{t_lo} °C must be below max_temperature_c {t_hi} °C"}
        )
    if problems:
        raise Invalid("cell is not valid", problems)


async def create_cell(session: AsyncSession, body: CellCreate, actor: str) -> m.Cell:
    values: dict[str, Any] = {}
    if body.spec is not None:
        values.update(load_spec(body.spec))
    given = body.model_dump(exclude_unset=True, exclude={"spec", "serial"})
    values.update({k: v for k, v in given.items() if v is not None})
    _check_window(values)
    if await session.scalar(select(m.Cell.id).where(m.Cell.serial == body.serial)) is not None:
        raise Conflict(f"a cell with serial {body.serial!r} exists")
    cell = m.Cell(serial=body.serial, spec_name=body.spec, **values)
    session.add(cell)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent request registered the same serial
        raise Conflict(f"a cell with serial {body.serial!r} exists") from exc
    session.add(
        m.Event(
            kind="audit",
            message=f"cell {cell.serial} registered",
            data={"cell_id": cell.id, "before": None, "after": _snapshot(cell)},
            actor=actor,
        )
    )
    return cell


async def get_cell(session: AsyncSession, cell_id: int) -> m.Cell:
    cell = await session.get(m.Cell, cell_id)
    if cell is None:
        raise NotFound(f"no cell {cell_id}")
    return cell


async def update_cell(
    session: AsyncSession, cell_id: int, patch: CellPatch, actor: str
) -> m.Cell:
    cell = await get_cell(session, cell_id)
    changes = patch.model_dump(exclude_unset=True)
    electrical = {"chemistry", "capacity_ah", "charge_cutoff_v", "discharge_cutoff_v"}
    nulled = [k for k in electrical if k in changes and changes[k] is None]
    if nulled:
        raise Invalid("cell is not valid", [{"loc": k, "msg": "may not be null"} for k in nulled])
    before = _snapshot(cell)
    merged = {**before, **{k: v for k, v in changes.items()}}
    _check_window(merged)
    for k, v in changes.items():
        setattr(cell, k, v)
    after = _snapshot(cell)
    changed = {k: {"before": before[k], "after": after[k]} for k in after if before[k] != after[k]}
    if changed:
        cell.updated_at = m.utcnow()
        session.add(
            m.Event(
                kind="audit",
                message=f"cell {cell.serial} edited: {', '.join(sorted(changed))}",
                data={"cell_id": cell.id, "before": before, "after": after},
                actor=actor,
            )
        )
    await session.flush()
    return cell


async def list_cells(
    session: AsyncSession,
    limit: int,
    offset: int,
    chemistry: str | None = None,
    serial: str | None = None,
) -> list[m.Cell]:
    q = select(m.Cell).order_by(m.Cell.id).limit(limit).offset(offset)
    if chemistry is not None:
        q = q.where(m.Cell.chemistry == chemistry)
    if serial is not None:
        q = q.where(m.Cell.serial == serial)
    return list((await session.scalars(q)).all())


async def run_ids_by_cell(session: AsyncSession, cell_ids: list[int]) -> dict[int, list[int]]:
    """Each cell's runs, oldest first (one query for a whole page of cells)."""
    out: dict[int, list[int]] = {i: [] for i in cell_ids}
    if not cell_ids:
        return out
    rows = await session.execute(
        select(m.Run.cell_id, m.Run.id).where(m.Run.cell_id.in_(cell_ids)).order_by(m.Run.id)
    )
    for cell_id, run_id in rows:
        out[cell_id].append(run_id)
    return out


async def cell_events(session: AsyncSession, cell_id: int) -> list[m.Event]:
    """The cell's audit trail (events without a run that name the cell)."""
    rows = await session.scalars(
        select(m.Event)
        .where(m.Event.run_id.is_(None), m.Event.kind == "audit")
        .order_by(m.Event.id)
    )
    # JSON path filters differ between SQLite and PostgreSQL; cells are edited rarely, so
    # filtering in Python keeps one portable query.
    return [e for e in rows.all() if (e.data or {}).get("cell_id") == cell_id]
