"""A run's evaluation against the benchmark catalogue, the technician's observations it
combines with the measured criteria, and the test report (HTML, or PDF). The work is done
by labdaq.benchmarks.service; these functions only map HTTP to it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response

from labdaq.api.deps import CellId, Operator, Reader, RunId, Session, require
from labdaq.api.schemas_evaluation import (
    EvaluationOut,
    EvaluationRequest,
    ObservationOut,
    ObservationsIn,
)
from labdaq.benchmarks import service
from labdaq.benchmarks.evaluate import ChannelAccuracy
from labdaq.bounds import INT32_MAX
from labdaq.storage import models as m

router = APIRouter(prefix="/api/v1/runs", tags=["evaluation"])
cell_router = APIRouter(prefix="/api/v1/cells", tags=["evaluation"])

# Judging a run and issuing its report is an engineer's job (and an admin's).
Evaluator = Annotated[m.ApiToken, Depends(require("evaluate"))]

_AUTH: dict[int | str, dict[str, Any]] = {401: {"description": "missing or unknown token"},
         403: {"description": "the token's role may not do this"}}
_RUN: dict[int | str, dict[str, Any]] = {404: {"description": "no such run"}}
_INVALID: dict[int | str, dict[str, Any]] = {
    422: {"description": "invalid parameters (names each bad field)"}}

RuleQ = Annotated[Literal["simple", "guarded"], Query(
    description="decision rule (ILAC-G8): simple acceptance, or guarded by the "
                "measurement uncertainty")]


def _accuracy(
    voltage_accuracy_rel: Annotated[float | None, Query(
        gt=0, le=0.5, description="channel voltage accuracy, relative, expanded (k = 2)")
    ] = None,
    current_accuracy_rel: Annotated[float | None, Query(
        gt=0, le=0.5, description="channel current accuracy, relative, expanded (k = 2)")
    ] = None,
    temperature_accuracy_c: Annotated[float | None, Query(
        gt=0, le=50, description="temperature accuracy in °C, expanded (k = 2)")] = None,
) -> ChannelAccuracy | None:
    # Without them no uncertainty is known and the guarded rule cannot apply a guard band.
    return service.accuracy_of(voltage_accuracy_rel, current_accuracy_rel,
                               temperature_accuracy_c)


AccuracyQ = Annotated[ChannelAccuracy | None, Depends(_accuracy)]
OcvBeforeQ = Annotated[int | None, Query(
    ge=1, le=INT32_MAX,
    description="UN 38.3 T.1-T.4: the OCV check run made before the stress (this "
                      "run is the one after it)")]
SpecCyclesQ = Annotated[int | None, Query(
    ge=1, le=1_000_000, description="datasheet cycle count to judge capacity retention at")]


@router.get("/{run_id}/evaluation", response_model=EvaluationOut,
            responses={**_AUTH, 404: {"description": "no such run, or (stored=true) no "
                                                     "stored evaluation"}, **_INVALID})
async def get_evaluation(
    run_id: RunId,
    session: Session,
    _: Evaluator,
    accuracy: AccuracyQ,
    rule: RuleQ = "simple",
    spec_cycles: SpecCyclesQ = None,
    ocv_before_run: OcvBeforeQ = None,
    entries: Annotated[list[str] | None, Query(
        max_length=200, description="catalogue entry ids to judge (repeatable); default: "
                                    "those the run's protocol serves")] = None,
    stored: Annotated[bool, Query(
        description="return the newest stored evaluation instead of judging now")] = False,
) -> EvaluationOut:
    if stored:
        return EvaluationOut.model_validate(await service.stored(session, run_id))
    return EvaluationOut.model_validate(
        await service.evaluate_out(session, run_id, rule, spec_cycles, entries, accuracy,
                                   ocv_before_run))


@router.post("/{run_id}/evaluation", response_model=EvaluationOut,
             status_code=status.HTTP_201_CREATED,
             responses={**_AUTH, **_RUN, **_INVALID})
async def store_evaluation(
    run_id: RunId, session: Session, token: Evaluator, body: EvaluationRequest | None = None
) -> EvaluationOut:
    req = body or EvaluationRequest()
    accuracy = service.accuracy_of(req.voltage_accuracy_rel, req.current_accuracy_rel,
                                   req.temperature_accuracy_c)
    out = await service.store(session, run_id, actor=token.name, rule=req.rule,
                              spec_cycles=req.spec_cycles, entries=req.entries,
                              accuracy=accuracy, ocv_before_run=req.ocv_before_run)
    await session.commit()
    return EvaluationOut.model_validate(out)


@router.post("/{run_id}/observations", response_model=list[ObservationOut],
             status_code=status.HTTP_201_CREATED,
             responses={**_AUTH, **_RUN, **_INVALID})
async def add_observations(
    run_id: RunId, body: ObservationsIn, session: Session, token: Operator
) -> list[ObservationOut]:
    rows = await service.add_observations(
        session, run_id, body.values, observed_by=body.observed_by or token.name,
        note=body.note, actor=token.name)
    await session.commit()
    return [ObservationOut.model_validate(r) for r in rows]


@router.get("/{run_id}/observations", response_model=list[ObservationOut],
            responses={**_AUTH, **_RUN})
async def get_observations(run_id: RunId, session: Session, _: Reader) -> list[ObservationOut]:
    return [ObservationOut.model_validate(r)
            for r in await service.list_observations(session, run_id)]


@router.get("/{run_id}/report", response_class=HTMLResponse,
            responses={200: {"content": {"text/html": {}, "application/pdf": {}},
                             "description": "the test report"},
                       **_AUTH, **_RUN, **_INVALID,
                       501: {"description": "PDF asked for, WeasyPrint not installed"}})
async def get_report(
    run_id: RunId,
    session: Session,
    _: Evaluator,
    accuracy: AccuracyQ,
    rule: RuleQ = "simple",
    spec_cycles: SpecCyclesQ = None,
    ocv_before_run: OcvBeforeQ = None,
    format: Annotated[Literal["html", "pdf"], Query(description="html or pdf")] = "html",
) -> Response:
    page = await service.report_html(session, run_id, rule, spec_cycles, accuracy,
                                     ocv_before_run)
    if format == "html":
        return HTMLResponse(page)
    pdf = await run_in_threadpool(service.html_to_pdf, page)
    return Response(pdf, media_type="application/pdf", headers={
        "Content-Disposition": f'inline; filename="labdaq-run-{run_id}-report.pdf"'})


@cell_router.get("/{cell_id}/evaluation", response_model=list[EvaluationOut],
                 responses={**_AUTH, 404: {"description": "no such cell"}, **_INVALID})
async def get_cell_evaluation(
    cell_id: CellId,
    session: Session,
    _: Evaluator,
    accuracy: AccuracyQ,
    rule: RuleQ = "simple",
    spec_cycles: SpecCyclesQ = None,
) -> list[EvaluationOut]:
    return [EvaluationOut.model_validate(e) for e in
            await service.evaluate_cell(session, cell_id, rule, spec_cycles, accuracy)]
