"""Cycle summary of 10 M samples: labdaq.analysis.summarise_cycles against a bare numpy
``reduceat`` pass over the same in-memory arrays (and cellpy's summary and a pandas
groupby when those are installed), plus the database read, timed separately.

One job: say what labdaq's per-cycle analysis costs over the least numpy can do. Data:
1,000 cycles × 10,000 samples at 1 s (4,000 s CC charge at +1 A, 1,000 s rest, 4,000 s
CC discharge at -0.98 A, 1,000 s rest — the research anchor's shape), the voltage from a
linear OCV plus a series resistance, so the cut-offs are reached and the state logic has
work to do. Both labdaq and the baseline compute every metric from the arrays: charge and
discharge Ah and Wh, coulombic and energy efficiency, time-weighted mean charge and
discharge voltage, min and max voltage per cycle; labdaq adds each cycle's start/end
state, rest, completeness and validity, and the capacity retention and fade. Results are
asserted equal before any timing counts.

Repeats alternate between the methods so machine noise hits them alike; medians are
reported. The database read (SQLite, labdaq.analysis.load.read_samples) is measured on
``DB_ROWS`` rows (setup insert not timed) and reported as rows/s. Last lines of stdout:
one JSON object per figure (benchmarks/_common.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from _common import result  # noqa: E402

from labdaq.analysis import capacity_retention, summarise_cycles  # noqa: E402

V_LO, V_HI, R_OHM = 3.0, 4.2, 0.03


def make_data(cycles: int, per_cycle: int = 10_000) -> dict[str, np.ndarray]:
    """The research anchor's profile, ``cycles`` times (dt = 1 s)."""
    quarter = per_cycle // 10
    one = np.concatenate([np.full(4 * quarter, 1.0), np.zeros(quarter),
                          np.full(4 * quarter, -0.98), np.zeros(quarter)])
    i = np.tile(one, cycles)
    n = i.size
    t = np.arange(n, dtype=np.float64)
    q = np.cumsum(i) / 3600.0
    cap = 4 * quarter / 3600.0  # the charge of one cycle: 0 -> 1 over the charge
    soc = np.clip(q - np.floor_divide(np.arange(n), per_cycle) * (4 * quarter * 0.02 / 3600),
                  0.0, None) / cap
    v = V_LO + (V_HI - V_LO) * np.clip(soc, 0.0, 1.0) + i * R_OHM
    cyc = np.repeat(np.arange(1, cycles + 1, dtype=np.int64), per_cycle)
    return {"t_s": t, "voltage_v": v, "current_a": i, "cycle_index": cyc}


