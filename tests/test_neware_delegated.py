"""Delegated runs on a simulated Neware BTS 8.0 server over TCP: the engine translates the
protocol into step XML, starts it, follows it with ``inquire``, harvests ``download``
records into samples (seq = record index) and ends the run as the cycler's state says.

The node runs in this process on an accelerated clock; the simulated BTS server runs its
channels on its own clock thread at the same speed (sims/neware_bts.py), on a real TCP
socket the driver (drivers/neware_bts.py) talks to.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest

from labdaq.drivers.neware_steps import to_neware_xml
from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.protocol import CellLimits, parse_protocol, resolve
from labdaq.runs import RunCreate, create_run
from labdaq.sims.neware_bts import apply_fault
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import assert_contiguous, rows_of, samples, wait_end, wait_for
from tests.neware_rig import (
    CELL,
    CHARGE_REST_DISCHARGE,
    LONG,
    BtsRig,
    doc,
    followed_after_restart,
    start_bts_rig,
    start_chamber_rig,
    wait_for_samples,
)


async def _rig(url: str, tmp_path: Path) -> AsyncIterator[BtsRig]:
    r = await start_bts_rig(url, tmp_path, speed=1000.0)
    yield r
    r.node.request_stop()
    await asyncio.wait_for(r.task, 30)
    await r.engine.dispose()
    r.server.stop()


@pytest.fixture
async def rig(sqlite_url: str, tmp_path: Path) -> AsyncIterator[BtsRig]:
    async for r in _rig(sqlite_url, tmp_path):
        yield r


@pytest.fixture
async def rig_any_db(db_url: str, tmp_path: Path) -> AsyncIterator[BtsRig]:
    """On SQLite and PostgreSQL: the run's pinned position and its harvested records."""
    async for r in _rig(db_url, tmp_path):
        yield r


async def test_delegated_run_completes_with_harvested_samples_steps_and_cycles(
        rig_any_db: BtsRig) -> None:
    rig = rig_any_db
    run_id = await rig.start_run(doc(CHARGE_REST_DISCHARGE))
    run = await wait_end(rig.maker, run_id, timeout_s=60)
    assert run.state == "completed", run.end_reason
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    test = rig.sim.tests["1-1-1"][1]
    # every record of the cycler's test is a sample, seq = record index, values as recorded
    assert s["seq"].size == len(test.records)
    np.testing.assert_allclose(s["voltage_v"], [r["volt"] for r in test.records])
    np.testing.assert_allclose(s["current_a"], [r["curr"] for r in test.records])
    steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    assert [(st.step_index, st.kind) for st in steps] == [(0, "cc"), (1, "rest"), (2, "cc")]
    assert steps[0].end_reason == "duration" and steps[2].end_reason == "duration"
    cycles = await rows_of(rig.maker, m.Cycle, run_id, m.Cycle.cycle_index)
    assert len(cycles) == 1
    # 600 s at 4.9 A, counted from the harvested records (trapezoids, as a direct run)
    assert cycles[0].charge_capacity_ah == pytest.approx(4.9 * 600 / 3600, rel=0.01)
    assert cycles[0].discharge_capacity_ah == pytest.approx(4.9 * 600 / 3600, rel=0.01)
    (started,) = await rig.events(run_id, "delegated")
    assert started.data["test_id"] == 1
    # the run is pinned to its test id, stored with its position
    assert run.position is not None and run.position["delegated"]["test_id"] == 1


async def test_cycles_of_a_loop_are_numbered_as_in_a_direct_run(rig: BtsRig) -> None:
    """What runs before a loop is a cycle of its own (as a direct run counts it), then one
    cycle per iteration: the cycler's cycle number (one per loop pass) is shifted by one
    from the loop on."""
    run_id = await rig.start_run(doc([
        {"step": "cc", "rate_c": 0.5, "until": {"duration_s": 300}},
        {"step": "loop", "count": 2, "body": [
            {"step": "cc", "rate_c": -0.5, "until": {"duration_s": 300}},
            {"step": "cc", "rate_c": 0.5, "until": {"duration_s": 300}}]},
    ]))
    run = await wait_end(rig.maker, run_id, timeout_s=60)
    assert run.state == "completed", run.end_reason
    cycles = await rows_of(rig.maker, m.Cycle, run_id, m.Cycle.cycle_index)
    ah = 2.45 * 300 / 3600
    assert [c.cycle_index for c in cycles] == [1, 2, 3]
    assert cycles[0].charge_capacity_ah == pytest.approx(ah, rel=0.01)
    assert cycles[0].discharge_capacity_ah == 0
    for c in cycles[1:]:
        assert c.charge_capacity_ah == pytest.approx(ah, rel=0.01)
        assert c.discharge_capacity_ah == pytest.approx(ah, rel=0.01)
    steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    assert [(st.step_index, st.cycle_index) for st in steps] == [
        (0, 1), (2, 2), (3, 2), (2, 3), (3, 3)]
    s = await samples(rig.maker, run_id)
    assert set(np.unique(s["cycle_index"]).tolist()) == {1, 2, 3}


