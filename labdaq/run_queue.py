"""The run queue of each channel: a run's place, moving and cancelling waiting runs, a
technician confirming the cell, and which waiting run the engine may start next.

A channel has at most one run holding its instrument (running or paused) and any number
waiting (queued, awaiting_cell), in the order of ``runs.queue_order``; a position is the
1-based rank in that order. The head of a free channel starts when its ``not_before`` has
passed and its cell is known to be on the channel: the previous run on the channel used
the same cell (or, with no previous run, it is the channel's default cell) and ended
``completed`` or ``stopped``, or a technician said so since (the request that created it
on an idle channel, or ``confirm-cell``). Otherwise it waits in ``awaiting_cell``: after a
safety abort, a failure or an interruption someone looks at the cell before the next test.
The queue is strict: a run that waits holds up those behind it, in the order a technician
planned. Everything is in the database, so an engine restart keeps the queue and its order.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.bounds import INT32_MAX, WholeNumber
from labdaq.errors import Conflict, NotFound
from labdaq.nodes import wake_node_of_run
from labdaq.run_states import command_refusal, ending
from labdaq.storage import models as m

WAITING = [s.value for s in m.WAITING_STATES]
HOLDING = [s.value for s in m.HOLDING_STATES]
ACTIVE = [s.value for s in m.ACTIVE_STATES]
#: How the previous run on a channel may have ended for its queue to go on by itself.
GOES_ON_AFTER = frozenset({m.RunState.completed.value, m.RunState.stopped.value})
#: The queue's order. A run without a place (inserted by hand, not through a request)
#: sorts first, on SQLite and PostgreSQL alike (they put NULL at opposite ends).
QUEUE_ORDER = func.coalesce(m.Run.queue_order, 0)


class RunPatch(BaseModel):
    """A change to a waiting run: its place in its channel's queue."""

    model_config = ConfigDict(extra="forbid")

    queue_position: WholeNumber = Field(
        ge=1, le=INT32_MAX,
        description="1 = next to start on its channel; past the end moves it to the end",
    )


