"""The rig of the Neware delegated-run tests: a simulated BTS server over TCP (its
channels run on their own clock thread at the node's speed), a node in the test's
process on an accelerated clock, the run documents they share, and the checks several
test modules make (tests/test_neware_*.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from labdaq.channels import upsert_instrument
from labdaq.engine.clock import EngineClock
from labdaq.engine.node import AcquisitionNode
from labdaq.runs import RunCreate, create_run
from labdaq.sims.neware_bts import BtsServer, NewareBtsSim
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.engine_rig import assert_contiguous, rows_of, samples, wait_end, wait_for

CELL = {
    "serial": "N-001", "chemistry": "nmc811", "capacity_ah": 4.9, "charge_cutoff_v": 4.2,
    "discharge_cutoff_v": 2.5, "max_charge_current_a": 4.9, "max_discharge_current_a": 9.8,
}


def doc(steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"schema_version": 1, "name": "delegated", "steps": steps, **extra}


@dataclass
class BtsRig:
    server: BtsServer
    sim: NewareBtsSim
    engine: AsyncEngine
    maker: async_sessionmaker[AsyncSession]
    node: AcquisitionNode
    task: asyncio.Task[None]

    async def start_run(self, protocol_document: dict[str, Any], period_s: float = 10.0
                        ) -> int:
        async with session_scope(self.maker) as s:
            run = await create_run(s, RunCreate(
                channel="bts1/1", cell_serial=CELL["serial"], sample_period_s=period_s,
                protocol_document=protocol_document), actor="test")
            await s.flush()
            return int(run.id)

    async def stored(self, run_id: int) -> int:
        async with session_scope(self.maker) as s:
            run = await s.get(m.Run, run_id)
            assert run is not None
            return int(run.last_seq or 0)

    async def engine_stopped_mid_run(self) -> tuple[int, int]:
        """A run of CHARGE_REST_DISCHARGE, and the engine stopped after 10 samples (its
        program runs on): the run id and the samples stored."""
        run_id = await self.start_run(doc(CHARGE_REST_DISCHARGE))
        await wait_for_samples(self, run_id, 10)
        self.node.request_stop()
        await asyncio.wait_for(self.task, 30)
        return run_id, await self.stored(run_id)

    async def events(self, run_id: int, kind: str) -> list[m.Event]:
        async with session_scope(self.maker) as s:
            return list((await s.scalars(select(m.Event).where(
                m.Event.run_id == run_id, m.Event.kind == kind).order_by(m.Event.id))).all())


async def start_bts_rig(url: str, tmp: Path, speed: float, soc: float = 0.5,
                        cell: str = "nmc811", seed: int = 1) -> BtsRig:
    sim = NewareBtsSim(channels=2, cell=cell, soc=soc, seed=seed)
    server = BtsServer(sim, speed=speed).start()
    host, port = server.address
    engine = create_engine(url)
    maker = sessionmaker(engine)
    async with session_scope(maker) as s:
        await upsert_instrument(s, "bts1", "neware_bts", f"TCPIP::{host}::{port}::SOCKET", [
            {"index": i, "name": f"bts1/{i}", "max_current_a": 20.0, "max_voltage_v": 5.0}
            for i in (1, 2)], options={"step_dir_remote": str(tmp / "steps")})
        s.add(m.Cell(**CELL))
    node = AcquisitionNode(engine, EngineClock(speed), poll_s=0.1, batch_age_s=0.1)
    task = asyncio.create_task(node.run_forever(), name="node")
    await wait_for(lambda: len(node.instruments) == 1, timeout_s=60, what="the node")
    return BtsRig(server, sim, engine, maker, node, task)


LONG = [  # ends by the test's fault long before its end
    {"step": "cc", "rate_c": 0.2, "until": {"voltage_v": "charge_cutoff", "duration_s": 36000}},
    {"step": "rest", "until": {"duration_s": 36000}},
]
CHARGE_REST_DISCHARGE = [
    {"step": "cc", "rate_c": 1.0, "until": {"voltage_v": "charge_cutoff", "duration_s": 600}},
    {"step": "rest", "until": {"duration_s": 120}},
    {"step": "cc", "rate_c": -1.0, "until": {"voltage_v": "discharge_cutoff",
                                              "duration_s": 600}},
]


async def wait_for_samples(rig: BtsRig, run_id: int, n: int, timeout_s: float = 60) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while await rig.stored(run_id) < n:
        assert loop.time() < deadline, f"fewer than {n} samples stored"
        await asyncio.sleep(0.05)


async def followed_after_restart(r: BtsRig, run_id: int, last_seen: int) -> m.Event:
    """A run a restarted engine followed again completes on its one program: every record
    once, and one ``engine_restart`` interruption from the last sample the first engine
    stored (``last_seen``); that event."""
    run = await wait_end(r.maker, run_id, timeout_s=60)
    assert run.state == "completed", run.end_reason
    assert list(r.sim.tests["1-1-1"]) == [1]  # one program, never started again
    s = await samples(r.maker, run_id)
    assert_contiguous(s["seq"])
    assert s["seq"].size == len(r.sim.tests["1-1-1"][1].records)
    (ev,) = [e for e in await r.events(run_id, "interruption")
             if e.data["cause"] == "engine_restart"]
    assert ev.data["from_t_s"] == pytest.approx(float(s["t_s"][last_seen - 1]))
    assert ev.data["to_t_s"] > ev.data["from_t_s"]
    steps = await rows_of(r.maker, m.Step, run_id, m.Step.step_number)
    assert [st.step_index for st in steps] == [0, 1, 2]
    return ev


@dataclass
class ChamberRig:
    """A node with a simulated ESPEC chamber, and a simulated BTS server whose one
    channel (``bts1/1``) sits in that chamber."""

    rig: Any  # tests.engine_rig.Rig
    sim: NewareBtsSim
    server: BtsServer
    chamber: Any  # the chamber's SimInstrument


async def start_chamber_rig(url: str, tmp_path: Path) -> ChamberRig:
    from labdaq.sims.lab import SimLab
    from tests.engine_rig import start_rig

    sim = NewareBtsSim(channels=1)
    server = BtsServer(sim, speed=1000.0).start()
    lab = SimLab(smus=0, chamber=True)
    rig = await start_rig(url, lab, 1000.0)
    (chamber,) = [i for i in lab.instruments if i.kind == "chamber"]
    host, port = server.address
    async with session_scope(rig.maker) as s:
        await upsert_instrument(
            s, "bts1", "neware_bts", f"TCPIP::{host}::{port}::SOCKET",
            [{"index": 1, "name": "bts1/1", "max_current_a": 20.0, "max_voltage_v": 5.0,
              "aux": {"chamber": chamber.name}}],
            options={"step_dir_remote": str(tmp_path / "steps")})
        s.add(m.Cell(**CELL))
    return ChamberRig(rig, sim, server, chamber)
