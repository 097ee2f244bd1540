"""A Neware BTS server that does not answer when the engine starts: the engine keeps
retrying with backoff (an open-ended interruption event says so) and follows the runs
when the server answers, harvesting what the cycler recorded meanwhile — through the
simulated BTS server over TCP (sims/neware_bts.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.storage import models as m
from tests.engine_rig import assert_contiguous, rows_of, samples, wait_end
from tests.test_neware_delegated import (
    CHARGE_REST_DISCHARGE,
    BtsRig,
    doc,
    start_bts_rig,
    wait_for_samples,
)


async def wait_for_event(rig: BtsRig, run_id: int, kind: str, cause: str,
                         timeout_s: float = 60) -> m.Event:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        found = [e for e in await rig.events(run_id, kind) if e.data.get("cause") == cause]
        if found:
            return found[0]
        assert loop.time() < deadline, f"no {kind} event with cause {cause}"
        await asyncio.sleep(0.05)


async def test_server_unreachable_at_engine_start_is_retried_and_followed(
        sqlite_url: str, tmp_path: Path) -> None:
    """The engine stops mid-run; the next one starts while the BTS server refuses every
    connection. It records an open-ended interruption (instrument_lost, with its
    backoff), keeps trying, and once the server answers follows the same test: every
    record once, no second program, and one interruption from the last sample it had to
    the first reading it saw again, with no sample missing."""
    r = await start_bts_rig(sqlite_url, tmp_path, speed=1000.0)
    task2: asyncio.Task[None] | None = None
    node2: AcquisitionNode | None = None
    try:
        run_id = await r.start_run(doc(CHARGE_REST_DISCHARGE))
        await wait_for_samples(r, run_id, 10)
        r.node.request_stop()
        await asyncio.wait_for(r.task, 30)
        last_seen = await r.stored(run_id)
        r.server.down = True  # every connection is accepted and dropped at once
        r.server.drop_connections()
        node2 = AcquisitionNode(r.engine, EngineClock(1000.0), poll_s=0.1, batch_age_s=0.1)
        node2.delegated.waits.backoff_initial_s = 0.2
        task2 = asyncio.create_task(node2.run_forever(), name="node2")
        lost = await wait_for_event(r, run_id, "interruption", "instrument_lost")
        assert lost.data["to_t_s"] is None and lost.data["retry"]["backoff_max_s"] > 0
        assert lost.data["last_seq"] == last_seen
        # still retrying: not given up, not ended, and /ready hears of it
        assert node2.delegated.waits.waiting and run_id not in node2.delegated.runs
        assert node2.heartbeat.instruments.get("bts1", "ok") != "ok"
        async with r.maker() as s:
            run = await s.get(m.Run, run_id)
            assert run is not None and run.state == "running"
        r.server.down = False
        run = await wait_end(r.maker, run_id, timeout_s=60)
        assert run.state == "completed", run.end_reason
        assert list(r.sim.tests["1-1-1"]) == [1]  # followed, never started again
        s = await samples(r.maker, run_id)
        assert_contiguous(s["seq"])
        assert s["seq"].size == len(r.sim.tests["1-1-1"][1].records)
        (ev,) = [e for e in await r.events(run_id, "interruption")
                 if e.data["cause"] == "engine_restart"]
        assert ev.data["from_t_s"] == pytest.approx(float(s["t_s"][last_seen - 1]))
        assert ev.data["to_t_s"] > ev.data["from_t_s"]
        assert ev.data["samples_missing"] == 0
        assert ev.data["server_unreachable"]["attempts"] >= 1
        steps = await rows_of(r.maker, m.Step, run_id, m.Step.step_number)
        assert [st.step_index for st in steps] == [0, 1, 2]
        assert not node2.delegated.waits.waiting
    finally:
        if node2 is not None and task2 is not None:
            node2.request_stop()
            await asyncio.wait_for(task2, 30)
        await r.engine.dispose()
        r.server.stop()