def utc(value: datetime | None) -> datetime | None:
    """SQLite gives timestamps back without their zone; every one labdaq writes is UTC."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


async def lock_channel(session: AsyncSession, channel_id: int) -> None:
    """Serialise changes to one channel's queue until the transaction ends: a no-op write
    to the channel row (a row lock on PostgreSQL, the write lock on SQLite). Two requests
    queueing at once would otherwise both take the place after the last."""
    await session.execute(
        update(m.Channel).where(m.Channel.id == channel_id).values(enabled=m.Channel.enabled)
    )


async def busy_with(session: AsyncSession, channel_id: int) -> int | None:
    """A run that keeps the channel busy (holding it first, else the queue's head)."""
    rows = (await session.execute(
        select(m.Run.id, m.Run.state).where(
            m.Run.channel_id == channel_id, m.Run.state.in_(ACTIVE))
    )).all()
    holding = [r for r, s in rows if s in HOLDING]
    return holding[0] if holding else (min(r for r, _ in rows) if rows else None)


async def waiting_runs(session: AsyncSession, channel_id: int) -> list[m.Run]:
    """The channel's waiting runs, next first."""
    return list((await session.scalars(
        select(m.Run).where(m.Run.channel_id == channel_id, m.Run.state.in_(WAITING))
        .order_by(QUEUE_ORDER, m.Run.id)
    )).all())


async def channel_queue(session: AsyncSession, channel_id: int) -> list[m.Run]:
    """The waiting runs of a channel, next first; 404 for an unknown channel."""
    if await session.get(m.Channel, channel_id) is None:
        raise NotFound(f"no channel {channel_id}")
    return await waiting_runs(session, channel_id)


async def enqueue(session: AsyncSession, run: m.Run, channel: m.Channel, queue: bool) -> None:
    """Give a new run its place: first on an idle channel (its request says which cell is
    there, so its cell counts as confirmed), else last, or 409 when ``queue`` is false."""
    await lock_channel(session, channel.id)
    busy = await busy_with(session, channel.id)
    if busy is not None and not queue:
        raise Conflict(f"channel {channel.name} is busy with run {busy}")
    last = await session.scalar(
        select(func.max(m.Run.queue_order)).where(
            m.Run.channel_id == channel.id, m.Run.state.in_(WAITING))
    )
    run.queue_order = (last or 0) + 1
    run.cell_confirmed_at = datetime.now(UTC) if busy is None else None


async def positions(session: AsyncSession, runs: Iterable[m.Run]) -> dict[int, int]:
    """The 1-based queue position of each waiting run in ``runs`` (run id -> position)."""
    waiting = [r for r in runs if r.state in WAITING]
    if not waiting:
        return {}
    wanted = {r.id for r in waiting}
    channels = {r.channel_id for r in waiting}
    rows = (await session.execute(
        select(m.Run.id, m.Run.channel_id).where(
            m.Run.channel_id.in_(channels), m.Run.state.in_(WAITING))
        .order_by(m.Run.channel_id, QUEUE_ORDER, m.Run.id)
    )).all()
    out: dict[int, int] = {}
    rank: dict[int, int] = {}
    for run_id, channel_id in rows:
        rank[channel_id] = rank.get(channel_id, 0) + 1
        if run_id in wanted:
            out[run_id] = rank[channel_id]
    return out


async def _waiting_run(session: AsyncSession, run_id: int, command: str) -> m.Run:
    run = await session.get(m.Run, run_id)
    if run is None:
        raise NotFound(f"no run {run_id}")
    if (why := command_refusal(run.state, command)) is not None:
        raise Conflict(f"run {run_id} {why}")
    return run


async def move(session: AsyncSession, run_id: int, position: int, actor: str) -> m.Run:
    """Move a waiting run to ``position`` (1 = next; past the end = last), audited."""
    run = await _waiting_run(session, run_id, "move")
    await lock_channel(session, run.channel_id)
    queue = await waiting_runs(session, run.channel_id)
    if run not in queue:  # started or ended since it was read
        await session.refresh(run)
        raise Conflict(f"run {run_id} is {run.state}; it is no longer in the queue")
    before = queue.index(run) + 1
    queue.remove(run)
    queue.insert(min(position, len(queue) + 1) - 1, run)
    # Two passes: the unique index on (channel, queue_order) is checked row by row, so
    # the new order goes through values no other waiting run holds.
    for k, r in enumerate(queue, start=1):
        r.queue_order = -k
    await session.flush()
    for r in queue:
        r.queue_order = -(r.queue_order or 0)
    await session.flush()
    after = queue.index(run) + 1
    session.add(m.Event(
        run_id=run_id, kind="audit", actor=actor,
        message=f"moved in the queue of its channel from position {before} to {after}",
        data={"from_position": before, "to_position": after,
              "queue": [r.id for r in queue]},
    ))
    return run


async def cancel(session: AsyncSession, run: m.Run, actor: str) -> bool:
    """End a waiting run (``stopped``) unless the engine claimed it meanwhile; audited.
    False: it is no longer waiting (the caller asks the engine to stop it instead)."""
    pos = (await positions(session, [run])).get(run.id)
    values = ending(m.RunState.stopped, f"cancelled in the queue by {actor}")
    # Conditional: the engine may be claiming it at this moment; it must not be ended
    # under a running acquisition.
    res = await session.execute(
        update(m.Run).where(m.Run.id == run.id, m.Run.state.in_(WAITING))
        .values(**values, waiting_reason=None)
        .execution_options(synchronize_session=False)
    )
    await session.refresh(run)
    if getattr(res, "rowcount", 0) != 1:
        return False
    session.add(m.Event(run_id=run.id, kind="audit", actor=actor,
                        message=f"cancelled in the queue at position {pos}",
                        data={"position": pos}))
    return True


async def confirm_cell(session: AsyncSession, run_id: int, actor: str) -> m.Run:
    """A technician says the run's cell is on its channel (and fit for it): the run goes
    back to the head of the queue, audited."""
    run = await _waiting_run(session, run_id, "confirm-cell")
    cell = await session.get(m.Cell, run.cell_id)
    channel = await session.get(m.Channel, run.channel_id)
    reason = run.waiting_reason
    res = await session.execute(
        update(m.Run).where(m.Run.id == run_id,
                            m.Run.state == m.RunState.awaiting_cell.value)
        .values(state=m.RunState.queued.value, cell_confirmed_at=datetime.now(UTC),
                waiting_reason=None)
        .execution_options(synchronize_session=False)
    )
    await session.refresh(run)
    if getattr(res, "rowcount", 0) != 1:
        raise Conflict(f"run {run_id} is {run.state}; only an awaiting_cell run can be "
                       "confirmed")
    serial = cell.serial if cell else run.cell_id
    session.add(m.Event(
        run_id=run_id, kind="audit", actor=actor,
        message=f"cell {serial} confirmed on channel {channel.name if channel else ''}",
        data={"cell_id": run.cell_id, "waited_because": reason},
    ))
    await wake_node_of_run(session, run, "confirmed")
    return run


# -- the engine's side -----------------------------------------------------------------
@dataclass(frozen=True)
class Decision:
    """What to do with the head of a free channel's queue."""

    run: m.Run
    channel: m.Channel
    start: bool
    reason: str | None = None  # why it must wait for a technician (start False)


async def _previous(session: AsyncSession, channel_id: int) -> tuple[int, int, str] | None:
    """(run id, cell id, state) of the run that started last on the channel."""
    row = (await session.execute(
        select(m.Run.id, m.Run.cell_id, m.Run.state)
        .where(m.Run.channel_id == channel_id, m.Run.started_at.is_not(None))
        .order_by(m.Run.started_at.desc(), m.Run.id.desc()).limit(1)
    )).first()
    return (int(row[0]), int(row[1]), str(row[2])) if row else None


async def _serial(session: AsyncSession, cell_id: int) -> str:
    cell = await session.get(m.Cell, cell_id)
    return cell.serial if cell is not None else f"#{cell_id}"


async def why_wait(session: AsyncSession, run: m.Run, channel: m.Channel) -> str | None:
    """Why the head of a free channel needs a technician before it starts (None: it may
    start)."""
    if run.cell_confirmed_at is not None:
        return None
    prev = await _previous(session, channel.id)
    if prev is None:
        loaded = channel.default_cell_id
        if loaded is not None and loaded != run.cell_id:
            return (f"channel {channel.name}'s cell is {await _serial(session, loaded)}; "
                    f"this run is for cell {await _serial(session, run.cell_id)}")
        return None
    prev_id, prev_cell, prev_state = prev
    if prev_state not in GOES_ON_AFTER:
        return (f"the previous run on channel {channel.name}, {prev_id}, ended {prev_state}; "
                "a technician checks the cell and confirms before the queue goes on")
    if prev_cell != run.cell_id:
        return (f"the previous run on channel {channel.name}, {prev_id}, was on cell "
                f"{await _serial(session, prev_cell)}; this run is for cell "
                f"{await _serial(session, run.cell_id)}")
    return None


async def decide(session: AsyncSession, now: datetime) -> list[Decision]:
    """For every channel nothing holds: its queue's head, and whether it starts now or
    waits for a technician. Heads waiting for their ``not_before``, or already
    awaiting_cell, are left out.

    Runs every scheduler round in the engine: one narrow query for the heads of the free
    channels' queues (a lab may queue weeks of runs on channels that are all busy), the
    heads that may start read in full.
    """
    holding = select(m.Run.channel_id).where(m.Run.state.in_(HOLDING))
    order = QUEUE_ORDER
    first = (
        select(m.Run.channel_id.label("channel_id"), func.min(order).label("first"))
        .where(m.Run.state.in_(WAITING), m.Run.channel_id.not_in(holding))
        .group_by(m.Run.channel_id).subquery()
    )
    rows = (await session.execute(
        select(m.Run.id, m.Run.channel_id, m.Run.state, m.Run.not_before)
        .join(first, (first.c.channel_id == m.Run.channel_id) & (first.c.first == order))
        .where(m.Run.state.in_(WAITING))
        .order_by(m.Run.channel_id, m.Run.id)
    )).all()
    heads: list[int] = []
    seen: set[int] = set()
    for run_id, channel_id, state, not_before in rows:
        if channel_id in seen:
            continue
        seen.add(channel_id)  # only the head counts: the queue is strict
        if state != m.RunState.queued.value:
            continue  # awaiting_cell: a technician's turn
        nb = utc(not_before)
        if nb is not None and nb > now:
            continue
        heads.append(int(run_id))
    if not heads:
        return []
    out: list[Decision] = []
    for run, channel in (await session.execute(
        select(m.Run, m.Channel).join(m.Channel, m.Channel.id == m.Run.channel_id)
        .where(m.Run.id.in_(heads), m.Channel.enabled).order_by(m.Run.channel_id)
    )).all():
        reason = await why_wait(session, run, channel)
        out.append(Decision(run, channel, reason is None, reason))
    return out
