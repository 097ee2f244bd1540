"""Alert notifier: tell subscribers by e-mail and webhook when a run completes, stops on a
fault or stops for safety, and when an acquisition node goes down or comes back. Who is
told: the lab's subscribers in the configuration (``[[labdaq.alerts]]``) and the run's own
(:mod:`labdaq.run_alerts`, subscribed through the API).

It follows the events table (the engine writes a ``state`` event with every run's final
state) with a cursor on ``events.id`` kept in the database (``alert_cursor``), so a
restart neither repeats nor skips an event. A node's change is a ``node`` event that a
surviving API process writes once (labdaq.node_watch); its alert names the node and the
runs it was acquiring, and has no run of its own. Each delivery is claimed first by inserting
its ``alert_deliveries`` row (unique per event and target: two notifiers never send the
same alert twice), then sent with retries and backoff, and its outcome recorded.
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any

import httpx
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from labdaq import run_alerts
from labdaq.config import AlertSubscription, Settings
from labdaq.node_watch import NODE_EVENT
from labdaq.storage import models as m

log = logging.getLogger(__name__)

#: The run's final state (a ``state`` event) -> the alert kind subscribers choose. An
#: acquisition fault ends a run ``failed``, a run that could not be resumed ends
#: ``interrupted``: both are "paused_fault", like a lost instrument (an ``interruption``
#: event with cause ``instrument_lost``: outputs off, the run waits for the instrument),
#: and so is a chamber that missed its set point in time (a ``chamber`` event: the run is
#: paused until a technician resumes or stops it).
KIND_OF_STATE = {
    m.RunState.completed.value: "completed",
    m.RunState.interrupted.value: "paused_fault",
    m.RunState.failed.value: "paused_fault",
    m.RunState.aborted_safety.value: "aborted_safety",
}
_BATCH = 200


@dataclass(frozen=True)
class Alert:
    """What one alert says: the run, its channel, its state, why, and where to look."""

    event_id: int
    run_id: int | None
    kind: str
    state: str
    reason: str
    channel: str | None
    limit: dict[str, Any] | None
    link: str
    # A node's change (kinds node_down, node_up): the node and the runs it was acquiring.
    node: str | None = None
    runs: tuple[int, ...] = ()

    def payload(self) -> dict[str, Any]:
        return {"event_id": self.event_id, "run_id": self.run_id, "kind": self.kind,
                "state": self.state, "reason": self.reason, "channel": self.channel,
                "limit": self.limit, "link": self.link, "node": self.node,
                "runs": list(self.runs)}

    def subject(self) -> str:
        if self.node is not None:
            return f"labdaq: node {self.node} {self.state}" + (
                f" ({len(self.runs)} runs)" if self.runs else "")
        return f"labdaq: run {self.run_id} {self.state}" + (
            f" ({self.limit['limit']})" if self.limit else "")

    def text(self) -> str:
        if self.node is not None:
            runs = ", ".join(str(r) for r in self.runs) or "none"
            return (f"Node {self.node}: {self.state}.\nReason: {self.reason}\n"
                    f"Runs: {runs}\nLink: {self.link}\n")
        lines = [f"Run {self.run_id} on channel {self.channel or '?'}: {self.state}.",
                 f"Reason: {self.reason}"]
        if self.limit:
            lines.append(f"Limit: {self.limit['limit']} (measured {self.limit['value']}, "
                         f"limit {self.limit['bound']}, from {self.limit['source'] or '?'})")
        lines.append(f"Link: {self.link}")
        return "\n".join(lines) + "\n"


class Notifier:
    """Reads new events, turns run endings into alerts, delivers them to subscribers."""

    def __init__(self, maker: async_sessionmaker[AsyncSession], settings: Settings) -> None:
        self.maker = maker
        self.settings = settings

    async def _cursor(self, s: AsyncSession) -> int:
        row = await s.get(m.AlertCursor, 1)
        if row is None:
            # A first start follows from now: it does not alert about the lab's history.
            from sqlalchemy import func

            start = int(await s.scalar(select(func.max(m.Event.id))) or 0)
            s.add(m.AlertCursor(id=1, event_id=start))
            await s.commit()
            return start
        return row.event_id

    def _node_alert(self, ev: m.Event) -> Alert | None:
        data = ev.data or {}
        state = str(data.get("state", ""))
        if ev.run_id is not None or state not in ("down", "up"):
            return None
        return Alert(ev.id, None, f"node_{state}", state, ev.message, None, None,
                     f"{self.settings.public_url.rstrip('/')}/", node=str(data.get("node")),
                     runs=tuple(int(r) for r in data.get("runs") or ()))

    async def _alert(self, s: AsyncSession, ev: m.Event) -> Alert | None:
        if ev.kind == NODE_EVENT:
            return self._node_alert(ev)
        data = ev.data or {}
        run = await s.get(m.Run, ev.run_id) if ev.run_id is not None else None
        if ev.kind == "interruption":
            lost = data.get("cause") == "instrument_lost" and data.get("to_t_s") is None
            # A run that could not be resumed ends interrupted with an interruption event
            # that has no end (labdaq.engine.recorder.interrupted), and no state event.
            ended = "to_t_s" not in data and run is not None \
                and run.state == m.RunState.interrupted.value
            state = "instrument_lost" if lost else "interrupted" if ended else ""
            kind = "paused_fault" if state else None
        elif ev.kind == "chamber":
            state = "chamber_paused" if data.get("cause") == "set_point_timeout" else ""
            kind = "paused_fault" if state else None
        else:
            state = str(data.get("state", ""))
            kind = KIND_OF_STATE.get(state)
        if kind is None or ev.run_id is None:
            return None
        channel = None
        if run is not None and run.channel_id is not None:
            ch = await s.get(m.Channel, run.channel_id)
            channel = ch.name if ch is not None else None
        limit = None
        if kind == "aborted_safety":
            trip = await s.scalar(
                select(m.Event).where(m.Event.run_id == ev.run_id, m.Event.kind == "safety",
                                      m.Event.id <= ev.id).order_by(m.Event.id.desc()).limit(1))
            if trip is not None:
                d = trip.data or {}
                limit = {k: d.get(k) for k in ("limit", "value", "bound", "source")}
        # A state event says "run <state>: <reason>".
        reason = ev.message.split(": ", 1)[1] \
            if ev.kind == "state" and ": " in ev.message else ev.message
        return Alert(ev.id, ev.run_id, kind, state, reason, channel, limit,
                     f"{self.settings.public_url.rstrip('/')}/runs/{ev.run_id}")

    async def run_once(self) -> int:
        """Handle every event after the cursor; returns how many deliveries were made
        (sent or failed) by this call."""
        async with self.maker() as s:
            after = await self._cursor(s)
            # The newest event first, then the state events up to it: one committed in
            # between is left for the next call, not skipped.
            last = int(await s.scalar(
                select(m.Event.id).where(m.Event.id > after).order_by(m.Event.id.desc())
                .limit(1)) or after)
            events = (await s.scalars(
                select(m.Event).where(m.Event.id > after, m.Event.id <= last,
                                      m.Event.kind.in_(("state", "interruption",
                                                        "chamber", NODE_EVENT)))
                .order_by(m.Event.id).limit(_BATCH))).all()
            alerts = [a for a in [await self._alert(s, ev) for ev in events] if a is not None]
            sends = [(alert, sub) for alert in alerts
                     for sub in await self._subscribers(s, alert)]
        if len(events) == _BATCH:
            last = events[-1].id  # more to read: the next call continues from here
        # Concurrently: one receiver that is down (retrying with backoff) holds up no other.
        done = sum(await asyncio.gather(*(self._deliver(alert, sub) for alert, sub in sends)))
        async with self.maker() as s:
            row = await s.get(m.AlertCursor, 1)
            if row is not None and row.event_id < last:
                row.event_id = last
                await s.commit()
        return done

    async def _subscribers(self, s: AsyncSession, alert: Alert) -> list[AlertSubscription]:
        """The lab's subscribers of the alert's kind, then those of its run (a node's
        alert: of the runs it was acquiring), each address or URL once."""
        runs = [alert.run_id] if alert.run_id is not None else list(alert.runs)
        out: dict[str | None, AlertSubscription] = {}
        for sub in [*self.settings.alerts, *await run_alerts.targets_for(s, runs, alert.kind)]:
            if alert.kind in sub.kinds:
                out.setdefault(sub.email or sub.webhook, sub)
        return list(out.values())

    async def _deliver(self, alert: Alert, sub: AlertSubscription) -> int:
        channel, target = ("email", sub.email) if sub.email else ("webhook", sub.webhook)
        assert target is not None
        async with self.maker() as s:
            row = m.AlertDelivery(event_id=alert.event_id, run_id=alert.run_id,
                                  kind=alert.kind, channel=channel, target=target,
                                  outcome="pending", attempts=0)
            s.add(row)
            try:
                await s.commit()
            except IntegrityError:
                return 0  # claimed before (a restart, or another notifier)
            error: str | None = None
            delay = self.settings.alerts_backoff_s
            for attempt in range(1, self.settings.alerts_attempts + 1):
                try:
                    if channel == "email":
                        await asyncio.to_thread(self._send_email, alert, target)
                    else:
                        await self._post_webhook(alert, target)
                    error = None
                except (OSError, smtplib.SMTPException, httpx.HTTPError) as exc:
                    error = f"{type(exc).__name__}: {exc}"
                    log.warning("alert %s to %s, try %d: %s", alert.event_id, target,
                                attempt, error)
                row.attempts = attempt
                if error is None:
                    break
                if attempt < self.settings.alerts_attempts:
                    await asyncio.sleep(delay)
                    delay *= 2
            row.outcome = "failed" if error else "sent"
            row.error = error
            row.sent_at = None if error else datetime.now(UTC)
            await s.commit()
        return 1

    def _send_email(self, alert: Alert, to: str) -> None:
        msg = EmailMessage()
        msg["From"] = self.settings.smtp_from
        msg["To"] = to
        msg["Subject"] = alert.subject()
        msg.set_content(alert.text())
        with smtplib.SMTP(self.settings.smtp_host, self.settings.smtp_port,
                          timeout=self.settings.alerts_timeout_s) as smtp:
            smtp.send_message(msg)

    async def _post_webhook(self, alert: Alert, url: str) -> None:
        async with httpx.AsyncClient(timeout=self.settings.alerts_timeout_s) as client:
            resp = await client.post(url, json=alert.payload())
            resp.raise_for_status()

    async def run_forever(self) -> None:
        """Poll until cancelled; a database error is logged and the next poll tries again."""
        while True:
            try:
                await self.run_once()
            except Exception:  # noqa: BLE001 - the API keeps serving; the next poll retries
                log.exception("alert notifier")
            await asyncio.sleep(self.settings.alerts_poll_s)
