"""A stored sample's time says when its reading was taken, checked against the simulated
cabinet's own clock: the engine runs on the lab's clock (tests/engine_rig.py), and the
cabinet keeps the clock time of every reading it takes (CabinetSim.readings). Over both
SOCKET links; the stream transport also through a dropped connection mid-run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from labdaq.drivers.transport import StreamTransport, VisaTransport
from labdaq.sims.lab import SimLab
from tests.engine_rig import assert_contiguous, samples, start_rig, wait_for

SPEED = 50.0


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
        ended = await rig.wait_end(run_id)
        assert ended.state == "completed", (ended.state, ended.end_reason)
    finally:
        await rig.stop()

    s = await samples(rig.maker, run_id)
    # Enough samples to check (a busy machine may miss periods of this 50x run: they are
    # gaps, tested elsewhere; what this test checks is the time of every sample stored).
    assert len(s["t_s"]) >= 5
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
