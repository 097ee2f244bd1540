"""Run service: validate a run request, resolve it into a plan, queue it; stop; query."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq import run_queue
from labdaq.auth import ROLE_GRANTS
from labdaq.bounds import (
    INT32_MAX,
    MAX_DURATION_S,
    MIN_SAMPLE_PERIOD_S,
)
from labdaq.drivers.roles import ProgramRunner
from labdaq.errors import Conflict, Forbidden, Invalid, NotFound
from labdaq.nodes import wake_node_of_run
from labdaq.protocol import (
    CellLimits,
    InstrumentLimits,
    Protocol,
    ProtocolError,
    ResolvedProtocol,
    Safety,
    list_templates,
    load_template,
    parse_protocol,
    resolve,
)
from labdaq.run_requests import (  # noqa: F401 - re-exported for callers
    CellIn,
    CycleProtocolIn,
    DocumentText,
    RunCreate,
)
from labdaq.run_states import command_refusal
from labdaq.storage import models as m


def _cycle_document(p: CycleProtocolIn, taper_a: float) -> dict[str, Any]:
    rest = [{"step": "rest", "until": {"duration_s": p.rest_s}}] if p.rest_s > 0 else []
    return {
        "schema_version": 1,
        "name": "basic_cycle",
        "description": "CC-CV charge, rest, CC discharge, rest (the first end-to-end path)",
        "steps": [
            {
                "step": "loop",
                "count": p.cycles,
                "tag": "cycle",
                "body": [
                    {
                        "step": "cccv",
                        "current_a": p.charge_current_a,
                        "voltage_v": p.charge_voltage_v,
                        "until": {"current_below_a": taper_a, "duration_s": p.max_step_s},
                        "tag": "charge",
                    },
                    *rest,
                    {
                        "step": "cc",
                        "current_a": -p.discharge_current_a,
                        "until": {"voltage_v": p.discharge_cutoff_v, "duration_s": p.max_step_s},
                        "tag": "discharge",
                    },
                    *rest,
                ],
            }
        ],
    }


def _check_cycle(p: CycleProtocolIn, cell: m.Cell, channel: m.Channel) -> None:
    """Field-level checks of the simple cycle, reported under the request's own names."""
    problems: list[dict[str, Any]] = []

    def bad(field: str, msg: str) -> None:
        problems.append({"loc": f"protocol.{field}", "msg": msg})

    if p.charge_voltage_v > cell.charge_cutoff_v:
        bad(
            "charge_voltage_v",
            f"{p.charge_voltage_v} V is above the cell's charge cut-off {cell.charge_cutoff_v} V",
        )
    if p.discharge_cutoff_v < cell.discharge_cutoff_v:
        bad(
            "discharge_cutoff_v",
            f"{p.discharge_cutoff_v} V is below the cell's discharge "
            f"cut-off {cell.discharge_cutoff_v} V",
        )
    if p.discharge_cutoff_v >= p.charge_voltage_v:
        bad("discharge_cutoff_v", "must be below charge_voltage_v")
    if cell.max_charge_current_a is not None and p.charge_current_a > cell.max_charge_current_a:
        bad(
            "charge_current_a",
            f"{p.charge_current_a} A exceeds the cell's max charge current "
            f"{cell.max_charge_current_a} A",
        )
    if (
        cell.max_discharge_current_a is not None
        and p.discharge_current_a > cell.max_discharge_current_a
    ):
        bad(
            "discharge_current_a",
            f"{p.discharge_current_a} A exceeds the cell's max discharge "
            f"current {cell.max_discharge_current_a} A",
        )
    for fld in ("charge_current_a", "discharge_current_a"):
        val = getattr(p, fld)
        if channel.max_current_a is not None and val > channel.max_current_a:
            bad(fld, f"{val} A exceeds channel {channel.name}'s limit {channel.max_current_a} A")
    if channel.max_voltage_v is not None and p.charge_voltage_v > channel.max_voltage_v:
        bad(
            "charge_voltage_v",
            f"{p.charge_voltage_v} V exceeds channel {channel.name}'s "
            f"limit {channel.max_voltage_v} V",
        )
    if problems:
        raise Invalid("protocol does not fit the cell or channel", problems)


