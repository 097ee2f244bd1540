"""Engine against the simulated lab in-process: real TCP to the simulated instruments, a
real database, the engine on the lab's clock (tests/engine_rig.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from labdaq.engine.channel import CLAMP_OVERSHOOT_V
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import (
    LockstepClock,
    Rig,
    assert_contiguous,
    rows_of,
    samples,
    start_paced_rig,
    start_rig,
    wait_for,
)

SPEED = 500.0


@pytest.fixture
async def rig(
    sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Rig]:
    soc, control_period_s = getattr(request, "param", (0.5, 1.0))
    lab = SimLab(soc=soc, cabinets=1, cabinet_channels=2)
    r = await start_rig(sqlite_url, lab, SPEED, control_period_s=control_period_s)
    yield r
    await r.stop()


@pytest.fixture
async def paced_rig(
    sqlite_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[Rig]:
    """``rig`` on a clock the engine's ticks pace (:class:`SpeedGovernor`): simulated time
    runs at most a control period past each tick's reading, so how many ticks a step gets
    does not depend on how busy the machine is (on the free 500x clock a loaded machine's
    late ticks are skipped, and a 900 s step was over in fewer than 20)."""
    soc, control_period_s = getattr(request, "param", (0.5, 1.0))
    lab = SimLab(soc=soc, cabinets=1, cabinet_channels=2, clock=LockstepClock())
    r = await start_paced_rig(sqlite_url, lab, SPEED, tick_s=control_period_s, idle=SPEED,
                              control_period_s=control_period_s)
    yield r
    await r.stop()


def discharge(until: dict[str, Any]) -> dict[str, Any]:
    return {
        "schema_version": 1,
        "name": "discharge",
        "steps": [{"step": "cc", "current_a": -7.0, "until": until}],
    }


def charge_doc(duration_s: float) -> dict[str, Any]:
    """A 1 A charge for ``duration_s``."""
    return {
        "schema_version": 1,
        "name": "charge",
        "steps": [{"step": "cc", "current_a": 1.0, "until": {"duration_s": duration_s}}],
    }


# A nearly empty cell and an engine that looks only once a minute (a misconfiguration).
SLOW_LOOKS = [(0.03, 60.0)]


@pytest.mark.parametrize("rig", SLOW_LOOKS, indirect=True)
async def test_undervoltage_breach_turns_output_off_and_aborts(rig: Rig) -> None:
    # The step ends on time only, so nothing holds the voltage: it falls through the
    # safety floor between two looks, and the interlock turns the output off.
    run_id = await rig.start_run(
        "smu1/1", protocol_document=discharge({"duration_s": 3600}), sample_period_s=60
    )
    ended = await rig.wait_end(run_id)
    assert ended.state == "aborted_safety", (ended.state, ended.end_reason)
    assert "min_voltage_v" in (ended.end_reason or "")
    async with session_scope(rig.maker) as s:
        events = (await s.scalars(select(m.Event).where(m.Event.kind == "safety"))).all()
    assert len(events) == 1
    assert events[0].data["limit"] == "min_voltage_v"
    # Timed and recorded (its size is the machine's load, measured by make bench).
    assert 0.0 <= events[0].data["breach_to_off_s"] < float("inf")
    assert not rig.lab.by_name("smu1").sim.output_on


@pytest.mark.parametrize("rig", SLOW_LOOKS, indirect=True)
async def test_voltage_end_is_held_by_the_cabinet_between_looks(rig: Rig) -> None:
    # The same discharge ending on the cell's cut-off, on a cycler channel: the engine sets
    # its lower compliance (VLIM:LOW) just below the cut-off, so the cabinet holds the cell
    # there and it never leaves the safety window; the step ends at the next look.
    run_id = await rig.start_run(
        "cabinet1/1",
        protocol_document=discharge({"voltage_v": "discharge_cutoff"}),
        sample_period_s=60,
    )
    ended = await rig.wait_end(run_id)
    assert ended.state == "completed", (ended.state, ended.end_reason)
    steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    assert [st.end_reason for st in steps] == ["voltage_below"]
    cutoff = ended.plan["program"][0]["until"]["voltage_below_v"]
    assert cutoff - CLAMP_OVERSHOOT_V - 1e-6 <= steps[0].end_voltage_v <= cutoff
    s = await samples(rig.maker, run_id)
    assert s["voltage_v"].min() >= cutoff - CLAMP_OVERSHOOT_V - 1e-6
    assert (s["current_a"] <= 0).all()  # held, never reversed
    assert rig.lab.by_name("cabinet1").sim.voltage_limit_low_v[0] == pytest.approx(
        cutoff - CLAMP_OVERSHOOT_V
    )


async def test_a_run_joining_leaves_the_others_integration_alone(paced_rig: Rig) -> None:
    rig = paced_rig
    # Regression: the group used to rebuild every run's integration anchor when a run
    # joined or left, so the next reading integrated again from the last *stored* sample.
    charge = charge_doc(900)
    first = await rig.start_run("cabinet1/1", protocol_document=charge, sample_period_s=60)
    await wait_for(lambda: bool(rig.node.groups), what="the cabinet group")
    group = next(iter(rig.node.groups.values()))
    await wait_for(lambda: group.ticks > 20, what="some ticks")
    await rig.start_run("cabinet1/2", protocol_document=charge, sample_period_s=60)
    for run_id in (first, first + 1):
        assert (await rig.wait_end(run_id)).state == "completed"
    s = await samples(rig.maker, first)
    assert_contiguous(s["seq"])
    steps = await rows_of(rig.maker, m.Step, first, m.Step.step_number)
    # Constant current: whatever the sampling, the charge is I × t of the stored span.
    span_s = s["t_s"][-1] - s["t_s"][0]
    assert steps[0].capacity_ah == pytest.approx(1.0 * span_s / 3600, rel=1e-3)
    assert steps[0].capacity_ah == pytest.approx(np.trapezoid(s["current_a"], s["t_s"]) / 3600)


async def test_pause_and_resume(rig: Rig) -> None:
    from labdaq.engine.group import FLAG_EDGE, FLAG_PAUSED
    from labdaq.runs import request_pause, request_resume

    charge = charge_doc(900)
    cab = rig.lab.by_name("cabinet1").sim
    run_id = await rig.start_run("cabinet1/1", protocol_document=charge, sample_period_s=10)
    await wait_for(lambda: bool(cab.output_on[0]), what="the output on")
    async with session_scope(rig.maker) as s:
        await request_pause(s, run_id, actor="test")
    await wait_for(lambda: not cab.output_on[0], what="the output off while paused")
    t_paused = rig.clock.now()
    await wait_for(lambda: rig.clock.now() - t_paused > 300, what="300 s of pause")
    async with session_scope(rig.maker) as s:
        assert (await s.get(m.Run, run_id)).state == "paused"  # type: ignore[union-attr]
        await request_resume(s, run_id, actor="test")
    ended = await rig.wait_end(run_id)
    assert ended.state == "completed", (ended.state, ended.end_reason)
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    paused = (s["flags"] & FLAG_PAUSED) != 0
    # Each 10 s period of the >= 300 s pause is a stored paused reading or a recorded
    # missed period (at 500x a period is 20 wall ms, so how many are missed is load's).
    assert paused.sum() + ended.missed_periods >= 20
    assert paused.any() and np.all(s["current_a"][paused] == 0)
    # Resuming stores a reading taken right after the set point is back, and integration
    # restarts from it: nothing is added for the time the output was still off.
    back = int(np.flatnonzero(paused)[-1]) + 1
    assert s["flags"][back] & FLAG_EDGE and not s["flags"][back] & FLAG_PAUSED
    assert s["current_a"][back] == pytest.approx(1.0, rel=0.02)
    assert s["step_capacity_ah"][back] == s["step_capacity_ah"][back - 1]
    step = (await rows_of(rig.maker, m.Step, run_id, m.Step.step_number))[0]
    # The pause does not count towards the step's 900 s: the step lasted them plus the pause.
    assert step.end_t_s - step.start_t_s > 900 + 300
    # Nor to its charge, which is what the stored samples integrate to (a constant 1 A, so
    # the engine's unstored control ticks add up to the same trapezoids): nothing for an
    # interval that ends paused or at the resume reading (the new anchor), and for the
    # interval the pause came in, the part before the output went off. How much of the
    # 900 s the output was really on is not compared with 900 s: at 500x each wall
    # millisecond between the output going off and the engine noting the pause is half a
    # simulated second without current, so that depends on how busy the machine is.
    in_step = s["step_index"] == 0
    t, i_a = s["t_s"][in_step], s["current_a"][in_step]
    q_ah, flags = s["step_capacity_ah"][in_step], s["flags"][in_step]
    was_paused = (flags[:-1] & FLAG_PAUSED) != 0
    ends_paused = (flags[1:] & FLAG_PAUSED) != 0
    anchor = ((flags[1:] & FLAG_EDGE) != 0) & was_paused
    into_pause = ends_paused & ~was_paused
    assert into_pause.sum() == 1
    trapezoid_ah = 0.5 * np.abs(i_a[1:] + i_a[:-1]) * np.diff(t) / 3600.0
    dq_ah = np.diff(q_ah)
    np.testing.assert_allclose(dq_ah[~into_pause],
                               np.where(ends_paused | anchor, 0.0, trapezoid_ah)[~into_pause],
                               rtol=1e-9, atol=1e-12)
    on_until_pause_ah = (np.abs(i_a[:-1]) * np.diff(t) / 3600.0)[into_pause]
    assert 0.0 <= dq_ah[into_pause] <= on_until_pause_ah * (1 + 1e-9)
    assert step.capacity_ah == pytest.approx(q_ah[-1], rel=1e-12)
    # Counted as charge, the 300 s of pause would have added a third (1200 s worth).
    assert step.capacity_ah < 1.0 * 1050 / 3600


async def test_wall_clock_jump_is_recorded_and_timing_is_unaffected(rig: Rig) -> None:
    import time

    charge = charge_doc(600)
    run_id = await rig.start_run("cabinet1/1", protocol_document=charge, sample_period_s=10)
    await wait_for(lambda: run_id in rig.node.active, what="the run to start")
    # The wall clock is stepped back an hour (NTP correction, someone setting the time).
    rig.node.wall_clock = lambda: time.time() - 3600.0
    ended = await rig.wait_end(run_id)
    assert ended.state == "completed", ended.end_reason
    async with session_scope(rig.maker) as s:
        events = (
            await s.scalars(
                select(m.Event).where(m.Event.run_id == run_id, m.Event.kind == "clock_jump")
            )
        ).all()
    assert len(events) == 1, [e.message for e in events]
    assert events[0].data["jump_s"] == pytest.approx(-3600.0, abs=1.0)
    assert events[0].severity == "warning"
    # Run timing is monotonic: the step still lasted its 600 s and samples are contiguous.
    # It ends at the first reading at or past its deadline; how far past depends on how
    # promptly the loop looked (at 500x a wall millisecond is half a simulated second), so
    # the deadline is checked through the recorded crossing and the readings before it.
    steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    deadline = steps[0].start_t_s + 600.0
    assert steps[0].end_reason == "duration"
    assert steps[0].end_crossing_t_s == pytest.approx(deadline, abs=1e-6)
    assert steps[0].end_t_s >= deadline - 1e-6
    s_ = await samples(rig.maker, run_id)
    assert_contiguous(s_["seq"])
    assert (np.diff(s_["t_s"]) > 0).all()
    in_step = s_["t_s"][s_["step_index"] == 0]
    assert (in_step[in_step < steps[0].end_t_s] < deadline).all()


async def _interruptions(rig: Rig, run_id: int) -> list[m.Event]:
    async with session_scope(rig.maker) as s:
        return list(
            (
                await s.scalars(
                    select(m.Event)
                    .where(m.Event.run_id == run_id, m.Event.kind == "interruption")
                    .order_by(m.Event.id)
                )
            ).all()
        )


async def test_lost_instrument_that_stays_gone_interrupts_its_runs(rig: Rig) -> None:
    """The SMU's link goes and stays gone past max_resume_gap_s: the run ends
    ``interrupted``; the first event is open-ended from its last stored sample, and every
    sample stored before is kept."""
    rig.node.max_resume_gap_s = 2.0  # wall seconds, whatever the clock's speed
    run_id = await rig.start_run("smu1/1", protocol_document=charge_doc(3000),
                                 sample_period_s=10)
    await wait_for(lambda: run_id in rig.node.active, what="the run to start")
    group = next(g for g in rig.node.groups.values() if g.name == "smu1")
    await wait_for(lambda: group.ticks > 10, what="some ticks")
    fault = rig.lab.faults.inject("drop_connection", "smu1", duration_s=1e7)
    try:
        ended = await rig.wait_end(run_id, timeout_s=60)
    finally:
        rig.lab.faults.clear(fault)
    assert ended.state == "interrupted", (ended.state, ended.end_reason)
    assert f"more than the {rig.node.max_resume_gap_s:.0f} s" in (ended.end_reason or "")
    lost, final = await _interruptions(rig, run_id)
    s_ = await samples(rig.maker, run_id)
    assert_contiguous(s_["seq"])
    assert "smu1 lost" in lost.message
    assert lost.data["cause"] == "instrument_lost" and lost.data["to_t_s"] is None
    assert lost.data["last_seq"] == int(s_["seq"][-1]) == final.data["last_seq"]
    assert lost.data["from_t_s"] == pytest.approx(float(s_["t_s"][-1]))
    assert final.message == ended.end_reason


# The lost-instrument tests charge at 1 A from 20 % of 4.9 Ah: the cabinet keeps its
# output on while it is unreachable (its watchdog is 30 s), and a long outage on a busy
# machine (seconds of wall time at 500x, plus any reply that times out under the load and
# makes one more, each handled the same way) must not overcharge the cell into a
# safety stop. For the same reason the tests allow further interruption pairs in between.
LOST_SOC = 0.2


async def _wait_interruptions(rig: Rig, run_id: int, n: int) -> list[m.Event]:
    """The run's interruption events once there are at least ``n`` (they are written by
    the engine's record queue, after the run has left its group)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while len(events := await _interruptions(rig, run_id)) < n:
        assert loop.time() < deadline, f"run {run_id}: {len(events)} interruption events"
        await asyncio.sleep(0.05)
    return events


