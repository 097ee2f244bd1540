"""A stored sample's time says when its reading was taken, checked against the simulated
cabinet's own clock: the engine runs on the lab's clock (tests/engine_rig.py), and the
cabinet keeps the clock time of every reading it takes (CabinetSim.readings). Over both
SOCKET links; the stream transport also through a dropped connection mid-run.

The engine's clock runs free at 50x here (the readings must come after their stamps on a
running clock), so a busy machine makes ticks late: periods go by unsampled, and the run
ends at a later tick than on a quiet one. Both are on the record, and the test accounts
for every period the run's ticks reached rather than for a count of stored samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from labdaq.drivers.transport import StreamTransport, VisaTransport
from labdaq.engine.gaps import EVENT_KIND
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import assert_contiguous, samples, start_rig, wait_for

SPEED = 50.0
PERIOD_S = 1.0  # the run's sample period and the group's control period: one tick each
GAP = int(m.SampleFlag.GAP)


@pytest.mark.parametrize("stream", [False, True], ids=["pyvisa", "stream"])
async def test_stored_time_is_between_query_and_next_reading(sqlite_url: str, tmp_path: Path,
                                                             stream: bool) -> None:
    lab = SimLab(soc=0.3, cabinets=1, cabinet_channels=2)
    if stream:  # the instrument option a lab sets for the asyncio stream transport
        lab.by_name("cabinet1").driver_options["transport"] = {"stream": True}
    cabinet = lab.by_name("cabinet1").sim
    # No measurement cycle: each query takes a fresh reading at the moment it arrives,
    # so every reading the engine was sent has its own time on the cabinet's clock.
    cabinet.refresh_s = 0.0
    rig = await start_rig(sqlite_url, lab, SPEED, control_period_s=1.0)
    try:
        doc = {"schema_version": 1, "name": "charge",
               "steps": [{"step": "cc", "current_a": 3.0, "until": {"duration_s": 60}}]}
        run_id = await rig.start_run("cabinet1/1", protocol_document=doc, sample_period_s=1)
        await wait_for(lambda: bool(rig.node.groups) and any(
            r.run_id == run_id for g in rig.node.groups.values() for r in g.runs),
            what="the run in its group")
        group = next(iter(rig.node.groups.values()))
        assert isinstance(group.driver.transport, StreamTransport if stream else VisaTransport)
        assert group.driver.data_format == "real32"  # readings arrive as float32 blocks
        k = next(j for j, r in enumerate(group.runs) if r.run_id == run_id)
        run_t0 = float(group.state.t0_clock_s[k])  # lab-clock time of the run's t_s = 0
        # The scheduled time of every tick that measures the run (the last one ends it:
        # a run that ends leaves the group in that tick). Wrapped before any await, so
        # the run is still in the group and its last tick is still to come.
        deadlines: list[float] = []
        tick = group._tick

        async def recorded(deadline: float | None = None, tick_s: float | None = None) -> None:
            if any(r.run_id == run_id for r in group.runs):
                assert deadline is not None and tick_s == PERIOD_S, (deadline, tick_s)
                deadlines.append(deadline)
            await tick(deadline, tick_s)

        group._tick = recorded  # type: ignore[method-assign]
        ended = await rig.wait_end(run_id)
        assert ended.state == "completed", (ended.state, ended.end_reason)
    finally:
        await rig.stop()

    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    async with session_scope(rig.maker) as ses:
        gaps = [(e.seq, e.data) for e in (await ses.scalars(
            select(m.Event).where(m.Event.run_id == run_id, m.Event.kind == EVENT_KIND)
            .order_by(m.Event.seq))).all()]
    # Every period the run had is accounted for: stored, or recorded as missed. Its
    # storage times are 0 (the sample taken as it joined), 1, 2, ... s; a tick serves
    # those before its scheduled time plus half a tick (group.py), so the periods the run
    # had are the storage times below its last tick's reach: 61 or 62 for a 60 s step
    # ended on time (as the ticks fall against the run's start), more when a busy machine
    # made the ending tick late.
    assert deadlines, "no tick measured the run"
    reach = (deadlines[-1] - run_t0) + 0.5 * PERIOD_S
    periods = int(np.ceil(reach / PERIOD_S))
    assert s["t_s"][-1] >= 60.0 - 1e-9  # the step's duration ended it
    assert s["seq"].size + ended.missed_periods == periods, (
        s["seq"].size, ended.missed_periods, periods, gaps)
    # ... each missed stretch once, as an event with the sample after it (flagged GAP),
    # the run's total their sum, and together with the stored samples tiling 0..periods-1:
    # a stretch starts right after the storage time of the sample before it.
    assert ended.missed_periods == sum(int(d["count"]) for _, d in gaps)
    assert [q for q, _ in gaps] == s["seq"][(s["flags"] & GAP) != 0].tolist()
    by_seq = dict(gaps)
    served = [0.0]  # the storage time each sample served (the first: 0, as the run joined)
    for q in s["seq"][1:].tolist():
        after = served[-1]
        if q in by_seq:
            d = by_seq[q]
            assert d["t_from_s"] == after + PERIOD_S, (q, after, d)
            assert d["t_to_s"] == d["t_from_s"] + (d["count"] - 1) * PERIOD_S, (q, d)
            after = d["t_to_s"]
        served.append(after + PERIOD_S)
    assert served[-1] == periods - 1, (served, periods)
    # No sample was read more than half a tick before the storage time it serves.
    assert np.all(s["t_s"] > np.array(served) - 0.5 * PERIOD_S), (s["t_s"], served)
    # The time check below needs a next sample to compare with: the sample taken as the
    # run joined and the one that ended it are both stored whatever the load, so two is
    # as many as can be asked of a busy machine, and enough for the check to mean something.
    assert s["seq"].size >= 2
    stored_at = run_t0 + s["t_s"]
    reading_t = np.array([t for t, _ in cabinet.readings])
    # Channel 1's voltage as the driver received it (float32 in a REAL,32 block).
    reading_v = np.array([v[0] for _, v in cabinet.readings]).astype(np.float32)
    assert reading_t.size and np.all(np.diff(reading_t) >= 0)
    # The cell charges at 3 A: its voltage rises with every reading, so a stored voltage
    # names the reading it came from.
    for j, (t_stored, v_stored) in enumerate(zip(stored_at, s["voltage_v"], strict=True)):
        match = np.flatnonzero(reading_v == np.float32(v_stored))
        assert match.size, f"sample {j}: voltage {v_stored!r} was never read"
        taken = reading_t[match]
        # Stamped when the query went out: the reading is taken after that ...
        assert np.any(taken >= t_stored), (j, t_stored, taken)
        # ... and before the next sample's query.
        if j + 1 < len(stored_at):
            assert np.any((taken >= t_stored) & (taken <= stored_at[j + 1])), (j, taken)


async def test_engine_over_the_stream_transport_survives_a_dropped_connection(
        sqlite_url: str, tmp_path: Path) -> None:
    """The cabinet drops every connection in the middle of a run read over the stream
    transport: the link reconnects (hot path gives way, the worker path reconnects),
    and the run completes with every sample numbered in order."""
    lab = SimLab(soc=0.3, cabinets=1, cabinet_channels=2)
    cab = lab.by_name("cabinet1")
    cab.driver_options["transport"] = {"stream": True}
    rig = await start_rig(sqlite_url, lab, SPEED, control_period_s=1.0)
    try:
        doc = {"schema_version": 1, "name": "charge",
               "steps": [{"step": "cc", "current_a": 3.0, "until": {"duration_s": 120}}]}
        run_id = await rig.start_run("cabinet1/1", protocol_document=doc, sample_period_s=1)
        await wait_for(lambda: bool(rig.node.groups), what="the cabinet group")
        group = next(iter(rig.node.groups.values()))
        transport = group.driver.transport
        assert isinstance(transport, StreamTransport)
        await wait_for(lambda: group.ticks > 10, what="some ticks")
        cab.server.drop_connections()
        await wait_for(lambda: transport.reconnects >= 1, what="a reconnect")
        ended = await rig.wait_end(run_id)
        assert ended.state == "completed", (ended.state, ended.end_reason)
    finally:
        await rig.stop()
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    assert np.all(np.diff(s["t_s"]) > 0)
