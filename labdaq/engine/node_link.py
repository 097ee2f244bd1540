"""A node's own PostgreSQL connection: instrument fences (advisory locks) and its wake-ups
(LISTEN).

One connection, held for the node's life and never pooled: a session-level advisory lock
lives exactly as long as the connection that took it, so a node that dies (kill -9, power
cut) releases its instruments when PostgreSQL drops its connection, and a node that runs
holds them. ``acquire`` takes an instrument's lock (``pg_try_advisory_lock`` on
``(INSTRUMENT_LOCK_NS, instrument id)``) before the node opens it; another node holding it
gets False and leaves the instrument alone. The same connection LISTENs on the node's
channel (labdaq.nodes.wake_channel) and sets ``wake`` on a notification.

If the connection drops while the node goes on, ``check`` reconnects and takes the locks
again; if another process took one meanwhile the node must stop driving (``lost`` says
which), and the node stops so that its supervisor restarts it.

On SQLite (single node) there is no connection: every acquire succeeds.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from sqlalchemy.engine import make_url

from labdaq.nodes import INSTRUMENT_LOCK_NS, wake_channel

log = logging.getLogger(__name__)

KEEPALIVES = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "5",
              "tcp_keepalives_count": "3"}


class NodeLink:
    def __init__(self, url: str, node: str, unassigned: bool) -> None:
        u = make_url(url)
        self.enabled = u.get_backend_name() == "postgresql"
        # asyncpg's own DSN form (no "+asyncpg" driver suffix).
        self.dsn = u.set(drivername="postgresql").render_as_string(hide_password=False)
        self.channels = [wake_channel(node)] + ([wake_channel(None)] if unassigned else [])
        self.wake = asyncio.Event()
        self.held: set[int] = set()
        self.lost: set[int] = set()
        self._conn: Any = None

    async def connect(self) -> None:
        if not self.enabled or self._conn is not None:
            return
        import asyncpg

        # Keepalives: a node that vanishes without closing its connection (power cut,
        # network gone) would otherwise hold its fences until the server's TCP timeout
        # (hours); with these the server drops it, and the fences, within about 20 s.
        conn = await asyncpg.connect(self.dsn, server_settings=KEEPALIVES)
        try:
            for channel in self.channels:
                await conn.add_listener(channel, self._notified)
            for instrument_id in sorted(self.held):
                if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)",
                                           INSTRUMENT_LOCK_NS, instrument_id):
                    self.lost.add(instrument_id)
        except BaseException:
            await conn.close()
            raise
        self._conn = conn
        # A reconnect may have missed notifications: look at the tables once now.
        self.wake.set()

    def _notified(self, *_args: Any) -> None:
        self.wake.set()

    async def acquire(self, instrument_id: int) -> bool:
        """Take the instrument's fence (True: this node may drive it)."""
        if not self.enabled or instrument_id in self.held:
            return True
        await self.connect()
        ok = bool(await self._conn.fetchval("SELECT pg_try_advisory_lock($1, $2)",
                                            INSTRUMENT_LOCK_NS, instrument_id))
        if ok:
            self.held.add(instrument_id)
        return ok

    async def acquire_waiting(self, instrument_ids: list[int], wait_s: float,
                              stopping: asyncio.Event | None = None) -> set[int]:
        """Take the fences of ``instrument_ids``, waiting up to ``wait_s`` for those held
        elsewhere (this node's previous process, dead but not yet noticed by the server);
        returns the ids still fenced off."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        pending = list(instrument_ids)
        while True:
            pending = [i for i in pending if not await self.acquire(i)]
            if not pending or loop.time() >= deadline or (stopping and stopping.is_set()):
                return set(pending)
            log.warning("instruments %s: their advisory locks are held by another process; "
                        "waiting up to %.0f s more", pending, deadline - loop.time())
            await asyncio.sleep(min(1.0, max(0.0, deadline - loop.time())))

    async def check(self) -> None:
        """Is the connection (and with it every fence) still there? Reconnect if not; the
        locks it could not take again are in ``lost``. Raises while the database is away."""
        if not self.enabled:
            return
        if self._conn is not None:
            try:
                await asyncio.wait_for(self._conn.fetchval("SELECT 1"), 10)
                return
            except Exception as exc:  # noqa: BLE001 - dropped: reconnect below
                log.warning("node connection lost (%s: %s): reconnecting, taking the "
                            "instrument fences again", type(exc).__name__, exc)
                await self._drop()
        await self.connect()

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.terminate()
            except Exception:  # noqa: BLE001 - it is gone either way
                pass

    async def close(self) -> None:
        """Release every fence (closing the connection does) after the outputs are off."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:  # noqa: BLE001 - terminating releases them as well
                conn.terminate()
        self.held.clear()
