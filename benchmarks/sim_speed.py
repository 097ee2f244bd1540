"""Simulated hours per wall second: a 1C cycle through a Keithley 2460 simulator over TCP.

One job: measure how fast the simulated lab runs a test when a controller takes one
sample per simulated second. A Keithley2450Sim (model 2460) with an nmc811 cell is served
by a real TCP SimServer on a ManualClock; the real Keithley2450 driver over pyvisa-py
SOCKET charges at 1C to 4.2 V and discharges at 1C to 2.5 V (CC), and per sample advances
the clock by 1 s and reads V and I (one ``:MEAS:VOLT?;:MEAS:CURR?`` round trip, which
steps the cell). Baseline, measured in the same run: the same cycle stepping a CellBank
in-process (``step(I, 1 s)`` + ``voltage_v``) with no transport, driver or SCPI. The
ratio is what serving the physics through a real instrument protocol costs.

Both run alternately in repeats so machine noise hits them alike; the median is
reported. Server and client share one process (a ManualClock cannot cross processes),
so they also share the GIL, as the engine and an in-process lab would. The last line of
stdout is one JSON object (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import result  # noqa: E402

SPEC = "nmc811"
SAMPLE_S = 1.0
START_SOC = 0.05
V_MAX = 4.2
V_MIN = 2.5
# Compliance a little above the end voltage so the end condition, not the SMU's CV
# clamp, ends the charge (this is a CC-only cycle).
V_LIMIT = 4.25


def run_tcp(cycles: int) -> tuple[float, float, int]:
    """(wall s, simulated s, samples) for ``cycles`` CC cycles through driver + TCP."""
    from labdaq.drivers.keithley2450 import Keithley2450
    from labdaq.drivers.transport import open_transport
    from labdaq.sims.cell import CellBank
    from labdaq.sims.clock import ManualClock
    from labdaq.sims.keithley2450 import Keithley2450Sim
    from labdaq.sims.server import SimServer

    clock = ManualClock()
    bank = CellBank(SPEC, n=1, soc=START_SOC, seed=1)
    current = bank.spec.capacity_ah  # 1C
    sim = Keithley2450Sim(bank, clock, model="2460")
    with SimServer.tcp(sim) as server:
        smu = Keithley2450(open_transport(server.resource, timeout_s=2.0), model="2460")
        try:
            smu.configure_protection(1, 4.5, 6.0)
            samples = 0
            t0 = time.perf_counter()
            for _ in range(cycles):
                for sign, done in ((1.0, lambda v: v >= V_MAX), (-1.0, lambda v: v <= V_MIN)):
                    smu.set_current(1, sign * current, V_LIMIT)
                    smu.output(1, True)
                    while True:
                        clock.advance(SAMPLE_S)
                        v = float(smu.measure()[0, 0])
                        samples += 1
                        if done(v):
                            break
            wall = time.perf_counter() - t0
            smu.output(1, False)
        finally:
            smu.close()
    return wall, samples * SAMPLE_S, samples


def run_direct(cycles: int) -> tuple[float, float, int]:
    """The same cycle stepping a CellBank in-process (no transport, driver or SCPI)."""
    from labdaq.sims.cell import CellBank

    bank = CellBank(SPEC, n=1, soc=START_SOC, seed=1)
    current = bank.spec.capacity_ah
    samples = 0
    t0 = time.perf_counter()
    for _ in range(cycles):
        for sign, done in ((1.0, lambda v: v >= V_MAX), (-1.0, lambda v: v <= V_MIN)):
            while True:
                bank.step(sign * current, SAMPLE_S)
                v = float(bank.voltage_v[0])
                samples += 1
                if done(v):
                    break
    return time.perf_counter() - t0, samples * SAMPLE_S, samples


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 30 s)")
    ap.add_argument("--cycles", type=int, default=None, help="cycles per repeat")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args()
    cycles = args.cycles if args.cycles is not None else 1
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 3)

    run_direct(1)  # warm-up: imports, spec cache
    rates: dict[str, list[float]] = {"tcp": [], "direct": []}
    per_sample: dict[str, list[float]] = {"tcp": [], "direct": []}
    sim_hours = 0.0
    samples = 0
    for _ in range(repeats):
        for kind, fn in (("tcp", run_tcp), ("direct", run_direct)):
            wall, sim_s, samples = fn(cycles)
            sim_hours = sim_s / 3600.0
            rates[kind].append(sim_hours / wall)
            per_sample[kind].append(wall / samples)
            print(f"{kind:6s} {sim_hours / wall:10.3f} simulated h per wall s "
                  f"({samples} samples, {sim_hours:.2f} h in {wall:.2f} s, "
                  f"{wall / samples * 1e6:.1f} us/sample)", flush=True)
    ours = statistics.median(rates["tcp"])
    base = statistics.median(rates["direct"])
    result(
        "sim_speed_1c_cycle",
        ours,
        "simulated h/wall s",
        base,
        sample_period_s=SAMPLE_S,
        cycles=cycles,
        samples_per_cycle=samples // cycles,
        simulated_h_per_repeat=round(sim_hours, 3),
        us_per_sample=round(statistics.median(per_sample["tcp"]) * 1e6, 1),
        baseline_us_per_sample=round(statistics.median(per_sample["direct"]) * 1e6, 1),
        repeats=repeats,
        cell=SPEC,
        path="Keithley2450 driver -> pyvisa-py SOCKET -> SimServer -> Keithley2450Sim",
        baseline_note="same cycle, CellBank.step + voltage_v in-process",
    )


if __name__ == "__main__":
    main()
