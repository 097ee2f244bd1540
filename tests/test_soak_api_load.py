"""Flat memory at production rates: 64 channels sampled every second under the standard
API load for an hour of wall time, and every process of `labdaq serve` (the
supervisor, API, engine, its sample writer, the simulated lab) grows by at most 20 MB of
resident memory after warm-up.

The session of tests/test_api_load_acquisition.py (`serve --sim --speed 1`, eight
8-channel cabinets, a run on every channel, the open-loop load at 100 requests/s), with
the load running ``SOAK_LOAD_S`` (an hour; ``LABDAQ_SOAK_LOAD_S`` overrides it). VmRSS
of each process is read every ``READ_EVERY_S``; the first ``WARM_S`` of load are
warm-up (imports, pools, caches, SQLite's page cache, the sample history the API
reads growing into its working set). Growth is the median of the last five readings
minus the median of the first five after warm-up, so a peak between two garbage
collections does not count. A process restarted by the supervisor fails the test (its
memory would start afresh). Marked ``soak``: `make soak` runs it; it is not in `make
test-slow` or `make faults`, whose budgets it would take alone.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from tests.fault_report import record_fault
from tests.test_api_load_acquisition import (
    CHANNELS,
    PERIOD_S,
    RATE_HZ,
    assert_nothing_missed,
    run_under_api_load,
)
from tests.test_memory_soak import MAX_GROWTH_MB, _rss_mb
from tests.test_supervision import Service, _child_running, _wait

pytestmark = [pytest.mark.slow, pytest.mark.soak]

SOAK_LOAD_S = float(os.environ.get("LABDAQ_SOAK_LOAD_S", 3600))
WARM_S = min(300.0, SOAK_LOAD_S / 4)
READ_EVERY_S = 10.0


def _pids(svc: Service) -> dict[str, int]:
    """The serve process tree: supervisor, API, engine, writer, simulated lab."""
    ready = _wait(svc.ready, "GET /ready", svc.proc)
    engine = int(ready["engine"]["pid"])
    found = {
        "serve": svc.proc.pid,
        "api": _child_running(svc.proc.pid, ["labdaq.cli", "api"]),
        "engine": engine,
        "writer": _child_running(engine, ["labdaq.engine.writer_process"]),
        "simulated lab": _child_running(svc.proc.pid, ["labdaq.cli", "sim"]),
    }
    assert all(found.values()), found
    return {k: int(v) for k, v in found.items() if v is not None}


@pytest.mark.timeout(int(SOAK_LOAD_S) + 1800)
def test_an_hour_under_api_load_keeps_memory_flat(tmp_path: Path) -> None:
    readings: dict[str, list[tuple[float, float]]] = {}
    pids: dict[str, int] = {}

    def sample(svc: Service, load: subprocess.Popen[str]) -> None:
        t0 = time.monotonic()
        pids.update(_pids(svc))
        readings.update({k: [] for k in pids})
        while load.poll() is None:
            assert svc.proc.poll() is None, "labdaq serve exited during the soak"
            t_s = time.monotonic() - t0
            for name, pid in pids.items():
                readings[name].append((t_s, _rss_mb(pid)))
            time.sleep(READ_EVERY_S)  # a sampling interval, not a synchronisation
        assert _pids(svc) == pids, "a process was restarted during the soak"

    out = run_under_api_load(tmp_path, SOAK_LOAD_S, sample)
    after = {k: [mb for t_s, mb in r if t_s >= WARM_S] for k, r in readings.items()}
    growth = {k: statistics.median(r[-5:]) - statistics.median(r[:5]) for k, r in after.items()}
    for name, r in after.items():
        print(f"{name}: {len(r)} readings after {WARM_S:g} s warm-up, {r[0]:.1f} → "
              f"{r[-1]:.1f} MB, peak {max(r):.1f} MB (growth {growth[name]:+.1f} MB)")
    record_fault(f"soak: {CHANNELS} channels at {PERIOD_S:g} s under the standard API load "
                 f"({RATE_HZ:g} req/s for {SOAK_LOAD_S / 60:g} min wall, speed 1; RSS after "
                 f"{WARM_S / 60:g} min warm-up)", faults=0,
                 lost=out.final["lost"][0] + out.seq_lost, duplicates=out.duplicates,
                 runs_resumed=out.n_runs, runs=out.n_runs, missed_periods=out.recorded_missed,
                 rss_growth_mb=max(growth.values()))
    assert all(len(r) >= 10 for r in after.values()), {k: len(r) for k, r in after.items()}
    assert max(growth.values()) <= MAX_GROWTH_MB, growth
    assert_nothing_missed(out)
