"""Runs joining an instrument's group do not cost the runs already sampling a period
(engine/scheduling.py ``_start_many``, engine/group.py ``add_many``).

Every command other than a measurement costs the simulated cabinet a fixed share of a
sample period of simulated time (a slow link, a busy instrument), and the engine runs on
a lockstep clock that only its own loop and those commands move (the clock of
tests/test_missed_periods.py): the test is as slow or fast as the machine, never
different. Programming a joining run takes several such commands. Had the group's loop
waited for them (the lock held for the whole join, as before batched joins) its next tick
would come more than a period late and every running channel would miss a period; now it
waits for one command at most, and no command of a join goes out while a tick is due.
The count comes from the database. A run the instrument
refuses fails alone: the others of its batch start as if each had joined on its own.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sqlalchemy import select

from labdaq.drivers.errors import InstrumentReportedError
from labdaq.runs import RunCreate, create_run
from labdaq.sims.lab import SimLab
from labdaq.sims.server import SimServer
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import (
    LockstepClock,
    assert_contiguous,
    channel_cell,
    samples,
    start_rig,
    wait_for,
)
from tests.test_missed_periods import HOLD, SteppedClock

SPEED = 20.0  # simulated seconds per wall second while the clock runs
PERIOD_S = 1.0
# Simulated time each non-measuring line takes. A driver call is a command and its
# error-queue read: 0.4 s, so a tick that waits for the call in flight is still within
# half its period, and the samples' times (when the queries went out) round to it.
COMMAND_COST_S = 0.2 * PERIOD_S
RUNNING = 4  # runs sampling before the others join
JOINING = 4  # runs joining them, in one scheduler round or a few
TICKS_AFTER = 6  # ticks with every run in the group before the engine stops
EDGE = int(m.SampleFlag.EDGE)


class CostlyCommands:
    """Every line the cabinet receives except ``MEAS:ALL?`` lets simulated time run
    ``cost_s`` further before it is answered (the engine waits for it in simulated
    time, as for a slow instrument)."""

    def __init__(self, server: SimServer, clock: LockstepClock, cost_s: float) -> None:
        self.commands = 0
        process = server._process

        def costly(line: str) -> bytes | None:
            reply = process(line)
            if not line.startswith("MEAS:ALL?"):
                self.commands += 1
                target = clock.now() + cost_s
                # Never lower a hold the engine's loop set further ahead.
                clock.hold(HOLD, max(target, clock._holds.get(HOLD, target)))
                while clock.now() < target:
                    time.sleep(0.0005)
            return reply

        server._process = costly  # type: ignore[method-assign]


def _charge(duration_s: float) -> dict[str, Any]:
    """A CC step: the join programs a clamp, a current and the output (three commands,
    each with its error-queue read)."""
    return {"schema_version": 1, "name": "slow charge",
            "steps": [{"step": "cc", "current_a": 0.1, "until": {"duration_s": duration_s}}]}


class LateWaking(SteppedClock):
    """The loop's wait for a deadline ends up to 0.2 s of wall time after simulated time
    reached it: the event loop of a busy machine, where other coroutines (the one joining
    runs) are resumed first."""

    poll_s = 0.2


async def test_runs_joining_a_sampling_group_cost_its_runs_no_period(db_url: str) -> None:
    await _join_while_sampling(db_url, SteppedClock)


async def test_a_join_sends_no_command_while_a_tick_is_due(db_url: str) -> None:
    """The group's coroutine wakes late for its deadlines: the joins' commands, which take
    simulated time, still wait for the due tick's measurement (group.call_between_ticks),
    so no running channel misses a period. Without that wait, the joins' commands pushed
    the clock seconds past a deadline before the tick measured."""
    await _join_while_sampling(db_url, LateWaking)


async def _join_while_sampling(db_url: str, clock: type[SteppedClock]) -> None:
    lab = SimLab(smus=0, cabinets=1, cabinet_channels=RUNNING + JOINING,
                 clock=LockstepClock())
    rig = await start_rig(db_url, lab, SPEED, control_period_s=PERIOD_S)
    try:
        lab.clock.hold(HOLD, lab.clock.now())  # still until the engine's loop asks for time
        rig.node.clock = clock(lab.clock)  # the group is made with it at the claim
        cost = CostlyCommands(lab.by_name("cabinet1").server, lab.clock, COMMAND_COST_S)
        node = rig.node
        first = [await rig.start_run(f"cabinet1/{c}", protocol_document=_charge(3600.0),
                                     sample_period_s=PERIOD_S)
                 for c in range(1, RUNNING + 1)]
        await wait_for(lambda: set(first) <= node.active.keys() and bool(node.groups),
                       timeout_s=60, what="the first runs to sample")
        group = next(iter(node.groups.values()))
        ticks0 = group.ticks
        await wait_for(lambda: group.ticks >= ticks0 + 3, timeout_s=60,
                       what="three ticks of the first runs")
        commands0 = cost.commands
        later = [await rig.start_run(f"cabinet1/{c}", protocol_document=_charge(3600.0),
                                     sample_period_s=PERIOD_S)
                 for c in range(RUNNING + 1, RUNNING + JOINING + 1)]
        # In the group's arrays, not only claimed: their set points go out while the
        # group ticks on, which on a busy machine can outlast the ticks waited for below.
        await wait_for(lambda: set(later) <= {r.run_id for r in group.runs}, timeout_s=60,
                       what="the other runs to join")
        ticks1 = group.ticks
        await wait_for(lambda: group.ticks >= ticks1 + TICKS_AFTER, timeout_s=60,
                       what="ticks with every run in the group")
        # The joins cost simulated time: more than a period in all (a loop that waited
        # for all of them would have missed one).
        assert (cost.commands - commands0) * COMMAND_COST_S > 1.5 * PERIOD_S
        node.request_stop()  # runs stay running; every row is committed on the way out
        await rig.task
        lab.clock.release(HOLD)

        for run_id in first + later:
            s = await samples(rig.maker, run_id)
            assert_contiguous(s["seq"])
            t_due = s["t_s"][(s["flags"] & EDGE) == 0]  # edge rows are extra readings
            assert t_due.size >= 3, (run_id, t_due.tolist())
            # A period of its own per due row, from the first row on: none lost. The first
            # is the tick nearest the run's first storage time (within half a period of it),
            # late by at most the driver call in flight (two lines).
            assert t_due[0] < 1.5 * PERIOD_S + 2 * COMMAND_COST_S, (run_id, t_due.tolist())
            lost = round(float(t_due[-1] - t_due[0]) / PERIOD_S) - (t_due.size - 1)
            assert lost == 0, (run_id, t_due.tolist())
            assert np.all(np.diff(t_due) < 2 * PERIOD_S), (run_id, t_due.tolist())
        async with session_scope(rig.maker) as ses:
            missed = (await ses.execute(select(m.Run.id, m.Run.missed_periods).where(
                m.Run.id.in_(first + later)))).all()
        assert {int(r): int(n or 0) for r, n in missed} == {r: 0 for r in first + later}
    finally:
        lab.clock.release(HOLD)
        await rig.stop()


async def test_a_run_the_instrument_refuses_fails_alone_and_the_others_of_its_batch_start(
        db_url: str) -> None:
    """Three runs claimed in one round join in one batch; the cabinet refuses the set
    point of one of them (an error in its error queue): that run fails with the
    instrument's error, the other two start and sample, as if each had joined alone."""
    lab = SimLab(smus=0, cabinets=1, cabinet_channels=3)
    rig = await start_rig(db_url, lab, SPEED, control_period_s=PERIOD_S)
    try:
        node = rig.node
        driver = next(iter(node.instruments.values())).driver
        set_current = driver.set_current

        def refuse_channel_2(channel: Any, current_a: float, voltage_limit_v: float) -> None:
            chans = channel if isinstance(channel, list) else [channel]
            if 2 in chans:
                raise InstrumentReportedError("set point refused", code=-222,
                                              text="Data out of range", instrument="cabinet1")
            set_current(channel, current_a, voltage_limit_v)

        driver.set_current = refuse_channel_2
        async with session_scope(rig.maker) as s:  # one transaction: one scheduler round
            ids = []
            for c in (1, 2, 3):
                run = await create_run(s, RunCreate(
                    channel=f"cabinet1/{c}", cell_serial=channel_cell(rig.desc, f"cabinet1/{c}"),
                    sample_period_s=PERIOD_S, protocol_document=_charge(3600.0)), actor="test")
                await s.flush()
                ids.append(int(run.id))
        ok = [ids[0], ids[2]]
        await wait_for(lambda: set(ok) <= node.active.keys(), timeout_s=60,
                       what="the two runs the cabinet accepts to join")
        refused = await rig.wait_end(ids[1])
        assert refused.state == "failed"
        assert "InstrumentReportedError" in (refused.end_reason or "")
        assert ids[1] not in node.active
        group = next(iter(node.groups.values()))
        # Active is not joined: after the batch failed each run joins alone, and the last
        # one's set point may still be going out.
        await wait_for(lambda: sorted(r.channel for r in group.runs) == [1, 3], timeout_s=60,
                       what="the two runs the cabinet accepts in the group")
        ticks0 = group.ticks
        await wait_for(lambda: group.ticks >= ticks0 + 2, timeout_s=60,
                       what="two ticks of the runs that started")
        for run_id in ok:
            async with session_scope(rig.maker) as s:
                run = await s.get(m.Run, run_id)
                assert run is not None and run.state == "running"
        node.request_stop()
        await rig.task
        for run_id in ok:
            assert_contiguous((await samples(rig.maker, run_id))["seq"])
    finally:
        await rig.stop()
