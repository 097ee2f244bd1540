"""Plain DB-API read connections kept per worker thread, for the API's heaviest reads.

A downsampled-samples request reads a run's samples into Arrow (:mod:`labdaq.downsample`)
on a worker thread. Opening a connection for each request (the file, its pragmas, the
WAL index; for PostgreSQL a login) cost as much as the query of a short run, so each
worker thread keeps its own connection (:func:`labdaq.export.connect`: ``sqlite3`` read
only, or ADBC on PostgreSQL) and reuses it. A connection that raised is closed and
dropped, so a restarted PostgreSQL or a replaced file is met with a new one on the next
request.

SQLite: a read connection outside a transaction holds no lock and does not stop WAL
checkpoints (``sqlite3`` opens a transaction only for writes), so keeping it is free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from labdaq.export import connect

T = TypeVar("T")


class ReadPool:
    """One read connection to ``url`` per thread that uses the pool."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[Any] = []

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, paramstyle, *args)`` on this thread's connection."""
        held = getattr(self._local, "conn", None)
        if held is None:
            held = connect(self.url, autocommit=True)
            self._local.conn = held
            with self._lock:
                self._all.append(held[0])
        conn, style = held
        try:
            return fn(conn, style, *args)
        except BaseException:
            self._local.conn = None
            with self._lock:
                if conn in self._all:
                    self._all.remove(conn)
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - already failing; the first error is the one
                pass
            raise

    def close(self) -> None:
        """Close every connection (at shutdown; threads still holding one get a new one)."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - closing at shutdown, nothing left to do
                pass
