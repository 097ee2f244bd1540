"""Several acquisition nodes on one PostgreSQL: roles, which node drives what, waking a
node, and telling a node that is down.

A lab scales the way labs already run infrastructure: one PostgreSQL, several acquisition
nodes (``labdaq serve --role node``), one or more API processes (``--role api``); no
cluster protocol of labdaq's own. The database is the only thing they share:

* each instrument row names the node that drives it (``instruments.node``, from the
  instruments file's ``node = "..."``). An instrument with no node is unassigned: the
  single-machine node (``--role all``, the default) drives it, a ``--role node`` never
  does (two nodes would otherwise race for it);
* a node's heartbeat row (labdaq.heartbeat) is its registration; its ``beat_at`` is the
  database's clock on PostgreSQL, so nodes on several machines are compared on one clock;
* a command or a new run is a row; ``pg_notify`` on the owning node's channel wakes that
  node only, inside the transaction that wrote the row (sent on commit). A lost
  notification delays the command to the node's next poll (``engine_poll_s``), never
  loses it;
* a node is *down* when its heartbeat is older than ``node_down_after_s`` by the
  database's clock, or it said it stopped; the API then shows its runs as ``node_down``.

SQLite is single-node: roles other than ``all`` are refused with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, func, or_, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.heartbeat import as_utc
from labdaq.storage import models as m

ROLES = ("all", "node", "api")
#: The run state the API shows for a run whose node is down (never stored).
NODE_DOWN = "node_down"
#: Advisory-lock namespace of instrument fences (the first key of the two-key form).
INSTRUMENT_LOCK_NS = 0x1AB0


class RoleError(ValueError):
    """A role this database cannot have (SQLite is single-node)."""


def check_role(role: str, url: str) -> None:
    """Refuse what cannot work: an unknown role, or a multi-node role on SQLite."""
    if role not in ROLES:
        raise RoleError(f"unknown role {role!r}: expected one of {', '.join(ROLES)}")
    if role != "all" and make_url(url).get_backend_name() != "postgresql":
        raise RoleError(
            f"--role {role} needs PostgreSQL: several nodes and API processes share one "
            "database, and SQLite is a file on one machine (use --role all, or set "
            "database_url to a postgresql:// URL)")


def owned_by(node: str, unassigned: bool) -> ColumnElement[bool]:
    """The instruments a node drives: assigned to it, and (``unassigned``: a single-machine
    node) those assigned to no node."""
    if unassigned:
        return or_(m.Instrument.node == node, m.Instrument.node.is_(None))
    return m.Instrument.node == node


def wake_channel(node: str | None) -> str:
    """The LISTEN channel of a node (of the unassigned instruments' node for None). A
    digest: node names are free text, channel names identifiers of at most 63 bytes."""
    if node is None:
        return "labdaq_node_unassigned"
    return "labdaq_node_" + hashlib.sha1(node.encode()).hexdigest()[:24]


def is_postgresql(session: AsyncSession) -> bool:
    return session.get_bind().dialect.name == "postgresql"


async def wake_node_of_run(session: AsyncSession, run: m.Run, why: str) -> None:
    """Wake the node that must read this run's new row: the node acquiring it, else the
    node driving its channel's instrument. Sent when the session commits; PostgreSQL only
    (an SQLite node polls)."""
    if not is_postgresql(session):
        return
    node = run.node
    if node is None or run.state not in (m.RunState.running.value, m.RunState.paused.value):
        node = await session.scalar(
            select(m.Instrument.node).join(m.Channel, m.Channel.instrument_id == m.Instrument.id)
            .where(m.Channel.id == run.channel_id))
    await session.execute(text("SELECT pg_notify(:channel, :payload)"),
                          {"channel": wake_channel(node), "payload": f"{why} {run.id}"})


async def db_now(session: AsyncSession) -> datetime:
    """The database's clock (PostgreSQL), or this machine's (SQLite: one machine)."""
    if is_postgresql(session):
        now = await session.scalar(select(func.now()))
        assert now is not None
        return as_utc(now)
    return datetime.now(UTC)


def is_down(beat: m.NodeHeartbeat, now: datetime, down_after_s: float) -> bool:
    """Down: said it stopped (or why it went down), or its beat is older than the timeout."""
    return beat.state != "running" or (now - as_utc(beat.beat_at)).total_seconds() > down_after_s


async def down_nodes(session: AsyncSession, nodes: Iterable[str | None],
                     down_after_s: float) -> set[str]:
    """Which of ``nodes`` are down (a node with no heartbeat at all is not: it never
    started, so nothing of it is running)."""
    names = {n for n in nodes if n is not None}
    if not names:
        return set()
    beats = (await session.scalars(
        select(m.NodeHeartbeat).where(m.NodeHeartbeat.node.in_(names)))).all()
    now = await db_now(session)
    return {b.node for b in beats if is_down(b, now, down_after_s)}


async def shown_states(session: AsyncSession, runs: Iterable[m.Run],
                       down_after_s: float) -> dict[int, str]:
    """Run id -> the state the API shows: the stored one, or ``node_down`` for a run
    acquiring (running, paused) on a node that is down. The stored state is left as it
    is: the node resumes the run when it returns (labdaq/engine/recovery.py)."""
    runs = list(runs)
    holding = (m.RunState.running.value, m.RunState.paused.value)
    down = await down_nodes(session, {r.node for r in runs if r.state in holding},
                            down_after_s)
    return {r.id: NODE_DOWN if r.state in holding and r.node in down else r.state
            for r in runs}
