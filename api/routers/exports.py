"""Exports: a run's or a cell's samples streamed as CSV, Parquet or Battery Data Format."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse

from labdaq import export
from labdaq.api.deps import CellId, Reader, RunId, Session
from labdaq.api.problems import Problem

router = APIRouter(prefix="/api/v1", tags=["exports"])

_FILE = {
    "description": "the export, streamed (CSV with a `#` description block, Parquet with "
    "key-value metadata, or BDF CSV)",
    "content": {"text/csv": {}, "application/vnd.apache.parquet": {}},
}
_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, unknown or revoked token"},
    404: {"model": Problem, "description": "no such run or cell"},
    422: {"model": Problem, "description": "unknown format"},
}
RunFormat = Literal["csv", "parquet", "bdf"]
FORMAT = Query("csv", description="csv | parquet | bdf (Battery Data Format column labels)")


def _stream(request: Request, plan: export.ExportPlan, fmt: str, name: str) -> StreamingResponse:
    url = request.app.state.settings.resolved_database_url
    return StreamingResponse(
        # A plain iterator: Starlette pulls it in a worker thread, so the blocking ADBC
        # reads never stall the event loop.
        export.stream_export(url, plan, fmt),
        media_type=export.MEDIA_TYPES[fmt],
        headers={"Content-Disposition": f'attachment; filename="{name}{export.SUFFIXES[fmt]}"'},
    )


@router.get(
    "/runs/{run_id}/export", response_class=StreamingResponse,
    responses={200: _FILE, **_ERRORS},
)
async def export_run(
    run_id: RunId, request: Request, session: Session, _: Reader, format: RunFormat = FORMAT
) -> StreamingResponse:
    plan = await export.plan_run_export(session, run_id, format)
    # End the read transaction now: the stream reads through its own connection, and an
    # open snapshot held for the whole download would keep SQLite's WAL from shrinking.
    await session.commit()
    return _stream(request, plan, format, f"run-{run_id}")


@router.get("/runs/{run_id}/export/metadata", responses=_ERRORS)
async def export_run_metadata(
    run_id: RunId, request: Request, session: Session, _: Reader, format: RunFormat = FORMAT
) -> dict[str, Any]:
    """The export's description with its ``data_sha256``: the parallel metadata document
    of a BDF file (whose text has no room for it), or a check of a downloaded export."""
    plan = await export.plan_run_export(session, run_id, format)
    url = request.app.state.settings.resolved_database_url
    return await run_in_threadpool(export.digest_only, url, plan)


@router.get(
    "/cells/{cell_id}/export", response_class=StreamingResponse,
    responses={200: _FILE, **_ERRORS},
)
async def export_cell(
    cell_id: CellId, request: Request, session: Session, _: Reader,
    format: Literal["csv", "parquet"] = Query(
        "csv", description="csv | parquet (all the cell's runs, run_id column)"
    ),
) -> StreamingResponse:
    plan = await export.plan_cell_export(session, cell_id, format)
    await session.commit()
    return _stream(request, plan, format, f"cell-{cell_id}")