@functools.lru_cache(maxsize=64)
def driver_min_sample_period_s(driver: str) -> float | None:
    """The fastest sample period a driver declares (class attribute), if it declares one."""
    for ep in entry_points(group="labdaq.drivers", name=driver):
        try:
            value = getattr(ep.load(), "min_sample_period_s", None)
        except Exception:  # noqa: BLE001 - a driver that cannot load here declares nothing
            return None
        return float(value) if isinstance(value, int | float) else None
    return None


@functools.lru_cache(maxsize=64)
def _program_runner(driver: str) -> type[ProgramRunner] | None:
    """The driver's class if it runs its own step programs (ProgramRunner), else None."""
    for ep in entry_points(group="labdaq.drivers", name=driver):
        try:
            cls = ep.load()
        except Exception:  # noqa: BLE001 - a driver that cannot load here declares nothing
            return None
        return cls if isinstance(cls, type) and issubclass(cls, ProgramRunner) else None
    return None


def _check_program_runner(resolved: ResolvedProtocol, driver: str | None, prefix: str) -> None:
    """A cycler that runs its own step program (ProgramRunner, e.g. Neware BTS) gets the
    protocol translated into that program: a step it cannot express is refused now, when
    the run is created, rather than when the engine starts it."""
    cls = _program_runner(driver) if driver else None
    if cls is None:
        return
    found = cls.unrunnable_step(resolved)
    if found is not None:
        path, why = found
        raise Invalid(
            f"protocol has a step the {driver} cycler cannot run",
            [{"loc": f"{prefix}.{path}", "msg": f"{why} (the {driver} driver runs the "
              "protocol as the cycler's own step program)"}],
        )


def _durations(resolved: ResolvedProtocol) -> Iterator[tuple[str, float]]:
    """(field path, seconds) of every duration in a resolved program."""
    for st in resolved.program:
        until = getattr(st, "until", None)
        if until is not None and getattr(until, "duration_s", None) is not None:
            yield f"{st.path}.until.duration_s", until.duration_s
        for name in ("pulse_duration_s", "rest_duration_s", "stable_for_s", "timeout_s"):
            value = getattr(st, name, None)
            if value is not None:
                yield f"{st.path}.{name}", value


def _check_periods(
    req: RunCreate,
    channel: m.Channel,
    driver: str | None,
    min_sample_period_s: float,
    max_duration_s: float,
) -> None:
    """The configured bounds, which the schema cannot show: they depend on the lab."""
    problems: list[dict[str, Any]] = []
    fastest = driver_min_sample_period_s(driver) if driver else None
    floor = max(min_sample_period_s, fastest or 0.0)
    if req.sample_period_s < floor:
        why = (
            f"{driver}'s fastest period"
            if fastest and fastest >= min_sample_period_s
            else "the configured minimum"
        )
        problems.append(
            {
                "loc": "sample_period_s",
                "msg": f"{req.sample_period_s:g} s is below {why}, {floor:g} s",
            }
        )
    p = req.protocol
    if p is not None:
        for name in ("max_step_s", "rest_s"):
            value = getattr(p, name)
            if value > max_duration_s:
                problems.append(
                    {
                        "loc": f"protocol.{name}",
                        "msg": f"{value:g} s exceeds the longest duration allowed, "
                        f"{max_duration_s:g} s",
                    }
                )
        if p.max_step_s < req.sample_period_s:
            problems.append(
                {
                    "loc": "protocol.max_step_s",
                    "msg": f"{p.max_step_s:g} s is shorter than the sample period "
                    f"{req.sample_period_s:g} s",
                }
            )
    if problems:
        raise Invalid(f"run request does not fit channel {channel.name}", problems)


