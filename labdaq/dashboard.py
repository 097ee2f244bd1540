"""What the web dashboard asks of the database: the lab at a glance, safety alarms and
their acknowledgement (audited), and how far a run has got through its program."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq import nodes
from labdaq.auth import ROLE_GRANTS
from labdaq.errors import Conflict, NotFound
from labdaq.storage import models as m

# Events that raise the dashboard's alarm banner until someone acknowledges them.
ALARM_KIND = "safety"
ACK_KEY = "acknowledges"
# A run ended by its safety limits shows this channel state until a new run starts.
SAFETY_STOP = "safety_stop"


def grants_of(role: str) -> list[str]:
    """The grants (labdaq.auth.ROLE_GRANTS) a role holds, for the page to hide the rest."""
    return sorted(g for g, roles in ROLE_GRANTS.items() if role in roles)


def progress(plan: dict[str, Any], step_index: int, cycle_index: int) -> float | None:
    """Fraction of the program done, counting the outermost loop's body once per planned
    iteration; None for an empty plan. Loops that end early on a condition (capacity
    fade) finish sooner than this says, so it is a lower bound on how far the run is."""
    program = plan.get("program") or []
    n = len(program)
    if n == 0:
        return None
    total = float(n)
    done = float(min(step_index, n))
    for i, st in enumerate(program):
        if st.get("step") == "loop_start":
            end = int(st.get("end_index", i))
            body = end - i
            iterations = max(int(st.get("max_iterations", 1)), 1)
            total = n + (iterations - 1) * body
            if i <= step_index <= end:
                # cycle_index is the loop iteration under way, from 1.
                done = step_index + min(max(cycle_index - 1, 0), iterations - 1) * body
            elif step_index > end:
                done = step_index + (iterations - 1) * body
            break
    return max(0.0, min(1.0, done / total))


async def latest_samples(session: AsyncSession, runs: list[m.Run]) -> dict[int, m.Sample]:
    """The newest committed sample of each run (by its progress column ``last_seq``)."""
    keys = [(r.id, r.last_seq) for r in runs if r.last_seq > 0]
    if not keys:
        return {}
    rows = (await session.scalars(
        select(m.Sample).where(tuple_(m.Sample.run_id, m.Sample.seq).in_(keys))
    )).all()
    return {s.run_id: s for s in rows}


async def overview(session: AsyncSession, down_after_s: float) -> list[dict[str, Any]]:
    """Every enabled channel with its instrument, state, the run on it (or the last one,
    when that ended in a safety stop) with progress, and its newest V/I/T. A running or
    paused run on a node that is down (``down_after_s``, labdaq.nodes) shows as
    ``node_down``, and so does its channel."""
    channels = (await session.execute(
        select(m.Channel, m.Instrument)
        .join(m.Instrument, m.Instrument.id == m.Channel.instrument_id)
        .where(m.Channel.enabled).order_by(m.Channel.id)
    )).all()
    ids = [ch.id for ch, _ in channels]
    # Each channel's run to show: the one running or paused on it; else the first one
    # waiting; else its newest (whose end, a safety stop, the channel still shows).
    newest: dict[int, m.Run] = {}
    rank = {m.RunState.running.value: 0, m.RunState.paused.value: 0,
            m.RunState.queued.value: 1}
    if ids:
        for row in (await session.scalars(
            select(m.Run).where(m.Run.channel_id.in_(ids)).order_by(m.Run.id)
        )).all():
            held = newest.get(row.channel_id)
            if held is None or rank.get(row.state, 2) < rank.get(held.state, 2) or (
                    rank.get(row.state, 2) == 2 and rank.get(held.state, 2) == 2):
                newest[row.channel_id] = row
    active = [r for r in newest.values() if r.state in {s.value for s in m.ACTIVE_STATES}]
    latest = await latest_samples(session, active)
    shown_state = await nodes.shown_states(session, active, down_after_s)
    cells = {}
    if newest:
        cells = {c.id: c for c in (await session.scalars(
            select(m.Cell).where(m.Cell.id.in_({r.cell_id for r in newest.values()}))
        )).all()}
    out = []
    for ch, inst in channels:
        run = newest.get(ch.id)
        is_active = run is not None and run.state in {s.value for s in m.ACTIVE_STATES}
        if is_active:
            assert run is not None
            state = shown_state.get(run.id, run.state)
        elif run is not None and run.state == m.RunState.aborted_safety.value:
            state = SAFETY_STOP
        elif run is not None and run.state == m.RunState.interrupted.value:
            state = "interrupted"
        else:
            state = "idle"
        shown = run if (is_active or state in (SAFETY_STOP, "interrupted")) else None
        sample = latest.get(run.id) if (run is not None and is_active) else None
        cell = cells.get(shown.cell_id) if shown is not None else None
        out.append({
            "channel_id": ch.id,
            "channel": ch.name,
            "instrument": inst.name,
            "driver": inst.driver,
            "state": state,
            "run": None if shown is None else {
                "id": shown.id,
                "state": shown_state.get(shown.id, shown.state),
                "node": shown.node,
                "cell_id": shown.cell_id,
                "cell_serial": cell.serial if cell else None,
                "step_index": shown.step_index,
                "step_count": shown.step_count,
                "cycle_index": shown.cycle_index,
                "elapsed_s": shown.elapsed_s,
                "progress": progress(shown.plan or {}, shown.step_index, shown.cycle_index),
                "end_reason": shown.end_reason,
            },
            "voltage_v": sample.voltage_v if sample else None,
            "current_a": sample.current_a if sample else None,
            "temperature_c": sample.temperature_c if sample else None,
            "t_s": sample.t_s if sample else None,
        })
    return out


async def _acknowledged_ids(session: AsyncSession, run_ids: set[int | None]) -> set[int]:
    q = select(m.Event.data).where(m.Event.kind == "audit")
    if None not in run_ids:
        q = q.where(m.Event.run_id.in_(run_ids))
    acked = set()
    for data in (await session.scalars(q)).all():
        value = (data or {}).get(ACK_KEY)
        if isinstance(value, int):
            acked.add(value)
    return acked


async def open_alarms(session: AsyncSession, limit: int = 100) -> list[m.Event]:
    """Safety events nobody has acknowledged yet, oldest first."""
    alarms = (await session.scalars(
        select(m.Event).where(m.Event.kind == ALARM_KIND).order_by(m.Event.id)
    )).all()
    if not alarms:
        return []
    acked = await _acknowledged_ids(session, {a.run_id for a in alarms})
    return [a for a in alarms if a.id not in acked][:limit]


async def acknowledge(session: AsyncSession, event_id: int, actor: str,
                      note: str | None = None) -> m.Event:
    """Record that ``actor`` saw safety event ``event_id``: an audit event on the same
    run naming it. A second acknowledgement of the same alarm is refused (409)."""
    alarm = await session.get(m.Event, event_id)
    if alarm is None or alarm.kind != ALARM_KIND:
        raise NotFound(f"no safety event {event_id}")
    if event_id in await _acknowledged_ids(session, {alarm.run_id}):
        raise Conflict(f"safety event {event_id} is acknowledged already")
    ack = m.Event(
        run_id=alarm.run_id, kind="audit", severity="info",
        message=f"safety alarm {event_id} acknowledged" + (f": {note}" if note else ""),
        data={ACK_KEY: event_id, "note": note,
              "before": {"alarm_id": event_id, "acknowledged": False,
                         "alarm": alarm.message},
              # Who acknowledged it is the audit record's actor and role.
              "after": {"alarm_id": event_id, "acknowledged": True, "note": note}},
        actor=actor,
    )
    session.add(ack)
    await session.flush()
    return ack
