"""Missed sample periods are on the record (engine/gaps.py): a simulated instrument that
stalls leaves one ``missed_periods`` event covering exactly the storage times that went by
unsampled, the run's total, and the counters of ``GET /metrics``.

The engine runs on a lockstep clock that it moves itself (:class:`SteppedClock`):
simulated time runs to each tick's deadline and waits there while the tick works, so a
busy machine makes the test slower, never different — except where the simulated
instrument stalls, which is simulated time going by while the engine waits for a reply.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.config import Settings
from labdaq.engine.gaps import gap_record
from labdaq.engine.ledger import Ledger, Records, Resolver
from labdaq.engine.writer import SampleWriter
from labdaq.sims.lab import SimLab
from labdaq.sims.server import SimServer
from labdaq.storage import models as m
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.engine_rig import (
    LockstepClock,
    WarpClock,
    assert_contiguous,
    samples,
    start_rig,
)

SPEED = 200.0  # simulated seconds per wall second while the clock runs
PERIOD_S = 1.0
STALL_S = 5.0  # simulated seconds the instrument takes to answer one query
STALLED_QUERY = 5  # the cabinet's 5th measurement query (a few stored samples in)
REST_S = 14.0
HOLD = "engine"
EDGE = int(m.SampleFlag.EDGE)
GAP = int(m.SampleFlag.GAP)


class SteppedClock(WarpClock):
    """The engine's clock on a :class:`LockstepClock` that only the engine moves: waiting
    for a deadline lets simulated time run to it, and it stays there until the next wait
    (never backwards: a deadline already passed leaves the clock where it is)."""

    async def sleep_until(self, t_s: float) -> None:
        assert isinstance(self.sim, LockstepClock)
        self.sim.hold(HOLD, max(t_s, self.now()))
        while self.now() < t_s:
            await asyncio.sleep(0.001)


class StallOnce:
    """The simulated cabinet measures its ``n``-th ``MEAS:ALL?`` query at once but answers
    it only after ``stall_s`` of simulated time (it lets the stepped clock run that far
    while the engine waits): an instrument that stalls, in the lab's own time."""

    def __init__(self, server: SimServer, clock: LockstepClock, n: int, stall_s: float) -> None:
        self.queries = 0
        self.stalled_at_s: float | None = None
        process = server._process

        def stalled(line: str) -> bytes | None:
            reply = process(line)
            if line.startswith("MEAS:ALL?"):
                self.queries += 1
                if self.queries == n:
                    t = clock.now()
                    self.stalled_at_s = t
                    clock.hold(HOLD, t + stall_s)
                    while clock.now() < t + stall_s:
                        time.sleep(0.0005)
            return reply

        server._process = stalled  # type: ignore[method-assign]


def _rest(duration_s: float) -> dict[str, Any]:
    return {"schema_version": 1, "name": "rest",
            "steps": [{"step": "rest", "until": {"duration_s": duration_s}}]}