def resolve_request(
    req: RunCreate,
    cell: m.Cell,
    channel: m.Channel,
    voltage_margin_v: float = 0.1,
    *,
    driver: str | None = None,
    min_sample_period_s: float = MIN_SAMPLE_PERIOD_S,
    max_duration_s: float = MAX_DURATION_S,
    lab_limits: Safety | None = None,
    role: str | None = None,
) -> tuple[Protocol, ResolvedProtocol, str]:
    """Turn the request into a validated, resolved program, or raise Invalid (422) or
    Forbidden (403: ``role`` may not start this protocol; None = no token, as the
    engine's own callers, which may start only ordinary protocols).

    CPU-bound (YAML, validation, compilation): the API calls it in a worker thread.
    """
    _check_periods(req, channel, driver, min_sample_period_s, max_duration_s)
    if req.protocol is not None:
        _check_cycle(req.protocol, cell, channel)
        doc: Any = _cycle_document(
            req.protocol, req.protocol.taper_current_a or cell.capacity_ah / 20.0
        )
        prefix = "protocol"
    elif req.template is not None:
        if req.template not in list_templates():
            raise Invalid(
                "unknown template",
                [
                    {
                        "loc": "template",
                        "msg": f"no template {req.template!r}; available: {list_templates()}",
                    }
                ],
            )
        doc = None
        prefix = "template"
    else:
        doc = req.protocol_document
        prefix = "protocol_document"
    try:
        protocol = parse_protocol(doc) if doc is not None else load_template(str(req.template))
    except ProtocolError as exc:
        raise Invalid(
            "protocol is not valid",
            [{"loc": f"{prefix}.{e['loc']}".rstrip("."), "msg": e["msg"]} for e in exc.errors],
        ) from exc
    # Who may run it is known only once the document is read; checked before it is
    # resolved, so a refused abuse protocol is refused for the role, not for the cell.
    _check_starter(protocol, req, role, prefix)
    try:
        max_i = channel.max_current_a
        resolved = resolve(
            protocol,
            CellLimits(
                capacity_ah=cell.capacity_ah,
                charge_cutoff_v=cell.charge_cutoff_v,
                discharge_cutoff_v=cell.discharge_cutoff_v,
                max_charge_current_a=cell.max_charge_current_a or max_i or cell.capacity_ah,
                max_discharge_current_a=cell.max_discharge_current_a or max_i or cell.capacity_ah,
                voltage_margin_v=voltage_margin_v,
                min_temperature_c=cell.min_temperature_c,
                max_temperature_c=cell.max_temperature_c,
            ),
            InstrumentLimits(
                max_current_a=max_i or 1e9,
                max_voltage_v=channel.max_voltage_v,
            ),
            lab=lab_limits,
        )
    except ProtocolError as exc:
        raise Invalid(
            "protocol is not valid for this cell and channel",
            [{"loc": f"{prefix}.{e['loc']}".rstrip("."), "msg": e["msg"]} for e in exc.errors],
        ) from exc
    too_long = [(path, v) for path, v in _durations(resolved) if v > max_duration_s]
    if too_long:
        raise Invalid(
            "protocol has durations beyond the longest allowed",
            [
                {
                    "loc": f"{prefix}.{path}",
                    "msg": f"{v:g} s exceeds the longest duration allowed, {max_duration_s:g} s",
                }
                for path, v in too_long
            ],
        )
    _check_program_runner(resolved, driver, prefix)
    wired = channel.aux or {}
    needs = {"eis": "impedance", "set_temperature": "chamber"}
    unsupported = [
        st for st in resolved.program if st.step in needs and not wired.get(needs[st.step])
    ]
    if unsupported:
        raise Invalid(
            "protocol needs instruments this channel does not have",
            [
                {
                    "loc": f"{prefix}.{st.path}",
                    "msg": f"a {st.step} step needs "
                    f"{'an impedance analyser' if st.step == 'eis' else 'a climate chamber'} "
                    f"assigned to channel {channel.name}; none is",
                }
                for st in unsupported
            ],
        )
    return protocol, resolved, prefix


