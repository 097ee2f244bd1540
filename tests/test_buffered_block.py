"""The vectorised pass over a block's quiet readings (engine/block_pass.py) against the
per-reading path: the same recorded blocks through both give the same stored rows, bit
for bit, the same ledger (fast state, positions, steps, cycles, gaps), the same events
and the same run state at the end.

Rig A (``block_pass = False``) fetches from its simulated cabinet over TCP and records
every block; rig B (the vectorised pass on) is handed A's blocks instead of fetching, on
a twin simulator (same seed, same manual clock moves) that takes its commands (set
points, outputs off). Each scenario puts an event inside a block: a phase ending (a pulse
train's too), a breach, a run joining while the cabinet logs, a ring overflow; and the test
checks the pass did process readings at once (B feeds fewer readings through ``_reading``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from labdaq.drivers.cabinet import CyclerCabinet
from labdaq.drivers.transport import open_transport
from labdaq.engine import group_buffered, group_edges
from labdaq.engine.block_pass import vectorisable
from labdaq.engine.fetch_record import record_fetches
from labdaq.engine.run_arrays import _FLOATS, _INTS
from labdaq.sims.cabinet import CabinetSim
from labdaq.sims.clock import ManualClock
from labdaq.sims.server import SimServer
from tests.test_buffered_acquisition import FETCH_S, Rig, _cc

Scenario = Callable[[Rig], Awaitable[None]]


@asynccontextmanager
async def _rig(stack: AsyncExitStack, ring: int) -> AsyncIterator[Rig]:
    clock = ManualClock(50.0)
    sim = CabinetSim(8, "nmc811", clock=clock, seed=4)
    server = stack.enter_context(SimServer.tcp(sim))
    # A long timeout: a busy machine may answer late, and nothing here measures time.
    cab = await asyncio.to_thread(
        lambda: CyclerCabinet(open_transport(server.resource, timeout_s=10.0), "cab",
                              acquisition="buffered", buffer_points=ring,
                              fetch_period_s=FETCH_S))
    try:
        yield Rig(sim, clock, cab)
    finally:
        cab.close()


def _wall_clock(monkeypatch: pytest.MonkeyPatch, rig: Rig) -> None:
    """The rows' wall times (and the stall watch's monotonic clock) from the rig's
    manual clock, so both rigs' agree."""
    shim = SimpleNamespace(time=lambda: 1.8e9 + rig.clock.now(),
                           monotonic=rig.clock.now, perf_counter=time.perf_counter)
    for module in (group_buffered, group_edges):
        monkeypatch.setattr(module, "time", shim)


async def _both(monkeypatch: pytest.MonkeyPatch, scenario: Scenario, ring: int = 200
                ) -> tuple[Rig, Rig, list[int]]:
    """Run ``scenario`` on rig A (per reading, recording its blocks) and on rig B (the
    vectorised pass, fed A's blocks); returns both and B's ``_reading`` calls per block."""
    async with AsyncExitStack() as stack:
        a = await stack.enter_async_context(_rig(stack, ring))
        b = await stack.enter_async_context(_rig(stack, ring))
        a.group.block_pass = False
        blocks = record_fetches(a.group)
        _wall_clock(monkeypatch, a)
        await scenario(a)

        replay = iter(blocks)
        calls: list[int] = []

        async def replayed(start: int, chans: list[int]) -> Any:
            got = next(replay)
            assert not len(got.indices) or int(got.indices[0]) == max(start, got.first_held)
            calls.append(0)
            return got

        reading_b = b.group._reading

        async def counted(*args: Any) -> set[int]:
            calls[-1] += 1
            return await reading_b(*args)

        b.group._fetch = replayed  # type: ignore[method-assign]
        b.group._reading = counted  # type: ignore[method-assign,assignment]
        _wall_clock(monkeypatch, b)
        await scenario(b)
        assert next(replay, None) is None  # B fetched exactly A's blocks
        return a, b, calls


def _same(x: Any, y: Any) -> bool:
    """Equal, NaN equal to NaN (floats bit for bit otherwise)."""
    return repr(x) == repr(y)


def _assert_same(a: Rig, b: Rig) -> None:
    assert a.sink.rows and len(a.sink.rows) == len(b.sink.rows)
    for ra, rb in zip(a.sink.rows, b.sink.rows, strict=True):
        assert _same(tuple(ra), tuple(rb)), (ra, rb)
    la, lb = a.sink.ledger, b.sink.ledger
    fa, fb = np.concatenate(la.fast), np.concatenate(lb.fast)
    assert fa.shape == fb.shape and np.array_equal(fa, fb, equal_nan=True)
    for name in ("positions", "steps", "cycles", "gaps"):
        assert _same(getattr(la, name), getattr(lb, name)), name
    assert _same([(type(e).__name__, getattr(e, "run_id", None), getattr(e, "message", None))
                  for e in a.events],
                 [(type(e).__name__, getattr(e, "run_id", None), getattr(e, "message", None))
                  for e in b.events])
    sa, sb = a.group.state, b.group.state
    for name in (*_FLOATS, *_INTS, "paused"):
        assert np.array_equal(getattr(sa, name), getattr(sb, name), equal_nan=True), name
    assert [r.run_id for r in a.group.runs] == [r.run_id for r in b.group.runs]
    for k, (x, y) in enumerate(zip(a.group.runs, b.group.runs, strict=True)):
        assert _same(a.group._full_position(k), b.group._full_position(k))
        assert (x.outcome, x.missed_periods) == (y.outcome, y.missed_periods)
    assert a.group.overflow_lost == b.group.overflow_lost
    assert _same(a.group._dcir_before, b.group._dcir_before)


