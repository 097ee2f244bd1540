"""A run's analysis: incremental capacity (dQ/dV) per cycle and the equivalent-circuit
fits of its impedance spectra (labdaq.run_analysis does the work)."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from labdaq import run_analysis as service
from labdaq.api.deps import Reader, RunId, Session
from labdaq.api.problems import AUTH, COMMON, responses
from labdaq.api.schemas_analysis import DqdvOut, EisFitOut
from labdaq.bounds import INT32_MAX

router = APIRouter(prefix="/api/v1/runs", tags=["analysis"])

READ = responses(*COMMON, *AUTH, 404)


@router.get("/{run_id}/dqdv", response_model=list[DqdvOut], responses=READ)
async def get_dqdv(
    run_id: RunId,
    session: Session,
    _: Reader,
    cycle: Annotated[list[Annotated[int, Query(ge=0, le=INT32_MAX)]] | None, Query(
        max_length=20, description="cycle indices (repeatable); default: the first and "
                                   "the last ended cycle")] = None,
    direction: Annotated[Literal["charge", "discharge"], Query(
        description="the half-cycle to differentiate")] = "charge",
) -> list[DqdvOut]:
    """dQ/dV against voltage of each cycle's charge (or discharge), smoothed."""
    return [DqdvOut.model_validate(c)
            for c in await service.dqdv_curves(session, run_id, cycle, direction)]


@router.get("/{run_id}/eis/fits", response_model=list[EisFitOut], responses=READ)
async def get_eis_fits(
    run_id: RunId,
    session: Session,
    _: Reader,
    newest: Annotated[int, Query(ge=1, le=50, description="fit the newest N spectra")] = 10,
) -> list[EisFitOut]:
    """The equivalent-circuit fit of each impedance spectrum, with its fitted curve."""
    return [EisFitOut.model_validate(f)
            for f in await service.eis_fits(session, run_id, newest)]
