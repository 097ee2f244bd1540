"""Per-run alert subscriptions: who is told about one run, besides the lab's subscribers.

A technician or engineer subscribes an e-mail address or a webhook URL to a run, for some
or all of the alert kinds (``completed``, ``paused_fault``, ``aborted_safety``, and
``node_down``/``node_up`` of the node acquiring it), and can unsubscribe it again; each
change is an audit event naming the run. The notifier (:mod:`labdaq.alerts`) reads a
run's subscriptions when it has an alert for that run (:func:`targets_for`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.auth import aware
from labdaq.config import ALERT_KINDS, AlertSubscription
from labdaq.errors import Conflict, NotFound
from labdaq.runs import require_run
from labdaq.storage import models as m


def view(sub: m.RunSubscription) -> dict[str, Any]:
    return {
        "id": sub.id, "run_id": sub.run_id,
        "email": sub.target if sub.channel == "email" else None,
        "webhook": sub.target if sub.channel == "webhook" else None,
        "kinds": list(sub.kinds), "created_by": sub.created_by,
        "created_at": ts.isoformat() if (ts := aware(sub.created_at)) else None,
    }


async def list_subscriptions(session: AsyncSession, run_id: int) -> list[m.RunSubscription]:
    await require_run(session, run_id)
    rows = await session.scalars(select(m.RunSubscription)
                                 .where(m.RunSubscription.run_id == run_id)
                                 .order_by(m.RunSubscription.id))
    return list(rows.all())


async def subscribe(session: AsyncSession, run_id: int, sub: AlertSubscription,
                    actor: str) -> m.RunSubscription:
    """Add ``sub`` to the run (409 if that address or URL is subscribed to it already)."""
    await require_run(session, run_id)
    channel, target = ("email", sub.email) if sub.email else ("webhook", sub.webhook)
    assert target is not None  # AlertSubscription names exactly one
    taken = await session.scalar(select(m.RunSubscription.id).where(
        m.RunSubscription.run_id == run_id, m.RunSubscription.target == target))
    if taken is not None:
        raise Conflict(f"{target} is subscribed to run {run_id} already")
    kinds = [k for k in ALERT_KINDS if k in sub.kinds]
    row = m.RunSubscription(run_id=run_id, channel=channel, target=target, kinds=kinds,
                            created_by=actor)
    session.add(row)
    try:
        await session.flush()
    except IntegrityError as exc:  # a concurrent request subscribed the same target
        raise Conflict(f"{target} is subscribed to run {run_id} already") from exc
    session.add(m.Event(
        run_id=run_id, kind="audit", actor=actor,
        message=f"{channel} {target} subscribed to run {run_id} ({', '.join(kinds)})",
        data={"subscription_id": row.id, "before": None, "after": view(row)},
    ))
    return row


async def unsubscribe(session: AsyncSession, run_id: int, subscription_id: int,
                      actor: str, reason: str | None = None) -> m.RunSubscription:
    row = await session.scalar(select(m.RunSubscription).where(
        m.RunSubscription.id == subscription_id, m.RunSubscription.run_id == run_id))
    if row is None:
        raise NotFound(f"run {run_id} has no subscription {subscription_id}")
    before = view(row)
    await session.delete(row)
    session.add(m.Event(
        run_id=run_id, kind="audit", actor=actor,
        message=f"{row.channel} {row.target} unsubscribed from run {run_id}",
        data={"subscription_id": subscription_id, "before": before, "after": None,
              "reason": reason},
    ))
    await session.flush()
    return row


async def targets_for(session: AsyncSession, run_ids: Iterable[int],
                      kind: str) -> list[AlertSubscription]:
    """The subscribers of these runs who want alerts of ``kind`` (each target once)."""
    ids = sorted(set(run_ids))
    if not ids:
        return []
    rows = await session.scalars(select(m.RunSubscription)
                                 .where(m.RunSubscription.run_id.in_(ids))
                                 .order_by(m.RunSubscription.id))
    out: dict[str, AlertSubscription] = {}
    for r in rows:
        if kind in r.kinds and r.target not in out:
            out[r.target] = AlertSubscription(
                email=r.target if r.channel == "email" else None,
                webhook=r.target if r.channel == "webhook" else None, kinds=list(r.kinds))
    return list(out.values())
