"""API latency under the standard API load while a 64-channel cabinet acquires.

One job: p50/p99 latency of the engineer's read queries, run cycles
(``GET /runs/{id}/cycles``) and downsampled samples (``GET /runs/{id}/samples?points=500``),
at 200 requests/s open loop (docs/architecture.md, Definitions: the standard API load,
each request to the next run, latency from the intended send time) while 64 simulated
channels acquire at 1 s (one cabinet, every channel cycling CC-CV), and whether the
acquisition paid for it: the engine's loop lateness against a trial with no API load in
the same run, and the sample periods lost (counted in the database).

The machinery is acquisition_scale's (the simulated lab, the API in its own process,
the AcquisitionNode in this one, the load client in another, the database counts); each
trial is a fresh node with fresh runs. Targets (issue 15): p99 <= 50 ms, lateness
unchanged, none lost. Prints one JSON line per figure.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import acquisition_scale as acq  # noqa: E402
from _common import result  # noqa: E402

KINDS = ("cycles", "points")
PLAN = replace(acq.FULL, cpc=64, period_s=1.0, max_cabinets=1, start_cabinets=1,
               window_s=15.0, settle_s=3.0, cycle_s=20.0, breach_per_cab=0,
               api_rate_hz=200.0, api_conns=16, api_kinds=KINDS)
QUICK = replace(PLAN, cpc=16, window_s=6.0, settle_s=2.0, api_rate_hz=100.0, api_conns=8)


async def _trials(lab: acq.Lab, plan: acq.Plan) -> tuple[acq.Step, acq.Step]:
    from labdaq.storage.db import create_engine, sessionmaker

    lab.engine = create_engine(lab.url)
    lab.maker = sessionmaker(lab.engine)
    try:
        quiet = await acq.Trial(lab, replace(plan, api_rate_hz=0.0), 1).run()
        acq.log("no API load:" + quiet.line())
        loaded = await acq.Trial(lab, plan, 1).run()
        acq.log(f"{plan.api_rate_hz:g} req/s:" + loaded.line())
        return quiet, loaded
    finally:
        await lab.engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    plan = QUICK if args.quick else PLAN
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    tmp = Path(tempfile.mkdtemp(prefix="labdaq-apilat-"))
    children = acq.Children(tmp)
    t0 = time.perf_counter()
    try:
        lab = acq.start_lab(children, tmp, 1)
        quiet, loaded = asyncio.run(_trials(lab, plan))
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    api = loaded.api
    p50 = api.get("p50_ms_by_kind", {})
    p99 = api.get("p99_ms_by_kind", {})
    lost = loaded.lost
    late_q = acq.pct(quiet.lateness_s, 99)
    late_l = acq.pct(loaded.lateness_s, 99)
    who = (f"{plan.api_rate_hz:g} req/s open loop ({'/'.join(KINDS)} in turn, distinct runs, "
           f"{plan.api_conns} connections) while {loaded.channels} channels acquire at "
           f"{plan.period_s:g} s")
    common = (f"sent {api.get('sent')}, answered {api.get('requests')}, errors "
              f"{api.get('errors')}, unfinished {api.get('unfinished')}; p50 cycles "
              f"{p50.get('cycles')} / points {p50.get('points')} ms, p99 cycles "
              f"{p99.get('cycles')} / points {p99.get('points')} ms; periods lost {lost}; "
              f"cpu% {loaded.cpu_pct}; {time.perf_counter() - t0:.0f} s")
    result("api_read_p99_ms", api.get("p99_ms") or 0.0, "ms", 50.0,
           note=f"{who}; baseline = the 50 ms target; {common}",
           headline=f"cycles + downsampled samples at {api.get('req_per_s')} req/s: p50 "
           f"{api.get('p50_ms')} ms, p99 {api.get('p99_ms')} ms (target <= 50 ms); "
           f"{lost} sample periods lost")
    result("api_read_p50_ms", api.get("p50_ms") or 0.0, "ms", None, note=f"{who}; {common}")
    result("loop_lateness_p99_ms_under_api_load", late_l or 0.0, "ms", late_q,
           note=f"engine loop lateness p99 with the API load vs without it (baseline), "
           f"same run; max {acq.pct(loaded.lateness_s, 100)} vs "
           f"{acq.pct(quiet.lateness_s, 100)} ms; lost {lost} vs {quiet.lost}",
           headline=f"loop lateness p99 {late_l} ms under {plan.api_rate_hz:g} req/s vs "
           f"{late_q} ms without; lost {lost} (without: {quiet.lost})")


if __name__ == "__main__":
    main()
