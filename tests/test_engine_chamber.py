"""A chamber that misses its set point in time pauses the run (issue 14, item 3): output
off, state paused, a ``chamber`` event saying why; a technician's resume waits again and
the run completes, or a stop ends it. The engine against the simulated lab over TCP
(tests/engine_rig.py); the chamber cannot heat while its heater alarm is latched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select

from labdaq.runs import request_resume, request_stop
from labdaq.sims.espec_chamber import ALARM_HEATER
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import Rig, rows_of, start_rig, wait_for

SPEED = 1000.0

# 25 °C room, 30 °C asked: the controller gets there in a few simulated minutes; the
# timeout leaves it ample room, but not a chamber that cannot heat.
DOC: dict[str, Any] = {
    "schema_version": 1,
    "name": "chamber then rest",
    "steps": [
        {"step": "set_temperature", "temperature_c": 30.0, "tolerance_c": 1.0,
         "stable_for_s": 30.0, "timeout_s": 900.0},
        {"step": "rest", "until": {"duration_s": 60.0}},
    ],
}


@pytest.fixture
async def rig(db_url: str) -> AsyncIterator[Rig]:
    r = await start_rig(db_url, SimLab(smus=1, chamber=True), SPEED)
    yield r
    await r.stop()


async def _state(rig: Rig, run_id: int) -> str:
    async with session_scope(rig.maker) as s:
        run = await s.get(m.Run, run_id)
        assert run is not None
        return run.state


async def _wait_state(rig: Rig, run_id: int, state: str) -> None:
    while (now := await _state(rig, run_id)) != state:
        assert now in ("queued", "running", "paused"), f"run ended {now} instead of {state}"
        await asyncio.sleep(0.05)  # a condition poll, as wait_end's


async def _chamber_events(rig: Rig, run_id: int) -> list[m.Event]:
    async with session_scope(rig.maker) as s:
        return list((await s.scalars(
            select(m.Event).where(m.Event.run_id == run_id, m.Event.kind == "chamber")
            .order_by(m.Event.id))).all())


async def _paused_by_chamber(rig: Rig) -> tuple[int, Any]:
    chamber = rig.lab.by_name("chamber1").sim
    chamber.inject_alarm(ALARM_HEATER)
    run_id = await rig.start_run("smu1/1", protocol_document=DOC)
    await _wait_state(rig, run_id, "paused")
    return run_id, chamber


async def test_chamber_that_misses_its_set_point_pauses_and_resume_completes(
    rig: Rig,
) -> None:
    run_id, chamber = await _paused_by_chamber(rig)
    (ev,) = await _chamber_events(rig, run_id)
    assert ev.severity == "warning"
    assert ev.data["cause"] == "set_point_timeout"
    assert ev.data["set_point_c"] == 30.0 and ev.data["timeout_s"] == 900.0
    # The heater never ran: the air stayed at the room's temperature, out of tolerance.
    assert abs(ev.data["reached_c"] - 30.0) > 1.0
    assert "30.00" in ev.message and "900 s" in ev.message
    smu = rig.lab.by_name("smu1").sim
    await wait_for(lambda: rig.node.active[run_id].paused, what="the group to pause the run")
    assert not smu.output_on
    # The alarm is reset at the panel; the technician resumes: the chamber step waits
    # again (set point sent again), the chamber gets there, the rest step runs.
    chamber.clear_alarms()
    async with session_scope(rig.maker) as s:
        await request_resume(s, run_id, actor="technician")
    ended = await rig.wait_end(run_id)
    assert ended.state == "completed", (ended.state, ended.end_reason)
    assert len(await _chamber_events(rig, run_id)) == 1
    steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    assert [st.step_index for st in steps] == [0, 1]
    assert abs(chamber.air_c - 30.0) <= 1.0


async def test_chamber_pause_then_stop_ends_the_run(rig: Rig) -> None:
    run_id, _ = await _paused_by_chamber(rig)
    async with session_scope(rig.maker) as s:
        await request_stop(s, run_id, actor="technician")
    ended = await rig.wait_end(run_id)
    assert ended.state == "stopped", (ended.state, ended.end_reason)
    assert not rig.lab.by_name("smu1").sim.output_on
