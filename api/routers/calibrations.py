"""Calibration certificates of instruments and channels (labdaq.calibrations): admins
record them (audited); the evaluation reads them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Query, status

from labdaq.api.deps import Admin, Session
from labdaq.api.problems import Problem
from labdaq.api.schemas_imports import CalibrationOut
from labdaq.bounds import ONE_LINE
from labdaq.calibrations import CalibrationIn, list_calibrations, record_calibration
from labdaq.storage import models as m

router = APIRouter(prefix="/api/v1/calibrations", tags=["calibrations"])

_AUTH: dict[int | str, dict[str, Any]] = {
    401: {"model": Problem, "description": "missing, unknown or revoked token"},
    403: {"model": Problem, "description": "only admins manage calibrations"},
}


def _out(c: m.Calibration, instrument: str, channel: str | None) -> CalibrationOut:
    return CalibrationOut(
        id=c.id, instrument=instrument, channel=channel, certificate_id=c.certificate_id,
        lab=c.lab, calibrated_on=c.calibrated_on, due_on=c.due_on,
        accuracy=dict(c.accuracy or {}), recorded_by=c.recorded_by,
        recorded_at=c.recorded_at, note=c.note)


@router.post("", response_model=CalibrationOut, status_code=status.HTTP_201_CREATED,
             responses={**_AUTH,
                        404: {"model": Problem, "description": "no such instrument"},
                        422: {"model": Problem, "description": "invalid certificate"}})
async def create_calibration(body: CalibrationIn, session: Session,
                             token: Admin) -> CalibrationOut:
    row = await record_calibration(session, body, actor=token.name)
    await session.commit()
    return _out(row, body.instrument, body.channel)


@router.get("", response_model=list[CalibrationOut], responses=_AUTH)
async def get_calibrations(
    session: Session, _: Admin,
    instrument: str | None = Query(None, max_length=100, pattern=ONE_LINE),
) -> list[CalibrationOut]:
    return [_out(c, i, ch) for c, i, ch in await list_calibrations(session, instrument)]
