"""Live streams as Server-Sent Events: one run (samples, steps, cycles, events, state) and
the whole lab (steps, cycles, events of every run)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse

from labdaq import live
from labdaq import runs as run_service
from labdaq.api.deps import Reader, RunId, Session
from labdaq.api.problems import Problem
from labdaq.storage import models as m
from labdaq.storage.db import snapshot_scope

router = APIRouter(prefix="/api/v1/runs", tags=["stream"])

# The ids the streams send (labdaq.live.Cursor / LabCursor), or nothing, so the schema
# says what Last-Event-ID may be. Step, cycle and event ids are INTEGER columns (int4 on
# PostgreSQL): nine digits at most, so a forged id never reaches the database. The
# header is a plain string (empty when absent): an
# optional one is documented as string-or-null, which clients send as the text "null".
RUN_EVENT_ID = (
    r"^(\d{1,18}\.\d{1,9}\.\d{1,9}\.\d{1,9}\.[a-z_]{0,20}\.(\d{1,18}(\.\d{1,18})?(e-?\d{1,3})?)?)?$"
)
LAB_EVENT_ID = r"^(\d{1,9}\.\d{1,9}\.\d{1,9})?$"
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, unknown or revoked token"},
    404: {"model": Problem, "description": "no such run"},
    422: {"model": Problem, "description": "bad Last-Event-ID or parameters"},
}
KEEPALIVE_S = 15.0


def _sse(msg: live.Message) -> bytes:
    data = json.dumps(msg.data, separators=(",", ":"), default=str)
    return f"id: {msg.cursor.encode()}\nevent: {msg.event}\ndata: {data}\n\n".encode()


@router.get(
    "/{run_id}/stream", response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "events `samples`, `step`, `cycle`, `event`, `state`; "
                     "each `id` resumes the stream after it (Last-Event-ID); on a cycler "
                     "that runs its own program (Neware) also `reading` (no id): the "
                     "latest inquired V, I, T, step, cycle and instrument state, ahead of "
                     "the harvested samples"}, **_ERRORS},
)
async def stream_run(
    run_id: RunId,
    request: Request,
    session: Session,
    _: Reader,
    rate_hz: float | None = Query(
        None, gt=0, le=1000, description="at most this many samples per second of run time"
    ),
    poll_s: float = Query(0.5, ge=0.05, le=10, description="how often to look for news"),
    last_event_id: str = Header(
        "", alias="Last-Event-ID", pattern=RUN_EVENT_ID, description="an id this stream sent"
    ),
) -> StreamingResponse:
    await run_service.get_run(session, run_id)
    cursor = live.Cursor.parse(last_event_id)
    await session.commit()  # no read transaction held open for the stream's lifetime
    maker = request.app.state.sessionmaker

    async def events() -> AsyncIterator[bytes]:
        nonlocal cursor
        idle = 0.0
        seen: dict[int, float] = {}
        while not await request.is_disconnected():
            async with snapshot_scope(maker) as s:
                # One snapshot: the state and every row committed with or before it, so
                # the stream never ends before the run's last samples, and rows committed
                # together arrive in the poll's order (samples, steps, cycles, events).
                run = await s.get(m.Run, run_id)
                assert run is not None
                msgs = await live.poll(s, run, cursor, rate_hz)
                readings = await live.poll_readings(s, seen, run_id)
            for reading in readings:
                # No id: a snapshot, not history; a reconnect need not resume it.
                yield _snapshot("reading", reading)
            for msg in msgs:
                yield _sse(msg)
                cursor = msg.cursor
            drained = not any(x.event == "samples" for x in msgs)
            if run.state in live.TERMINAL and drained:
                return
            if msgs:
                idle = 0.0
                continue
            idle = 0.0 if readings else idle + poll_s  # a reading is traffic too
            if idle >= KEEPALIVE_S:
                idle = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(poll_s)

    return StreamingResponse(
        events(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _snapshot(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


lab_router = APIRouter(prefix="/api/v1", tags=["stream"])


@lab_router.get(
    "/stream", response_class=StreamingResponse,
    responses={200: {"content": {"text/event-stream": {}},
                     "description": "events `step`, `cycle`, `event` (state changes, safety, "
                     "audit) of every run; each `id` resumes the stream after it; with "
                     "`latest=true` also `latest` (no id)"},
               **{k: v for k, v in _ERRORS.items() if k != 404}},
)
async def stream_lab(
    request: Request,
    session: Session,
    _: Reader,
    poll_s: float = Query(0.5, ge=0.05, le=10, description="how often to look for news"),
    last_event_id: str = Header(
        "", alias="Last-Event-ID", pattern=LAB_EVENT_ID, description="an id this stream sent"
    ),
    latest: bool = Query(False, description="also send `latest`: the newest sample (V, I, "
                         "T) of each running or paused run when it changes"),
) -> StreamingResponse:
    """What happens anywhere in the lab from now on (or after ``Last-Event-ID``)."""
    cursor = (live.LabCursor.parse(last_event_id) if last_event_id
              else await live.lab_start(session))
    await session.commit()
    maker = request.app.state.sessionmaker

    async def events() -> AsyncIterator[bytes]:
        nonlocal cursor
        idle = 0.0
        yield f"id: {cursor.encode()}\nevent: hello\ndata: {{}}\n\n".encode()
        seen: dict[int, int] = {}
        seen_readings: dict[int, float] = {}
        while not await request.is_disconnected():
            async with snapshot_scope(maker) as s:
                msgs = await live.poll_lab(s, cursor)
                snapshots = await live.poll_latest(s, seen) if latest else []
                # A cycler running its own program: its inquired reading is the newest.
                snapshots += await live.poll_readings(s, seen_readings) if latest else []
            for snap in snapshots:
                # No id: a snapshot is not history, a reconnect need not resume it.
                yield _snapshot("latest", snap)
            for msg in msgs:
                data = json.dumps(msg.data, separators=(",", ":"), default=str)
                yield f"id: {msg.cursor.encode()}\nevent: {msg.event}\ndata: {data}\n\n".encode()
                cursor = msg.cursor
            if msgs:
                idle = 0.0
                continue
            idle += poll_s
            if idle >= KEEPALIVE_S:
                idle = 0.0
                yield b": keep-alive\n\n"
            await asyncio.sleep(poll_s)

    return StreamingResponse(
        events(), media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
