"""Cell model throughput: CellBank steps of a 64-cell bank vs a bare numpy reference.

One job: measure how many cell-steps per second ``labdaq.sims.cell.CellBank`` advances
(one ``step(current, 1 s)`` plus one ``voltage_v`` read, what a simulator does per
sample) for 64 cells, against a minimal numpy equivalent-circuit update measured in the
same run: OCV table interpolation, R0, two RC pairs with the exact exponential update
and coulomb counting, also with a terminal voltage per step. The reference has no
temperature, hysteresis, ageing, self-discharge, shorts or runaway: the ratio is what
that physics (and the model's bookkeeping) costs.

Both run alternately in repeats so machine noise hits them alike; the median rate of
each is reported. The last line of stdout is one JSON object (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import result  # noqa: E402

CELLS = 64
DT_S = 1.0
# Currents alternate sign every HALF_PERIOD steps so SOC stays inside the table (a
# cabinet cycling cells at 0.3C-1C), and differ per cell so nothing is uniform.
HALF_PERIOD = 1800


def currents(capacity_ah: float) -> tuple[np.ndarray, np.ndarray]:
    c_rate = np.linspace(0.3, 1.0, CELLS)
    i = c_rate * capacity_ah
    return -i, i  # discharge first (cells start at SOC 0.8)


def run_bank(steps: int, spec: str) -> tuple[float, float]:
    """(wall seconds, checksum) for ``steps`` CellBank steps + voltage reads."""
    from labdaq.sims.cell import CellBank

    bank = CellBank(spec, n=CELLS, soc=0.8, seed=1)
    dis, chg = currents(bank.spec.capacity_ah)
    total = 0.0
    t0 = time.perf_counter()
    for k in range(steps):
        bank.step(dis if (k // HALF_PERIOD) % 2 == 0 else chg, DT_S)
        v = bank.voltage_v
    total += float(v.sum())
    return time.perf_counter() - t0, total


def run_bare(steps: int, spec_name: str) -> tuple[float, float]:
    """The same loop with the bare equivalent-circuit update (constants hoisted)."""
    from labdaq.sims.cell import load_cell_spec

    spec = load_cell_spec(spec_name)
    res = spec.resistance
    soc_tab = np.asarray(spec.ocv.soc, dtype=float)
    ocv_tab = np.asarray(spec.ocv.charge_v, dtype=float)
    r0, r1, r2 = res.r0_ohm, res.r1_ohm, res.r2_ohm
    a1 = np.exp(-DT_S / res.tau1_s)
    a2 = np.exp(-DT_S / res.tau2_s)
    k_soc = DT_S / (3600.0 * spec.capacity_ah)
    soc = np.full(CELLS, 0.8)
    v1 = np.zeros(CELLS)
    v2 = np.zeros(CELLS)
    dis, chg = currents(spec.capacity_ah)
    t0 = time.perf_counter()
    for k in range(steps):
        i = dis if (k // HALF_PERIOD) % 2 == 0 else chg
        s1 = i * r1
        s2 = i * r2
        v1 = s1 + (v1 - s1) * a1
        v2 = s2 + (v2 - s2) * a2
        soc = soc + i * k_soc
        v = np.interp(soc, soc_tab, ocv_tab) + i * r0 + v1 + v2
    return time.perf_counter() - t0, float(v.sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="short run (< 30 s)")
    ap.add_argument("--steps", type=int, default=None, help="steps per repeat")
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--cell", default="nmc811", help="cell spec in seeds/cells")
    args = ap.parse_args()
    steps = args.steps if args.steps is not None else (10_000 if args.quick else 20_000)
    repeats = args.repeats if args.repeats is not None else 3

    run_bank(200, args.cell)  # warm-up: imports, spec cache, per-dt constants
    run_bare(200, args.cell)
    rates: dict[str, list[float]] = {"ours": [], "bare": []}
    for _ in range(repeats):
        for kind, fn in (("ours", run_bank), ("bare", run_bare)):
            wall, _ = fn(steps, args.cell)
            rates[kind].append(steps * CELLS / wall)
            print(f"{kind:5s} {steps * CELLS / wall:12.0f} cell-steps/s "
                  f"{wall / steps * 1e6:8.2f} us per {CELLS}-cell step", flush=True)
    ours = statistics.median(rates["ours"])
    bare = statistics.median(rates["bare"])
    result(
        "cell_model_steps",
        ours,
        "cell-steps/s",
        bare,
        cells=CELLS,
        dt_s=DT_S,
        us_per_bank_step=round(CELLS / ours * 1e6, 2),
        baseline_us_per_bank_step=round(CELLS / bare * 1e6, 2),
        steps=steps,
        repeats=repeats,
        cell=args.cell,
        baseline_note="bare numpy: OCV interp + R0 + 2 RC exact exp + coulomb count",
    )


if __name__ == "__main__":
    main()
