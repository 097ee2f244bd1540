"""A running engine shows where it waits when asked (labdaq/stack_dump.py), and goes on."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from sqlalchemy import select

from labdaq import processes
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, sessionmaker, upgrade


def _beat(url: str, pid: int) -> float | None:
    """The engine's latest heartbeat (epoch seconds), None before its first."""
    async def go() -> float | None:
        engine = create_engine(url)
        try:
            async with sessionmaker(engine)() as s:
                row = await s.scalar(select(m.NodeHeartbeat).where(m.NodeHeartbeat.pid == pid))
                return None if row is None else row.beat_at.timestamp()
        finally:
            await engine.dispose()

    return asyncio.run(go())


def test_engine_writes_its_threads_and_tasks_on_sigusr2_and_keeps_running(
        tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'labdaq.db'}"
    upgrade(url)
    children = processes.Children(tmp_path)
    proc = children.spawn("engine", processes.labdaq_argv(
        "engine", "--data-dir", str(tmp_path), "--database-url", url),
        env=processes.child_env(drop=("LABDAQ_CONFIG",)))
    try:
        # Its first heartbeat comes from the scheduler's loop, after the handlers.
        processes.wait_until(lambda: _beat(url, proc.pid) is not None, 120,
                             "the engine's first heartbeat", proc)
        proc.send_signal(signal.SIGUSR2)
        processes.wait_until(lambda: "--- end of stacks" in children.tail("engine", 100_000),
                             60, "the stacks", proc)
        log = children.tail("engine", 100_000)
        threads = log.index(f"--- stacks of pid {proc.pid}: threads ---")
        tasks = log.index("asyncio tasks ---", threads)
        assert "run_forever" in log[tasks:], log[tasks:]  # the node's own task, by frame
        assert "File " in log[threads:tasks]  # faulthandler's frames

        # Still acquiring: a later heartbeat, then SIGUSR1's thread stacks, and it
        # stops on SIGTERM as always.
        before = _beat(url, proc.pid)
        assert before is not None
        processes.wait_until(lambda: (_beat(url, proc.pid) or 0.0) > before, 60,
                             "a heartbeat after the dump", proc)
        proc.send_signal(signal.SIGUSR1)
        processes.wait_until(lambda: "most recent call first" in children.tail(
            "engine", 100_000)[tasks:], 60, "the thread stacks", proc)
        assert proc.poll() is None
    finally:
        children.stop_all()
    assert proc.returncode == 0, children.tail("engine")
