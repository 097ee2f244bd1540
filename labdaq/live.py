"""Live run data for Server-Sent Events: what is new in a run since a cursor.

The stream is built by polling the database (the API process has no other channel from
the engine yet): each poll reads the samples, steps, cycles and events committed after
the cursor, and the run's state. The cursor names the last row of each kind that was
sent, so it is the SSE event id: a client that reconnects with ``Last-Event-ID`` gets
everything after it, with no gap and nothing twice.

A run on a cycler that runs its own program (a Neware channel) also has the reading the
engine last inquired (``live_readings``, :func:`poll_readings`): sent as a snapshot ahead
of the harvested samples, outside the cursor.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.errors import Invalid
from labdaq.export import COLUMNS
from labdaq.storage import models as m

TERMINAL = {s.value for s in m.RunState} - {s.value for s in m.ACTIVE_STATES}


@dataclass(frozen=True)
class Cursor:
    """Last sent sample seq, step id, cycle id, event id; and the last state sent."""

    seq: int = 0
    step_id: int = 0
    cycle_id: int = 0
    event_id: int = 0
    state: str = ""
    # Run time (s) of the last sample sent, for decimation across polls and reconnects.
    sent_t_s: float | None = None

    def encode(self) -> str:
        t = "" if self.sent_t_s is None else repr(self.sent_t_s)
        return f"{self.seq}.{self.step_id}.{self.cycle_id}.{self.event_id}.{self.state}.{t}"

    @classmethod
    def parse(cls, text: str | None) -> Cursor:
        if not text:
            return cls()
        try:
            seq, step, cycle, event, state, t = text.split(".", 5)
            return cls(int(seq), int(step), int(cycle), int(event), state,
                       float(t) if t else None)
        except ValueError as exc:
            raise Invalid(
                "bad Last-Event-ID",
                [{"loc": "Last-Event-ID", "msg": "give an id this stream sent, or none"}],
            ) from exc


@dataclass
class Message:
    event: str
    data: dict[str, Any]
    cursor: Cursor


def _row(obj: Any, fields: Sequence[str]) -> dict[str, Any]:
    out = {}
    for f in fields:
        v = getattr(obj, f)
        out[f] = v.isoformat() if hasattr(v, "isoformat") else v
    return out


_STEP_FIELDS = ("step_number", "step_index", "cycle_index", "kind", "start_t_s", "end_t_s",
                "end_reason", "capacity_ah", "energy_wh", "end_voltage_v", "dcir_ohm")
_CYCLE_FIELDS = ("cycle_index", "start_t_s", "end_t_s", "charge_capacity_ah",
                 "discharge_capacity_ah", "charge_energy_wh", "discharge_energy_wh",
                 "coulombic_efficiency", "energy_efficiency")
_EVENT_FIELDS = ("id", "ts", "kind", "severity", "message", "data", "actor")
_RUN_FIELDS = ("id", "state", "step_index", "step_count", "cycle_index", "elapsed_s",
               "end_reason", "last_seq")


async def poll(
    session: AsyncSession,
    run: m.Run,
    cursor: Cursor,
    rate_hz: float | None = None,
    max_samples: int = 10_000,
) -> list[Message]:
    """Messages for what is new after ``cursor``, in a fixed order (samples, steps,
    cycles, events, then state), each with the cursor that includes it."""
    out: list[Message] = []
    s = m.Sample
    rows = (await session.execute(
        select(*(getattr(s, c) for c in COLUMNS))
        .where(s.run_id == run.id, s.seq > cursor.seq).order_by(s.seq).limit(max_samples)
    )).all()
    if rows:
        sent_t = cursor.sent_t_s
        keep = []
        for r in rows:
            # Decimation by run time: a sample goes out if at least 1/rate_hz passed since
            # the last one sent (the cursor still moves past the skipped ones).
            if rate_hz is None or sent_t is None or r.t_s - sent_t >= 1.0 / rate_hz:
                keep.append(r)
                sent_t = r.t_s
        cursor = replace(cursor, seq=rows[-1].seq, sent_t_s=sent_t)
        cols = list(zip(*keep, strict=True)) if keep else [() for _ in COLUMNS]
        data: dict[str, Any] = {c: list(v) for c, v in zip(COLUMNS, cols, strict=True)}
        out.append(Message("samples", {"run_id": run.id, "count": len(keep), **data}, cursor))
    for st in (await session.scalars(
        select(m.Step).where(m.Step.run_id == run.id, m.Step.id > cursor.step_id)
        .order_by(m.Step.id)
    )).all():
        cursor = replace(cursor, step_id=st.id)
        out.append(Message("step", _row(st, _STEP_FIELDS), cursor))
    for cy in (await session.scalars(
        select(m.Cycle).where(m.Cycle.run_id == run.id, m.Cycle.id > cursor.cycle_id)
        .order_by(m.Cycle.id)
    )).all():
        cursor = replace(cursor, cycle_id=cy.id)
        out.append(Message("cycle", _row(cy, _CYCLE_FIELDS), cursor))
    for ev in (await session.scalars(
        select(m.Event).where(m.Event.run_id == run.id, m.Event.id > cursor.event_id)
        .order_by(m.Event.id)
    )).all():
        cursor = replace(cursor, event_id=ev.id)
        out.append(Message("event", _row(ev, _EVENT_FIELDS), cursor))
    if run.state != cursor.state:
        cursor = replace(cursor, state=run.state)
        out.append(Message("state", _row(run, _RUN_FIELDS), cursor))
    return out


@dataclass(frozen=True)
class LabCursor:
    """Last step, cycle and event id sent on the lab-wide stream."""

    step_id: int = 0
    cycle_id: int = 0
    event_id: int = 0

    def encode(self) -> str:
        return f"{self.step_id}.{self.cycle_id}.{self.event_id}"

    @classmethod
    def parse(cls, text: str) -> LabCursor:
        try:
            step, cycle, event = (int(x) for x in text.split("."))
            return cls(step, cycle, event)
        except ValueError as exc:
            raise Invalid(
                "bad Last-Event-ID",
                [{"loc": "Last-Event-ID", "msg": "give an id this stream sent, or none"}],
            ) from exc


async def lab_start(session: AsyncSession) -> LabCursor:
    """A new lab stream starts at what exists now (it follows; it does not replay)."""
    from sqlalchemy import func

    return LabCursor(
        int(await session.scalar(select(func.max(m.Step.id))) or 0),
        int(await session.scalar(select(func.max(m.Cycle.id))) or 0),
        int(await session.scalar(select(func.max(m.Event.id))) or 0),
    )


@dataclass
class LabMessage:
    event: str
    data: dict[str, Any]
    cursor: LabCursor


async def poll_lab(session: AsyncSession, cursor: LabCursor, limit: int = 1000) -> list[LabMessage]:
    """Steps and cycle summaries completed, and events (state changes, safety, audit ...)
    recorded anywhere in the lab after ``cursor``."""
    out: list[LabMessage] = []
    for st in (await session.scalars(
        select(m.Step).where(m.Step.id > cursor.step_id).order_by(m.Step.id).limit(limit)
    )).all():
        cursor = replace(cursor, step_id=st.id)
        out.append(LabMessage("step", {"run_id": st.run_id, **_row(st, _STEP_FIELDS)}, cursor))
    for cy in (await session.scalars(
        select(m.Cycle).where(m.Cycle.id > cursor.cycle_id).order_by(m.Cycle.id).limit(limit)
    )).all():
        cursor = replace(cursor, cycle_id=cy.id)
        out.append(LabMessage("cycle", {"run_id": cy.run_id, **_row(cy, _CYCLE_FIELDS)}, cursor))
    for ev in (await session.scalars(
        select(m.Event).where(m.Event.id > cursor.event_id).order_by(m.Event.id).limit(limit)
    )).all():
        cursor = replace(cursor, event_id=ev.id)
        out.append(LabMessage("event", {"run_id": ev.run_id, **_row(ev, _EVENT_FIELDS)}, cursor))
    return out


async def poll_latest(session: AsyncSession, seen: dict[int, int]) -> list[dict[str, Any]]:
    """The newest committed sample of every running or paused run whose ``last_seq``
    moved since ``seen`` (run id -> seq, updated here): a snapshot for live V/I/T on the
    lab stream, not history, so it takes no part in the stream's cursor. Runs with an
    inquired reading (:func:`poll_readings`, newer than their harvested samples) are
    left out: their snapshot is that reading."""
    runs = (await session.scalars(
        select(m.Run).where(m.Run.state.in_([m.RunState.running.value,
                                             m.RunState.paused.value]))
    )).all()
    inquired = set((await session.scalars(
        select(m.LiveReading.run_id).where(m.LiveReading.run_id.in_([r.id for r in runs]))
    )).all()) if runs else set()
    keys = [(r.id, r.last_seq) for r in runs if r.last_seq > 0
            and r.id not in inquired and seen.get(r.id) != r.last_seq]
    if not keys:
        return []
    from sqlalchemy import tuple_

    s = m.Sample
    rows = (await session.execute(
        select(s.run_id, s.seq, s.t_s, s.voltage_v, s.current_a, s.temperature_c,
               s.step_index, s.cycle_index)
        .where(tuple_(s.run_id, s.seq).in_(keys)).order_by(s.run_id)
    )).all()
    for r in rows:
        seen[r.run_id] = r.seq
    return [r._asdict() for r in rows]


_READING_FIELDS = ("run_id", "t_s", "ts_utc", "voltage_v", "current_a", "temperature_c",
                   "step_index", "cycle_index", "state", "last_seq")


async def poll_readings(session: AsyncSession, seen: dict[int, float],
                        run_id: int | None = None) -> list[dict[str, Any]]:
    """The latest reading a cycler that runs its own program reported (``live_readings``,
    a Neware channel's ``inquire``) of one run, or of every running or paused run, when it
    is newer than in ``seen`` (run id -> ``ts_utc``, updated here). A snapshot ahead of
    the harvested samples, not history: it takes no part in a stream's cursor."""
    lr = m.LiveReading
    q = select(lr).join(m.Run, m.Run.id == lr.run_id).where(
        m.Run.state.in_([m.RunState.running.value, m.RunState.paused.value]))
    if run_id is not None:
        q = q.where(lr.run_id == run_id)
    out = []
    for row in (await session.scalars(q.order_by(lr.run_id))).all():
        if seen.get(row.run_id) == row.ts_utc:
            continue
        seen[row.run_id] = row.ts_utc
        out.append({**_row(row, _READING_FIELDS), "source": "inquired"})
    return out
