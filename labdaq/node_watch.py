"""Node watch: a node going down, and coming back, becomes one ``node`` event, written by a
surviving process.

A node that dies cannot say so; the API processes, which survive it, watch the nodes'
heartbeats (labdaq.nodes.is_down, on the database's clock) and record each change as an
event of kind ``node`` (no run; ``data``: the node, ``state`` "down" or "up", and the runs
it was acquiring). The alert notifier (labdaq.alerts) follows events, so the event is what
turns into an e-mail or a webhook.

Several API processes watch at once, and the change must be written once: each takes the
database's lock for it before it compares the node's state with the node's last ``node``
event, and writes only when they differ; the second one in sees the first one's event.
On PostgreSQL that lock is a transaction-level advisory lock; on SQLite it is the
database's write lock, taken by a write that changes nothing before the events are read
(the effect of BEGIN IMMEDIATE, as labdaq.run_queue.lock_channel does for a channel).
A node with no ``node`` event that is up has never been down: no event. Between changes
a watcher reads only the heartbeats (it keeps the last state it saw), so the events table
is read once per change, not once per poll, and the lock is taken only when a change
looks unrecorded.

On SQLite (one machine, ``--role all``) the same watch runs in the API process: the
engine is a process of its own there too, so a killed or hung engine, and its return,
are events and alerts as a node's are.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

from sqlalchemy import select, text, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from labdaq.heartbeat import as_utc
from labdaq.nodes import db_now, is_down, is_postgresql
from labdaq.storage import models as m

log = logging.getLogger(__name__)

#: The event kind of a node's change (``data["state"]``: "down" or "up").
NODE_EVENT = "node"
#: Advisory-lock key of the watchers' critical section (the two-key form's first key;
#: labdaq.nodes.INSTRUMENT_LOCK_NS is the instruments' namespace).
WATCH_LOCK_NS = 0x1AB1


async def last_node_state(session: AsyncSession, node: str) -> str | None:
    """The state of the node's last ``node`` event (None: it never went down)."""
    ev = await session.scalar(
        select(m.Event).where(m.Event.kind == NODE_EVENT, m.Event.run_id.is_(None),
                              m.Event.data["node"].as_string() == node)
        .order_by(m.Event.id.desc()).limit(1))
    return None if ev is None else str((ev.data or {}).get("state"))


def _needs_event(recorded: str | None, state: str) -> bool:
    """A change to record: not the state last recorded, and not "up" for a node that was
    never down."""
    return recorded != state and not (recorded is None and state == "up")


async def lock_watch(session: AsyncSession, nodes: list[str]) -> None:
    """Serialise the watchers until the transaction ends: an advisory lock on PostgreSQL;
    on SQLite the write lock, taken by a no-op write to the nodes' heartbeat rows before
    anything is read (a read first would leave a snapshot a second watcher's commit makes
    stale, and SQLite refuses to turn that into a write)."""
    if is_postgresql(session):
        await session.execute(text("SELECT pg_advisory_xact_lock(:ns, 0)"),
                              {"ns": WATCH_LOCK_NS})
        return
    await session.execute(update(m.NodeHeartbeat).where(m.NodeHeartbeat.node.in_(nodes))
                          .values(node=m.NodeHeartbeat.node))


class NodeWatch:
    """Polls the nodes' heartbeats; writes a ``node`` event for each change it sees first."""

    def __init__(self, maker: async_sessionmaker[AsyncSession], down_after_s: float,
                 poll_s: float) -> None:
        self.maker = maker
        self.down_after_s = down_after_s
        self.poll_s = poll_s
        # Node -> the state ("down" | "up") this watcher last saw recorded.
        self.seen: dict[str, str] = {}

    async def run_once(self) -> list[int]:
        """Record every change not recorded yet; returns the ids of the events written."""
        async with self.maker() as s:
            beats = (await s.scalars(select(m.NodeHeartbeat))).all()
            now = await db_now(s)
            states = {b.node: ("down" if is_down(b, now, self.down_after_s) else "up", b)
                      for b in beats}
        changed = {n for n, (state, _) in states.items() if self.seen.get(n) != state}
        if not changed:
            return []
        # Read first, without the lock: usually (a watcher starting, a change another
        # process recorded) nothing is to be written, and on SQLite the lock is the
        # database's one write lock.
        async with self.maker() as s:
            due = [n for n in sorted(changed)
                   if _needs_event(await last_node_state(s, n), states[n][0])]
        written = []
        if due:
            async with self.maker() as s, s.begin():
                # Held to commit: the watchers compare and write one at a time.
                await lock_watch(s, due)
                for node in due:
                    state, beat = states[node]
                    if not _needs_event(await last_node_state(s, node), state):
                        continue
                    ev = await self._event(s, node, state, beat, now)
                    s.add(ev)
                    await s.flush()
                    written.append(ev.id)
        # Only after the commit: a failed write is tried again at the next poll.
        self.seen.update({n: states[n][0] for n in changed})
        return written

    async def _event(self, s: AsyncSession, node: str, state: str,
                     beat: m.NodeHeartbeat, now: datetime) -> m.Event:
        runs = list((await s.scalars(
            select(m.Run.id).where(m.Run.node == node,
                                   m.Run.state.in_((m.RunState.running.value,
                                                    m.RunState.paused.value)))
            .order_by(m.Run.id))).all())
        if state == "down":
            age_s = (now - as_utc(beat.beat_at)).total_seconds()
            why = beat.state if beat.state != "running" else \
                f"no heartbeat for {age_s:.0f} s (more than {self.down_after_s:g} s)"
            message = f"node {node} down: {why}; {len(runs)} run(s) show node_down"
            severity = "critical" if runs else "warning"
        else:
            message = f"node {node} back up: its runs resume"
            severity = "info"
        return m.Event(run_id=None, kind=NODE_EVENT, severity=severity, message=message,
                       data={"node": node, "state": state, "runs": runs})

    async def run_forever(self) -> None:
        """Poll until cancelled; a database error is logged and the next poll tries again."""
        while True:
            try:
                for ev_id in await self.run_once():
                    log.warning("node event %d recorded", ev_id)
            except Exception:  # noqa: BLE001 - the API keeps serving; the next poll retries
                log.exception("node watch")
            await asyncio.sleep(self.poll_s)
