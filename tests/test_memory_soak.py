"""Flat memory: 64 cabinet channels cycling for a simulated day, and the engine, its
sample writer and the simulated lab each grow by at most 20 MB of resident memory after
warm-up.

Real processes as in production (``labdaq sim`` with one 64-channel cabinet, ``labdaq
engine`` with its writer child) on a migrated SQLite file, both clocks at 500× so a
simulated day takes about three wall minutes. Resident memory (VmRSS from /proc) is read
once the runs have two simulated hours behind them (imports, pools and caches are warm by
then) and again until they have 26: growth is the median of the last five readings minus
the median of the first five, so a momentary peak between two garbage collections does
not count. Samples stay contiguous throughout.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.fault_report import lost_and_duplicates, record_fault
from tests.test_kill9_campaign import _create_runs
from tests.test_recovery_kill9 import Lab, _children, _env, _lab, _query, _stop, _wait

pytestmark = [pytest.mark.slow, pytest.mark.faults]

SPEED = 500.0
CHANNELS = 64
PERIOD_S = 10.0
WARM_T_S = 2 * 3600.0
END_T_S = WARM_T_S + 24 * 3600.0
MAX_GROWTH_MB = 20.0
# About four and a half hours a cycle: half a C up to the charge cut-off and down to the
# discharge cut-off with rests, so every channel keeps cycling all day.
SOAK_DOC: dict[str, Any] = {
    "schema_version": 1,
    "name": "memory_soak",
    "steps": [
        {"step": "loop", "count": 1000, "body": [
            {"step": "cc", "rate_c": 0.5, "until": {"voltage_v": "charge_cutoff"}},
            {"step": "rest", "until": {"duration_s": 600}},
            {"step": "cc", "rate_c": -0.5, "until": {"voltage_v": "discharge_cutoff"}},
            {"step": "rest", "until": {"duration_s": 600}},
        ]},
    ],
}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError(f"no VmRSS for {pid}")


def _min_t_s(lab: Lab) -> float:
    """How far the slowest run has got, in simulated seconds; every run must be running
    (one that stopped, for a safety limit say, would stall the soak)."""
    states = dict(_query(lab, "SELECT id, state FROM runs"))
    ended = {k: v for k, v in states.items() if v not in ("queued", "running")}
    assert not ended, f"runs ended during the soak: {ended}"
    rows = _query(lab, "SELECT min(t) FROM (SELECT max(t_s) AS t FROM samples "
                  "GROUP BY run_id)")
    return float(rows[0][0] or 0.0)


@pytest.mark.timeout(1800)
def test_a_simulated_day_on_64_channels_keeps_memory_flat(tmp_path: Path) -> None:
    sim_args = ("--smus", "1", "--cabinets", "1", "--cabinet-channels", str(CHANNELS),
                "--soc", "0.5", "--watchdog", "0")
    with _lab(tmp_path, SPEED, sim_args) as lab:
        run_ids = _create_runs(lab, SOAK_DOC, PERIOD_S, instrument_prefix="cabinet")
        assert len(run_ids) == CHANNELS, len(run_ids)
        with open(lab.logs / "engine.log", "wb") as out:
            engine = subprocess.Popen(
                [sys.executable, "-m", "labdaq.cli", "engine", "--speed", str(SPEED),
                 "--data-dir", str(lab.data_dir)],
                stdout=out, stderr=subprocess.STDOUT, cwd=lab.data_dir.parent,
                env=_env(LABDAQ_MAX_RESUME_GAP_S="1e9"), start_new_session=True)
        try:
            _wait(lambda: _min_t_s(lab) >= WARM_T_S, 600, "two simulated hours", engine,
                  lab.proc)
            writer = _children(engine.pid)
            assert len(writer) == 1, writer
            pids = {"engine": engine.pid, "writer": writer[0], "simulated lab": lab.proc.pid}
            readings: dict[str, list[float]] = {k: [] for k in pids}
            while _min_t_s(lab) < END_T_S:
                for name, pid in pids.items():
                    readings[name].append(_rss_mb(pid))
                assert engine.poll() is None and lab.proc.poll() is None
                time.sleep(1.0)  # a sampling interval, not a synchronisation
            _query(lab, "UPDATE runs SET requested_action = 'stop'")
            _wait(lambda: {s for (s,) in _query(lab, "SELECT state FROM runs")} == {"stopped"},
                  120, "the runs to stop", engine, lab.proc)
        finally:
            _stop(engine)
        growth = {name: statistics.median(r[-5:]) - statistics.median(r[:5])
                  for name, r in readings.items()}
        lost = dups = 0
        for rid in run_ids:
            seqs = [s for (s,) in _query(lab, "SELECT seq FROM samples WHERE run_id = ? "
                                         "ORDER BY seq", rid)]
            # Numbered 1..N by the engine: a hole below the last seq is a lost sample.
            n_lost, n_dup = lost_and_duplicates(seqs, list(range(1, max(seqs, default=0) + 1)))
            lost += n_lost
            dups += n_dup
        record_fault("soak: 64 channels for a simulated day at 500× (RSS after warm-up)",
                     faults=0, lost=lost, duplicates=dups, runs_resumed=len(run_ids),
                     runs=len(run_ids), rss_growth_mb=max(growth.values()))
        for name, r in readings.items():
            print(f"{name}: {len(r)} readings, {r[0]:.1f} → {r[-1]:.1f} MB "
                  f"(growth {growth[name]:+.1f} MB)")
        assert lost == 0 and dups == 0
        assert all(len(r) >= 10 for r in readings.values()), {k: len(r) for k, r in
                                                                readings.items()}
        assert max(growth.values()) <= MAX_GROWTH_MB, growth
        # Every channel cycled all day: at least four full cycles each.
        n_cycles = dict(_query(lab, "SELECT run_id, count(*) FROM cycles GROUP BY run_id"))
        assert min(n_cycles.get(r, 0) for r in run_ids) >= 4, n_cycles
