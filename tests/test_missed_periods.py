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
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from labdaq.api.app import create_app
from labdaq.auth import create_token
from labdaq.config import Settings
from labdaq.drivers.roles import Cycler
from labdaq.engine.channel import ChannelRun
from labdaq.engine.clock import EngineClock
from labdaq.engine.gaps import gap_record
from labdaq.engine.group import InstrumentGroup
from labdaq.engine.ledger import Ledger, Records, Resolver
from labdaq.engine.writer import SampleWriter
from labdaq.protocol import CellLimits, parse_protocol, resolve
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
    (never backwards: a deadline already passed leaves the clock where it is).
    ``poll_s``: how often (wall seconds) the waiting coroutine looks at the clock."""

    poll_s = 0.001

    async def sleep_until(self, t_s: float) -> None:
        assert isinstance(self.sim, LockstepClock)
        self.sim.hold(HOLD, max(t_s, self.now()))
        while self.now() < t_s:
            await asyncio.sleep(self.poll_s)


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
        rows = [(run_id, seq, t, now, 0, 0, 3.7, 0.0, None, 0.0, 0.0, flags, None)
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


# -- the group's count, tick by tick ----------------------------------------------------
class _Cabinet(Cycler):
    """A one-channel cycler that always reads a resting cell (no sockets: the count under
    test is the group's own arithmetic)."""

    channels = [1]

    def configure_protection(self, channel: int, voltage_max_v: float,
                             current_max_a: float) -> None: ...
    def set_current(self, channel: int, current_a: float, voltage_limit_v: float) -> None: ...
    def set_voltage(self, channel: int, voltage_v: float, current_limit_a: float) -> None: ...
    def output(self, channel: int, on: bool) -> None: ...
    def all_off(self) -> None: ...
    def safe_shutdown(self) -> None: ...

    def measure(self, channels: Sequence[int] | None = None) -> np.ndarray:
        return np.tile([3.7, 0.0, 25.0], (len(channels or self.channels), 1))


class _Clock(EngineClock):
    """Engine time set by the test; the group's own loop never gets to tick."""

    def __init__(self) -> None:
        super().__init__()
        self.t = 0.0

    def now(self) -> float:
        return self.t

    async def sleep_until(self, t_s: float) -> None:
        await asyncio.Event().wait()


class _Sink:
    def __init__(self) -> None:
        self.rows: list[Sequence[Any]] = []
        self.gaps: list[dict[str, Any]] = []

    async def put(self, rows: Sequence[Sequence[Any]], ledger: Ledger | None = None) -> None:
        self.rows += rows
        self.gaps += ledger.gaps if ledger is not None else []


async def _group(period_s: float, control_period_s: float) -> tuple[Any, _Clock, _Sink]:
    plan = resolve(parse_protocol(_rest(1e6)), CellLimits(
        capacity_ah=2.4, charge_cutoff_v=4.2, discharge_cutoff_v=2.5,
        max_charge_current_a=2.4, max_discharge_current_a=7.2))
    run = ChannelRun(1, 1, plan, period_s)
    phase = run.start(0.0).next_phase
    assert phase is not None
    clock, sink = _Clock(), _Sink()

    async def call(fn: Any, *args: Any) -> Any:
        return fn(*args)

    async def emit(ev: Any) -> None: ...

    group = InstrumentGroup("cab", _Cabinet(), call, clock, sink,  # type: ignore[arg-type]
                            emit, control_period_s=control_period_s)
    await group._add(run, phase, 0.0)  # the join's edge sample at t = 0
    return group, clock, sink


@pytest.mark.parametrize(("period_s", "tick_s", "ticks", "gaps"), [
    # A tick every period; the loop re-anchored after stalls of 2.4 and 2.6 periods.
    (1.0, 1.0, [1, 2, 3, 5.4, 6.4, 9, 10], [(1, 4.0), (2, 7.0)]),
    # A 10 s period ticked every second: a tick 5.3 s late for its storage time at 30
    # serves it, the one at 20 was missed, and the run keeps its grid (40, 50, ...).
    (10.0, 1.0, [*range(1, 11), 35.3, 36.3, 39.7, 49.6, 50.6], [(1, 20.0)]),
], ids=["period=tick", "period>tick"])
async def test_the_group_counts_the_storage_times_a_late_tick_skipped(
    period_s: float, tick_s: float, ticks: list[float], gaps: list[tuple[int, float]]
) -> None:
    group, clock, sink = await _group(period_s, tick_s)
    for t in ticks:
        clock.t = float(t)
        await group._tick(float(t), tick_s)
    assert [(g["count"], g["t_from_s"]) for g in sink.gaps] == gaps
    t_s = np.array([r[2] for r in sink.rows])
    flags = np.array([r[11] for r in sink.rows])
    due = t_s[(flags & EDGE) == 0]
    # The strict definition (benchmarks/acquisition_scale.py): stored due rows against
    # the periods elapsed between the first and the last.
    lost = round((due[-1] - due[0]) / period_s) - (due.size - 1)
    assert lost == sum(n for n, _ in gaps)
    flagged = [r[1] for r in sink.rows if r[11] & GAP]
    assert flagged == [g["seq"] for g in sink.gaps]
    assert group.runs[0].missed_periods == lost
