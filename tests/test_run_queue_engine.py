"""The run queue with the engine: runs queued on one channel start one after another,
in the queue's order, at their not_before, and a change of cell waits for a technician
(the simulated lab over real TCP, the engine in this process: tests/engine_rig.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from labdaq import run_queue
from labdaq.runs import RunCreate, create_run, request_stop
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import Rig, channel_cell, start_rig, wait_for

SPEED = 500.0
CHANNEL = "cabinet1/1"


@pytest.fixture
async def rig(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    lab = SimLab(soc=0.5, cabinets=1, cabinet_channels=2)
    r = await start_rig(sqlite_url, lab, SPEED)
    yield r
    await r.stop()


def charge(duration_s: float) -> dict[str, Any]:
    """A 1 A charge for ``duration_s`` (simulated): 60 s is an eighth of a wall second at 500x."""
    return {
        "schema_version": 1,
        "name": f"charge {duration_s:g} s",
        "steps": [{"step": "cc", "current_a": 1.0, "until": {"duration_s": duration_s}}],
    }


# Long enough to stay running while a test changes the queue behind it; the test stops it.
HOLDER = charge(100_000)


async def queue_run(rig: Rig, doc: dict[str, Any], **extra: Any) -> int:
    """Create a run on CHANNEL as the API would (queued behind whatever is there)."""
    async with session_scope(rig.maker) as s:
        if "cell_serial" not in extra and "cell" not in extra:
            extra["cell_serial"] = channel_cell(rig.desc, CHANNEL)
        run = await create_run(
            s, RunCreate(channel=CHANNEL, protocol_document=doc, sample_period_s=5.0, **extra),
            actor="technician1",
        )
        await s.flush()
        return int(run.id)


async def run_row(rig: Rig, run_id: int) -> m.Run:
    async with session_scope(rig.maker) as s:
        run = await s.get(m.Run, run_id)
        assert run is not None
        return run


async def wait_state(rig: Rig, run_id: int, *states: str, timeout_s: float = 60.0) -> m.Run:
    """Poll the run's row until it is in one of ``states`` (a hang reaches the timeout)."""
    box: dict[str, m.Run] = {}

    async def check() -> bool:
        box["run"] = await run_row(rig, run_id)
        return box["run"].state in states

    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"run {run_id} still {box['run'].state}"
        await asyncio.sleep(0.02)
    return box["run"]


async def n_samples(rig: Rig, run_id: int) -> int:
    async with session_scope(rig.maker) as s:
        return int(await s.scalar(
            select(func.count()).select_from(m.Sample).where(m.Sample.run_id == run_id)) or 0)


async def events(rig: Rig, run_id: int, kind: str) -> list[m.Event]:
    async with session_scope(rig.maker) as s:
        return list((await s.scalars(
            select(m.Event).where(m.Event.run_id == run_id, m.Event.kind == kind)
            .order_by(m.Event.id))).all())


async def rounds_pass(rig: Rig, n: int = 2) -> None:
    """Let the engine look at its queues ``n`` more times."""
    r0 = rig.node.rounds
    await wait_for(lambda: rig.node.rounds >= r0 + n, what=f"{n} scheduler rounds")


def assert_one_after_another(runs: list[m.Run]) -> None:
    """Each run started after the one before it had ended (never two on the channel)."""
    for before, after in zip(runs, runs[1:], strict=False):
        assert before.ended_at is not None and after.started_at is not None
        assert run_queue.utc(after.started_at) >= run_queue.utc(before.ended_at), (
            before.id, after.id)


async def test_three_queued_runs_run_one_after_another_without_a_technician(rig: Rig) -> None:
    ids = [await queue_run(rig, charge(60)) for _ in range(3)]
    for run_id in ids:
        ended = await rig.wait_end(run_id)
        assert ended.state == "completed", (run_id, ended.state, ended.end_reason)
        assert await n_samples(rig, run_id) > 0
    runs = [await run_row(rig, i) for i in ids]
    assert_one_after_another(runs)
    for run_id in ids:
        # Nothing waited for a technician; the only audit is the creation.
        assert await events(rig, run_id, "queue") == []
        assert len(await events(rig, run_id, "audit")) == 1