def _metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, parsed by prometheus_client: (name, labels) -> value."""
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.fixture
async def api(db_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    app = create_app(Settings(database_url=db_url))
    async with app.router.lifespan_context(app):
        async with session_scope(app.state.sessionmaker) as s:
            token = await create_token(s, "t-engineer", "engineer")
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            yield c, {"Authorization": f"Bearer {token}"}


async def test_stalled_instrument_leaves_one_gap_event_covering_exactly_its_missed_periods(
    db_url: str, api: tuple[httpx.AsyncClient, dict[str, str]]
) -> None:
    client, auth = api
    before = _metrics((await client.get("/metrics")).text)
    lab = SimLab(smus=0, cabinets=1, cabinet_channels=1, clock=LockstepClock())
    rig = await start_rig(db_url, lab, SPEED, control_period_s=PERIOD_S)
    try:
        lab.clock.hold(HOLD, lab.clock.now())  # still until the engine's loop asks for time
        rig.node.clock = SteppedClock(lab.clock)  # the group is made with it at the claim
        stall = StallOnce(lab.by_name("cabinet1").server, lab.clock, STALLED_QUERY, STALL_S)
        run_id = await rig.start_run("cabinet1/1", protocol_document=_rest(REST_S),
                                     sample_period_s=PERIOD_S)
        run = await rig.wait_end(run_id)
        assert run.state == "completed", run.end_reason
        assert stall.stalled_at_s is not None, "the cabinet was never asked that often"

        s = await samples(rig.maker, run_id)
        assert_contiguous(s["seq"])
        due = (s["flags"] & EDGE) == 0  # edge samples are extra, not due ones
        t_due, seq_due = s["t_s"][due], s["seq"][due]
        steps = np.diff(t_due)
        holes = np.flatnonzero(steps > 1.5 * PERIOD_S)
        assert holes.size == 1, f"one hole expected in {t_due.tolist()}"
        h = int(holes[0])
        missing = round(steps[h] / PERIOD_S) - 1
        assert missing == round(STALL_S / PERIOD_S) - 1  # the stall's periods, no more

        async with session_scope(rig.maker) as ses:
            events = (await ses.scalars(select(m.Event).where(
                m.Event.run_id == run_id, m.Event.kind == "missed_periods"))).all()
            stored = await ses.get(m.Run, run_id)
            assert stored is not None
            assert stored.missed_periods == missing
        assert len(events) == 1
        ev = events[0]
        assert ev.data["count"] == missing
        assert ev.data["t_from_s"] == pytest.approx(t_due[h] + PERIOD_S, abs=1e-6)
        assert ev.data["t_to_s"] == pytest.approx(t_due[h + 1] - PERIOD_S, abs=1e-6)
        assert ev.seq == int(seq_due[h + 1]) == ev.data["seq"]
        # The first sample after the gap, and only it, is flagged GAP.
        assert s["seq"][(s["flags"] & GAP) != 0].tolist() == [int(seq_due[h + 1])]

        # The API: the run's total and its events list.
        body = (await client.get(f"/api/v1/runs/{run_id}", headers=auth)).json()
        assert body["missed_periods"] == missing
        listed = (await client.get(f"/api/v1/runs/{run_id}/events", headers=auth)).json()
        gap = [e for e in listed if e["kind"] == "missed_periods"]
        assert [(e["data"]["count"], e["data"]["t_from_s"], e["data"]["t_to_s"]) for e in gap] \
            == [(missing, ev.data["t_from_s"], ev.data["t_to_s"])]

        # /metrics: durable totals at once; the engine's counters with its next heartbeat.
        n_rows = int(s["seq"].size)
        written = ("labdaq_engine_samples_written_total", (("node", rig.node.node_name),))
        after: dict[Any, float] = {}

        async def scrape() -> None:
            after.clear()
            after.update(_metrics((await client.get("/metrics")).text))

        deadline = asyncio.get_running_loop().time() + 30  # a condition poll
        await scrape()
        while after.get(written, 0.0) < n_rows:
            assert asyncio.get_running_loop().time() < deadline, "no heartbeat with the rows"
            await asyncio.sleep(0.1)
            await scrape()
        stored_key = ("labdaq_samples_stored_total", ())
        missed_key = ("labdaq_missed_periods_total", ())
        assert after[stored_key] - before.get(stored_key, 0.0) == n_rows
        assert after[missed_key] - before.get(missed_key, 0.0) == missing
        assert after[("labdaq_runs", (("state", "completed"),))] \
            == before[("labdaq_runs", (("state", "completed"),))] + 1
        assert after[("labdaq_instrument_up", (("instrument", "cabinet1"),
                                               ("node", rig.node.node_name)))] == 1.0
        assert ("labdaq_engine_writer_backlog_rows", (("node", rig.node.node_name),)) in after
        assert ("labdaq_engine_loop_lateness_seconds",
                (("node", rig.node.node_name), ("stat", "p99"))) in after
        run_route = (("method", "GET"), ("route", "/api/v1/runs/{run_id}"), ("status", "200"))
        assert after[("labdaq_api_request_duration_seconds_count", run_route)] >= 1
    finally:
        lab.clock.release(HOLD)
        await rig.stop()


async def test_a_replayed_gap_is_recorded_once(db_url: str) -> None:
    """The gap's event is keyed by its run and the sample after it, and the total is
    absolute: the same batch written twice (a journal replayed after a write that had
    in fact committed) leaves one event and the same total."""
    engine = create_engine(db_url)
    try:
        maker = sessionmaker(engine)
        async with session_scope(maker) as ses:
            inst = m.Instrument(name="c", driver="cabinet",
                                resource="TCPIP::127.0.0.1::1::SOCKET")
            cell = m.Cell(serial="S1", chemistry="nmc811", capacity_ah=1.0,
                          charge_cutoff_v=4.2, discharge_cutoff_v=2.5)
            proto = m.Protocol(name="p", content_hash="sha256:0", document={})
            ses.add_all([inst, cell, proto])
            await ses.flush()
            ch = m.Channel(instrument_id=inst.id, index=1, name="c/1")
            ses.add(ch)
            await ses.flush()
            run = m.Run(channel_id=ch.id, cell_id=cell.id, protocol_id=proto.id,
                        state="running", sample_period_s=1.0)
            ses.add(run)
            await ses.flush()
            run_id = run.id
        now = time.time()
        rows = [(run_id, seq, t, now, 0, 0, 3.7, 0.0, None, 0.0, 0.0, flags)
                for seq, t, flags in ((1, 1.0, 0), (2, 6.0, GAP))]
        records = Resolver().resolve(
            Ledger(gaps=[gap_record(run_id, 2, 4, 2.0, 1.0, now, 4, "late")]))
        replayed = Records.from_json(records.to_json())  # as the journal keeps it
        writer = SampleWriter(engine)
        for rec in (records, replayed):
            await writer._insert(rows, rec)
        async with session_scope(maker) as ses:
            events = (await ses.scalars(select(m.Event).where(
                m.Event.run_id == run_id, m.Event.kind == "missed_periods"))).all()
            total = await ses.scalar(select(m.Run.missed_periods).where(m.Run.id == run_id))
        assert [(e.seq, e.data["count"], e.data["t_from_s"], e.data["t_to_s"]) for e in events] \
            == [(2, 4, 2.0, 5.0)]
        assert total == 4
    finally:
        await engine.dispose()