def bare_numpy(d: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every numeric metric, the least numpy can do it in: one reduceat per quantity."""
    t, v, i, cyc = d["t_s"], d["voltage_v"], d["current_a"], d["cycle_index"]
    dt = np.diff(t)
    dq = 0.5 * (i[1:] + i[:-1]) * dt / 3600.0
    p = i * v
    de = np.abs(0.5 * (p[1:] + p[:-1]) * dt) / 3600.0
    vdt = 0.5 * (v[1:] + v[:-1]) * dt
    lab = cyc[1:]
    starts = np.concatenate(([0], np.flatnonzero(np.diff(lab)) + 1))
    c, dsc = dq > 0, dq < 0
    qc = np.add.reduceat(np.where(c, dq, 0.0), starts)
    qd = -np.add.reduceat(np.where(dsc, dq, 0.0), starts)
    ec = np.add.reduceat(np.where(c, de, 0.0), starts)
    ed = np.add.reduceat(np.where(dsc, de, 0.0), starts)
    vc = np.add.reduceat(np.where(c, vdt, 0.0), starts) / np.add.reduceat(
        np.where(c, dt, 0.0), starts)
    vd = np.add.reduceat(np.where(dsc, vdt, 0.0), starts) / np.add.reduceat(
        np.where(dsc, dt, 0.0), starts)
    return {
        "cycle_index": lab[starts], "charge_capacity_ah": qc, "discharge_capacity_ah": qd,
        "charge_energy_wh": ec, "discharge_energy_wh": ed,
        "coulombic_efficiency": qd / qc, "energy_efficiency": ed / ec,
        "mean_charge_voltage_v": vc, "mean_discharge_voltage_v": vd,
        "max_voltage_v": np.maximum.reduceat(v[1:], starts),
        "min_voltage_v": np.minimum.reduceat(v[1:], starts),
    }


def labdaq_summary(d: dict[str, np.ndarray]) -> Any:
    s = summarise_cycles(d["t_s"], d["voltage_v"], d["current_a"], d["cycle_index"],
                         charge_cutoff_v=V_HI, discharge_cutoff_v=V_LO)
    capacity_retention(s)
    return s


def pandas_groupby(d: dict[str, np.ndarray]) -> Any:
    import pandas as pd

    df = pd.DataFrame(d)
    dt = df["t_s"].diff().fillna(0.0)
    i, v = df["current_a"], df["voltage_v"]
    dq = 0.5 * (i + i.shift(fill_value=0.0)) * dt / 3600.0
    p = i * v
    de = (0.5 * (p + p.shift(fill_value=0.0)) * dt).abs() / 3600.0
    df = df.assign(qc=dq.where(dq > 0, 0.0), qd=-dq.where(dq < 0, 0.0),
                   ec=de.where(dq > 0, 0.0), ed=de.where(dq < 0, 0.0))
    g = df.groupby("cycle_index").agg(qc=("qc", "sum"), qd=("qd", "sum"), ec=("ec", "sum"),
                                      ed=("ed", "sum"), vmax=("voltage_v", "max"),
                                      vmin=("voltage_v", "min"))
    g["ce"] = g["qd"] / g["qc"]
    g["ee"] = g["ed"] / g["ec"]
    return g


def cellpy_summary(d: dict[str, np.ndarray]) -> Any:
    """cellpy's step table and summary on the same data (recipe: research perf-anchors
    §4c), built without a file loader."""
    import pandas as pd
    from cellpy import cellreader
    from cellpy.readers import core
    from cellpy.readers.core import Data

    t, v, i, cyc = d["t_s"], d["voltage_v"], d["current_a"], d["cycle_index"]
    n = t.size
    per = np.searchsorted(cyc, cyc, side="left")
    step = np.where(i > 0, 1, np.where(i < 0, 3, 2)) + 0
    q = np.concatenate(([0.0], 0.5 * (i[1:] + i[:-1]) * np.diff(t) / 3600.0))
    qc = np.where(q > 0, q, 0.0)
    qd = np.where(q < 0, -q, 0.0)
    # Cumulative within the cycle, as cyclers write them.
    cum_c = np.cumsum(qc)
    cum_d = np.cumsum(qd)
    cum_c -= cum_c[per] - qc[per]
    cum_d -= cum_d[per] - qd[per]
    raw = pd.DataFrame({
        "data_point": np.arange(1, n + 1), "test_time": t, "step_time": t - t[per],
        "date_time": pd.to_datetime(t, unit="s"), "cycle_index": cyc, "step_index": step,
        "sub_step_index": 0, "sub_step_time": 0.0, "current": i, "voltage": v,
        "charge_capacity": cum_c, "discharge_capacity": cum_d, "charge_energy": 0.0,
        "discharge_energy": 0.0, "internal_resistance": 0.0,
    })
    c = cellreader.CellpyCell.vacant()
    data = Data()
    data.raw = raw
    data.raw_units = core.get_default_raw_units()
    c.data = data
    c.make_step_table()
    c.make_summary(find_ir=False, find_end_voltage=True)
    return c.data.summary


def check_equal(mine: Any, bare: dict[str, np.ndarray]) -> None:
    for key, want in bare.items():
        got = np.asarray(getattr(mine, key), dtype=np.float64)
        if not np.allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True):
            raise AssertionError(f"labdaq and bare numpy disagree on {key}")


def time_db_read(rows: int) -> float:
    """rows/s of read_samples from a SQLite file (insert not timed)."""
    import sqlite3

    from sqlalchemy import create_engine

    from labdaq.analysis.load import read_samples
    from labdaq.storage.db import upgrade

    d = make_data(max(rows // 10_000, 1))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        upgrade(f"sqlite:///{path}")
        con = sqlite3.connect(path)
        con.execute("PRAGMA foreign_keys=OFF")
        con.executemany(
            "INSERT INTO samples (run_id, seq, t_s, ts_utc, step_index, cycle_index, "
            "voltage_v, current_a, temperature_c, step_capacity_ah, step_energy_wh, flags) "
            "VALUES (1, ?, ?, ?, 0, ?, ?, ?, 25.0, 0.0, 0.0, 0)",
            zip(range(1, d["t_s"].size + 1), d["t_s"].tolist(), d["t_s"].tolist(),
                d["cycle_index"].tolist(), d["voltage_v"].tolist(), d["current_a"].tolist(),
                strict=True),
        )
        con.commit()
        con.close()
        engine = create_engine(f"sqlite:///{path}")
        with engine.connect() as conn:
            t0 = time.perf_counter()
            got = read_samples(conn, 1)
            elapsed = time.perf_counter() - t0
        engine.dispose()
    assert got["t_s"].size == d["t_s"].size
    return d["t_s"].size / elapsed


CELLPY_CYCLES = 100


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="1 M samples, fewer repeats")
    ap.add_argument("--no-cellpy", action="store_true")
    args = ap.parse_args()
    cycles = 100 if args.quick else 1000
    repeats = 3
    db_rows = 200_000 if args.quick else 300_000
    d = make_data(cycles)
    n = d["t_s"].size
    print(f"{n:,} samples, {cycles} cycles", file=sys.stderr)

    check_equal(labdaq_summary(d), bare_numpy(d))
    methods: dict[str, Any] = {"labdaq": labdaq_summary, "numpy": bare_numpy}
    try:
        import pandas  # noqa: F401

        methods["pandas"] = pandas_groupby
    except ImportError:
        print("pandas not installed: no groupby figure", file=sys.stderr)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(repeats):
        for name, fn in methods.items():
            t0 = time.perf_counter()
            fn(d)
            times[name].append(time.perf_counter() - t0)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items()),
              file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}

    cellpy_s = None
    ours_small_s = None
    if not args.no_cellpy:
        # cellpy on 100 cycles (1 M samples), labdaq on the same: cellpy took 73 s for
        # the 10 M samples, most of make bench's time over its budget.
        small = make_data(min(cycles, CELLPY_CYCLES))
        try:
            t0 = time.perf_counter()
            theirs = cellpy_summary(small)
            cellpy_s = time.perf_counter() - t0
            ours_small = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                labdaq_summary(small)
                ours_small.append(time.perf_counter() - t0)
            ours_small_s = statistics.median(ours_small)
            print(f"cellpy (one run, {small['t_s'].size:,} samples): {cellpy_s:.2f} s; "
                  f"labdaq on the same: {ours_small_s:.3f} s", file=sys.stderr)
            # Same data, same answer: cellpy's per-cycle capacities against ours.
            mine = labdaq_summary(small)
            for col, ours in (("charge_capacity", mine.charge_capacity_ah),
                              ("discharge_capacity", mine.discharge_capacity_ah)):
                dev = np.max(np.abs(theirs[col].to_numpy()[: ours.size] / ours - 1))
                print(f"cellpy {col} vs labdaq: max deviation {dev:.2e}", file=sys.stderr)
                assert dev < 5e-3, (col, dev)
        except ImportError:
            print("cellpy not installed: no cellpy figure", file=sys.stderr)
        except Exception as exc:  # a cellpy API change must not hide the other figures
            print(f"cellpy failed: {type(exc).__name__}: {exc}", file=sys.stderr)

    db_rate = time_db_read(db_rows)
    print(f"database read: {db_rate:,.0f} rows/s ({db_rows:,} rows, SQLite)", file=sys.stderr)

    note = (f"{n / 1e6:g} M samples; labdaq {med['labdaq']:.3f} s, bare numpy "
            f"{med['numpy']:.3f} s" + (f", pandas {med['pandas']:.3f} s" if "pandas" in med
                                        else "")
            + (f"; on {CELLPY_CYCLES} cycles labdaq {ours_small_s:.3f} s, cellpy "
               f"{cellpy_s:.1f} s" if cellpy_s and ours_small_s else ", cellpy not measured")
            + f"; DB read {db_rate / 1e6:.2f} M rows/s")
    result("cycle_summary_vs_numpy", med["labdaq"], "s", med["numpy"], note=note,
           headline=f"cycle summary of {n / 1e6:g} M samples: {med['labdaq']:.2f} s = "
                    f"{med['labdaq'] / med['numpy']:.2f}x bare numpy reduceat"
                    + (f"; {cellpy_s / ours_small_s:.0f}x faster than cellpy on "
                       f"{CELLPY_CYCLES} cycles" if cellpy_s and ours_small_s else ""))
    if cellpy_s and ours_small_s:
        result("cycle_summary_vs_cellpy", ours_small_s, "s", cellpy_s,
               note=f"{CELLPY_CYCLES} cycles ({small['t_s'].size / 1e6:g} M samples), the "
                    "same data for both")
    result("cycle_summary_db_read", db_rate, "rows/s", None,
           note=f"labdaq.analysis.load.read_samples, {db_rows:,} rows from SQLite")


if __name__ == "__main__":
    main()
