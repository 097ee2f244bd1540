"""The buffered simulator's ceiling client of benchmarks/acquisition_scale.py
(``acq_bare.trace_main``): it starts every cabinet logging as the engine's driver does,
counts the readings its ``TRAC:DATA?`` blocks carry, and leaves no cabinet logging.

One job: run it for a fraction of a second against two simulated cabinets served over TCP
and check what it set up, counted and left behind. No rate is asserted.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

from labdaq.sims.cabinet import CabinetSim
from labdaq.sims.clock import SimClock
from labdaq.sims.server import SimServer

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(scope="module")
def acq_bare() -> ModuleType:
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location("acq_bare_under_test",
                                                      BENCH / "acq_bare.py")
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("fetch_s", [0.02, 0.0])
def test_trace_client_logs_like_the_engine_and_stops_the_cabinets(
        acq_bare: ModuleType, capsys: pytest.CaptureFixture[str], fetch_s: float) -> None:
    clock = SimClock()
    sims = [CabinetSim(64, clock=clock, seed=k) for k in range(2)]
    servers = [SimServer.tcp(s).start() for s in sims]
    try:
        acq_bare.trace_main({"ports": [int(s.resource.split("::")[2]) for s in servers],
                             "duration_s": 0.3, "warmup_s": 0.1, "period_s": 0.01,
                             "fetch_s": fetch_s, "points": 1000})
    finally:
        for s in servers:
            s.stop()
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(out) >= {"readings_per_s", "fetches_per_s", "lost", "cpu_pct"}
    assert out["lost"] == 0  # 0.4 s of logging never fills a 1,000-reading ring
    for sim in sims:
        assert sim.log.period_s == 0.01 and sim.log.points == 1000
        assert not sim.log.running  # ABOR answered before the client ended
        assert sim.log.count > 0 and sim.data_format == "REAL"
