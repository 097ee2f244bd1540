"""The API's load cannot make the engine miss periods: 64 channels sampled every second
under the standard API load at 100 requests/s, and not one period missed.

`labdaq serve --sim --speed 1` (production rates: a second is a second) with eight
8-channel simulated cabinets; a run on every one of the 64 channels cycles a half-C
charge and discharge of 30 s each (a set point change per channel every 30 s). Once
every run has samples, the standard API load (docs/architecture.md, Definitions) runs
against the API for ``LOAD_S`` seconds: its own process, the open-loop client of
`benchmarks/acquisition_scale.py --api-load` (run status, cycles, downsampled samples,
one page of full samples, each to the next run). Then every run is stopped and the
database says what happened, counted two ways: the engine's own record (``runs.
missed_periods`` and ``missed_periods`` events) and the design map's definition of
lost (a sample period with no stored due sample, from each run's first sample to the
end of the load), both 0; ``seq`` contiguous, every run stopped as asked.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from labdaq.auth import create_token
from labdaq.storage.db import create_engine, session_scope, sessionmaker
from tests.fault_report import lost_and_duplicates, record_fault
from tests.test_supervision import Service, _serve, _wait

pytestmark = [pytest.mark.slow, pytest.mark.faults]

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "acquisition_scale.py"
CABINETS = 8  # `serve --sim` cabinets have 8 channels each
CHANNELS = 8 * CABINETS
PERIOD_S = 1.0
LOAD_S = 60.0
RATE_HZ = 100.0
CONNS = 8
CYCLE_DOC: dict[str, Any] = {
    "schema_version": 1,
    "name": "api_load_cycling",
    "steps": [{"step": "loop", "count": 1000, "body": [
        {"step": "cc", "rate_c": 0.5, "until": {"duration_s": 30}},
        {"step": "cc", "rate_c": -0.5, "until": {"duration_s": 30}},
    ]}],
}


def _bench() -> ModuleType:
    """benchmarks/acquisition_scale.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("acquisition_scale_for_load", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _engineer_token(svc: Service) -> str:
    async def make() -> str:
        engine = create_engine(f"sqlite:///{svc.data_dir / 'labdaq.db'}")
        try:
            async with session_scope(sessionmaker(engine)) as s:
                return await create_token(s, "api-load", "engineer")
        finally:
            await engine.dispose()

    return asyncio.run(make())


def _start_runs(svc: Service) -> list[int]:
    desc = json.loads((svc.data_dir / "simlab.json").read_text())
    channels = [(ch["name"], ch["cell"]["serial"]) for inst in desc["instruments"]
                if inst["name"].startswith("cabinet") for ch in inst["channels"]
                if ch.get("cell")]
    assert len(channels) == CHANNELS, channels
    ids = []
    with httpx.Client(base_url=svc.base, headers=svc.headers, timeout=60) as client:
        for name, serial in channels:
            r = client.post("/api/v1/runs", json={
                "channel": name, "cell_serial": serial, "protocol_document": CYCLE_DOC,
                "sample_period_s": PERIOD_S})
            assert r.status_code == 201, r.text
            ids.append(int(r.json()["id"]))
    return ids


@dataclass
class LoadOutcome:
    """What one session under the standard API load left behind, counted from the database
    (``lost``: due periods with no stored sample; ``holes``/``seq_lost``: numbered samples
    the database does not hold)."""

    api: dict[str, Any]
    final: dict[str, Any]
    recorded_missed: int
    gap_events: list[tuple[Any, ...]]
    seq_lost: int
    duplicates: int
    n_runs: int


def run_under_api_load(tmp_path: Path, load_s: float,
                       while_loaded: Callable[[Service, subprocess.Popen[str]], None]
                       | None = None) -> LoadOutcome:
    """`labdaq serve --sim --speed 1`, a run on each of the 64 channels, the standard API
    load for ``load_s`` seconds (``while_loaded(svc, load_proc)`` is called while it runs
    and returns once it has ended), then every run stopped and the database checked."""
    bench = _bench()
    with _serve(tmp_path, speed=1.0, serve_args=("--sim-cabinets", str(CABINETS))) as svc:
        run_ids = _start_runs(svc)
        _wait(lambda: svc.db("SELECT count(DISTINCT run_id) FROM samples")[0][0] == CHANNELS,
              "every run to store a sample", svc.proc)
        spec = {"port": int(svc.base.rsplit(":", 1)[1]), "token": _engineer_token(svc),
                "ids": run_ids, "rate_hz": RATE_HZ, "duration_s": load_s, "conns": CONNS}
        load = subprocess.Popen([sys.executable, str(BENCH), "--api-load", json.dumps(spec)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if while_loaded is not None:
                while_loaded(svc, load)
            out, err = load.communicate(timeout=load_s + 300)
        finally:
            if load.poll() is None:  # the test failed while the load ran
                load.kill()
                load.wait()
        load_end_utc = time.time()
        assert load.returncode == 0, err[-3000:]
        api = json.loads(out.strip().splitlines()[-1])
        with httpx.Client(base_url=svc.base, headers=svc.headers, timeout=60) as client:
            for rid in run_ids:
                r = client.post(f"/api/v1/runs/{rid}/stop")
                assert r.status_code == 200, r.text
        _wait(lambda: {s for (s,) in svc.db(
            f"SELECT state FROM runs WHERE id IN ({','.join(map(str, run_ids))})")}
            == {"stopped"}, "every run to stop", svc.proc)
        db_path = svc.data_dir / "labdaq.db"
        final = bench.final_check(db_path, min(run_ids), max(run_ids), PERIOD_S, set(),
                                  [load_end_utc])
        recorded = int(svc.db("SELECT coalesce(sum(missed_periods), 0) FROM runs")[0][0])
        gap_events = svc.db("SELECT run_id, data FROM events WHERE kind = 'missed_periods'")
        lost = dups = 0
        for rid in run_ids:
            seqs = [s for (s,) in svc.db("SELECT seq FROM samples WHERE run_id = ? "
                                         "ORDER BY seq", rid)]
            n_lost, n_dup = lost_and_duplicates(seqs, list(range(1, max(seqs) + 1)))
            lost += n_lost
            dups += n_dup
    print(f"API load: {json.dumps(api)}")
    print(f"stored rows {final['rows']}, periods lost {final['lost']}, recorded missed "
          f"{recorded}, gap events {len(gap_events)}, seq holes {final['holes']}")
    return LoadOutcome(api, final, recorded, gap_events, lost, dups, len(run_ids))


def assert_nothing_missed(out: LoadOutcome) -> None:
    # The load ran and was served: requests answered, and none with an error.
    assert out.api["requests"] > 0, out.api
    assert out.api["errors"] == 0 and set(out.api["statuses"]) == {"200"}, out.api
    # Nothing missed, by the engine's record and by the database's rows.
    assert out.recorded_missed == 0 and not out.gap_events, out.gap_events[:5]
    assert out.final["lost"] == [0], out.final
    assert out.final["holes"] == 0 and out.seq_lost == 0 and out.duplicates == 0, out.final
    assert not out.final["bad"], out.final["bad"]


@pytest.mark.timeout(900)
def test_api_load_does_not_make_the_engine_miss_periods(tmp_path: Path) -> None:
    out = run_under_api_load(tmp_path, LOAD_S)
    record_fault(f"{CHANNELS} channels at {PERIOD_S:g} s under the standard API load "
                 f"({RATE_HZ:g} req/s for {LOAD_S:g} s, speed 1)", faults=0,
                 lost=out.final["lost"][0] + out.seq_lost, duplicates=out.duplicates,
                 runs_resumed=out.n_runs, runs=out.n_runs, missed_periods=out.recorded_missed)
    assert_nothing_missed(out)
