"""Cells: the physical cells under test; technicians register and edit them (audited)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, status

from labdaq import cells as service
from labdaq.api.dataout_schemas import CellOut
from labdaq.api.deps import CellId, Operator, Reader, Session
from labdaq.api.problems import Problem
from labdaq.api.schemas import EventOut
from labdaq.bounds import INT32_MAX, ONE_LINE
from labdaq.cells import CellCreate, CellPatch
from labdaq.storage import models as m

router = APIRouter(prefix="/api/v1/cells", tags=["cells"])

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, unknown or revoked token"},
}
_WRITE: dict[int | str, dict[str, Any]] = {
    **_AUTH,
    403: {"model": Problem, "description": "the token's role may not edit cells"},
    422: {"model": Problem, "description": "invalid cell (names each bad field)"},
}
_404: dict[int | str, dict[str, Any]] = {404: {"model": Problem, "description": "no such cell"}}


async def _out(session: Session, cells: list[m.Cell]) -> list[CellOut]:
    runs = await service.run_ids_by_cell(session, [c.id for c in cells])
    return [
        CellOut.model_validate(c).model_copy(update={"run_ids": runs[c.id]}) for c in cells
    ]


@router.get("", response_model=list[CellOut], responses=_AUTH)
async def list_cells(
    session: Session,
    _: Reader,
    chemistry: str | None = Query(None, max_length=50, pattern=ONE_LINE),
    serial: str | None = Query(None, max_length=100, pattern=ONE_LINE),
    limit: int = Query(100, ge=1, le=1000),
    offset: int = Query(0, ge=0, le=INT32_MAX),
) -> list[CellOut]:
    return await _out(session, await service.list_cells(session, limit, offset, chemistry, serial))


@router.post(
    "", response_model=CellOut, status_code=status.HTTP_201_CREATED,
    responses={**_WRITE, 409: {"model": Problem, "description": "serial already registered"}},
)
async def create_cell(body: CellCreate, session: Session, token: Operator) -> CellOut:
    cell = await service.create_cell(session, body, actor=token.name)
    await session.commit()
    return (await _out(session, [cell]))[0]


@router.get("/{cell_id}", response_model=CellOut, responses={**_AUTH, **_404})
async def get_cell(cell_id: CellId, session: Session, _: Reader) -> CellOut:
    return (await _out(session, [await service.get_cell(session, cell_id)]))[0]


@router.patch("/{cell_id}", response_model=CellOut, responses={**_WRITE, **_404})
async def update_cell(
    cell_id: CellId, body: CellPatch, session: Session, token: Operator
) -> CellOut:
    cell = await service.update_cell(session, cell_id, body, actor=token.name)
    await session.commit()
    return (await _out(session, [cell]))[0]


@router.get("/{cell_id}/events", response_model=list[EventOut], responses={**_AUTH, **_404})
async def get_cell_events(cell_id: CellId, session: Session, _: Reader) -> list[EventOut]:
    """The cell's audit trail: who registered and edited it, with values before and after."""
    await service.get_cell(session, cell_id)
    return [EventOut.model_validate(e) for e in await service.cell_events(session, cell_id)]
