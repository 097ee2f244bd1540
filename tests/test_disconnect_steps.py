"""An instrument's link drops in the middle of each kind of step, through the simulators'
fault injection (sims/faults.py ``drop_connection``): what the run does is the design's.

* The cycler drops while the run is in a rest, CC, CC-CV, pulse, EIS or chamber step:
  the run leaves its group with an ``instrument_lost`` interruption, waits, and when the
  cycler answers again resumes at that step ("it answered again") and completes.
* The impedance meter (``eis1``) drops before an EIS sweep, or the chamber while it settles: an
  auxiliary step that cannot be carried out fails the run with the reason, naming the
  step (labdaq/engine/aux_steps.py); the run does not hang.

Either way every sample stored before the drop is still there, once: ``seq`` is 1..N
without a hole and ``t_s`` only grows. The engine runs in this process against the
simulated lab over TCP (tests/engine_rig.py); each drop is made when the run is seen in
its step and cleared when the run is seen to have left (or ended), never after a timer.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from labdaq.engine.channel import ChannelRun
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import Rig, assert_contiguous, samples, start_rig, wait_end, wait_for
from tests.fault_report import lost_and_duplicates, record_fault

pytestmark = [pytest.mark.slow, pytest.mark.faults]

SPEED = 100.0
CHANNEL = "smu1/1"
TIMEOUT_S = 120.0  # conditions only: a hang fails, a busy machine does not
EIS: dict[str, Any] = {"step": "eis", "start_frequency_hz": 1000, "stop_frequency_hz": 0.1,
                       "points_per_decade": 10, "amplitude_v": 0.005}
CHAMBER: dict[str, Any] = {"step": "set_temperature", "temperature_c": 30.0,
                           "tolerance_c": 1.0, "stable_for_s": 60.0, "timeout_s": 3600.0}
REST: dict[str, Any] = {"step": "rest", "until": {"duration_s": 60}}
# Each step long enough (simulated) that the drop falls inside it on a busy machine; the
# run then ends by itself soon after it resumes.
STEPS: dict[str, dict[str, Any]] = {
    "rest": {"step": "rest", "until": {"duration_s": 1200}},
    "cc": {"step": "cc", "rate_c": 0.2, "until": {"duration_s": 1200}},
    "cccv": {"step": "cccv", "rate_c": 0.3, "voltage_v": "charge_cutoff",
             "until": {"current_below_c": 0.01, "duration_s": 1200}},
    "pulse": {"step": "pulse", "rate_c": -0.5, "pulse_duration_s": 600,
              "rest_duration_s": 600},
    "eis": EIS,
    "set_temperature": CHAMBER,
}


def _doc(step: dict[str, Any]) -> dict[str, Any]:
    return {"schema_version": 1, "name": f"drop during {step['step']}",
            "steps": [REST, step, REST]}


def _in_step(r: Rig, run_id: int, kind: str) -> bool:
    cr: ChannelRun | None = r.node.active.get(run_id)
    return cr is not None and cr.step is not None and cr.step.step == kind


async def _events(r: Rig, run_id: int, kind: str) -> list[m.Event]:
    async with session_scope(r.maker) as s:
        return list((await s.scalars(select(m.Event).where(
            m.Event.run_id == run_id, m.Event.kind == kind).order_by(m.Event.id))).all())


async def _wait_events(r: Rig, run_id: int, kind: str) -> list[m.Event]:
    """The run's events of ``kind`` once there is one (the engine's record queue writes
    them after the run has left its group)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TIMEOUT_S
    while not (events := await _events(r, run_id, kind)):
        assert loop.time() < deadline, f"no {kind} event on run {run_id}"
        await asyncio.sleep(0.05)  # a condition poll
    return events


async def _rig(url: str) -> Rig:
    return await start_rig(url, SimLab(smus=1, impedance=1, chamber=True, soc=0.5), SPEED,
                           max_resume_gap_s=1e6)


async def _stored_before(r: Rig, run_id: int) -> list[int]:
    return [int(s) for s in (await samples(r.maker, run_id))["seq"]]


