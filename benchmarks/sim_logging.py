"""The cabinet simulator's cost in buffered mode: CPU per logged 64-channel reading and per
``TRAC:DATA?`` fetch, in process and through a real ``labdaq sim`` over TCP.

One job: say how many readings the simulated cabinet logs and serves per CPU-second of
its simulator, so benchmarks/acquisition_scale.py's buffered mode can tell the engine's
limit from the simulator's (issue 12: "the simulator must keep up without becoming the
bottleneck").

Two parts, in one run:

1. **In process** (a ``CabinetSim`` on a ``ManualClock``, no transport): 64 channels
   logging every ``period_s``, half charging 1C with the voltage limit 80 mV above the
   cell (CC then CV), half discharging 1C; the clock moves ``fetch_s`` at a time and each
   step ends with one ``TRAC:DATA? <next>,(@1:64)`` (a block of fetch_s/period_s
   readings, 5 by default). CPU (``time.process_time``) is split into the logging
   (``CabinetSim._step_to``: stepping the cells reading by reading and keeping each in the
   ring) and the fetch (the rest of the line: parsing, the block's bytes). ``--profile``
   prints the cProfile of this part.
2. **Over TCP**: ``labdaq sim --cabinets K`` (its own process, speed 1); K
   ``CyclerCabinet`` drivers (asyncio stream transport, as the engine's hot path) start
   logging at ``period_s`` with ``start_logging`` and fetch with ``fetch_logged`` every
   ``fetch_s`` for ``tcp_s`` seconds; the simulator process's CPU (/proc) over the window
   against the readings it logged and served. That CPU includes everything the process
   does (socket threads, its watchdog and idle housekeeping), so it is the figure a lab of
   K cabinets costs.

Run by hand (not by ``make bench``: acquisition_scale.py's buffered phase 1 measures the
simulator's ceiling in the same run as the engine); ``--quick`` takes a few seconds. The
last stdout line is one JSON object (benchmarks/_common.py); human lines on stderr.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402
from acq_common import cpu_seconds, loadavg, log  # noqa: E402

CHANNELS = 64
CHARGE_A = 4.9
DISCHARGE_A = -4.9
CAP_ABOVE_V = 0.08
VOLT_LOW_V = 2.5


def setup_commands(voltage_v: list[float], channels: int = CHANNELS) -> list[str]:
    """Half the channels charging at 1C clamped ``CAP_ABOVE_V`` above their voltage (CC,
    then CV within a few readings), half discharging at 1C (CC), every output on."""
    half = channels // 2
    cmds = [f"CURR {CHARGE_A},(@1:{half})", f"CURR {DISCHARGE_A},(@{half + 1}:{channels})",
            f"CURR:VLIM:LOW {VOLT_LOW_V},(@1:{channels})"]
    cmds += [f"CURR:VLIM {voltage_v[ch] + CAP_ABOVE_V:.4f},(@{ch + 1})" for ch in range(half)]
    cmds.append(f"OUTP 1,(@1:{channels})")
    return cmds


def in_process(readings: int, period_s: float, fetch_s: float, seed: int,
               profile: bool) -> dict[str, Any]:
    """CPU per logged reading and per fetch of one cabinet, stepped by a ManualClock."""
    from labdaq.sims.cabinet import CabinetSim
    from labdaq.sims.clock import ManualClock

    clock = ManualClock(100.0)
    sim = CabinetSim(CHANNELS, clock=clock, seed=seed)
    for cmd in [*setup_commands(list(sim.snapshot()[0])), "FORM:DATA REAL,32",
                f"TRIG:TIM {period_s}", "TRAC:POIN 1000", "INIT"]:
        sim.handle_line(cmd)
    step_to = sim._step_to
    log_cpu = [0.0]  # wall seconds in _step_to, then scaled to CPU

    def timed_step_to(now: float) -> None:
        # perf_counter, not process_time: the latter costs ~100 us a call on this VM.
        w0 = time.perf_counter()
        step_to(now)
        log_cpu[0] += time.perf_counter() - w0

    sim._step_to = timed_step_to  # type: ignore[method-assign]
    fetches = 0
    nxt = sim.log.count + 1
    prof = cProfile.Profile() if profile else None
    c0, w0 = time.process_time(), time.perf_counter()
    if prof is not None:
        prof.enable()
    start_count = sim.log.count
    while sim.log.count - start_count < readings:
        clock.advance(fetch_s)
        sim.handle_line(f"TRAC:DATA? {nxt},(@1:{CHANNELS})")
        nxt = sim.log.count + 1
        fetches += 1
    if prof is not None:
        prof.disable()
    total, wall = time.process_time() - c0, time.perf_counter() - w0
    # The split is timed in wall seconds (cheap to read); scaled to CPU by the whole
    # loop's CPU/wall ratio (below 1 only when other processes took the core).
    log_cpu[0] *= total / wall
    logged = sim.log.count - start_count
    if prof is not None:
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(18)
    out = {"readings": logged, "fetches": fetches,
           "us_per_reading": 1e6 * log_cpu[0] / logged,
           "us_per_fetch": 1e6 * (total - log_cpu[0]) / fetches,
           "readings_per_cpu_s": logged / total}
    log(f"in process, 1 cabinet x {CHANNELS} ch, {logged} readings in blocks of "
        f"{logged / fetches:.1f}: {out['us_per_reading']:.1f} us CPU per logged reading, "
        f"{out['us_per_fetch']:.1f} us per TRAC:DATA? fetch; "
        f"{out['readings_per_cpu_s']:,.0f} readings (with their fetches) per CPU-second")
    return out


def over_tcp(cabinets: int, duration_s: float, period_s: float, fetch_s: float
             ) -> dict[str, Any]:
    """``labdaq sim`` in its own process; K drivers log and fetch; its CPU per reading."""
    from labdaq import processes
    from labdaq.drivers.cabinet import CyclerCabinet
    from labdaq.drivers.transport import open_transport
    from labdaq.processes import Children

    tmp = Path(tempfile.mkdtemp(prefix="labdaq-simlog-"))
    children = Children(tmp)
    try:
        desc_path = tmp / "lab.json"
        sim = children.spawn("sim", processes.sim_argv(
            desc_path, "--smus", "0", "--cabinets", str(cabinets), "--cabinet-channels",
            str(CHANNELS), "--speed", "1"), stdout=subprocess.DEVNULL)
        desc = processes.read_sim_description(desc_path, sim, timeout_s=60)
        resources = [i["resource"] for i in desc["instruments"] if i["driver"] == "cabinet"]
        cabs = [CyclerCabinet(open_transport(r, timeout_s=5.0, stream=True), f"cab{j}",
                              acquisition="buffered", buffer_points=1000,
                              fetch_period_s=fetch_s)
                for j, r in enumerate(resources)]
        for cab in cabs:
            for cmd in setup_commands(list(cab.measure_full().voltage_v)):
                cab.write_checked(cmd)
            cab.start_logging(period_s)
        nxt = [1] * len(cabs)
        got = [0]
        fetches = [0]
        lost = [0]
        stop = threading.Event()

        def fetch_loop() -> None:
            deadline = time.monotonic()
            while not stop.is_set():
                deadline += fetch_s
                for j, cab in enumerate(cabs):
                    block = cab.fetch_logged(nxt[j])
                    if block.first_held > nxt[j]:
                        lost[0] += block.first_held - nxt[j]
                    if len(block.indices):
                        nxt[j] = int(block.indices[-1]) + 1
                        got[0] += len(block.indices)
                    fetches[0] += 1
                time.sleep(max(0.0, deadline - time.monotonic()))

        t = threading.Thread(target=fetch_loop, name="fetch")
        t.start()
        time.sleep(1.0)  # warm-up
        g0, f0, c0, t0 = got[0], fetches[0], cpu_seconds(sim.pid), time.perf_counter()
        time.sleep(duration_s)
        g1, f1, c1, t1 = got[0], fetches[0], cpu_seconds(sim.pid), time.perf_counter()
        stop.set()
        t.join(timeout=10)
        for cab in cabs:
            cab.stop_logging()
            cab.close()
    finally:
        children.stop_all()
    wall = t1 - t0
    cpu = c1 - c0
    readings = g1 - g0
    out = {"cabinets": cabinets, "readings_per_s": readings / wall,
           "fetches_per_s": (f1 - f0) / wall, "sim_cpu_pct": 100 * cpu / wall,
           "us_per_reading_all_in": 1e6 * cpu / readings if readings else None,
           "readings_per_sim_cpu_s": readings / cpu if cpu > 0 else None,
           "lost": lost[0]}
    log(f"over TCP, labdaq sim with {cabinets} cabinets x {CHANNELS} ch logging every "
        f"{period_s * 1e3:g} ms, fetched every {fetch_s * 1e3:g} ms: "
        f"{out['readings_per_s']:,.0f} readings/s served, simulator CPU "
        f"{out['sim_cpu_pct']:.0f} % of a core = {out['us_per_reading_all_in'] or 0:.0f} us "
        f"per reading all in, {out['readings_per_sim_cpu_s'] or 0:,.0f} readings per "
        f"simulator CPU-second ({lost[0]} lost)")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--readings", type=int, default=5000, help="in-process readings")
    ap.add_argument("--cabinets", type=int, default=8, help="cabinets over TCP (0: skip)")
    ap.add_argument("--tcp-s", type=float, default=10.0, help="TCP window, wall seconds")
    ap.add_argument("--period-s", type=float, default=0.01)
    ap.add_argument("--fetch-s", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="cProfile the in-process part")
    ap.add_argument("--quick", action="store_true", help="1,000 readings, 2 cabinets, 2 s")
    args = ap.parse_args()
    if args.quick:
        args.readings, args.cabinets, args.tcp_s = 1000, 2, 2.0
    load0 = loadavg()
    inproc = in_process(args.readings, args.period_s, args.fetch_s, args.seed, args.profile)
    tcp = (over_tcp(args.cabinets, args.tcp_s, args.period_s, args.fetch_s)
           if args.cabinets > 0 else None)
    result("sim_logging_readings_per_cpu_s", inproc["readings_per_cpu_s"],
           "readings/CPU-s", None, in_process=inproc, tcp=tcp, loadavg_before=load0,
           loadavg_after=loadavg())


if __name__ == "__main__":
    main()