def _check_starter(protocol: Protocol, req: RunCreate, role: str | None, prefix: str) -> None:
    """An abuse protocol needs an engineer or admin and a reason; an ordinary one an
    operator (technician or admin). ``role`` None: a caller without a token."""
    if protocol.abuse:
        if role not in ROLE_GRANTS["abuse"]:
            allowed = " or ".join(sorted(str(r) for r in ROLE_GRANTS["abuse"]))
            raise Forbidden(f"{prefix} is an abuse protocol (abuse: true): it may exceed "
                            f"the cell's ratings, so only an {allowed} token may start "
                            f"it; this token's role is {role!r}")
        if not (req.reason or "").strip():
            raise Invalid("an abuse protocol needs a reason", [{
                "loc": "reason",
                "msg": "give the reason for this abuse test (it goes into the audit log)"}])
    elif role is not None and role not in ROLE_GRANTS["operate"]:
        raise Forbidden(f"role {role!r} may not start an ordinary run (only an abuse "
                        "protocol, abuse: true)")


def active_limits(resolved: ResolvedProtocol) -> dict[str, dict[str, Any]]:
    """``{limit: {"value": v, "source": "cell"|"instrument"|"protocol"|"lab"}}`` of every
    limit set for the run."""
    lim = resolved.limits
    return {name: {"value": getattr(lim, name), "source": source}
            for name, source in lim.sources.items() if getattr(lim, name) is not None}


async def _channel(session: AsyncSession, ref: str | int) -> m.Channel:
    # A name made of digits is an id only when it fits the id column.
    as_id = int(ref) if isinstance(ref, int) or (ref.isascii() and ref.isdigit()) else None
    if as_id is not None and 1 <= as_id <= INT32_MAX:
        ch = await session.get(m.Channel, as_id)
    else:
        ch = await session.scalar(select(m.Channel).where(m.Channel.name == ref))
    if ch is None or not ch.enabled:
        names = (await session.scalars(select(m.Channel.name).where(m.Channel.enabled))).all()
        msg = (f"channel {ref!r} is disabled or removed in the instruments configuration"
               if ch is not None else f"no channel {ref!r}")
        raise Invalid(
            f"unknown channel {ref!r}",
            [{"loc": "channel", "msg": f"{msg}; known: {sorted(names)}"}],
        )
    return ch


async def _cell(session: AsyncSession, req: RunCreate, channel: m.Channel) -> m.Cell:
    if req.cell_id is None and req.cell_serial is None and req.cell is None:
        default = (await session.get(m.Cell, channel.default_cell_id)
                   if channel.default_cell_id is not None else None)
        if default is None:
            raise Invalid(
                "no cell given",
                [{"loc": "cell", "msg": f"channel {channel.name} has no default cell; give "
                  "cell_id, cell_serial or cell"}],
            )
        return default
    if req.cell_id is not None:
        cell = await session.get(m.Cell, req.cell_id)
        if cell is None:
            raise Invalid("unknown cell", [{"loc": "cell_id", "msg": f"no cell {req.cell_id}"}])
        return cell
    if req.cell_serial is not None:
        cell = await session.scalar(select(m.Cell).where(m.Cell.serial == req.cell_serial))
        if cell is None:
            raise Invalid(
                "unknown cell",
                [{"loc": "cell_serial", "msg": f"no cell with serial {req.cell_serial!r}"}],
            )
        return cell
    assert req.cell is not None
    cell = await session.scalar(select(m.Cell).where(m.Cell.serial == req.cell.serial))
    if cell is None:
        cell = m.Cell(**req.cell.model_dump())
        session.add(cell)
        await session.flush()
    return cell


