"""Positions, steps and cycles committed with the sample rows they count (engine/ledger.py).

Unit level: how a writer resolves ledgers in stream order, and the journal keeping them
with their rows. Database level (SQLite and PostgreSQL): a position, a steps row and a
cycles row reach the database in the same transaction as their batch, straight and
after a journaled outage.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from labdaq.engine import wallclock
from labdaq.engine.journal import Journal
from labdaq.engine.ledger import FAST_COLUMNS, Ledger, Records, Resolver, position_json
from labdaq.engine.writer import SampleWriter
from tests.test_writer import _rows, _seed_run, _until


def _position(seq: int, step_cap: float, pc: int = 0) -> dict[str, Any]:
    return {
        "pc": pc, "seq": seq, "t_s": seq * 0.1, "step_cap_ah": step_cap, "step_en_wh": 0.0,
        "step_dis_ah": 0.0, "loop_iters": {}, "loop_dis_ah": {}, "loop_first_dis_ah": {},
        "step_number": pc + 1, "step_t0_s": 0.0, "step_started_t_s": 0.0,
        "phase_t0_s": 0.0, "phase_name": "cc", "pulse_i": 0,
        "cycle": {"cycle_index": 1, "start_t_s": 0.0, "end_t_s": 0.0, "charge_ah": 0.0,
                  "discharge_ah": step_cap, "charge_wh": 0.0, "discharge_wh": 0.0,
                  "charge_v_s": 0.0, "charge_s": 0.0, "discharge_v_s": 0.0,
                  "discharge_s": 0.0, "gaps": 0},
    }


def _full(run_id: int, seq: int, step_cap: float, pc: int = 0) -> dict[str, Any]:
    return {"run_id": run_id, "step_index": pc, "step_count": 3, "cycle_index": 1,
            "position": _position(seq, step_cap, pc)}


def _fast(run_id: int, seq: int, step_cap: float) -> np.ndarray:
    row = np.zeros((1, len(FAST_COLUMNS)))
    row[0, :4] = (run_id, seq, seq * 0.1, step_cap)
    row[0, FAST_COLUMNS.index("discharge_ah")] = step_cap
    return row


def test_resolver_overlays_the_newest_row_on_the_newest_full_position() -> None:
    r = Resolver()
    first = r.resolve(Ledger(fast=[_fast(7, 1, 0.1)], positions=[_full(7, 0, 0.0)]))
    assert first.progress[7]["last_seq"] == 1
    assert first.progress[7]["position"]["step_cap_ah"] == 0.1
    # A later batch with fast state only continues from the remembered full position.
    second = r.resolve(Ledger(fast=[_fast(7, 3, 0.3), _fast(7, 2, 0.2)]))
    pos = second.progress[7]["position"]
    assert (pos["seq"], pos["step_cap_ah"], pos["cycle"]["discharge_ah"]) == (3, 0.3, 0.3)
    assert pos["pc"] == 0 and second.progress[7]["step_index"] == 0


def test_a_boundary_position_wins_over_the_row_that_ended_the_step() -> None:
    """The row that ended step 0 (seq 5, its accumulators) and the position after the
    transition (step 1, seq 5, zero) are in one batch: the position is what counts."""
    r = Resolver()
    r.resolve(Ledger(fast=[_fast(7, 4, 0.4)], positions=[_full(7, 0, 0.0)]))
    out = r.resolve(Ledger(fast=[_fast(7, 5, 0.5)], positions=[_full(7, 5, 0.0, pc=1)]))
    pos = out.progress[7]["position"]
    assert (pos["pc"], pos["seq"], pos["step_cap_ah"]) == (1, 5, 0.0)
    # The new step's first row (seq 6) then moves it on.
    out = r.resolve(Ledger(fast=[_fast(7, 6, 0.01)]))
    pos = out.progress[7]["position"]
    assert (pos["pc"], pos["seq"], pos["step_cap_ah"]) == (1, 6, 0.01)


def _strip_clock(progress: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    out = {}
    for rid, p in progress.items():
        pos = {k: v for k, v in p["position"].items() if k != wallclock.KEY}
        out[rid] = {**p, "position": pos}
    return out


def test_ledgers_resolved_together_give_what_resolving_them_in_turn_gives() -> None:
    """The writer resolves the ledgers of every batch a write takes at once: each run's
    newest full position with its newest row, steps and cycles in stream order."""
    ledgers = [
        Ledger(fast=[_fast(7, 1, 0.1), _fast(8, 1, 0.5)],
               positions=[_full(7, 0, 0.0), _full(8, 0, 0.0)], steps=[{"n": 1}]),
        Ledger(fast=[_fast(7, 2, 0.2)], cycles=[{"c": 1}]),
        # Run 8 ends a step: its boundary position is newer than its last row so far.
        Ledger(fast=[_fast(7, 4, 0.4), _fast(7, 3, 0.3)],
               positions=[_full(8, 5, 0.0, pc=1)], steps=[{"n": 2}]),
        Ledger(fast=[_fast(8, 4, 0.9)]),
    ]
    one_by_one, together = Resolver(), Resolver()
    want = Records()
    for led in ledgers:
        want.extend(one_by_one.resolve(Ledger(fast=list(led.fast), positions=list(led.positions),
                                              steps=list(led.steps), cycles=list(led.cycles))))
    merged = Ledger()
    for led in ledgers:
        merged.extend(led)
    got = together.resolve(merged)
    assert _strip_clock(got.progress) == _strip_clock(want.progress)
    assert got.progress[8]["position"]["pc"] == 1 and got.progress[8]["last_seq"] == 5
    assert got.progress[7]["last_seq"] == 4
    assert (got.steps, got.cycles) == ([{"n": 1}, {"n": 2}], [{"c": 1}])


def test_position_json_is_json_dumps_text_and_keeps_a_nan() -> None:
    pos = _position(12, 0.25)
    pos["step_en_wh"] = np.float64(1.5)
    pos["pulse_i"] = np.int64(3)
    assert json.loads(position_json(pos)) == json.loads(json.dumps(pos, default=float))
    pos["step_cap_ah"] = float("nan")
    assert np.isnan(json.loads(position_json(pos))["step_cap_ah"])


def test_journal_keeps_records_with_their_rows(tmp_path: Path) -> None:
    rec = Records(progress={1: {"run_id": 1, "last_seq": 3}},
                  steps=[{"run_id": 1, "step_number": 1}], cycles=[])
    j = Journal(tmp_path)
    assert j.append_many([_rows(1, 1, 3), _rows(1, 4, 2)], [rec.to_json(), None]) == 2
    j.close()
    j2 = Journal(tmp_path)
    j2.open()
    recs = j2.peek_many(100)
    assert [len(x.rows) for x in recs] == [3, 2]
    assert recs[0].records is not None and recs[1].records is None
    back = Records.from_json(recs[0].records)
    assert back.progress == rec.progress and back.steps == rec.steps
    assert list(recs[0].rows) == _rows(1, 1, 3)


async def _state(engine: AsyncEngine, run_id: int) -> tuple[Any, ...]:
    async with engine.connect() as conn:
        n = (await conn.execute(text("SELECT count(*) FROM samples WHERE run_id = :r"),
                                {"r": run_id})).scalar()
        last_seq = (await conn.execute(text("SELECT last_seq FROM runs WHERE id = :r"),
                                       {"r": run_id})).scalar()
        steps = (await conn.execute(text("SELECT count(*) FROM steps WHERE run_id = :r"),
                                    {"r": run_id})).scalar()
        cycles = (await conn.execute(
            text("SELECT discharge_capacity_ah, spans_gap FROM cycles WHERE run_id = :r"),
            {"r": run_id})).all()
    return n, last_seq, steps, [tuple(c) for c in cycles]


def _step(run_id: int) -> dict[str, Any]:
    return {"run_id": run_id, "step_number": 1, "step_index": 0, "cycle_index": 1,
            "kind": "cc", "start_t_s": 0.0, "end_t_s": 0.5, "end_reason": "duration",
            "capacity_ah": 0.5, "energy_wh": 1.8, "end_voltage_v": 3.7, "dcir_ohm": None,
            "end_crossing_t_s": 0.5}


def _cycle(run_id: int) -> dict[str, Any]:
    return {"run_id": run_id, "cycle_index": 1, "start_t_s": 0.0, "end_t_s": 0.5,
            "charge_capacity_ah": 0.0, "discharge_capacity_ah": 0.5, "charge_energy_wh": 0.0,
            "discharge_energy_wh": 1.8, "coulombic_efficiency": None,
            "energy_efficiency": None, "mean_charge_voltage_v": None,
            "mean_discharge_voltage_v": 3.7, "spans_gap": True}


async def _set_running(engine: AsyncEngine, run_id: int) -> None:
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE runs SET state = 'running' WHERE id = :r"),
                           {"r": run_id})


@pytest.mark.parametrize("journaled", [False, True])
async def test_writer_commits_positions_steps_and_cycles_with_the_rows(
    db_engine: AsyncEngine, tmp_path: Path, journaled: bool
) -> None:
    run_id = await _seed_run(db_engine)
    await _set_running(db_engine, run_id)
    w = SampleWriter(db_engine, batch_rows=10_000, batch_age_s=60, journal_dir=tmp_path / "j")
    w.start()
    try:
        await w.flush()  # journal opened
        if journaled:
            # As during an outage: batches go to the journal with their records and are
            # replayed, in order and with them, when the database is back.
            w._mark_down("test outage")
            w._retry_at = time.monotonic() + 3600
        await w.put(_rows(run_id, 1, 5),
                    Ledger(fast=[_fast(run_id, 5, 0.5)], positions=[_full(run_id, 0, 0.0)]))
        # Handed over, not committed: neither rows nor their records are in yet.
        assert await _state(db_engine, run_id) == (0, 0, 0, [])
        await w.put(_rows(run_id, 6, 1), Ledger(
            fast=[_fast(run_id, 6, 0.0)], positions=[_full(run_id, 5, 0.0, 1)],
            steps=[_step(run_id)], cycles=[_cycle(run_id)]))
        if journaled:
            w._hand_over()
            await _until(lambda: w.rows_journaled == 6)
            assert w.journal_pending_rows == 6
            assert await _state(db_engine, run_id) == (0, 0, 0, [])
        await w.flush()
        assert w.journal_pending_rows == 0
        assert await _state(db_engine, run_id) == (6, 6, 1, [(0.5, True)])
        async with db_engine.connect() as conn:
            pos = (await conn.execute(text("SELECT position FROM runs WHERE id = :r"),
                                      {"r": run_id})).scalar()
        pos = pos if isinstance(pos, dict) else json.loads(pos)
        assert (pos["pc"], pos["seq"]) == (1, 6)
    finally:
        await w.close()
