"""A run's samples: pages at full resolution with a cursor, or downsampled for plots."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response
from sqlalchemy import select

from labdaq import runs as run_service
from labdaq.api.dataout_schemas import SamplesPage
from labdaq.api.deps import Reader, RunId, Session
from labdaq.api.json_response import model_json
from labdaq.api.problems import Problem
from labdaq.bounds import INT32_MAX, INT64_MAX
from labdaq.downsample import downsampled
from labdaq.errors import NotFound
from labdaq.export import COLUMNS, SampleFilter
from labdaq.storage import models as m

router = APIRouter(prefix="/api/v1/runs", tags=["samples"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, unknown or revoked token"},
    404: {"model": Problem, "description": "no such run"},
    422: {"model": Problem, "description": "invalid query parameters"},
}


@router.get("/{run_id}/samples", response_model=SamplesPage, responses=_ERRORS)
async def get_samples(
    run_id: RunId,
    request: Request,
    session: Session,
    _: Reader,
    after_seq: int = Query(0, ge=0, le=INT64_MAX, description="seq greater than this"),
    limit: int = Query(10_000, ge=1, le=100_000, description="page size (full resolution)"),
    t_from: float | None = Query(None, allow_inf_nan=False, description="t_s >= this (s)"),
    t_to: float | None = Query(None, allow_inf_nan=False, description="t_s <= this (s)"),
    cycle: int | None = Query(None, ge=0, le=INT32_MAX, description="only samples of this cycle"),
    step: int | None = Query(None, ge=0, le=INT32_MAX, description="this plan step"),
    points: int | None = Query(
        None, ge=10, le=100_000,
        description="downsample to at most this many points (MinMaxLTTB on voltage and "
        "current); the cursor parameters are then ignored",
    ),
) -> Response:
    where = SampleFilter(t_from=t_from, t_to=t_to, cycle=cycle, step=step)
    if points is not None:
        # One hop to a worker thread with its own connection: the run, its last seq and
        # the samples are all read there (labdaq.read_pool), and an unchanged run is
        # answered from the cache.
        found = await run_in_threadpool(
            request.app.state.read_pool.run, downsampled, run_id, points, where,
            request.app.state.downsample_cache,
        )
        if found is None:
            raise NotFound(f"no run {run_id}")
        table, source = found
        cols = table.to_pydict()
        seqs = cols["seq"]
        return model_json(SamplesPage(
            run_id=run_id, count=len(seqs), next_after_seq=seqs[-1] if seqs else after_seq,
            more=False, downsampled=True, source_count=source, **cols,
        ))
    s = m.Sample
    q = (
        select(*(getattr(s, c) for c in COLUMNS))
        .where(s.run_id == run_id, s.seq > after_seq)
        .order_by(s.seq)
        .limit(limit + 1)
    )
    if t_from is not None:
        q = q.where(s.t_s >= t_from)
    if t_to is not None:
        q = q.where(s.t_s <= t_to)
    if cycle is not None:
        q = q.where(s.cycle_index == cycle)
    if step is not None:
        q = q.where(s.step_index == step)
    rows = (await session.execute(q)).all()
    if not rows:
        await run_service.require_run(session, run_id)
    more = len(rows) > limit
    rows = rows[:limit]
    # Core rows, not ORM objects: building ORM instances dominated this endpoint's cost.
    columns = list(zip(*rows, strict=True)) if rows else [() for _ in COLUMNS]
    data = {c: list(v) for c, v in zip(COLUMNS, columns, strict=True)}
    return model_json(SamplesPage(
        run_id=run_id, count=len(rows),
        next_after_seq=data["seq"][-1] if rows else after_seq, more=more, **data,
    ))
