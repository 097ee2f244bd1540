"""A run's alert subscriptions: list, subscribe an e-mail address or webhook, unsubscribe
(each change audited; labdaq.run_alerts)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, status

from labdaq import run_alerts as service
from labdaq.api.deps import Reader, RunId, Session
from labdaq.api.problems import AUTH, COMMON, responses
from labdaq.api.schemas_alerts import SubscriptionIn, SubscriptionOut
from labdaq.bounds import INT32_MAX

router = APIRouter(prefix="/api/v1/runs", tags=["alerts"])

SubscriptionId = Annotated[int, Path(ge=1, le=INT32_MAX, description="subscription id")]


@router.get("/{run_id}/subscriptions", response_model=list[SubscriptionOut],
            responses=responses(*COMMON, *AUTH, 404))
async def list_subscriptions(run_id: RunId, session: Session, _: Reader) -> list[SubscriptionOut]:
    """Who is told about this run besides the lab's subscribers."""
    rows = await service.list_subscriptions(session, run_id)
    return [SubscriptionOut(**service.view(r)) for r in rows]


@router.post("/{run_id}/subscriptions", response_model=SubscriptionOut,
             status_code=status.HTTP_201_CREATED,
             responses=responses(*COMMON, *AUTH, 404, 409))
async def subscribe(run_id: RunId, body: SubscriptionIn, session: Session,
                    token: Reader) -> SubscriptionOut:
    """Tell an e-mail address or a webhook when this run completes, pauses on a fault or
    stops for safety (or its node goes down or comes back): any role may (audited); 409
    if that address or URL is subscribed to the run already."""
    row = await service.subscribe(session, run_id, body.subscription(), actor=token.name)
    await session.commit()
    return SubscriptionOut(**service.view(row))


@router.delete("/{run_id}/subscriptions/{subscription_id}", response_model=SubscriptionOut,
               responses=responses(*COMMON, *AUTH, 404))
async def unsubscribe(run_id: RunId, subscription_id: SubscriptionId, session: Session,
                      token: Reader) -> SubscriptionOut:
    """Stop telling this subscriber about the run (audited); the removed subscription."""
    row = await service.unsubscribe(session, run_id, subscription_id, actor=token.name)
    await session.commit()
    return SubscriptionOut(**service.view(row))