async def test_protect_trip_ends_the_run_aborted_safety_with_the_reason(rig: BtsRig) -> None:
    run_id = await rig.start_run(doc(LONG))
    await wait_for_samples(rig, run_id, 5)
    apply_fault(rig.server, "protect:1-1-1:cell over-temperature (simulated)")
    run = await wait_end(rig.maker, run_id, timeout_s=30)
    assert run.state == "aborted_safety"
    assert "cell over-temperature (simulated)" in (run.end_reason or "")
    (trip,) = await rig.events(run_id, "safety")
    assert trip.data["source"] == "instrument"
    assert "cell over-temperature (simulated)" in trip.message
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    # everything the cycler recorded up to the trip is harvested
    assert s["seq"][-1] == len(rig.sim.tests["1-1-1"][1].records)


async def test_labdaq_side_breach_stops_the_program_and_aborts(rig: BtsRig) -> None:
    """A temperature limit is not written into the step file: labdaq's own check on the
    inquired and harvested readings is what stops the program."""
    run_id = await rig.start_run(doc(LONG, safety={"max_temperature_c": 30.0}))
    await wait_for_samples(rig, run_id, 3)
    rig.sim.bank.ambient_c = np.array([80.0, 25.0])  # the cell heats up
    run = await wait_end(rig.maker, run_id, timeout_s=60)
    assert run.state == "aborted_safety"
    assert "max_temperature_c" in (run.end_reason or "")
    (trip,) = await rig.events(run_id, "safety")
    assert trip.data["limit"] == "max_temperature_c" and trip.data["value"] > 30.0
    # the program was stopped on the cycler, by labdaq
    assert rig.sim.channels["1-1-1"].workstatus == "stop"
    assert any(b"<cmd>stop</cmd>" in r for r in rig.server.requests)
    assert_contiguous((await samples(rig.maker, run_id))["seq"])


async def test_a_program_already_running_under_the_runs_barcode_is_followed(
        rig: BtsRig, tmp_path: Path) -> None:
    """An engine killed between ``start`` and storing the test id (or a start whose reply
    was lost) left the run's program running: the next start finds the channel busy with
    a test it does not own, sees the run's barcode on it, and follows that test instead
    of failing or starting another."""
    from datetime import UTC, datetime, timedelta

    from sqlalchemy import update

    from labdaq.drivers.neware_steps import translate
    from labdaq.protocol import ResolvedProtocol

    async with session_scope(rig.maker) as s:
        run = await create_run(s, RunCreate(
            channel="bts1/1", cell_serial=CELL["serial"], sample_period_s=10.0,
            protocol_document=doc(CHARGE_REST_DISCHARGE),
            not_before=datetime.now(UTC) + timedelta(hours=1)), actor="test")
        await s.flush()
        run_id, plan = int(run.id), run.plan
    step_file = tmp_path / "crashed.xml"
    step_file.write_text(translate(ResolvedProtocol.model_validate(plan),
                                   sample_name="x", record_period_s=10.0).xml)
    with rig.sim.lock:
        assert rig.sim.start("1-1-1", f"labdaq-run-{run_id}", str(step_file)) == 1
    async with session_scope(rig.maker) as s:
        await s.execute(update(m.Run).where(m.Run.id == run_id).values(not_before=None))
    done = await wait_end(rig.maker, run_id, timeout_s=60)
    assert done.state == "completed", done.end_reason
    assert list(rig.sim.tests["1-1-1"]) == [1]  # followed, not started again
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    assert s["seq"].size == len(rig.sim.tests["1-1-1"][1].records)