async def create_run(
    session: AsyncSession,
    req: RunCreate,
    actor: str,
    voltage_margin_v: float = 0.1,
    *,
    min_sample_period_s: float = MIN_SAMPLE_PERIOD_S,
    max_duration_s: float = MAX_DURATION_S,
    lab_limits: Safety | None = None,
    role: str | None = None,
) -> m.Run:
    """Validate, resolve and queue a run; ``role`` is the token's (see resolve_request)."""
    channel = await _channel(session, req.channel)
    cell = await _cell(session, req, channel)
    if not req.queue and (busy := await run_queue.busy_with(session, channel.id)) is not None:
        # Early, before the protocol is resolved; checked again with the channel locked.
        raise Conflict(f"channel {channel.name} is busy with run {busy}")
    driver = await session.scalar(
        select(m.Instrument.driver).where(m.Instrument.id == channel.instrument_id)
    )
    # Off the event loop: a large document takes a while to parse, and /health and every
    # other request must keep answering meanwhile.
    protocol, resolved, _ = await asyncio.to_thread(
        functools.partial(
            resolve_request,
            req,
            cell,
            channel,
            voltage_margin_v,
            driver=driver,
            min_sample_period_s=min_sample_period_s,
            max_duration_s=max_duration_s,
            lab_limits=lab_limits,
            role=role,
        )
    )
    digest = protocol.content_hash()
    protocol_id = await session.scalar(
        select(m.Protocol.id).where(m.Protocol.content_hash == digest))
    if protocol_id is None:
        # Two requests with one new document at once (two API processes) both get here:
        # the second insert waits for the first and does nothing, and both use its row.
        insert = (postgresql.insert if session.get_bind().dialect.name == "postgresql"
                  else sqlite.insert)
        await session.execute(insert(m.Protocol).values(
            name=protocol.name, content_hash=digest, document=protocol.model_dump(mode="json"),
        ).on_conflict_do_nothing(index_elements=["content_hash"]))
        protocol_id = await session.scalar(
            select(m.Protocol.id).where(m.Protocol.content_hash == digest))
    run = m.Run(
        channel_id=channel.id,
        cell_id=cell.id,
        protocol_id=protocol_id,
        state=m.RunState.queued.value,
        plan=resolved.model_dump(mode="json"),
        sample_period_s=req.sample_period_s,
        step_count=len(resolved.program),
        # The wiring as it is now: later changes to the channel do not rewrite history
        # (and labdaq.instruments_apply refuses them while this run is active).
        wiring=channel.aux,
        not_before=req.not_before,
    )
    # Its place in the channel's queue, taken with the channel locked (run_queue.py).
    await run_queue.enqueue(session, run, channel, req.queue)
    session.add(run)
    try:
        await session.flush()
    except IntegrityError as exc:
        # The partial unique index caught a concurrent request for the same place.
        raise Conflict(f"channel {channel.name} is busy") from exc
    position = (await run_queue.positions(session, [run])).get(run.id)
    await wake_node_of_run(session, run, "queued")  # its node starts it without polling
    session.add(
        m.Event(
            run_id=run.id,
            kind="audit",
            message=f"run created on channel {channel.name}"
            + (f", queue position {position}" if position and position > 1 else ""),
            # Each active limit with the source that set it (cell, instrument, protocol,
            # lab): the tightest of them all (labdaq.protocol.limits).
            data={"request": req.model_dump(mode="json"), "queue_position": position,
                  "limits": active_limits(resolved),
                  # Before/after like every other change: nothing, then the run as made.
                  "before": None,
                  "after": {"run_id": run.id, "state": run.state, "channel": channel.name,
                            "cell_id": cell.id, "cell_serial": cell.serial,
                            "protocol_id": protocol_id, "protocol_hash": digest,
                            "sample_period_s": run.sample_period_s,
                            "queue_position": position, "not_before":
                            run.not_before.isoformat() if run.not_before else None},
                  # An abuse run says so, and why, at the top of its audit record.
                  **({"abuse": True, "reason": req.reason} if protocol.abuse else {})},
            actor=actor,
        )
    )
    return run


