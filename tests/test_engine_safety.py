"""Safety: a breach on any measurement turns that channel's output off first, ends the run
as aborted_safety and records a safety event with the breach-to-off time.

Through the simulated lab over real TCP (Keithley 2460 SMUs and a cycler cabinet in
this process, engine on the lab's clock, which the engine paces: ``paced_rig``). Faults
are injected in the simulators:

* thermal runaway (``CellBank.trigger_thermal_runaway``): the simulated cell's separator
  fails within ~1 s of the onset, so on either instrument the voltage collapses before the
  temperature has risen by 5 °C; the run ends on min_voltage_v (the 2460 measures no
  temperature at all);
* an internal short (``CellBank.set_internal_short``, 1 Ω: ~14 W inside a 46 g cell) heats
  the cell at ~0.3 °C/s while its voltage holds up for minutes: on the cabinet, which
  measures cell temperature, the run ends on max_temperature_c;
* over-current: the SMU's current regulation fails and it delivers 1.5× the set current
  (the simulator object's ``actual_current`` is wrapped, so the cell really gets it and
  the SMU really reports it — the engine only sees readings);
* over-voltage: the SMU's voltage compliance fails (its ``_compliance_voltage`` is
  wrapped to 99 V), so a constant-current charge runs the cell past full.

The steps used end on time only, so the engine's own voltage clamps at end voltages
(labdaq.engine.channel._clamp) are not in play: the interlock is what must stop them.
Timings are recorded, not asserted (benchmarks/engine_channels.py reports them).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select

from labdaq.engine.group import FLAG_BREACH
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import (
    LockstepClock,
    Rig,
    assert_contiguous,
    eventually,
    nmc_18650_spec,
    samples,
    start_paced_rig,
    wait_for,
)

SPEED = 500.0


def document(step: dict[str, Any], max_temperature_c: float | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema_version": 1, "name": "safety test", "steps": [step]}
    if max_temperature_c is not None:
        doc["safety"] = {"max_temperature_c": max_temperature_c}
    return doc


CHARGE_1A = {"step": "cc", "current_a": 1.0, "until": {"duration_s": 36000}}


def safety_lab(tmp_path: Path, clock: LockstepClock | None = None) -> SimLab:
    return SimLab(
        smus=1,
        cabinets=1,
        cabinet_channels=2,
        cell_spec=nmc_18650_spec(tmp_path),
        soc=0.5,
        seed=11,
        clock=clock,
    )


@pytest.fixture
async def paced_rig(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    """The lab on a lockstep clock paced by the engine (engine_rig.SpeedGovernor):
    simulated time goes at most one control period past an instrument's last reading, and
    the next reading is taken there, however busy the machine.

    Every test here runs on it. The governor paces each instrument group the node creates
    (it wraps ``node._group_for``, through which a run joins the SMU's group as the
    cabinet's), so the SMU is held to a reading per simulated second as the cabinet is. On
    the free 500x clock, on a loaded machine (load 10-15, two busy loops beside the test),
    the cabinet stopped answering within the driver's 2 s timeout (the simulator steps its
    cells through all the simulated time since the last query, in steps of at most 1 s,
    before it replies, and at 500x a stalled second of wall time is 500 of them), was
    counted as lost, and the runs never ended as the tests wait for (pytest-timeout); the
    SMU tests failed the same way, and the over-current one also ended on max_voltage_v:
    the cell was full before the fault went in."""
    lab = safety_lab(tmp_path, LockstepClock())
    rig = await start_paced_rig(sqlite_url, lab, SPEED, tick_s=1.0, idle=SPEED)
    yield rig
    await rig.stop()


# The paced tests' hang guards. Their simulated span is fixed (a reading per simulated
# second until the fault trips), so a busy machine only makes them take more wall time:
# these bound that, they are no performance bound.
PACED_WAIT_S = 240.0
PACED_TIMEOUT = pytest.mark.timeout(600)

# When a fault goes into a running run (simulated seconds into the run, see
# _runs_held_at): well before a charge could fill the cell (2160 s at 2 A from half full),
# which on the free clock a loaded machine's slow polling let happen first.
FAULT_AT_S = 30.0
_FAULT_HOLD = "test: fault injection"  # the test's own hold on the lockstep clock


async def safety_event(rig: Rig, run_id: int) -> m.Event:
    async with session_scope(rig.maker) as s:
        events = (
            await s.scalars(
                select(m.Event).where(m.Event.run_id == run_id, m.Event.kind == "safety")
            )
        ).all()
    assert len(events) == 1, [e.message for e in events]
    return events[0]


async def check_aborted(rig: Rig, run_id: int, limit: str, timeout_s: float = 30.0
                        ) -> tuple[m.Event, dict[str, Any]]:
    """aborted_safety with ``limit``; the event names the breaching sample, which is stored
    and flagged, and carries the breach-to-off time; no sample was lost. ``timeout_s``
    only stops a hung run."""
    run = await rig.wait_end(run_id, timeout_s=timeout_s)
    assert run.state == "aborted_safety", (run.state, run.end_reason)
    assert limit in (run.end_reason or "")
    ev = await safety_event(rig, run_id)
    assert ev.severity == "critical"
    assert ev.data["limit"] == limit
    # From the breaching reading to the off command on the wire, and to the instrument's
    # acknowledgement (its error queue read back after the command): the second is later.
    breach_to_off = ev.data["breach_to_off_s"]
    breach_to_ack = ev.data["breach_to_off_ack_s"]
    assert isinstance(breach_to_off, float) and math.isfinite(breach_to_off) and breach_to_off >= 0
    assert isinstance(breach_to_ack, float) and breach_to_off < breach_to_ack
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    k = int(np.flatnonzero(s["seq"] == ev.data["seq"])[0])
    assert s["flags"][k] & FLAG_BREACH
    assert k == len(s["seq"]) - 1, "the breaching sample is the run's last"
    assert not (s["flags"][:k] & FLAG_BREACH).any()
    return ev, s


@PACED_TIMEOUT
async def test_internal_short_on_cabinet_trips_on_temperature(paced_rig: Rig) -> None:
    rig = paced_rig
    cab = rig.lab.by_name("cabinet1").sim
    # Held at FAULT_AT_S: a start that takes long (an instrument lost and found again while
    # run 2 joins) must not let run 1 charge its cell full before the short goes in.
    async with _runs_held_at(rig, FAULT_AT_S, ("cabinet1/1", document(CHARGE_1A, 50.0)),
                             ("cabinet1/2", document(CHARGE_1A, 50.0))) as (hot, calm):
        cab.bank.set_internal_short(0, 1.0)
    ev, s = await check_aborted(rig, hot, "max_temperature_c", PACED_WAIT_S)
    assert ev.data["value"] > 50.0 and ev.data["bound"] == 50.0
    assert s["temperature_c"][-1] > 50.0 and np.nanmax(s["temperature_c"][:-1]) <= 50.0
    assert s["voltage_v"][-1] > 3.0  # the voltage had not collapsed
    assert not cab.output_on[0], "channel 1 output still on"
    # The other channel of the same cabinet goes on.
    assert cab.output_on[1]
    async with session_scope(rig.maker) as ss:
        other = await ss.get(m.Run, calm)
        assert other is not None and other.state == "running"


@PACED_TIMEOUT
async def test_thermal_runaway_on_cabinet(paced_rig: Rig) -> None:
    rig = paced_rig
    cab = rig.lab.by_name("cabinet1").sim
    async with _runs_held_at(rig, FAULT_AT_S,
                             ("cabinet1/2", document(CHARGE_1A, 50.0))) as (run_id,):
        cab.bank.trigger_thermal_runaway(1)
    ev, s = await check_aborted(rig, run_id, "min_voltage_v", PACED_WAIT_S)
    assert ev.data["value"] < ev.data["bound"]
    assert s["temperature_c"][-1] > s["temperature_c"][-2]  # and it is heating up
    assert not cab.output_on[1]


@PACED_TIMEOUT
async def test_thermal_runaway_on_smu_shows_as_voltage_collapse(paced_rig: Rig) -> None:
    rig = paced_rig
    smu = rig.lab.by_name("smu1").sim
    async with _runs_held_at(rig, FAULT_AT_S, ("smu1/1", document(CHARGE_1A))) as (run_id,):
        smu.cell.trigger_thermal_runaway(0)
    ev, s = await check_aborted(rig, run_id, "min_voltage_v", PACED_WAIT_S)
    assert ev.data["value"] < ev.data["bound"]
    assert np.isnan(s["temperature_c"]).all()  # a 2460 measures no temperature
    assert not smu.output_on


@PACED_TIMEOUT
async def test_over_current_when_the_smu_regulation_fails(paced_rig: Rig) -> None:
    rig = paced_rig
    smu = rig.lab.by_name("smu1").sim
    charge_2a = document({"step": "cc", "current_a": 2.0, "until": {"duration_s": 3600}})
    async with _runs_held_at(rig, FAULT_AT_S, ("smu1/1", charge_2a)) as (run_id,):
        regulated = smu.actual_current
        smu.actual_current = lambda: 1.5 * regulated()  # 3.0 A for a 2.0 A set point
    ev, s = await check_aborted(rig, run_id, "max_charge_current_a", PACED_WAIT_S)
    assert ev.data["value"] == pytest.approx(3.0, rel=1e-6)
    assert ev.data["bound"] == pytest.approx(2.4)  # the cell's 1C
    assert s["current_a"][-1] == pytest.approx(3.0, rel=1e-6)
    assert not smu.output_on


@PACED_TIMEOUT
async def test_over_voltage_when_the_smu_compliance_fails(paced_rig: Rig) -> None:
    # The fault is in before the run starts, so no hold: a reading per simulated second
    # all the way from half full to past 4.3 V.
    rig = paced_rig
    smu = rig.lab.by_name("smu1").sim
    smu._compliance_voltage = lambda: 99.0
    run_id = await rig.start_run(
        "smu1/1",
        protocol_document=document({"step": "cc", "current_a": 2.4, "until": {"duration_s": 7200}}),
    )
    ev, s = await check_aborted(rig, run_id, "max_voltage_v", PACED_WAIT_S)
    assert ev.data["bound"] == pytest.approx(4.3)  # charge cut-off + 0.1 V margin
    assert s["voltage_v"][-1] > 4.3 and s["voltage_v"][:-1].max() <= 4.3
    assert not smu.output_on


async def _running(rig: Rig, *run_ids: int) -> None:
    """Until every run has stored a few samples (acquisition is under way)."""
    for run_id in run_ids:
        async def three(run_id: int = run_id) -> bool:
            return len((await samples(rig.maker, run_id))["seq"]) >= 3

        await eventually(three, f"run {run_id} to store three samples")


def _has_read(rig: Rig, clock: LockstepClock, run_id: int) -> bool:
    """The run has joined its instrument's group and taken its first reading, and the
    group's loop waits on the lockstep clock (HoldClock has set its hold)."""
    g = rig.node.run_groups.get(run_id)
    if g is None or clock.held(g.name) is None:
        return False
    k = np.flatnonzero(g.state.run_id == run_id)
    return bool(k.size) and int(g.state.seq[k[0]]) >= 1


