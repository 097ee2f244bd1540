"""Load an instruments file into the database: the lab's instruments, channels, wiring, cells.

One job: compare a validated configuration (labdaq.instruments_config) with the
instruments, channels and cells in the database, list the differences, and, unless it is a
dry run, make them in the caller's transaction (the caller commits once, so a refused or
failed apply changes nothing). Used by ``labdaq instruments apply``, ``labdaq serve``
(the file named by ``instruments_file``) and ``PUT /api/v1/instruments``.

Rules a lab relies on:

- A full apply makes the database match the file: instruments and channels missing from
  the file are removed. Rows that past runs reference are kept, disabled, for their
  history; a run still active (queued, running, paused) on a channel refuses the removal,
  naming the run.
- On a channel with an active run, the wiring, and the driver, resource and options of its
  instrument, do not change under it: the apply is refused naming the run. The run keeps
  a snapshot of the wiring it started with (``runs.wiring``).
- Cells named by ``[[cells]]`` are created or updated by serial; never removed (runs
  reference them).
- Errors name the file, the entry and the field (and the line, where the text gives it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.errors import Conflict, Invalid
from labdaq.instruments_config import (
    CellConfig,
    InstrumentConfig,
    InstrumentsConfig,
    LoadedConfig,
    Loc,
    driver_problems,
    wiring_problems,
)
from labdaq.storage import models as m

_CELL_FIELDS = ("chemistry", "spec_name", "capacity_ah", "nominal_voltage_v", "charge_cutoff_v",
                "discharge_cutoff_v", "max_charge_current_a", "max_discharge_current_a",
                "min_temperature_c", "max_temperature_c")


@dataclass(frozen=True)
class Change:
    """One difference between the file and the database."""

    action: str  # "add", "update", "remove", "disable"
    kind: str  # "instrument", "channel", "cell"
    name: str
    detail: str = ""

    def line(self) -> str:
        mark = {"add": "+", "update": "~", "remove": "-", "disable": "-"}[self.action]
        text = f"{mark} {self.kind} {self.name}"
        return f"{text}: {self.detail}" if self.detail else text

    def as_dict(self) -> dict[str, str]:
        return {"action": self.action, "kind": self.kind, "name": self.name,
                "detail": self.detail}


@dataclass
class ApplyResult:
    """What an apply changed (or, dry run, would change)."""

    source: str
    dry_run: bool
    changes: list[Change] = field(default_factory=list)

    def summary(self) -> str:
        counts: dict[str, int] = {}
        for c in self.changes:
            counts[c.action] = counts.get(c.action, 0) + 1
        if not counts:
            return "no changes"
        order = ("add", "update", "disable", "remove")
        return ", ".join(f"{counts[a]} to {a}" for a in order if a in counts)


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"wiring": {"thermocouple": {"channel": 101}}}`` -> ``{"wiring.thermocouple.channel":
    101}``, so a diff names the one setting that changed."""
    if isinstance(value, Mapping) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(_flat(item, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: None if isinstance(value, Mapping) else value}


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """One ``key old -> new`` per changed (possibly nested) setting."""
    before, after = _flat(old), _flat(new)
    keys = list(after) + [k for k in before if k not in after]
    return [f"{k} {before.get(k)!r} -> {after.get(k)!r}" for k in keys
            if before.get(k) != after.get(k)]


def _channel_values(inst: InstrumentConfig, index: int, cell_ids: Mapping[str, int],
                    ) -> dict[str, Any]:
    ch = next(c for c in inst.channels if c.index == index)
    return {
        "name": ch.name or f"{inst.name}/{ch.index}",
        "max_current_a": ch.max_current_a,
        "max_voltage_v": ch.max_voltage_v,
        "aux": ch.wiring(),
        "default_cell_id": cell_ids.get(ch.cell) if ch.cell else None,
        "enabled": inst.enabled,
    }


class _Plan:
    """Differences and refusals, computed before anything is written."""

    def __init__(self, loaded: LoadedConfig) -> None:
        self.loaded = loaded
        self.changes: list[Change] = []
        self.refusals: list[str] = []
        self.problems: list[tuple[str, str]] = []  # (where, what)
        # Callables (session) -> awaitable. Removals go first, so a name a removed row
        # held is free for the row that takes it over.
        self.removals: list[Any] = []
        self.ops: list[Any] = []
        self.cell_serials: dict[int, str] = {}  # cell id -> serial (database)

    def where(self, loc: Loc) -> str:
        return self.loaded.where(loc)

    def refuse(self, who: str, why: str) -> None:
        self.refusals.append(f"{who}: {why}")


def _runs_text(run_ids: list[int]) -> str:
    ids = sorted(set(run_ids))
    return ("run " if len(ids) == 1 else "runs ") + ", ".join(str(i) for i in ids)


async def apply_instruments(session: AsyncSession, loaded: LoadedConfig, *, actor: str,
                            dry_run: bool = False, partial: bool = False) -> ApplyResult:
    """Make the database match ``loaded`` (``partial``: only add or update its entries,
    remove nothing). Raises Invalid (a reference the database cannot satisfy) or Conflict
    (an active run in the way), each naming the file, entry and field; nothing is written
    then."""
    cfg = loaded.config
    plan = _Plan(loaded)
    instruments = {r.name: r for r in (await session.scalars(select(m.Instrument))).all()}
    channels = (await session.scalars(select(m.Channel))).all()
    by_instrument: dict[int, dict[int, m.Channel]] = {}
    for ch_row in channels:
        by_instrument.setdefault(ch_row.instrument_id, {})[ch_row.index] = ch_row
    cells = {c.serial: c for c in (await session.scalars(select(m.Cell))).all()}
    active: dict[int, list[int]] = {}
    for run_id, ch_id in (await session.execute(
            select(m.Run.id, m.Run.channel_id).where(
                m.Run.state.in_([s.value for s in m.ACTIVE_STATES])))).all():
        active.setdefault(ch_id, []).append(run_id)
    used = set((await session.scalars(select(m.Run.channel_id).distinct())).all())

    # References: wiring to instruments, channels to cells.
    others = {} if not partial else {
        name: (r.driver, r.options or {}) for name, r in instruments.items()
        if r.enabled and name not in {i.name for i in cfg.instruments}}
    entries = [inst.model_dump() for inst in cfg.instruments]
    for loc, msg in [*driver_problems(entries), *wiring_problems(cfg, others)]:
        plan.problems.append((plan.where(loc), msg))
    file_cells = {c.serial for c in cfg.cells}
    for i, inst in enumerate(cfg.instruments):
        for j, ch in enumerate(inst.channels):
            if ch.cell and ch.cell not in file_cells and ch.cell not in cells:
                plan.problems.append((
                    plan.where(("instruments", i, "channels", j, "cell")),
                    f"no cell {ch.cell!r} in the [[cells]] tables or in the database; add a "
                    "[[cells]] table for it"))
    if plan.problems:
        raise Invalid(f"{loaded.source}: the configuration does not fit the lab",
                      [{"loc": where, "msg": msg} for where, msg in plan.problems])
    plan.cell_serials = {c.id: serial for serial, c in cells.items()}

    _plan_cells(plan, cfg, cells)
    for i, inst in enumerate(cfg.instruments):
        _plan_instrument(plan, i, inst, instruments.get(inst.name), by_instrument, active, used,
                         partial)
    if not partial:
        names = {i.name for i in cfg.instruments}
        for name, row in instruments.items():
            if name not in names:
                _plan_removal(plan, row, by_instrument.get(row.id, {}), active, used)
    if plan.refusals:
        raise Conflict(f"{loaded.source}: refused, nothing was changed: "
                       + "; ".join(plan.refusals))
    result = ApplyResult(loaded.source, dry_run, plan.changes)
    if dry_run or not plan.changes:
        return result
    for op in [*plan.removals, *plan.ops]:
        await op(session)
        await session.flush()
    session.add(m.Event(
        kind="audit",
        message=f"instruments applied from {loaded.source}: {result.summary()}",
        data={"source": loaded.source, "changes": [c.as_dict() for c in plan.changes]},
        actor=actor,
    ))
    await session.flush()
    return result


def _plan_cells(plan: _Plan, cfg: InstrumentsConfig, cells: Mapping[str, m.Cell]) -> None:
    for cell in cfg.cells:
        row = cells.get(cell.serial)
        values = {k: getattr(cell, k) for k in _CELL_FIELDS}
        if row is None:
            plan.changes.append(Change("add", "cell", cell.serial,
                                       f"{cell.chemistry}, {cell.capacity_ah:g} Ah"))
            plan.ops.append(_add_cell(cell))
            continue
        diff = _differences({k: getattr(row, k) for k in _CELL_FIELDS}, values)
        if diff:
            plan.changes.append(Change("update", "cell", cell.serial, "; ".join(diff)))
            plan.ops.append(_set(row, values))


def _plan_instrument(plan: _Plan, i: int, inst: InstrumentConfig, row: m.Instrument | None,
                     by_instrument: Mapping[int, Mapping[int, m.Channel]],
                     active: Mapping[int, list[int]], used: set[int], partial: bool) -> None:
    values = {"driver": inst.driver, "resource": inst.resource, "options": inst.options,
              "enabled": inst.enabled, "node": inst.node}
    if row is None:
        plan.changes.append(Change("add", "instrument", inst.name,
                                   f"{inst.driver} at {inst.resource}"
                                   + ("" if inst.enabled else " (disabled)")))
        for ch in inst.channels:
            plan.changes.append(Change("add", "channel", ch.name or f"{inst.name}/{ch.index}",
                                       _wiring_text(ch.wiring(), ch.cell)))
        plan.ops.append(_add_instrument(inst))
        return
    existing = by_instrument.get(row.id, {})
    busy = [r for ch in existing.values() for r in active.get(ch.id, [])]
    diff = _differences({"driver": row.driver, "resource": row.resource,
                         "options": row.options or {}, "enabled": row.enabled,
                         "node": row.node}, values)
    if diff:
        if busy:
            fields = dict.fromkeys(d.split(" ", 1)[0].split(".")[0] for d in diff)
            plan.refuse(plan.where(("instruments", i)),
                        f"{_runs_text(busy)} active on its channels; its "
                        f"{', '.join(fields)} cannot change under a run (stop the run or "
                        "wait until it ends)")
        plan.changes.append(Change("update", "instrument", inst.name, "; ".join(diff)))
        plan.ops.append(_set(row, values))
    for j, ch in enumerate(inst.channels):
        ch_name = ch.name or f"{inst.name}/{ch.index}"
        ch_row = existing.get(ch.index)
        if ch_row is None:
            plan.changes.append(Change("add", "channel", ch_name,
                                       _wiring_text(ch.wiring(), ch.cell)))
            plan.ops.append(_add_channel(row, inst, ch.index))
            continue
        plan.ops.append(_update_channel(ch_row, inst, ch.index))
        # Cells compare by serial: a new cell has no id until the apply runs.
        old = {"name": ch_row.name, "max_current_a": ch_row.max_current_a,
               "max_voltage_v": ch_row.max_voltage_v, "wiring": ch_row.aux,
               "enabled": ch_row.enabled}
        new = {"name": ch_name, "max_current_a": ch.max_current_a,
               "max_voltage_v": ch.max_voltage_v, "wiring": ch.wiring(),
               "enabled": inst.enabled}
        ch_diff = _differences(old, new)
        old_cell = plan.cell_serials.get(ch_row.default_cell_id or -1)
        if old_cell != ch.cell:
            ch_diff.append(f"cell {old_cell!r} -> {ch.cell!r}")
        if ch_diff:
            runs = active.get(ch_row.id, [])
            if runs and old["wiring"] != new["wiring"]:
                plan.refuse(plan.where(("instruments", i, "channels", j)),
                            f"{_runs_text(runs)} active on channel {ch_row.name}; its wiring "
                            "cannot change under a run (the run keeps the wiring it started "
                            "with; stop it or wait until it ends)")
            plan.changes.append(Change("update", "channel", ch_name, "; ".join(ch_diff)))
    if partial:
        return
    wanted = {ch.index for ch in inst.channels}
    for index, ch_row in existing.items():
        if index not in wanted:
            _plan_channel_removal(plan, ch_row, f"instrument {inst.name!r}", active, used,
                                  plan.where(("instruments", i, "channels")))


def _plan_channel_removal(plan: _Plan, ch_row: m.Channel, owner: str,
                          active: Mapping[int, list[int]], used: set[int], where: str) -> None:
    runs = active.get(ch_row.id, [])
    if runs:
        plan.refuse(where, f"channel {ch_row.name} of {owner} is not in the file but "
                           f"{_runs_text(runs)} is active on it; stop the run or wait until "
                           "it ends")
        return
    if ch_row.id in used:
        if ch_row.enabled:
            plan.changes.append(Change("disable", "channel", ch_row.name,
                                       "not in the file; kept for the runs that used it"))
            plan.removals.append(_set(ch_row, {"enabled": False}))
        return
    plan.changes.append(Change("remove", "channel", ch_row.name, "not in the file"))
    plan.removals.append(_delete_channel(ch_row.id))


def _plan_removal(plan: _Plan, row: m.Instrument, channels: Mapping[int, m.Channel],
                  active: Mapping[int, list[int]], used: set[int]) -> None:
    busy = [r for ch in channels.values() for r in active.get(ch.id, [])]
    where = f"instrument {row.name!r} (in the database, not in {plan.loaded.source})"
    if busy:
        plan.refuse(where, f"cannot be removed: {_runs_text(busy)} active on its channels "
                           f"({', '.join(sorted(c.name for c in channels.values()))}); stop "
                           "the run or wait until it ends, or keep the instrument in the file")
        return
    if any(ch.id in used for ch in channels.values()):
        if row.enabled or any(ch.enabled for ch in channels.values()):
            plan.changes.append(Change("disable", "instrument", row.name,
                                       "not in the file; kept for the runs that used it"))
            plan.removals.append(_set(row, {"enabled": False}))
            for ch in channels.values():
                plan.removals.append(_set(ch, {"enabled": False}))
        return
    plan.changes.append(Change("remove", "instrument", row.name, "not in the file"))
    for ch in channels.values():
        plan.removals.append(_delete_channel(ch.id))
    plan.removals.append(_delete_instrument(row.id))


def _wiring_text(aux: Mapping[str, Any] | None, cell: str | None) -> str:
    parts = []
    if cell:
        parts.append(f"cell {cell}")
    for key, value in (aux or {}).items():
        if isinstance(value, Mapping):
            value = " ".join(f"{k}={v}" for k, v in value.items())
        parts.append(f"{key} {value}")
    return ", ".join(parts)


# -- operations (run in order, after every check passed) --------------------------------


def _add_cell(cell: CellConfig) -> Any:
    async def op(session: AsyncSession) -> None:
        session.add(m.Cell(serial=cell.serial, **{k: getattr(cell, k) for k in _CELL_FIELDS}))
    return op


def _set(row: Any, values: Mapping[str, Any]) -> Any:
    async def op(session: AsyncSession) -> None:
        for key, value in values.items():
            setattr(row, key, value)
    return op


async def _cell_ids(session: AsyncSession) -> dict[str, int]:
    return {s: i for s, i in (await session.execute(select(m.Cell.serial, m.Cell.id))).all()}


def _add_instrument(inst: InstrumentConfig) -> Any:
    async def op(session: AsyncSession) -> None:
        row = m.Instrument(name=inst.name, driver=inst.driver, resource=inst.resource,
                           options=inst.options, enabled=inst.enabled, node=inst.node)
        session.add(row)
        await session.flush()
        cell_ids = await _cell_ids(session)
        for ch in inst.channels:
            session.add(m.Channel(instrument_id=row.id, index=ch.index,
                                  **_channel_values(inst, ch.index, cell_ids)))
    return op


def _add_channel(row: m.Instrument, inst: InstrumentConfig, index: int) -> Any:
    async def op(session: AsyncSession) -> None:
        session.add(m.Channel(instrument_id=row.id, index=index,
                              **_channel_values(inst, index, await _cell_ids(session))))
    return op


def _update_channel(ch_row: m.Channel, inst: InstrumentConfig, index: int) -> Any:
    async def op(session: AsyncSession) -> None:
        for key, value in _channel_values(inst, index, await _cell_ids(session)).items():
            setattr(ch_row, key, value)
    return op


def _delete_channel(channel_id: int) -> Any:
    async def op(session: AsyncSession) -> None:
        await session.execute(delete(m.Channel).where(m.Channel.id == channel_id))
    return op


def _delete_instrument(instrument_id: int) -> Any:
    async def op(session: AsyncSession) -> None:
        await session.execute(delete(m.Instrument).where(m.Instrument.id == instrument_id))
    return op


def single_instrument(cfg: InstrumentConfig, source: str = "request") -> LoadedConfig:
    """One instrument (the API's single-instrument PUT) as a configuration to apply."""
    config = InstrumentsConfig(instruments=[cfg])
    data = {"instruments": [cfg.model_dump(mode="json")]}
    return LoadedConfig(config, source, data, None)


def document(config: InstrumentsConfig, source: str = "request") -> LoadedConfig:
    """A whole configuration document received as data (the API's PUT body)."""
    return LoadedConfig(config, source, config.model_dump(mode="json"), None)
