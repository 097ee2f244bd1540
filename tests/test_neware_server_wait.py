"""A Neware BTS server that does not answer when the engine starts: the engine keeps
retrying with backoff (an open-ended interruption event says so) and follows the runs
when the server answers, harvesting what the cycler recorded meanwhile — through the
simulated BTS server over TCP (sims/neware_bts.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.storage import models as m
from tests.neware_rig import (
    BtsRig,
    followed_after_restart,
    start_bts_rig,
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
        run_id, last_seen = await r.engine_stopped_mid_run()
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
        # followed as after any restart: its one program, every record once
        ev = await followed_after_restart(r, run_id, last_seen)
        assert ev.data["samples_missing"] == 0
        assert ev.data["server_unreachable"]["attempts"] >= 1
        assert not node2.delegated.waits.waiting
    finally:
        if node2 is not None and task2 is not None:
            node2.request_stop()
            await asyncio.wait_for(task2, 30)
        await r.engine.dispose()
        r.server.stop()