async def test_a_queued_run_is_cancelled(rig: Rig) -> None:
    holder = await queue_run(rig, HOLDER)
    cancelled, last = await queue_run(rig, charge(60)), await queue_run(rig, charge(60))
    await wait_state(rig, holder, "running")
    async with session_scope(rig.maker) as s:
        assert (await s.get(m.Run, cancelled)).state == "queued"  # type: ignore[union-attr]
        await request_stop(s, cancelled, actor="technician1")
    async with session_scope(rig.maker) as s:
        ch = await s.scalar(select(m.Channel.id).where(m.Channel.name == CHANNEL))
        assert ch is not None
        assert [r.id for r in await run_queue.waiting_runs(s, ch)] == [last]
        await request_stop(s, holder, actor="technician1")
    assert (await rig.wait_end(holder)).state == "stopped"
    assert (await rig.wait_end(last)).state == "completed"
    gone = await run_row(rig, cancelled)
    assert gone.state == "stopped" and gone.started_at is None
    assert "cancelled in the queue" in (gone.end_reason or "")
    assert await n_samples(rig, cancelled) == 0
    (audit,) = [e for e in await events(rig, cancelled, "audit") if "cancelled" in e.message]
    assert audit.actor == "technician1" and audit.data == {"position": 1}


async def test_a_queued_run_is_moved_ahead(rig: Rig) -> None:
    holder = await queue_run(rig, HOLDER)
    second, third = await queue_run(rig, charge(60)), await queue_run(rig, charge(60))
    await wait_state(rig, holder, "running")
    async with session_scope(rig.maker) as s:
        await run_queue.move(s, third, 1, actor="technician1")
    async with session_scope(rig.maker) as s:
        await request_stop(s, holder, actor="technician1")
    for run_id in (third, second):
        assert (await rig.wait_end(run_id)).state == "completed"
    assert_one_after_another([await run_row(rig, i) for i in (holder, third, second)])
    (audit,) = [e for e in await events(rig, third, "audit") if "moved" in e.message]
    assert audit.data["from_position"] == 2 and audit.data["to_position"] == 1
    assert audit.data["queue"] == [third, second]


async def test_a_queued_run_waits_for_its_not_before(rig: Rig) -> None:
    # The node's wall clock, moved by the test: not_before is a time of day, and the test
    # must not wait for one (nor depend on how long anything takes).
    offset = [0.0]
    rig.node.wall_clock = lambda: time.time() + offset[0]
    at = datetime.now(UTC) + timedelta(days=1)
    run_id = await queue_run(rig, charge(60), not_before=at)
    await rounds_pass(rig)
    early = await run_row(rig, run_id)
    assert early.state == "queued" and early.started_at is None
    assert run_queue.utc(early.not_before) == at
    offset[0] = 86_400.0 + 60.0  # a day and a minute later, for the engine
    assert (await rig.wait_end(run_id)).state == "completed"
    assert await n_samples(rig, run_id) > 0


async def test_a_run_for_another_cell_waits_for_the_technician(rig: Rig) -> None:
    first = await queue_run(rig, HOLDER)
    other = await queue_run(rig, charge(60),
                            cell={**await run_cell(rig, first), "serial": "SWAPPED-002"})
    await wait_state(rig, first, "running")
    async with session_scope(rig.maker) as s:
        await request_stop(s, first, actor="technician1")
    held = await wait_state(rig, other, "awaiting_cell")
    assert "SWAPPED-002" in (held.waiting_reason or "")
    (ev,) = await events(rig, other, "queue")
    assert ev.severity == "warning" and "confirm" in ev.message
    # It waits: the engine goes round and starts nothing on the channel.
    await rounds_pass(rig)
    assert (await run_row(rig, other)).state == "awaiting_cell"
    assert await n_samples(rig, other) == 0
    async with session_scope(rig.maker) as s:
        await run_queue.confirm_cell(s, other, actor="technician1")
    assert (await rig.wait_end(other)).state == "completed"
    (audit,) = [e for e in await events(rig, other, "audit") if "confirmed" in e.message]
    assert audit.actor == "technician1" and "SWAPPED-002" in audit.message


async def run_cell(rig: Rig, run_id: int) -> dict[str, Any]:
    """The values of a run's cell, as a new cell's request would give them."""
    async with session_scope(rig.maker) as s:
        run = await s.get(m.Run, run_id)
        assert run is not None
        cell = await s.get(m.Cell, run.cell_id)
        assert cell is not None
        return {k: getattr(cell, k) for k in (
            "serial", "chemistry", "capacity_ah", "charge_cutoff_v", "discharge_cutoff_v",
            "max_charge_current_a", "max_discharge_current_a")}
