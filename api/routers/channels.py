"""Channels: what can run, whether it is busy, and the runs queued on it."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from labdaq import run_queue
from labdaq.api.deps import NodeDownAfterS, Reader, Session
from labdaq.api.problems import AUTH, COMMON, responses
from labdaq.api.routers.runs import run_out
from labdaq.api.schemas import ChannelOut, RunOut
from labdaq.bounds import INT32_MAX
from labdaq.channels import list_channels

router = APIRouter(prefix="/api/v1/channels", tags=["channels"])

# By id: channel names hold a slash ("smu1/1").
ChannelId = Annotated[int, Path(ge=1, le=INT32_MAX, description="channel id")]


@router.get("", response_model=list[ChannelOut], responses=responses(*COMMON, *AUTH))
async def get_channels(session: Session, _: Reader) -> list[ChannelOut]:
    return [ChannelOut(**c) for c in await list_channels(session)]


@router.get(
    "/{channel_id}/queue", response_model=list[RunOut],
    responses=responses(*COMMON, *AUTH, 404),
)
async def get_queue(channel_id: ChannelId, session: Session, _: Reader,
                    down_after_s: NodeDownAfterS) -> list[RunOut]:
    """The runs waiting on the channel (queued, awaiting_cell), next first, each with its
    queue_position; the run holding the channel is not in it."""
    return await run_out(session, await run_queue.channel_queue(session, channel_id),
                         down_after_s)
