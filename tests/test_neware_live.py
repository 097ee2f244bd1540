"""Inquired readings of a Neware run reach the live view: the engine writes each round's
``inquire`` reading to ``live_readings`` and the API's streams send it — the run's stream
as ``reading``, the lab stream's ``latest`` — ahead of the harvested samples.

The engine runs in this process against the simulated BTS server over TCP
(sims/neware_bts.py); ``labdaq api`` runs in its own process on the same database.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from labdaq.auth import create_token
from labdaq.runs import request_pause, request_stop
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.dataout_fixtures import api_server
from tests.engine_rig import wait_end, wait_for
from tests.neware_rig import LONG, BtsRig, doc, start_bts_rig, wait_for_samples
from tests.test_live_stream import read_stream


async def live_row(rig: BtsRig, run_id: int) -> m.LiveReading | None:
    async with session_scope(rig.maker) as s:
        return await s.scalar(select(m.LiveReading).where(m.LiveReading.run_id == run_id))


async def test_inquired_readings_reach_the_run_and_lab_streams(sqlite_url: str,
                                                              tmp_path: Path) -> None:
    r = await start_bts_rig(sqlite_url, tmp_path, speed=200.0)
    try:
        run_id = await r.start_run(doc(LONG), period_s=10.0)
        await wait_for_samples(r, run_id, 3)
        # the follower writes a reading every round while the program runs
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while (row := await live_row(r, run_id)) is None or row.state != "working":
            assert loop.time() < deadline, "no working reading written"
            await asyncio.sleep(0.05)
        # Paused on the cycler, its test time stands still: the reading the streams send
        # must then be exactly what inquire reports, which no harvested sample carries.
        async with session_scope(r.maker) as s:
            await request_pause(s, run_id, "test")
            token = await create_token(s, "t-reader", "technician")
        ch = r.sim.channels["1-1-1"]
        await wait_for(lambda: ch.workstatus == "pause", timeout_s=30, what="pause")
        deadline = loop.time() + 60
        while (row := await live_row(r, run_id)) is None or row.state != "pause":
            assert loop.time() < deadline, "no reading of the paused channel written"
            await asyncio.sleep(0.05)
        async with session_scope(r.maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None and run.position is not None
            offset = run.position["delegated"]["t_offset_s"]

        cm = api_server(sqlite_url)
        base, _ = await asyncio.to_thread(cm.__enter__)
        try:
            got: list[dict[str, Any]] = []
            await asyncio.to_thread(
                read_stream, base, run_id, token, got,
                until=lambda out: any(x["event"] == "reading" for x in out))
            (reading,) = [x for x in got if x["event"] == "reading"]
            assert "id" not in reading  # a snapshot, outside the stream's cursor
            d = reading["data"]
            assert d["run_id"] == run_id and d["source"] == "inquired"
            assert d["state"] == "pause" and d["current_a"] == 0.0
            assert d["t_s"] - offset == pytest.approx(ch.test_time_s, abs=1e-3)
            assert d["voltage_v"] == pytest.approx(float(r.sim.bank.voltage_v[0]), abs=0.01)
            assert (d["step_index"], d["cycle_index"]) == (0, 1)
            # the lab stream's live V/I/T of this run is the inquired reading too
            lab: list[dict[str, Any]] = []
            await asyncio.to_thread(
                read_stream, base, None, token, lab, params={"latest": "true"},
                until=lambda out: any(x["event"] == "latest" for x in out))
            (latest,) = [x for x in lab if x["event"] == "latest"]
            assert latest["data"]["source"] == "inquired"
            assert latest["data"]["t_s"] == d["t_s"]
        finally:
            await asyncio.to_thread(cm.__exit__, None, None, None)
        async with session_scope(r.maker) as s:
            await request_stop(s, run_id, "test")
        run = await wait_end(r.maker, run_id, timeout_s=30)
        assert run.state == "stopped"
    finally:
        r.node.request_stop()
        await asyncio.wait_for(r.task, 30)
        await r.engine.dispose()
        r.server.stop()