@asynccontextmanager
async def _runs_held_at(
    rig: Rig, t_s: float, *starts: tuple[str, dict[str, Any]]
) -> AsyncIterator[list[int]]:
    """Start runs (channel, protocol document), let them acquire for ``t_s`` simulated
    seconds and hold simulated time there while the body injects a fault; time goes on
    when the body is done.

    The fault then goes in at the same simulated time into the runs however busy the
    machine: simulated time stands still from before the runs are queued until each has
    taken its first reading (the scheduler claims runs on wall-time polls, which at the
    idle 500x would be minutes of simulated time), then runs to ``t_s`` past that, the
    engine reading every simulated second (paced_rig), and stops there (the lockstep
    clock never passes its lowest hold). The body runs once each group's loop has
    finished its last reading before ``t_s`` and waits for one after it, and once the
    runs' samples are stored (_running). Its hold is short (a few polls of wall time), far
    below the simulators' 30 s command watchdog."""
    clock = rig.lab.clock
    assert isinstance(clock, LockstepClock), "paced_rig's lab"
    t0 = clock.now()
    clock.hold(_FAULT_HOLD, t0)
    try:
        run_ids = [await rig.start_run(ch, protocol_document=doc) for ch, doc in starts]
        await wait_for(lambda: all(_has_read(rig, clock, r) for r in run_ids), PACED_WAIT_S,
                       "the runs' first readings")
        groups = {rig.node.run_groups[r].name for r in run_ids}
        t_fault = t0 + t_s
        clock.hold(_FAULT_HOLD, t_fault)

        def waiting_past_fault() -> bool:
            # A group's hold is moved past t_fault only when a reading at or before it is
            # done (SpeedGovernor._after_tick); its next reading waits for the clock.
            return all((h := clock.held(name)) is not None and h > t_fault
                       for name in groups)

        await wait_for(waiting_past_fault, PACED_WAIT_S,
                       f"the runs to read up to {t_s} s of simulated time")
        await _running(rig, *run_ids)
        yield run_ids
    finally:
        clock.release(_FAULT_HOLD)


@PACED_TIMEOUT
async def test_breach_on_the_first_reading(paced_rig: Rig) -> None:
    # The reading taken right after the set point is applied is checked like any other:
    # a limit below the cell's temperature trips there, before the first control tick.
    rig = paced_rig
    cab = rig.lab.by_name("cabinet1").sim
    run_id = await rig.start_run("cabinet1/1", protocol_document=document(CHARGE_1A, 20.0))
    ev, s = await check_aborted(rig, run_id, "max_temperature_c", PACED_WAIT_S)
    assert len(s["seq"]) == 1 and ev.data["seq"] == 1
    assert not cab.output_on[0]
