"""Runs: start, inspect, stop; their samples and cycle summaries."""

from __future__ import annotations

from fastapi import APIRouter, Query, Request, status
from fastapi.responses import JSONResponse

from labdaq import runs as service
from labdaq.api.deps import Operator, Reader, RunId, Session
from labdaq.api.problems import AUTH, COMMON, OPERATE, responses
from labdaq.api.schemas import CycleOut, EisOut, EventOut, RunOut, StepOut
from labdaq.api.schemas_dashboard import RunPreview
from labdaq.bounds import INT32_MAX
from labdaq.runs import RunCreate
from labdaq.storage.models import RunState

router = APIRouter(prefix="/api/v1/runs", tags=["runs"])

READ = responses(*COMMON, *AUTH, 404)
COMMAND = responses(*COMMON, *OPERATE, 404, 409)


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
    body: RunCreate, request: Request, session: Session, token: Operator,
    dry_run: bool = Query(False, description="check and resolve only; store nothing"),
) -> RunOut | JSONResponse:
    s = request.app.state.settings
    if dry_run:
        preview = await service.preview_run(
            session, body, voltage_margin_v=s.safety_voltage_margin_v,
            min_sample_period_s=s.min_sample_period_s, max_duration_s=s.max_duration_s,
        )
        return JSONResponse(RunPreview.model_validate(preview).model_dump(mode="json"))
    run = await service.create_run(
        session,
        body,
        actor=token.name,
        voltage_margin_v=s.safety_voltage_margin_v,
        min_sample_period_s=s.min_sample_period_s,
        max_duration_s=s.max_duration_s,
    )
    await session.commit()
    return RunOut.model_validate(run)


@router.get("", response_model=list[RunOut], responses=responses(*COMMON, *AUTH))
async def list_runs(
    session: Session,
    _: Reader,
    state: RunState | None = Query(None, description="only runs in this state"),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=INT32_MAX),
) -> list[RunOut]:
    rows = await service.list_runs(session, state.value if state else None, limit, offset)
    return [RunOut.model_validate(r) for r in rows]


@router.get("/{run_id}", response_model=RunOut, responses=READ)
async def get_run(run_id: RunId, session: Session, _: Reader) -> RunOut:
    return RunOut.model_validate(await service.get_run(session, run_id))


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


@router.get("/{run_id}/cycles", response_model=list[CycleOut], responses=READ)
async def get_cycles(run_id: RunId, session: Session, _: Reader) -> list[CycleOut]:
    return [CycleOut.model_validate(c) for c in await service.list_cycles(session, run_id)]


@router.get("/{run_id}/steps", response_model=list[StepOut], responses=READ)
async def get_steps(run_id: RunId, session: Session, _: Reader) -> list[StepOut]:
    return [StepOut.model_validate(x) for x in await service.list_steps(session, run_id)]


@router.get("/{run_id}/events", response_model=list[EventOut], responses=READ)
async def get_events(run_id: RunId, session: Session, _: Reader) -> list[EventOut]:
    return [EventOut.model_validate(x) for x in await service.list_events(session, run_id)]


@router.get("/{run_id}/eis", response_model=list[EisOut], responses=READ)
async def get_eis(run_id: RunId, session: Session, _: Reader) -> list[EisOut]:
    return [EisOut.model_validate(x) for x in await service.list_spectra(session, run_id)]
