"""kill -9 of the engine while runs wait in a channel's queue: the restarted engine resumes
the run it held, then starts the waiting ones in the queue's order (real processes:
``labdaq sim`` and ``labdaq engine``, as in tests/test_recovery_kill9.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from labdaq import run_queue
from labdaq.runs import RunCreate, create_run
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.test_recovery_kill9 import (
    CHANNEL,
    Lab,
    _alive,
    _children,
    _lab,
    _query,
    _start_engine,
    _state,
    _stop,
    _wait,
)

# Real processes started, killed and restarted: more than the 5 s of a fast test.
pytestmark = pytest.mark.slow


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """A simulated lab process (``labdaq sim``) for the test, stopped afterwards."""
    with _lab(tmp_path) as lab:
        yield lab


def _charge(duration_s: float) -> dict[str, Any]:
    """A C/5 charge for ``duration_s`` simulated seconds (200x: 1,800 s is 9 wall s)."""
    return {"schema_version": 1, "name": f"charge {duration_s:g} s",
            "steps": [{"step": "cc", "rate_c": 0.2, "until": {"duration_s": duration_s}}]}


def _queue(lab: Lab, doc: dict[str, Any]) -> int:
    """Create a run on the SMU channel as the API would: queued behind what is there."""
    cell = lab.desc["instruments"][0]["channels"][0]["cell"]["serial"]

    async def create() -> int:
        engine = create_engine(lab.url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                run = await create_run(s, RunCreate(
                    channel=CHANNEL, cell_serial=cell, protocol_document=doc,
                    sample_period_s=1.0), actor="technician1")
                await s.flush()
                return int(run.id)
        finally:
            await engine.dispose()

    return asyncio.run(create())


def _move(lab: Lab, run_id: int, position: int) -> None:
    async def move() -> None:
        engine = create_engine(lab.url)
        try:
            async with session_scope(sessionmaker(engine)) as s:
                await run_queue.move(s, run_id, position, actor="technician1")
        finally:
            await engine.dispose()

    asyncio.run(move())


def _times(lab: Lab, run_id: int) -> tuple[datetime, datetime]:
    ((started, ended),) = _query(lab, "SELECT started_at, ended_at FROM runs WHERE id = ?",
                                 run_id)
    return datetime.fromisoformat(started), datetime.fromisoformat(ended)


def test_kill9_keeps_the_queue_and_its_order(lab: Lab) -> None:
    holder = _queue(lab, _charge(1800))
    second, third = _queue(lab, _charge(60)), _queue(lab, _charge(60))
    # No engine yet: all three wait. The queue is now holder, third, second (not the
    # order of creation).
    _move(lab, third, 2)
    engine = _start_engine(lab, "engine1", max_resume_gap_s=600)
    try:
        _wait(lambda: _query(lab, "SELECT count(*) FROM samples WHERE run_id = ?",
                             holder)[0][0] >= 50, 30, "the first run to store samples",
              engine, lab.proc)
        children = _children(engine.pid)
        os.kill(engine.pid, signal.SIGKILL)
        engine.wait(10)
        _wait(lambda: not any(_alive(c) for c in children), 30, "the writer child to exit")
    finally:
        if engine.poll() is None:
            engine.kill()
            engine.wait()
    # Killed mid-run: the first still holds the channel, the others wait in their order.
    assert _state(lab, holder) == "running"
    assert [(r, _state(lab, r)) for r in (third, second)] == [
        (third, "queued"), (second, "queued")]
    engine = _start_engine(lab, "engine2", max_resume_gap_s=1e6)
    try:
        _wait(lambda: _state(lab, second) not in ("queued", "running"), 60,
              "the last run of the queue to end", engine, lab.proc)
    finally:
        _stop(engine)
    states = {r: _state(lab, r) for r in (holder, third, second)}
    assert states == {holder: "completed", third: "completed", second: "completed"}
    # The first resumed after the kill (one gap on its record), then the queue went on
    # in its order, one run after another.
    ((data,),) = _query(lab, "SELECT data FROM events WHERE run_id = ? AND "
                             "kind = 'interruption'", holder)
    assert json.loads(data)["last_seq"] >= 50
    (_, end_holder), (start3, end3), (start2, _) = (
        _times(lab, r) for r in (holder, third, second))
    assert end_holder <= start3 and end3 <= start2
    for run_id in (third, second):
        assert _query(lab, "SELECT count(*) FROM events WHERE run_id = ? AND "
                           "kind = 'interruption'", run_id)[0][0] == 0
