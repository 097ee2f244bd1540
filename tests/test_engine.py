"""Engine against the simulated lab in-process: real TCP to the simulated SMU, real DB."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import select

from labdaq.channels import upsert_instrument
from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.runs import RunCreate, create_run
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker

SPEED = 500.0


@pytest.fixture
async def rig(sqlite_url: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple]:
    soc, control_period_s = getattr(request, "param", (0.5, 1.0))
    lab = SimLab(speed=SPEED, soc=soc)
    desc = lab.start()
    engine = create_engine(sqlite_url)
    maker = sessionmaker(engine)
    async with session_scope(maker) as s:
        inst = desc["instruments"][0]
        ch = inst["channels"][0]
        await upsert_instrument(
            s,
            inst["name"],
            inst["driver"],
            inst["resource"],
            [{k: ch[k] for k in ("index", "name", "max_current_a", "max_voltage_v")}],
        )
        s.add(m.Cell(**ch["cell"]))
    node = AcquisitionNode(
        engine,
        EngineClock(SPEED),
        poll_s=0.05,
        batch_age_s=0.1,
        control_period_s=control_period_s,
    )
    task = asyncio.create_task(node.run_forever())
    yield lab, maker, node, ch
    node.request_stop()
    await asyncio.wait_for(task, 10)
    await engine.dispose()
    lab.stop()


async def _wait_end(maker, run_id: int, timeout_s: float = 60) -> m.Run:
    for _ in range(int(timeout_s / 0.1)):
        async with session_scope(maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            if run.state not in ("queued", "running", "paused"):
                return run
        await asyncio.sleep(0.1)
    raise AssertionError(f"run {run_id} did not end")


# A nearly empty cell and an engine that looks only once a minute (a misconfiguration):
# the voltage falls through the safety floor between two looks.
@pytest.mark.parametrize("rig", [(0.03, 60.0)], indirect=True)
async def test_undervoltage_breach_turns_output_off_and_aborts(rig) -> None:
    lab, maker, node, ch = rig
    async with session_scope(maker) as s:
        # A discharge to the cell's cut-off, but the cell is nearly empty and the engine
        # samples slowly, so the voltage falls through the safety floor between samples.
        doc = {
            "schema_version": 1,
            "name": "discharge",
            "steps": [
                {"step": "cc", "current_a": -7.0, "until": {"voltage_v": "discharge_cutoff"}}
            ],
        }
        run = await create_run(
            s,
            RunCreate(
                channel=ch["name"],
                cell_serial=ch["cell"]["serial"],
                protocol_document=doc,
                sample_period_s=60,
            ),
            actor="test",
        )
    ended = await _wait_end(maker, run.id)
    assert ended.state == "aborted_safety", (ended.state, ended.end_reason)
    assert "min_voltage_v" in (ended.end_reason or "")
    async with session_scope(maker) as s:
        events = (await s.scalars(select(m.Event).where(m.Event.kind == "safety"))).all()
    assert len(events) == 1
    assert events[0].data["limit"] == "min_voltage_v"
    assert events[0].data["breach_to_off_s"] < 0.5
    sim = lab.sims[0]
    assert not sim.output_on
