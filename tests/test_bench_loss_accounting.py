"""The acquisition benchmark's loss accounting: a missed sample period counts as lost.

One job: feed ``window_losses`` and ``final_check`` of benchmarks/acquisition_scale.py a
tiny SQLite database with known gaps, seq holes and end states, and check what they
count. No engine, no timing: the figures the benchmark prints rest on these counts.
"""

from __future__ import annotations

import importlib.util
import sqlite3
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "acquisition_scale.py"
PERIOD_S = 0.01
T0_UTC = 1_800_000_000.0  # the runs' start, POSIX seconds
EDGE = 8  # SampleFlag.EDGE: a reading right after a set point changed (extra)


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("acquisition_scale_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _db(path: Path, runs: dict[int, tuple[str, int, list[tuple[int, float, int]]]]) -> Path:
    """``runs``: id -> (end state, engine's last_seq, [(seq, t_s, flags), ...]); all on
    instrument 1, channel = run id."""
    con = sqlite3.connect(path)
    con.executescript(
        "CREATE TABLE channels (id INTEGER PRIMARY KEY, instrument_id INTEGER);"
        "CREATE TABLE runs (id INTEGER PRIMARY KEY, channel_id INTEGER, state TEXT, "
        "last_seq INTEGER, ended_at TEXT, end_reason TEXT);"
        "CREATE TABLE samples (run_id INTEGER, seq INTEGER, t_s REAL, ts_utc REAL, "
        "flags INTEGER, PRIMARY KEY (run_id, seq));"
        "CREATE TABLE events (id INTEGER PRIMARY KEY, kind TEXT, run_id INTEGER);"
    )
    for rid, (state, last_seq, rows) in runs.items():
        con.execute("INSERT INTO channels VALUES (?, 1)", (rid,))
        con.execute("INSERT INTO runs VALUES (?, ?, ?, ?, '2027-01-15 08:00:00', 'test')",
                    (rid, rid, state, last_seq))
        con.executemany("INSERT INTO samples VALUES (?, ?, ?, ?, ?)",
                        [(rid, seq, t, T0_UTC + t, f) for seq, t, f in rows])
    con.commit()
    con.close()
    return path


def _due(n: int, skip: frozenset[int] = frozenset()) -> list[float]:
    """Times of due samples 0..n-1 periods, minus the skipped periods."""
    return [k * PERIOD_S for k in range(n) if k not in skip]


def _numbered(times: list[float], flags: int = 0) -> list[tuple[int, float, int]]:
    return [(seq, t, flags) for seq, t in enumerate(times, start=1)]


def test_a_missed_period_counts_as_lost(bench: ModuleType, tmp_path: Path) -> None:
    whole = _numbered(_due(100))
    gap = _numbered(_due(100, frozenset({40})))  # period 40 has no stored sample
    two = _numbered(_due(100, frozenset({60, 61})))  # two in a row
    db = _db(tmp_path / "s.db", {1: ("stopped", 100, whole), 2: ("stopped", 99, gap),
                                 3: ("stopped", 98, two)})
    w = bench.window_losses(db, 1, 3, PERIOD_S, T0_UTC, T0_UTC + 1.0)
    assert w["lost"] == 3
    assert w["rows"] == 100 + 99 + 98
    f = bench.final_check(db, 1, 3, PERIOD_S, set(), [T0_UTC + 0.5, T0_UTC + 1.0])
    assert f["lost"] == [1, 3]  # up to each end: the gap at 0.4 s, then the two at 0.6 s
    assert f["holes"] == 0 and f["bad"] == []


def test_jitter_is_not_a_loss_and_edge_rows_do_not_fill_a_gap(
    bench: ModuleType, tmp_path: Path
) -> None:
    times = _due(50)
    times[20] += 0.6 * PERIOD_S  # late, and the next one on time: nothing missed
    jitter = _numbered(times)
    # Period 30 missed; an edge reading (extra, after a set-point change) in period 29
    # does not stand in for it.
    gapped = _due(50, frozenset({30}))
    rows = _numbered(gapped)
    rows.append((len(rows) + 1, 29.5 * PERIOD_S, EDGE))
    db = _db(tmp_path / "s.db", {1: ("stopped", 50, jitter), 2: ("stopped", 50, rows)})
    w = bench.window_losses(db, 1, 2, PERIOD_S, T0_UTC, T0_UTC + 1.0)
    assert w["lost"] == 1
    assert w["rows"] == 50 + 49  # edge rows are not due rows
    assert w["phase_changes"] == 1


def test_seq_holes_and_end_states(bench: ModuleType, tmp_path: Path) -> None:
    # The engine numbered 20 rows, the database holds 18 (seq 7 and 8 never committed).
    held = [(seq, (seq - 1) * PERIOD_S, 0) for seq in range(1, 21) if seq not in (7, 8)]
    db = _db(tmp_path / "s.db", {
        1: ("stopped", 20, held),
        2: ("aborted_safety", 20, _numbered(_due(20))),  # a breach run, tripped
        3: ("failed", 20, _numbered(_due(20))),  # an ordinary run that failed
        4: ("stopped", 20, _numbered(_due(20))),  # a breach run stopped before its breach
    })
    f = bench.final_check(db, 1, 4, PERIOD_S, {2, 4}, [T0_UTC + 1.0])
    assert f["holes"] == 2
    assert f["lost"] == [2]  # the two uncommitted rows are missed periods as well
    assert [why.split(":")[0] for _, why in f["bad"]] == ["run 3 ended failed"]
    assert f["untripped"] == 1


def test_a_buffered_trial_that_falls_behind_is_not_lossless(bench: ModuleType) -> None:
    """Buffered mode: the cabinets' rings hide an engine that falls behind until they
    overflow, so a trial with nothing lost still fails when its writer's backlog reached
    its bound or it or the fetch lateness kept growing through the window."""
    import acq_trial

    def step(backlog: list[tuple[float, int]], lateness: list[float], hit: bool,
             span_s: float = 10.0, stored_per_s: float = 50_000.0) -> Any:
        st = acq_trial.Step(hz=100.0, period_s=PERIOD_S, cabinets=1, channels=64)
        st.stored_per_s = stored_per_s
        st.backlog_growth_per_s = acq_trial.growth_of(backlog)
        st.backlog_floor_end = acq_trial.last_floor(backlog)
        st.lateness_growth = acq_trial.growth_per_s(lateness, span_s)
        st.kept_up = acq_trial.kept_up(st, hit, batch_rows=2_000)
        return st

    # Steady: the backlog is a sawtooth (it empties at each commit) and the lateness
    # jitters with spikes; neither floor rises, whatever a fit through the teeth says.
    saw = [(0.2 * k, 20_000 + (k % 5) * 4_000) for k in range(50)]
    jitter = [0.02 + 0.01 * (k % 3) + (0.3 if k in (150, 190) else 0.0) for k in range(200)]
    ok = step(saw, jitter, hit=False)
    assert ok.kept_up and not ok.why
    # The writer is 5 % slower than the cabinets: 2,500 rows more every second.
    growing = [(t, v + int(2_500 * t)) for t, v in saw]
    slow = step(growing, jitter, hit=False)
    assert not slow.kept_up and "backlog rose" in slow.why
    # Back-pressure held the backlog at its bound, and the engine fell behind instead.
    late = [0.02 + 0.15 * k / 20 for k in range(200)]  # 1.5 s behind after 10 s
    behind = step(saw, late, hit=True)
    assert not behind.kept_up
    assert "reached its bound" in behind.why and "lateness rose" in behind.why
    # A falling-behind trial reads "fell behind", never "LOSSLESS".
    assert "FELL BEHIND" in behind.line()
    # A 2 s window of a small quick trial (2,500 rows/s stored), sampled every 0.2 s: the
    # writer commits when its rows reach a batch or age 0.5 s, so the thirds (0.6 s) can
    # miss the troughs and the floor "rises" past 2 % of the rate while the backlog stays
    # under one batch of 2,000 rows.
    short = [(0.2 * k, [0, 600, 300, 0, 700, 400, 100, 715, 450, 150][k]) for k in range(10)]
    assert acq_trial.growth_of(short) > acq_trial.BACKLOG_GROWTH_MAX * 2_500
    quick = step(short, [0.02] * 40, hit=False, span_s=2.0, stored_per_s=2_500.0)
    assert quick.kept_up and not quick.why
    # The same rise above a batch is a writer falling behind.
    above = step([(t, v + 5_000 + int(3_000 * t)) for t, v in short], [0.02] * 40, hit=False,
                 span_s=2.0, stored_per_s=2_500.0)
    assert not above.kept_up and "backlog rose" in above.why
