"""Runs: start (or queue), inspect, move in the queue, stop; their samples and cycle
summaries."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from pydantic import TypeAdapter

from labdaq import nodes, run_queue
from labdaq import runs as service
from labdaq.api.deps import NodeDownAfterS, Operator, Reader, RunId, RunStarter, Session
from labdaq.api.json_response import validated_json
from labdaq.api.problems import AUTH, COMMON, OPERATE, responses
from labdaq.api.schemas import CycleOut, EisOut, EventOut, RunOut, StepOut
from labdaq.api.schemas_dashboard import RunPreview
from labdaq.bounds import INT32_MAX
from labdaq.errors import NotFound
from labdaq.run_queue import RunPatch
from labdaq.run_reads import cycles_on
from labdaq.runs import RunCreate
from labdaq.storage import models as m
from labdaq.storage.models import RunState

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

READ = responses(*COMMON, *AUTH, 404)
COMMAND = responses(*COMMON, *OPERATE, 404, 409)


async def run_out(session: Session, runs: list[m.Run], down_after_s: float) -> list[RunOut]:
    """Runs as the API shows them, a waiting run with its queue position, an acquiring
    one whose node is down as ``node_down`` (labdaq.nodes)."""
    pos = await run_queue.positions(session, runs)
    shown = await nodes.shown_states(session, runs, down_after_s)
    return [RunOut.model_validate(r).model_copy(
        update={"queue_position": pos.get(r.id), "state": shown[r.id]}) for r in runs]


@router.post(
    "",
    response_model=RunOut,
    status_code=status.HTTP_201_CREATED,
    responses={
        200: {"model": RunPreview, "description": "dry_run: what would start; nothing stored"},
        **responses(*COMMON, *OPERATE, 409),
    },
)
async def create_run(
    body: RunCreate, request: Request, session: Session, token: RunStarter,
    dry_run: bool = Query(False, description="check and resolve only; store nothing"),
) -> RunOut | JSONResponse:
    """Create a run. On a busy channel it waits in the channel's queue (queue_position in
    the response) unless the body says "queue": false, which answers 409. With dry_run,
    what would start (resolved currents and limits), nothing stored. An ordinary protocol
    needs a technician or admin token; a protocol marked abuse: true an engineer or admin
    token and a reason (403 otherwise; 422 without the reason)."""
    s = request.app.state.settings
    if dry_run:
        preview = await service.preview_run(
            session, body, voltage_margin_v=s.safety_voltage_margin_v,
            min_sample_period_s=s.min_sample_period_s, max_duration_s=s.max_duration_s,
            lab_limits=s.lab_limits, role=token.role,
        )
        return JSONResponse(RunPreview.model_validate(preview).model_dump(mode="json"))
    run = await service.create_run(
        session,
        body,
        actor=token.name,
        voltage_margin_v=s.safety_voltage_margin_v,
        min_sample_period_s=s.min_sample_period_s,
        max_duration_s=s.max_duration_s,
        lab_limits=s.lab_limits,
        role=token.role,
    )
    await session.commit()
    return (await run_out(session, [run], s.node_down_after_s))[0]


@router.get("", response_model=list[RunOut], responses=responses(*COMMON, *AUTH))
async def list_runs(
    session: Session,
    _: Reader,
    down_after_s: NodeDownAfterS,
    state: RunState | None = Query(None, description="only runs in this state"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=INT32_MAX),
) -> list[RunOut]:
    rows = await service.list_runs(session, state.value if state else None, limit, offset)
    return await run_out(session, rows, down_after_s)


@router.get("/{run_id}", response_model=RunOut, responses=READ)
async def get_run(run_id: RunId, session: Session, _: Reader,
                  down_after_s: NodeDownAfterS) -> RunOut:
    return (await run_out(session, [await service.get_run(session, run_id)],
                           down_after_s))[0]


@router.patch("/{run_id}", response_model=RunOut, responses=COMMAND)
async def move_run(run_id: RunId, body: RunPatch, session: Session, token: Operator,
                   down_after_s: NodeDownAfterS) -> RunOut:
    """Move a waiting run to another place in its channel's queue (audited)."""
    run = await run_queue.move(session, run_id, body.queue_position, actor=token.name)
    await session.commit()
    return (await run_out(session, [run], down_after_s))[0]


@router.post("/{run_id}/confirm-cell", response_model=RunOut, responses=COMMAND)
async def confirm_cell(run_id: RunId, session: Session, token: Operator,
                       down_after_s: NodeDownAfterS) -> RunOut:
    """The run's cell is on its channel: an awaiting_cell run goes back to the head of the
    queue and starts when the channel is free (audited)."""
    run = await run_queue.confirm_cell(session, run_id, actor=token.name)
    await session.commit()
    return (await run_out(session, [run], down_after_s))[0]


@router.post("/{run_id}/stop", response_model=RunOut, responses=COMMAND)
async def stop_run(run_id: RunId, session: Session, token: Operator) -> RunOut:
    run = await service.request_stop(session, run_id, actor=token.name)
    await session.commit()
    return RunOut.model_validate(run)


@router.post("/{run_id}/pause", response_model=RunOut, responses=COMMAND)
async def pause_run(run_id: RunId, session: Session, token: Operator) -> RunOut:
    run = await service.request_pause(session, run_id, actor=token.name)
    await session.commit()
    return RunOut.model_validate(run)


@router.post("/{run_id}/resume", response_model=RunOut, responses=COMMAND)
async def resume_run(run_id: RunId, session: Session, token: Operator) -> RunOut:
    run = await service.request_resume(session, run_id, actor=token.name)
    await session.commit()
    return RunOut.model_validate(run)


_CYCLES = TypeAdapter(list[CycleOut])


@router.get("/{run_id}/cycles", response_model=list[CycleOut], responses=READ)
async def get_cycles(run_id: RunId, request: Request, _: Reader) -> Response:
    # One hop to a worker thread's kept connection (labdaq.run_reads).
    rows = await run_in_threadpool(request.app.state.read_pool.run, cycles_on, run_id)
    if rows is None:
        raise NotFound(f"no run {run_id}")
    return validated_json(_CYCLES, rows)


@router.get("/{run_id}/steps", response_model=list[StepOut], responses=READ)
async def get_steps(run_id: RunId, session: Session, _: Reader) -> list[StepOut]:
    return [StepOut.model_validate(x) for x in await service.list_steps(session, run_id)]


@router.get("/{run_id}/events", response_model=list[EventOut], responses=READ)
async def get_events(run_id: RunId, session: Session, _: Reader) -> list[EventOut]:
    return [EventOut.model_validate(x) for x in await service.list_events(session, run_id)]


@router.get("/{run_id}/eis", response_model=list[EisOut], responses=READ)
async def get_eis(run_id: RunId, session: Session, _: Reader) -> list[EisOut]:
    return [EisOut.model_validate(x) for x in await service.list_spectra(session, run_id)]