async def test_phase_ends_inside_blocks_give_the_same_rows_ledger_and_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        # Ends at different readings of different blocks, one of them a capacity end.
        await rig.join(1, _cc((1.0, 0.125), (-1.0, 0.07), (0.5, 1000.0)), run_id=1)
        await rig.join(2, _cc((-2.0, 0.2), (1.0, 1000.0)), run_id=2)
        await rig.join(3, {"schema_version": 1, "name": "cap", "steps": [
            {"step": "cc", "current_a": 3.0, "until": {"capacity_ah": 1e-4}},
            {"step": "cc", "current_a": -1.0, "until": {"duration_s": 1000}}]}, run_id=3)
        await rig.join(4, _cc((0.5, 1000.0)), run_id=4)
        # A pulse train: its DCIR is taken at the first reading under each new set point.
        await rig.join(8, {"schema_version": 1, "name": "pulse", "steps": [
            {"step": "pulse", "current_a": 2.0, "pulse_duration_s": 0.06,
             "rest_duration_s": 0.08, "count": 3},
            {"step": "cc", "current_a": 0.5, "until": {"duration_s": 1000}}]}, run_id=8)
        await rig.group._start_logging()
        await rig.fetches(12)

    a, b, calls = await _both(monkeypatch, scenario)
    _assert_same(a, b)
    assert len(a.sink.ledger.steps) >= 4  # the phases did end
    dcir = [x["dcir_ohm"] for x in a.sink.ledger.steps if x["run_id"] == 8]
    assert dcir and all(d == d for d in dcir)  # the pulses' DCIR were taken (not NaN)
    assert sum(calls) < b.group.ticks // 2  # most readings went through the pass


async def test_a_breach_inside_a_block_gives_the_same_rows_ledger_and_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        v0 = float(rig.cab.measure([5])[0, 0])
        await rig.join(5, _cc((1.0, 0.02), (-9.8, 1000.0),
                              safety={"min_voltage_v": round(v0 - 0.03, 4)}), run_id=5)
        await rig.join(6, _cc((1.0, 1000.0)), run_id=6)
        await rig.group._start_logging()
        await rig.fetches(6)

    a, b, calls = await _both(monkeypatch, scenario)
    _assert_same(a, b)
    assert [r.run_id for r in a.group.runs] == [6]  # run 5 breached and left
    assert a.group.breach_to_ack_s and b.group.breach_to_ack_s
    assert sum(calls) < b.group.ticks // 2


async def test_a_run_joining_while_the_cabinet_logs_gives_the_same_rows(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.join(1, _cc((1.0, 1000.0)), run_id=1)
        await rig.group._start_logging()
        await rig.fetches(2)
        rig.clock.advance(0.023)  # joins between two fetches: the next block has older
        await rig.join(7, _cc((-1.0, 0.09), (1.0, 1000.0)), run_id=7)  # readings
        await rig.fetches(5)

    a, b, calls = await _both(monkeypatch, scenario)
    _assert_same(a, b)
    assert len(a.group.runs) == 2 and a.sink.ledger.steps
    assert sum(calls) < b.group.ticks // 2


@pytest.mark.parametrize("paused", [False, True])
async def test_an_overflow_gives_the_same_gaps_rows_and_state(
        monkeypatch: pytest.MonkeyPatch, paused: bool) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.join(1, _cc((0.5, 1000.0)), run_id=1)
        await rig.join(2, _cc((-0.5, 0.3), (0.5, 1000.0)), run_id=2)
        await rig.group._start_logging()
        await rig.fetches(2)
        if paused:  # a paused run: its rows are flagged, its charge not counted
            rig.group.state.paused[1] = True
            rig.group.runs[1].paused = True
        await rig.fetches(1, 0.5)  # 50 readings into a ring of 20
        await rig.fetches(3)

    a, b, calls = await _both(monkeypatch, scenario, ring=20)
    _assert_same(a, b)
    assert a.group.overflow_lost == 30
    assert [g["cause"] for g in a.sink.ledger.gaps] == ["overflow"] * 2
    assert sum(calls) < b.group.ticks // 2


async def test_a_dvdt_end_condition_keeps_the_group_per_reading(
        monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(rig: Rig) -> None:
        await rig.join(1, {"schema_version": 1, "name": "dvdt", "steps": [
            {"step": "cc", "current_a": 1.0,
             "until": {"dvdt_below_v_per_s": 1e-9, "duration_s": 1000}}]}, run_id=1)
        await rig.group._start_logging()
        await rig.fetches(3)

    a, b, calls = await _both(monkeypatch, scenario)
    _assert_same(a, b)
    assert not vectorisable(b.group)
    assert sum(calls) == b.group.ticks  # every reading went through _reading