async def test_lost_instrument_that_returns_resumes_its_runs(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The cabinet refuses connections until both runs have left it: the transport gives
    up, the runs wait for it, and when it answers again they resume at their step
    (interruption event with the gap) and complete with contiguous samples."""
    lab = SimLab(soc=LOST_SOC, cabinets=1, cabinet_channels=2)
    r = await start_rig(sqlite_url, lab, SPEED, max_resume_gap_s=1e6)
    try:
        # 3600 s of charge: the outage is cleared by event, not by time, so it falls
        # inside the step however loaded the machine is.
        ids = [await r.start_run(f"cabinet1/{ch}", protocol_document=charge_doc(3600),
                                 sample_period_s=10) for ch in (1, 2)]
        await wait_for(lambda: all(i in r.node.active for i in ids), what="both runs")
        group = next(g for g in r.node.groups.values() if g.name == "cabinet1")
        # Active is not joined: a run is active while its set point is still being
        # programmed. Both must be acquiring in the group when the link goes.
        await wait_for(lambda: {cr.run_id for cr in group.runs} == set(ids),
                       what="both runs to join the cabinet's group")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60.0
        while min([(await samples(r.maker, i))["seq"].size for i in ids]) < 2:
            assert loop.time() < deadline, "the runs did not store samples"
            await asyncio.sleep(0.05)
        fault = r.lab.faults.inject("drop_connection", "cabinet1", duration_s=1e7)
        try:
            await wait_for(lambda: not any(i in r.node.active for i in ids), timeout_s=60,
                           what="the runs to leave the lost cabinet")
            for run_id in ids:  # they left because the cabinet was lost, not because done
                first = await _wait_interruptions(r, run_id, 1)
                assert first[0].data["cause"] == "instrument_lost"
                assert first[0].data["last_seq"] > 1  # it had been acquiring
        finally:
            r.lab.faults.clear(fault)
        ended = [await r.wait_end(i, timeout_s=90) for i in ids]
        for run_id, run in zip(ids, ended, strict=True):
            assert run.state == "completed", (run.state, run.end_reason)
            lost, *later, resumed = await _interruptions(r, run_id)
            assert lost.data["cause"] == "instrument_lost"
            assert "answered again" in resumed.message and resumed.data["gap_s"] > 0
            s_ = await samples(r.maker, run_id)
            assert_contiguous(s_["seq"])
            assert (np.diff(s_["t_s"]) > 0).all()
            steps = await rows_of(r.maker, m.Step, run_id, m.Step.step_number)
            # The charge is counted over the time the current flowed, without the gap:
            # at least the step's 3600 s (it ends at the first look past its deadline,
            # later on a busy machine, and the run's clock is 500x), and never the gap.
            charged_s = steps[0].end_t_s - steps[0].start_t_s - resumed.data["gap_s"]
            why = (steps[0].start_t_s, steps[0].end_t_s, resumed.data, steps[0].capacity_ah)
            assert charged_s >= 3600 * 0.99, why
            assert steps[0].capacity_ah == pytest.approx(1.0 * charged_s / 3600, rel=0.02), why
    finally:
        await r.stop()


async def test_instrument_lost_while_a_run_joins_starts_it_when_it_answers(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The cabinet stops answering while a run is being started on it (programming its
    protection and set point): the run does not fail. It waits with an interruption
    event and starts from its first step once the cabinet answers again."""
    lab = SimLab(soc=LOST_SOC, cabinets=1, cabinet_channels=2)
    r = await start_rig(sqlite_url, lab, SPEED, max_resume_gap_s=1e6)
    try:
        fault = r.lab.faults.inject("drop_connection", "cabinet1", duration_s=1e7)
        try:
            run_id = await r.start_run("cabinet1/1", protocol_document=charge_doc(600),
                                       sample_period_s=10)
            (lost,) = await _wait_interruptions(r, run_id, 1)
            assert lost.data["cause"] == "instrument_lost" and lost.data["last_seq"] == 0
            assert "while the run was starting" in lost.message
            async with session_scope(r.maker) as s:
                run = await s.get(m.Run, run_id)
                assert run is not None and run.state == "running"
            assert not (await samples(r.maker, run_id))["seq"].size
        finally:
            r.lab.faults.clear(fault)
        ended = await r.wait_end(run_id, timeout_s=90)
        assert ended.state == "completed", (ended.state, ended.end_reason)
        lost, started, *_ = await _interruptions(r, run_id)
        assert "answered again" in started.message and started.data["gap_s"] > 0
        s_ = await samples(r.maker, run_id)
        assert_contiguous(s_["seq"])
        steps = await rows_of(r.maker, m.Step, run_id, m.Step.step_number)
        assert len(steps) == 1 and steps[0].capacity_ah >= 600 / 3600 * 0.99
    finally:
        await r.stop()


async def test_instrument_lost_again_while_a_run_rejoins_waits_again(
    sqlite_url: str, tmp_path: Path
) -> None:
    """The cabinet answers again, but the link fails once more while the run is being
    rejoined (its set point programmed): the run waits for the cabinet again instead of
    ending, then resumes and completes. The second failure is made to happen exactly
    there by failing the group's first set-point command after the fault is cleared (a
    real flapping link could not be timed to hit it)."""
    from labdaq.drivers.errors import ConnectionFailed

    lab = SimLab(soc=LOST_SOC, cabinets=1, cabinet_channels=2)
    r = await start_rig(sqlite_url, lab, SPEED, max_resume_gap_s=1e6)
    try:
        run_id = await r.start_run("cabinet1/1", protocol_document=charge_doc(1800),
                                   sample_period_s=10)
        await wait_for(lambda: run_id in r.node.active, what="the run to start")
        group = next(g for g in r.node.groups.values() if g.name == "cabinet1")
        await wait_for(lambda: [cr.run_id for cr in group.runs] == [run_id],
                       what="the run to join")
        ticks = group.ticks
        await wait_for(lambda: group.ticks > ticks + 10, what="some ticks")
        fault = r.lab.faults.inject("drop_connection", "cabinet1", duration_s=1e7)
        try:
            await wait_for(lambda: run_id not in r.node.active, timeout_s=60,
                           what="the run to leave the lost cabinet")
            await _wait_interruptions(r, run_id, 1)
            apply = group._apply
            failed: list[int] = []

            async def flapping_apply(run: Any, phase: Any) -> None:
                if not failed:
                    failed.append(run.run_id)
                    raise ConnectionFailed("link lost again", instrument="cabinet1")
                await apply(run, phase)

            group._apply = flapping_apply  # type: ignore[method-assign]
        finally:
            r.lab.faults.clear(fault)
        ended = await r.wait_end(run_id, timeout_s=90)
        assert failed == [run_id]  # the rejoin did fail once
        assert ended.state == "completed", (ended.state, ended.end_reason)
        lost, *later, resumed = await _interruptions(r, run_id)
        assert lost.data["cause"] == "instrument_lost"
        assert any("lost again while resuming" in e.message and "answered again" in e.message
                   for e in [*later, resumed])
        assert "answered again" in resumed.message and resumed.data["gap_s"] > 0
        assert_contiguous((await samples(r.maker, run_id))["seq"])
    finally:
        await r.stop()


async def test_shutdown_makes_safe_and_closes_every_link(
    sqlite_url: str, tmp_path: Path
) -> None:
    lab = SimLab(soc=0.5, cabinets=1, cabinet_channels=2)
    r = await start_rig(sqlite_url, lab, SPEED)
    try:
        run_id = await r.start_run("cabinet1/1", protocol_document=charge_doc(3600))
        cab = lab.by_name("cabinet1")
        await wait_for(lambda: bool(cab.sim.output_on[0]), what="the output on")
        assert all(inst.server._connections for inst in lab.instruments
                   if inst.transport == "tcp")
        r.node.request_stop()
        await asyncio.wait_for(r.task, 30)
        # Outputs off, the run left running for the next engine to resume, links closed.
        assert not cab.sim.output_on.any()
        async with session_scope(r.maker) as s:
            assert (await s.get(m.Run, run_id)).state == "running"  # type: ignore[union-attr]
        await wait_for(lambda: not any(inst.server._connections for inst in lab.instruments),
                       timeout_s=60, what="every simulator to see its client go")
    finally:
        await r.engine.dispose()
        lab.stop()


# An engine that looks every 10 s, storing every 600 s: a phase end between two storage
# times is stored at once, off the storage grid.
OFF_GRID = [(0.5, 10.0)]


@pytest.mark.parametrize("paced_rig", OFF_GRID, indirect=True)
async def test_a_phase_end_off_the_storage_grid_does_not_skip_the_next_period(
    paced_rig: Rig,
) -> None:
    rig = paced_rig
    # Regression: the row a phase end stores moved the run's next storage time on by a
    # period, so the period after it went unsampled (a lost sample per off-grid phase end;
    # every run joining a group lost one this way, docs/performance.md).
    from labdaq.engine.group import FLAG_EDGE

    period_s = 600.0
    doc = {"schema_version": 1, "name": "short-then-long", "steps": [
        {"step": "cc", "current_a": 1.0, "until": {"duration_s": 50}},
        {"step": "cc", "current_a": 1.0, "until": {"duration_s": 1300}},
    ]}
    run_id = await rig.start_run("cabinet1/1", protocol_document=doc, sample_period_s=period_s)
    assert (await rig.wait_end(run_id)).state == "completed"
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    t = s["t_s"][(s["flags"] & FLAG_EDGE) == 0]
    assert t[0] < period_s / 2  # the first phase's end, off the grid
    # Every storage period holds a reading: no two consecutive ones 1.5 periods apart.
    assert np.diff(t).max() < 1.5 * period_s, np.diff(t).tolist()
    assert t.size >= 4  # 50 s (the phase end), 600 s, 1200 s, 1350 s (the run's end)
