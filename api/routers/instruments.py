"""Instruments: list them; admins configure them (resource string + driver + channels)."""

from __future__ import annotations

from fastapi import APIRouter, status

from labdaq.api.deps import Admin, Reader, Session
from labdaq.api.schemas import InstrumentOut
from labdaq.instruments_config import InstrumentConfig
from labdaq.instruments_service import configure_instrument, list_instruments

router = APIRouter(prefix="/api/v1/instruments", tags=["instruments"])


@router.get("", response_model=list[InstrumentOut])
async def get_instruments(session: Session, _: Reader) -> list[InstrumentOut]:
    return [InstrumentOut(**x) for x in await list_instruments(session)]


@router.put("", response_model=InstrumentOut, status_code=status.HTTP_200_OK)
async def put_instrument(body: InstrumentConfig, session: Session, token: Admin) -> InstrumentOut:
    out = await configure_instrument(session, body, actor=token.name)
    await session.commit()
    return InstrumentOut(**out)
