"""Plain DB-API read connections kept between requests, for the API's heaviest reads.

A downsampled-samples request reads a run's samples into Arrow (:mod:`labdaq.downsample`)
on a worker thread. Opening a connection for each request (the file, its pragmas, the
WAL index; for PostgreSQL a login) cost as much as the query of a short run, so idle
connections are kept and lent to the next call (:func:`labdaq.export.connect`:
``sqlite3`` read only, or ADBC on PostgreSQL). A connection that raised is closed and
dropped, so a restarted PostgreSQL or a replaced file is met with a new one on the next
request.

At most ``max_idle`` are kept; one returned to a full pool is closed, so the pool holds
the calls running now plus ``max_idle``, however many threads have come and gone
(anyio ends a worker thread idle for 10 s and starts new ones when requests overlap
again: connections kept per thread would grow with that churn). A connection is used by
one call at a time, from whichever thread borrows it (``sqlite3`` is opened with
``check_same_thread`` off).

SQLite: a read connection outside a transaction holds no lock and does not stop WAL
checkpoints (``sqlite3`` opens a transaction only for writes), so keeping it is free.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

from labdaq.export import connect

T = TypeVar("T")

#: Idle connections kept: the standard API load keeps 8 requests in flight.
MAX_IDLE = 8
#: SQLite page cache of each read connection, KiB (SQLite's default is about 2 MiB). A
#: read walks one run's rows once and the OS caches the file behind it, so a large cache
#: per kept connection would only fill with pages of the growing database.
READ_CACHE_KIB = 512


def _close(conn: Any) -> None:
    try:
        conn.close()
    except Exception:  # noqa: BLE001 - dropping it either way; nothing else to do
        pass


class ReadPool:
    """Read connections to ``url``, one lent to each call, at most ``max_idle`` kept."""

    def __init__(self, url: str, max_idle: int = MAX_IDLE) -> None:
        self.url = url
        self.max_idle = max_idle
        self._lock = threading.Lock()
        # Last in, first out: the connection used last has the warmest page cache.
        self._idle: list[tuple[Any, str]] = []
        self._closed = False
        #: Connections open now (lent or idle), for tests and diagnostics.
        self.open_count = 0

    def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(conn, paramstyle, *args)`` on a connection no other call is using."""
        with self._lock:
            held = self._idle.pop() if self._idle else None
        if held is None:
            held = connect(self.url, autocommit=True)
            if held[1] == "qmark":  # sqlite3
                held[0].execute(f"PRAGMA cache_size=-{READ_CACHE_KIB}")
            with self._lock:
                self.open_count += 1
        try:
            result = fn(held[0], held[1], *args)
        except BaseException:
            self._drop(held)
            raise
        with self._lock:
            if not self._closed and len(self._idle) < self.max_idle:
                self._idle.append(held)
                return result
        self._drop(held)
        return result

    def _drop(self, held: tuple[Any, str]) -> None:
        with self._lock:
            self.open_count -= 1
        _close(held[0])

    def close(self) -> None:
        """Close the idle connections (at shutdown; one still lent is closed when it
        comes back)."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for held in idle:
            self._drop(held)
