"""Channels: what can run, and whether it is busy."""

from __future__ import annotations

from fastapi import APIRouter

from labdaq.api.deps import Reader, Session
from labdaq.api.problems import AUTH, COMMON, responses
from labdaq.api.schemas import ChannelOut
from labdaq.channels import list_channels

router = APIRouter(prefix="/api/v1/channels", tags=["channels"])


@router.get("", response_model=list[ChannelOut], responses=responses(*COMMON, *AUTH))
async def get_channels(session: Session, _: Reader) -> list[ChannelOut]:
    return [ChannelOut(**c) for c in await list_channels(session)]