def _check_samples(seqs: list[int], before: list[int], t_s: np.ndarray) -> tuple[int, int]:
    lost, dups = lost_and_duplicates(seqs, before)
    assert lost == 0 and dups == 0, (lost, dups)
    assert_contiguous(np.asarray(seqs))
    assert (np.diff(t_s) > 0).all()
    return lost, dups


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", list(STEPS))
async def test_cycler_lost_in_each_step_resumes_the_run(sqlite_url: str, kind: str) -> None:
    r = await _rig(sqlite_url)
    try:
        run_id = await r.start_run(CHANNEL, protocol_document=_doc(STEPS[kind]),
                                   sample_period_s=1.0)
        await wait_for(lambda: _in_step(r, run_id, kind), TIMEOUT_S, f"the {kind} step")
        before = await _stored_before(r, run_id)
        fault = r.lab.faults.inject("drop_connection", "smu1", duration_s=1e7)
        try:
            await wait_for(lambda: run_id not in r.node.active, TIMEOUT_S,
                           "the run to leave the lost cycler")
            lost_ev = await _wait_events(r, run_id, "interruption")
            assert lost_ev and lost_ev[0].data["cause"] == "instrument_lost", lost_ev
        finally:
            r.lab.faults.clear(fault)
        run = await wait_end(r.maker, run_id, TIMEOUT_S)
        s_ = await samples(r.maker, run_id)
        seqs = [int(x) for x in s_["seq"]]
        lost, dups = lost_and_duplicates(seqs, before)
        interruptions = await _events(r, run_id, "interruption")
        resumed = [e for e in interruptions if "answered again" in e.message]
        record_fault(f"cycler link dropped during a {kind} step", faults=1, lost=lost,
                     duplicates=dups, runs_resumed=int(bool(resumed)), runs=1,
                     missed_periods=int(run.missed_periods or 0))
        assert run.state == "completed", (run.state, run.end_reason, interruptions)
        assert resumed, [e.message for e in interruptions]
        _check_samples(seqs, before, s_["t_s"])
        # Every step of the protocol was carried out, the interrupted one included.
        async with session_scope(r.maker) as s:
            kinds = list((await s.scalars(select(m.Step.kind).where(
                m.Step.run_id == run_id).order_by(m.Step.step_number))).all())
        assert kind in kinds, kinds
    finally:
        await r.stop()


AUX = {"eis": "eis1", "set_temperature": "chamber1"}


@pytest.mark.timeout(600)
@pytest.mark.parametrize("kind", list(AUX))
async def test_aux_instrument_lost_fails_its_step_with_the_reason(sqlite_url: str,
                                                                  kind: str) -> None:
    r = await _rig(sqlite_url)
    try:
        run_id = await r.start_run(CHANNEL, protocol_document=_doc(STEPS[kind]),
                                   sample_period_s=1.0)
        # The impedance meter goes before the sweep (a sweep is over in a few wall ms
        # here); the chamber while the run waits for it to settle.
        step_seen = "rest" if kind == "eis" else kind
        await wait_for(lambda: _in_step(r, run_id, step_seen), TIMEOUT_S,
                       f"the {step_seen} step")
        fault = r.lab.faults.inject("drop_connection", AUX[kind], duration_s=1e7)
        try:
            run = await wait_end(r.maker, run_id, TIMEOUT_S)
        finally:
            r.lab.faults.clear(fault)
        s_ = await samples(r.maker, run_id)
        seqs = [int(x) for x in s_["seq"]]
        lost, dups = lost_and_duplicates(seqs, list(range(1, max(seqs) + 1)))
        record_fault(f"{AUX[kind]} link dropped during a {kind} step (run fails, reason "
                     "recorded)", faults=1, lost=lost, duplicates=dups, runs_resumed=0,
                     runs=1, missed_periods=int(run.missed_periods or 0))
        assert run.state == "failed", (run.state, run.end_reason)
        reason = run.end_reason or ""
        # The step and the lost link (labdaq.engine.setpoints.LOST_INSTRUMENT) are named.
        assert f"{kind} step" in reason, reason
        assert any(e in reason for e in ("ConnectionFailed", "InstrumentTimeout")), reason
        _check_samples(seqs, list(range(1, max(seqs) + 1)), s_["t_s"])
    finally:
        await r.stop()

