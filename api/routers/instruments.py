"""Instruments: list them; admins configure them (a whole instruments document, as
``labdaq instruments apply`` takes it, or one instrument), unless a file configures them."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from pydantic import BaseModel

from labdaq.api.deps import Admin, Reader, Session
from labdaq.api.problems import AUTH, COMMON, OPERATE, responses
from labdaq.api.schemas import InstrumentOut
from labdaq.instruments_config import InstrumentConfig, InstrumentsConfig
from labdaq.instruments_service import (
    configure_instrument,
    configure_lab,
    list_instruments,
    refuse_if_file_configured,
)

router = APIRouter(prefix="/api/v1/instruments", tags=["instruments"])


class ChangeOut(BaseModel):
    action: str  # add, update, disable, remove
    kind: str  # instrument, channel, cell
    name: str
    detail: str


class InstrumentsApplied(BaseModel):
    """The differences a whole document made (or, ``dry_run``, would make)."""

    dry_run: bool
    summary: str
    changes: list[ChangeOut]
    instruments: list[InstrumentOut]


@router.get("", response_model=list[InstrumentOut], responses=responses(*COMMON, *AUTH))
async def get_instruments(session: Session, _: Reader) -> list[InstrumentOut]:
    return [InstrumentOut(**x) for x in await list_instruments(session)]


@router.put("", response_model=InstrumentsApplied | InstrumentOut,
            status_code=status.HTTP_200_OK, responses=responses(*COMMON, *OPERATE, 409))
async def put_instruments(body: InstrumentsConfig | InstrumentConfig, request: Request,
                          session: Session, token: Admin,
                          dry_run: bool = False) -> InstrumentsApplied | InstrumentOut:
    """A document (``{"instruments": [...], "cells": [...]}``) replaces the lab's
    configuration, as ``labdaq instruments apply``; one instrument is created or updated.
    409 when an instruments file configures the lab or an active run is in the way."""
    refuse_if_file_configured(request.app.state.settings.instruments_file)
    if isinstance(body, InstrumentConfig):
        out = await configure_instrument(session, body, actor=token.name, dry_run=dry_run)
        if not dry_run:
            await session.commit()
        return InstrumentOut(**out)
    result = await configure_lab(session, body, actor=token.name, dry_run=dry_run)
    if not dry_run:
        await session.commit()
    return InstrumentsApplied(
        dry_run=dry_run, summary=result.summary(),
        changes=[ChangeOut(**c.as_dict()) for c in result.changes],
        instruments=[InstrumentOut(**x) for x in await list_instruments(session)],
    )