async def get_run(session: AsyncSession, run_id: int) -> m.Run:
    run = await session.get(m.Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    return run


async def request_stop(session: AsyncSession, run_id: int, actor: str) -> m.Run:
    run = await get_run(session, run_id)
    if (why := command_refusal(run.state, "stop")) is not None:
        raise Conflict(f"run {run_id} {why}")
    # A waiting run touched no instrument yet: it is cancelled here (unless the engine
    # claimed it meanwhile; then the engine stops it like any running run).
    if run.state in run_queue.WAITING and await run_queue.cancel(session, run, actor):
        return run
    if (why := command_refusal(run.state, "stop")) is not None:
        raise Conflict(f"run {run_id} {why}")
    run.requested_action = "stop"
    session.add(m.Event(run_id=run_id, kind="audit", message="stop requested", actor=actor))
    await wake_node_of_run(session, run, "stop")
    return run


async def request_pause(session: AsyncSession, run_id: int, actor: str) -> m.Run:
    run = await get_run(session, run_id)
    if (why := command_refusal(run.state, "pause")) is not None:
        raise Conflict(f"run {run_id} {why}")
    run.requested_action = "pause"
    session.add(m.Event(run_id=run_id, kind="audit", message="pause requested", actor=actor))
    await wake_node_of_run(session, run, "pause")
    return run


async def request_resume(session: AsyncSession, run_id: int, actor: str) -> m.Run:
    run = await get_run(session, run_id)
    if (why := command_refusal(run.state, "resume")) is not None:
        raise Conflict(f"run {run_id} {why}")
    run.requested_action = "resume"
    session.add(m.Event(run_id=run_id, kind="audit", message="resume requested", actor=actor))
    await wake_node_of_run(session, run, "resume")
    return run


async def list_samples(
    session: AsyncSession, run_id: int, after_seq: int, limit: int
) -> list[m.Sample]:
    await get_run(session, run_id)
    rows = await session.scalars(
        select(m.Sample)
        .where(m.Sample.run_id == run_id, m.Sample.seq > after_seq)
        .order_by(m.Sample.seq)
        .limit(limit)
    )
    return list(rows.all())


async def require_run(session: AsyncSession, run_id: int) -> None:
    """NotFound unless the run exists (its id only: the row, with its plan, is not read)."""
    if await session.scalar(select(m.Run.id).where(m.Run.id == run_id)) is None:
        raise NotFound(f"no run {run_id}")


async def list_runs(
    session: AsyncSession, state: str | None, limit: int, offset: int
) -> list[m.Run]:
    q = select(m.Run).order_by(m.Run.id.desc()).limit(limit).offset(offset)
    if state is not None:
        q = q.where(m.Run.state == state)
    return list((await session.scalars(q)).all())


async def list_steps(session: AsyncSession, run_id: int) -> list[m.Step]:
    await get_run(session, run_id)
    rows = await session.scalars(
        select(m.Step).where(m.Step.run_id == run_id).order_by(m.Step.step_number)
    )
    return list(rows.all())


async def list_events(session: AsyncSession, run_id: int) -> list[m.Event]:
    await get_run(session, run_id)
    rows = await session.scalars(
        select(m.Event).where(m.Event.run_id == run_id).order_by(m.Event.id)
    )
    return list(rows.all())


async def list_spectra(session: AsyncSession, run_id: int) -> list[m.EisSpectrum]:
    await get_run(session, run_id)
    rows = await session.scalars(
        select(m.EisSpectrum).where(m.EisSpectrum.run_id == run_id).order_by(m.EisSpectrum.id)
    )
    return list(rows.all())


async def preview_run(session: AsyncSession, req: RunCreate, **create: Any) -> dict[str, Any]:
    """What ``create_run`` would start, storing nothing (``POST /api/v1/runs?dry_run=true``).

    ``create_run`` itself runs — every check (422, 409), the resolution against the cell
    and channel — and the session is then rolled back, so a dry run can never disagree
    with the real request. The caller's session must hold nothing else to commit. On
    PostgreSQL the ids it drew from the sequences are not reused (gaps in run ids).
    """
    new_cell = req.cell is not None and await session.scalar(
        select(m.Cell.id).where(m.Cell.serial == req.cell.serial)) is None
    run = await create_run(session, req, actor="dry run", **create)
    channel = await session.get(m.Channel, run.channel_id)
    cell = await session.get(m.Cell, run.cell_id)
    proto = await session.get(m.Protocol, run.protocol_id)
    assert channel is not None and cell is not None and proto is not None
    out = {
        "dry_run": True,
        "channel": channel.name,
        "cell": {"id": None if new_cell else cell.id, "serial": cell.serial,
                 "chemistry": cell.chemistry, "capacity_ah": cell.capacity_ah,
                 "charge_cutoff_v": cell.charge_cutoff_v,
                 "discharge_cutoff_v": cell.discharge_cutoff_v},
        "protocol_name": proto.name,
        "content_hash": proto.content_hash,
        "sample_period_s": run.sample_period_s,
        "limits": dict(run.plan["limits"]),
        "program": list(run.plan["program"]),
    }
    await session.rollback()
    return out
