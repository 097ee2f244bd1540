"""The API's read connections (labdaq.read_pool) stay bounded whatever its worker threads
do: anyio ends idle worker threads and starts new ones, and a pool that kept a connection
per thread for the process's life grew without end (the 1 h soak,
tests/test_soak_api_load.py)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest

from labdaq.read_pool import ReadPool


@pytest.fixture
def pool(tmp_path: Path) -> ReadPool:
    db = tmp_path / "r.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE t (x INTEGER)")
        conn.execute("INSERT INTO t VALUES (7)")
    return ReadPool(f"sqlite:///{db}", max_idle=3)


def _read(conn: Any, style: str) -> int:
    assert style == "qmark"
    return int(conn.execute("SELECT x FROM t").fetchone()[0])


def _in_thread(fn: Any) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join()


def test_threads_that_come_and_go_reuse_one_connection(pool: ReadPool) -> None:
    seen: list[int] = []
    for _ in range(50):  # as anyio's worker threads: each a new thread, then gone
        _in_thread(lambda: seen.append(pool.run(_read)))
    assert seen == [7] * 50
    assert pool.open_count == 1


def test_overlapping_calls_each_get_a_connection_and_only_max_idle_are_kept(
    pool: ReadPool,
) -> None:
    n = 6
    inside = threading.Barrier(n + 1)
    leave = threading.Event()
    conns: list[Any] = []
    lock = threading.Lock()

    def hold(conn: Any, style: str) -> None:
        with lock:
            conns.append(conn)
        inside.wait()
        assert leave.wait(60)

    threads = [threading.Thread(target=pool.run, args=(hold,)) for _ in range(n)]
    for t in threads:
        t.start()
    inside.wait()  # every call holds its connection now
    assert len({id(c) for c in conns}) == n and pool.open_count == n
    leave.set()
    for t in threads:
        t.join()
    assert pool.open_count == pool.max_idle == 3
    # The three returned to a full pool were closed.
    closed = 0
    for c in conns:
        try:
            c.execute("SELECT 1")
        except sqlite3.ProgrammingError:
            closed += 1
    assert closed == n - 3


def test_a_connection_that_raised_is_dropped_and_close_empties_the_pool(
    pool: ReadPool,
) -> None:
    assert pool.run(_read) == 7 and pool.open_count == 1

    def boom(conn: Any, style: str) -> None:
        raise RuntimeError("lost")

    with pytest.raises(RuntimeError):
        pool.run(boom)
    assert pool.open_count == 0
    assert pool.run(_read) == 7 and pool.open_count == 1
    pool.close()
    assert pool.open_count == 0
    # After close a call still works, and does not keep its connection.
    assert pool.run(_read) == 7 and pool.open_count == 0
