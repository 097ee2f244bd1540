"""Chamber steps between cycler steps on a Neware channel: the protocol runs as one
program per segment, with labdaq holding the chamber between them — through the
simulated BTS server over TCP (sims/neware_bts.py) and a simulated ESPEC chamber.

The BTS API has no command that holds another instrument and no confirmed chamber step
type, so the engine cuts the protocol at each chamber step (drivers/neware_steps.py,
labdaq/engine/delegated.py); the samples of the second program follow on from the first's
and the cycle stays open across the chamber step, as in a direct run.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labdaq.drivers.neware_steps import translate
from labdaq.protocol import parse_protocol
from labdaq.protocol.program import resolve
from labdaq.runs import RunCreate, create_run
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import assert_contiguous, rows_of, samples
from tests.neware_rig import CELL, ChamberRig, doc, start_chamber_rig
from tests.test_neware_bts import CELL as LIMITS

SPLIT = [
    {"step": "cc", "rate_c": 0.5, "until": {"duration_s": 300}},
    {"step": "set_temperature", "temperature_c": 10.0, "tolerance_c": 1.0,
     "stable_for_s": 300},
    {"step": "cc", "rate_c": -0.5, "until": {"duration_s": 300}},
]


def test_protocol_is_cut_at_chamber_steps_outside_loops() -> None:
    steps = [
        {"step": "set_temperature", "temperature_c": 25.0},
        SPLIT[0],
        SPLIT[1],
        {"step": "loop", "count": 2, "body": [SPLIT[2], {"step": "rest",
                                                         "until": {"duration_s": 60}}]},
        {"step": "set_temperature", "temperature_c": 25.0},
    ]
    sf = translate(resolve(parse_protocol(doc(steps)), LIMITS), sample_name="x")
    assert [[c.index for c in seg.chamber_steps] for seg in sf.segments] == [[0], [2], [7]]
    # each program numbers its steps from 1; the map leads back to the protocol's steps
    assert [seg.step_map for seg in sf.segments] == [{1: 1}, {1: 4, 2: 5, 3: 6}, {}]
    assert sf.segments[0].xml is not None and "<Step1 " in sf.segments[0].xml
    assert sf.segments[1].xml is not None and 'Step_Type="5"' in sf.segments[1].xml
    assert sf.segments[2].xml is None  # the protocol ends with the chamber


@pytest.fixture
async def chamber_rig(sqlite_url: str, tmp_path: Path) -> AsyncIterator[ChamberRig]:
    r = await start_chamber_rig(sqlite_url, tmp_path)
    try:
        yield r
    finally:
        await r.rig.stop()
        r.server.stop()


async def _run(r: ChamberRig, steps: list[dict[str, Any]]) -> int:
    async with session_scope(r.rig.maker) as s:
        run = await create_run(s, RunCreate(
            channel="bts1/1", cell_serial=CELL["serial"], sample_period_s=10.0,
            protocol_document=doc(steps)), actor="test")
        await s.flush()
        return int(run.id)


async def test_chamber_step_between_programs(chamber_rig: ChamberRig) -> None:
    r = chamber_rig
    run_id = await _run(r, SPLIT)
    done = await r.rig.wait_end(run_id, timeout_s=90)
    assert done.state == "completed", done.end_reason
    assert r.chamber.sim.constant_sp_c == 10.0
    # two programs, each a test of its own under the run's barcodes
    tests = r.sim.tests["1-1-1"]
    assert [(t.test_id, t.barcode) for t in tests.values()] == [
        (1, f"labdaq-run-{run_id}"), (2, f"labdaq-run-{run_id}-part2")]
    s = await samples(r.rig.maker, run_id)
    assert_contiguous(s["seq"])
    # every record of both once, the second's after the first's
    assert s["seq"].size == len(tests[1].records) + len(tests[2].records)
    n1 = len(tests[1].records)
    np.testing.assert_allclose(s["current_a"][n1:], [x["curr"] for x in tests[2].records])
    steps = await rows_of(r.rig.maker, m.Step, run_id, m.Step.step_number)
    assert [(st.step_index, st.kind) for st in steps] == [
        (0, "cc"), (1, "set_temperature"), (2, "cc")]
    # the chamber was held after the first program and before the second
    assert steps[0].end_t_s <= steps[1].start_t_s
    assert steps[1].end_t_s - steps[1].start_t_s >= 300
    assert float(s["t_s"][n1]) >= steps[1].end_t_s
    assert np.all(s["step_index"][:n1] == 0) and np.all(s["step_index"][n1:] == 2)
    # one cycle, charge and discharge: a chamber step does not end a cycle (as direct)
    (cycle,) = await rows_of(r.rig.maker, m.Cycle, run_id, m.Cycle.cycle_index)
    ah = 2.45 * 300 / 3600
    assert cycle.charge_capacity_ah == pytest.approx(ah, rel=0.01)
    assert cycle.discharge_capacity_ah == pytest.approx(ah, rel=0.01)
    assert steps[0].capacity_ah == pytest.approx(ah, rel=0.01)
    assert steps[2].capacity_ah == pytest.approx(ah, rel=0.01)
    events = await rows_of(r.rig.maker, m.Event, run_id, m.Event.id)
    started = [e.data for e in events if e.kind == "delegated"]
    assert [(d["segment"], d["test_id"], d["first_seq"]) for d in started] == [
        (0, 1, 1), (1, 2, n1 + 1)]


async def _wait_segment(r: ChamberRig, run_id: int, segment: int) -> None:
    """Until the run's position says ``segment`` is being held (the previous program's
    end is pinned)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 60
    while True:
        async with session_scope(r.rig.maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            pos = (run.position or {}).get("delegated", {})
        if pos.get("segment") == segment:
            return
        assert loop.time() < deadline, f"segment {segment} never reached"
        await asyncio.sleep(0.05)


async def test_stop_while_holding_the_chamber_between_programs(
        chamber_rig: ChamberRig) -> None:
    """A stop while the chamber is held between two programs ends the run at once: the
    second program is never started, and the first program's step and the open cycle
    are stored."""
    from labdaq.runs import request_stop

    r = chamber_rig
    run_id = await _run(r, [SPLIT[0], {**SPLIT[1], "stable_for_s": 30000}, SPLIT[2]])
    await _wait_segment(r, run_id, 1)
    async with session_scope(r.rig.maker) as s:
        await request_stop(s, run_id, "test")
    done = await r.rig.wait_end(run_id, timeout_s=60)
    assert done.state == "stopped", done.end_reason
    assert list(r.sim.tests["1-1-1"]) == [1]
    steps = await rows_of(r.rig.maker, m.Step, run_id, m.Step.step_number)
    assert [(st.step_index, st.kind) for st in steps] == [(0, "cc")]
    (cycle,) = await rows_of(r.rig.maker, m.Cycle, run_id, m.Cycle.cycle_index)
    assert cycle.charge_capacity_ah == pytest.approx(2.45 * 300 / 3600, rel=0.01)
    assert cycle.discharge_capacity_ah == 0


async def test_engine_restart_while_holding_the_chamber_between_programs(
        chamber_rig: ChamberRig) -> None:
    """The engine stops after the first program has finished, while it holds the chamber:
    the next engine holds it again and starts the second program — no program twice, no
    step row twice, samples contiguous, one cycle."""
    from labdaq.engine.node import AcquisitionNode

    r = chamber_rig
    run_id = await _run(r, [SPLIT[0], {**SPLIT[1], "stable_for_s": 3000}, SPLIT[2]])
    await _wait_segment(r, run_id, 1)
    r.rig.node.request_stop()
    await asyncio.wait_for(r.rig.task, 30)
    assert list(r.sim.tests["1-1-1"]) == [1]  # the second program has not started
    node2 = AcquisitionNode(r.rig.engine, r.rig.clock, poll_s=0.25, batch_age_s=0.2,
                            temperature_lost_s=1e9)
    r.rig.node, r.rig.task = node2, asyncio.create_task(node2.run_forever(), name="node2")
    done = await r.rig.wait_end(run_id, timeout_s=90)
    assert done.state == "completed", done.end_reason
    tests = r.sim.tests["1-1-1"]
    assert list(tests) == [1, 2]
    s = await samples(r.rig.maker, run_id)
    assert_contiguous(s["seq"])
    assert s["seq"].size == len(tests[1].records) + len(tests[2].records)
    steps = await rows_of(r.rig.maker, m.Step, run_id, m.Step.step_number)
    assert [(st.step_index, st.kind) for st in steps] == [
        (0, "cc"), (1, "set_temperature"), (2, "cc")]
    (cycle,) = await rows_of(r.rig.maker, m.Cycle, run_id, m.Cycle.cycle_index)
    assert cycle.discharge_capacity_ah == pytest.approx(2.45 * 300 / 3600, rel=0.01)
    events = await rows_of(r.rig.maker, m.Event, run_id, m.Event.id)
    (gap,) = [e for e in events if e.kind == "interruption"
              and e.data.get("cause") == "engine_restart"]
    assert gap.data["samples_missing"] == 0
