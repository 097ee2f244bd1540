"""The dashboard's API additions: who the token is, the lab at a glance, and safety
alarms with their (audited) acknowledgement."""

from __future__ import annotations

from fastapi import APIRouter, Path, status

from labdaq import dashboard as service
from labdaq.api.deps import NodeDownAfterS, Operator, Reader, Session
from labdaq.api.problems import AUTH, COMMON, OPERATE, responses
from labdaq.api.schemas_dashboard import AckIn, AckOut, AlarmOut, ChannelStatus, WhoAmI
from labdaq.bounds import INT32_MAX

router = APIRouter(prefix="/api/v1", tags=["lab"])


@router.get("/whoami", response_model=WhoAmI, responses=responses(*COMMON, *AUTH))
async def whoami(token: Reader) -> WhoAmI:
    return WhoAmI(name=token.name, role=token.role, grants=service.grants_of(token.role))


@router.get("/lab", response_model=list[ChannelStatus], responses=responses(*COMMON, *AUTH))
async def lab(session: Session, _: Reader, down_after_s: NodeDownAfterS) -> list[ChannelStatus]:
    """Every channel: its state, the run on it with progress, and its newest V/I/T."""
    return [ChannelStatus.model_validate(x)
            for x in await service.overview(session, down_after_s)]


@router.get("/alarms", response_model=list[AlarmOut], responses=responses(*COMMON, *AUTH))
async def alarms(session: Session, _: Reader) -> list[AlarmOut]:
    """Safety events nobody has acknowledged yet, oldest first."""
    return [AlarmOut.model_validate(e) for e in await service.open_alarms(session)]


@router.post("/alarms/{event_id}/ack", response_model=AckOut,
             status_code=status.HTTP_201_CREATED,
             responses=responses(*COMMON, *OPERATE, 404, 409))
async def acknowledge(
    session: Session,
    token: Operator,
    event_id: int = Path(ge=1, le=INT32_MAX, description="the safety event's id"),
    body: AckIn | None = None,
) -> AckOut:
    """Acknowledge a safety alarm: an audit event on its run names it and who saw it."""
    ack = await service.acknowledge(session, event_id, actor=token.name,
                                    note=body.note if body else None)
    await session.commit()
    return AckOut.model_validate(ack)