async def _wait_run_state(rig: BtsRig, run_id: int, state: str, timeout_s: float = 60.0
                          ) -> None:
    """Until the run's stored state is ``state`` (``timeout_s`` only bounds a hang)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        async with session_scope(rig.maker) as s:
            run = await s.get(m.Run, run_id)
            if run is not None and run.state == state:
                return
        assert loop.time() < deadline, f"run {run_id} never became {state}"
        await asyncio.sleep(0.05)


async def test_pause_resume_and_stop_reach_the_cycler(rig: BtsRig) -> None:
    from labdaq.runs import request_pause, request_resume, request_stop

    run_id = await rig.start_run(doc(LONG))
    await wait_for_samples(rig, run_id, 3)
    ch = rig.sim.channels["1-1-1"]
    for request, state, run_state in ((request_pause, "pause", "paused"),
                                      (request_resume, "working", "running")):
        async with session_scope(rig.maker) as s:
            await request(s, run_id, "test")
        await wait_for(lambda state=state: ch.workstatus == state, timeout_s=30,
                       what=f"the channel to be {state}")
        # The cycler acts first; the node records the run's new state after its reply, and
        # only a paused run takes a resume: the next request waits for the record.
        await _wait_run_state(rig, run_id, run_state)
    async with session_scope(rig.maker) as s:
        await request_stop(s, run_id, "test")
    run = await wait_end(rig.maker, run_id, timeout_s=30)
    assert run.state == "stopped" and ch.workstatus == "stop"
    assert [x["event"] for x in ch.test.log] == ["start", "pause", "continue", "stop"]
    assert_contiguous((await samples(rig.maker, run_id))["seq"])


@pytest.mark.slow  # 30 simulated minutes of outage at 200x, and the run around it
async def test_link_dropped_30_simulated_minutes_loses_no_sample(
        sqlite_url: str, tmp_path: Path) -> None:
    """The BTS server is unreachable for 1800 simulated seconds while the program runs on:
    when it answers again the records made meanwhile are harvested (samples contiguous,
    none twice), and one interruption event covers the time labdaq could not see."""
    speed, down_s, period_s = 200.0, 1800.0, 10.0
    r = await start_bts_rig(sqlite_url, tmp_path, speed=speed)
    try:
        run_id = await r.start_run(doc([
            {"step": "rest", "until": {"duration_s": 300}},
            {"step": "cc", "rate_c": -0.25, "until": {"voltage_v": "discharge_cutoff",
                                                       "duration_s": 3600}},
            {"step": "rest", "until": {"duration_s": 300}},
        ]), period_s=period_s)
        ch = r.sim.channels["1-1-1"]
        await wait_for(lambda: ch.test_time_s >= 1200, timeout_s=60, what="t 1200 s")
        with r.sim.lock:
            apply_fault(r.server, f"down:{down_s}")
            down_at = ch.test_time_s  # test time; the program runs on, 1:1 in sim time
        run = await wait_end(r.maker, run_id, timeout_s=120)
        assert run.state == "completed", run.end_reason
        s = await samples(r.maker, run_id)
        assert_contiguous(s["seq"])
        records = r.sim.tests["1-1-1"][1].records
        assert s["seq"].size == len(records)  # every record once
        offset = run.position["delegated"]["t_offset_s"]
        np.testing.assert_allclose(s["t_s"] - offset, [x["testtime"] for x in records])
        (ev,) = [e for e in await r.events(run_id, "interruption")
                 if e.data["cause"] == "link_lost"]
        frm, to = ev.data["from_t_s"] - offset, ev.data["to_t_s"] - offset
        # it covers the outage, from the last reading labdaq saw to the first after it, as
        # an inquire reply gives test time: to the millisecond (sims/neware_bts.py), so
        # the last reading before the fault can read 1201.689 for a fault at 1201.68886
        # (seen under three .ci/runs at once)
        def ms(t_s: float) -> float:
            return round(t_s, 3)

        assert ms(frm) <= ms(down_at) and ms(to) >= ms(down_at + down_s), (frm, to, down_at)
        # ... and not much more: a few seconds of wall time at 200x on a loaded machine
        assert frm > down_at - 600 and to < down_at + down_s + 900, (frm, to, down_at)
        assert ev.data["samples_missing"] == 0
        # what the cycler recorded meanwhile (a record per period) is all in the samples
        tt = np.array([x["testtime"] for x in records])
        meanwhile = (tt > frm) & (tt < to)
        assert meanwhile.sum() >= (to - frm) / (1.2 * period_s)
        inside = (s["t_s"] - offset > frm) & (s["t_s"] - offset < to)
        assert inside.sum() == meanwhile.sum()
    finally:
        r.node.request_stop()
        await asyncio.wait_for(r.task, 30)
        await r.engine.dispose()
        r.server.stop()


async def test_engine_restart_follows_the_same_test_and_misses_no_record(
        sqlite_url: str, tmp_path: Path) -> None:
    """The engine stops mid-run (the program runs on, as on a real cycler); the next one
    follows the pinned test from the committed position: no second program, every
    record once, an interruption event for the time nobody watched."""
    r = await start_bts_rig(sqlite_url, tmp_path, speed=1000.0)
    task2: asyncio.Task[None] | None = None
    try:
        run_id, last_seen = await r.engine_stopped_mid_run()
        node2 = AcquisitionNode(r.engine, EngineClock(1000.0), poll_s=0.1, batch_age_s=0.1)
        task2 = asyncio.create_task(node2.run_forever(), name="node2")
        await followed_after_restart(r, run_id, last_seen)
        await asyncio.sleep(0)
        node2.request_stop()
        await asyncio.wait_for(task2, 30)
    finally:
        if task2 is not None and not task2.done():
            task2.cancel()
        await r.engine.dispose()
        r.server.stop()


async def test_leading_chamber_step_is_held_before_the_program_starts(
        sqlite_url: str, tmp_path: Path) -> None:
    """A set_temperature step before the cycler's first step: the engine sets the chamber
    wired to the channel and waits until it holds, then starts the program (without it)."""
    cr = await start_chamber_rig(sqlite_url, tmp_path)
    rig, sim, server, chamber = cr.rig, cr.sim, cr.server, cr.chamber
    try:
        async with session_scope(rig.maker) as s:
            run = await create_run(s, RunCreate(
                channel="bts1/1", cell_serial=CELL["serial"], sample_period_s=10.0,
                protocol_document=doc([
                    {"step": "set_temperature", "temperature_c": 30.0, "tolerance_c": 1.0,
                     "stable_for_s": 300},
                    CHARGE_REST_DISCHARGE[1]])), actor="test")
            await s.flush()
            run_id = int(run.id)
        done = await rig.wait_end(run_id, timeout_s=60)
        assert done.state == "completed", done.end_reason
        assert chamber.sim.constant_sp_c == 30.0
        steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
        assert [(st.step_index, st.kind) for st in steps] == [(0, "set_temperature"),
                                                              (1, "rest")]
        # the program began once the chamber had held its set point for 300 s
        offset = done.position["delegated"]["t_offset_s"]
        assert offset >= 300 and steps[1].start_t_s >= offset
        assert steps[0].end_t_s <= offset
        # the step file has the rest only: Neware step 1 is the protocol's step 1
        assert [int(r["step"]) for r in sim.tests["1-1-1"][1].records][-1] == 1
    finally:
        await rig.stop()
        server.stop()


async def test_program_that_ended_unseen_is_judged_by_its_own_test(rig: BtsRig,
                                                                   tmp_path: Path) -> None:
    """The link is down while the program finishes and a technician starts another test
    at the BTS client: labdaq harvests its pinned test, ends the run as that test ended
    (its log), and never touches the other test."""
    run_id = await rig.start_run(doc(CHARGE_REST_DISCHARGE))
    await wait_for_samples(rig, run_id, 3)
    ch = rig.sim.channels["1-1-1"]
    apply_fault(rig.server, "down:100000")
    await wait_for(lambda: ch.workstatus == "finish", timeout_s=30, what="the program's end")
    # The technician's test is a long one: still working when the test looks, however
    # long the harvest takes on a busy machine.
    foreign = tmp_path / "bench.xml"
    foreign.write_text(to_neware_xml(resolve(parse_protocol(doc(LONG)), CellLimits(**{
        k: v for k, v in CELL.items() if k not in ("serial", "chemistry")})),
        sample_name="bench"))
    assert rig.sim.start_foreign("1-1-1", str(foreign)) == 2
    rig.server.down = False
    run = await wait_end(rig.maker, run_id, timeout_s=30)
    assert run.state == "completed", run.end_reason
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    assert s["seq"].size == len(rig.sim.tests["1-1-1"][1].records)
    assert ch.workstatus == "working" and ch.test is not None and ch.test.test_id == 2
    assert not any(b"<cmd>stop</cmd>" in r for r in rig.server.requests)
