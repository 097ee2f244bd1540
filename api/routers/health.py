"""Liveness and database reachability."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import text

import labdaq
from labdaq.api.deps import Session
from labdaq.api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health)
async def health(session: Session) -> Health:
    await session.execute(text("SELECT 1"))
    return Health(status="ok", version=labdaq.__version__, database=session.bind.dialect.name)
