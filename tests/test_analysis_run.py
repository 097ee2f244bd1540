"""labdaq.analysis on a run of a simulated cell, through the drivers and real TCP sockets
with the engine in this process (the rig of tests/test_engine_templates.py).

The reference integration (``reference_cycles``) is written here in plain Python, one
sample at a time, and imports nothing from labdaq.analysis: the interval between two
samples is a trapezoid that counts for the cycle of its end sample, as charge or
discharge by its sign. Every cycle metric must agree with it within 0.1 %; they must also
agree with the engine's own online totals (the cycles table).

The cell starts half charged (SimLab's default), so the first cycle's coulombic
efficiency is near 1.5 and must come flagged as not comparable; the next cycles start
from the empty state the previous discharge left and are valid.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import create_engine

from labdaq.analysis import capacity_retention, pulse_resistances, summarise_cycles
from labdaq.analysis.load import read_samples
from labdaq.sims.cell import load_cell_spec
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from tests.engine_rig import (
    LockstepClock,
    assert_contiguous,
    nmc_18650_spec,
    rows_of,
    samples,
    start_paced_rig,
)

PROTOCOL = {
    "schema_version": 1,
    "name": "analysis_check",
    "steps": [{
        "step": "loop", "count": 3, "tag": "cycle",
        "body": [
            {"step": "cc", "rate_c": 0.5, "tag": "charge",
             "until": {"voltage_v": "charge_cutoff"}},
            {"step": "rest", "until": {"duration_s": 600}},
            {"step": "pulse", "rate_c": -1.0, "pulse_duration_s": 10, "rest_duration_s": 40,
             "count": 2, "tag": "dcir"},
            {"step": "cc", "rate_c": -0.5, "tag": "discharge",
             "until": {"voltage_v": "discharge_cutoff"}},
            {"step": "rest", "until": {"duration_s": 600}},
        ],
    }],
}


def reference_cycles(t: list[float], v: list[float], i: list[float], cyc: list[int],
                     ) -> dict[int, dict[str, float]]:
    """Per-cycle totals by a plain loop over the samples."""
    out: dict[int, dict[str, float]] = {}
    for j in range(1, len(t)):
        dt = t[j] - t[j - 1]
        q = 0.5 * (i[j] + i[j - 1]) * dt / 3600.0
        e = abs(0.5 * (i[j] * v[j] + i[j - 1] * v[j - 1]) * dt / 3600.0)
        vm = 0.5 * (v[j] + v[j - 1]) * dt
        c = out.setdefault(cyc[j], dict.fromkeys(
            ("qc", "qd", "ec", "ed", "vc", "vd", "sc", "sd"), 0.0))
        if q > 0:
            c["qc"] += q
            c["ec"] += e
            c["vc"] += vm
            c["sc"] += dt
        elif q < 0:
            c["qd"] -= q
            c["ed"] += e
            c["vd"] += vm
            c["sd"] += dt
    return {
        k: {
            "charge_capacity_ah": c["qc"], "discharge_capacity_ah": c["qd"],
            "charge_energy_wh": c["ec"], "discharge_energy_wh": c["ed"],
            "coulombic_efficiency": c["qd"] / c["qc"], "energy_efficiency": c["ed"] / c["ec"],
            "mean_charge_voltage_v": c["vc"] / c["sc"],
            "mean_discharge_voltage_v": c["vd"] / c["sd"],
        }
        for k, c in out.items()
    }


async def simulated_run(url: str, tmp: Path) -> dict[str, Any]:
    lab = SimLab(smus=1, cell_spec=nmc_18650_spec(tmp), seed=5, clock=LockstepClock())
    rig = await start_paced_rig(url, lab, 1000.0)
    try:
        run_id = await rig.start_run("smu1/1", protocol_document=PROTOCOL)
        run = await rig.wait_end(run_id, timeout_s=120)
        assert run.state == "completed", run.end_reason
        s = await samples(rig.maker, run_id)
        cycles = await rows_of(rig.maker, m.Cycle, run_id, m.Cycle.cycle_index)
        steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    finally:
        await rig.stop()
    return {"s": s, "cycles": cycles, "steps": steps, "run_id": run_id}


async def test_cycle_metrics_of_a_simulated_run(sqlite_url: str, tmp_path: Path) -> None:
    r = await simulated_run(sqlite_url, tmp_path)
    assert_contiguous(r["s"]["seq"])
    # The analysis input, read by labdaq.analysis.load: the rig's own reading, exactly.
    engine = create_engine(sqlite_url)
    with engine.connect() as conn:
        s = read_samples(conn, r["run_id"])
    engine.dispose()
    # The columns analysis reads (the rig reads the stored row whole).
    assert set(s) <= set(r["s"]) and "temperature_c" in s
    for key, col in s.items():
        np.testing.assert_array_equal(col, r["s"][key], err_msg=key)
    spec = load_cell_spec(str(nmc_18650_spec(tmp_path)))
    summary = summarise_cycles(
        s["t_s"], s["voltage_v"], s["current_a"], s["cycle_index"], flags=s["flags"],
        charge_cutoff_v=spec.charge_cutoff_v, discharge_cutoff_v=spec.discharge_cutoff_v,
    )
    ref = reference_cycles(s["t_s"].tolist(), s["voltage_v"].tolist(),
                           s["current_a"].tolist(), s["cycle_index"].tolist())
    assert summary.cycle_index.tolist() == sorted(ref) == [1, 2, 3]
    engine = {c.cycle_index: c for c in r["cycles"]}
    for k, row in enumerate(summary.rows()):
        want = ref[row["cycle_index"]]
        for key, value in want.items():
            assert row[key] == pytest.approx(value, rel=1e-3), (row["cycle_index"], key)
            # The engine's online totals, from the same readings.
            got = getattr(engine[row["cycle_index"]], key)
            assert row[key] == pytest.approx(got, rel=1e-3), (row["cycle_index"], key, got)
        assert summary.n_samples[k] > 0

    # Cycle 1 starts half charged: CE far above 1, flagged; 2 and 3 start empty and are
    # valid, with a CE near 1.
    first = summary.rows()[0]
    assert first["start_state"] == "unknown" and not first["efficiency_valid"]
    assert first["coulombic_efficiency"] > 1.3
    assert "undefined state" in first["note"]
    assert first["full_discharge"] and not first["full_charge"]
    for row in summary.rows()[1:]:
        assert row["start_state"] == "empty" and row["end_state"] == "empty", row
        assert row["efficiency_valid"] and row["complete"] and row["rested_before"], row
        assert row["full_charge"] and row["full_discharge"], row
        # "Empty" is the discharge cut-off under load, which moves with the cell's
        # temperature and polarisation: a valid cycle's CE is near 1, not bounded by it.
        assert 0.97 < row["coulombic_efficiency"] < 1.01, row
        assert 0.8 < row["energy_efficiency"] < row["coulombic_efficiency"], row
        assert row["mean_discharge_voltage_v"] < row["mean_charge_voltage_v"], row

    # Retention uses every full discharge, including the first cycle's.
    ret = capacity_retention(summary)
    assert ret.cycle_index.tolist() == [1, 2, 3]
    assert ret.retention[0] == 1.0 and np.all(ret.retention > 0.95)
    assert math.isfinite(ret.fade_pct_per_cycle) and ret.cycles_to_80pct is None

    # DC resistance at the pulse edges: the engine's per-step value, recomputed from the
    # stored readings, and within the cell's R0 .. R0 + R1 (+30 % for SOC, temperature).
    pulses = [st for st in r["steps"] if st.kind == "pulse"]
    assert len(pulses) == 3
    res = pulse_resistances(s["t_s"], s["voltage_v"], s["current_a"], s["step_index"],
                            steps=[st.step_index for st in pulses])
    for st in pulses:
        sel = (res.t_s >= st.start_t_s) & (res.t_s <= st.end_t_s)
        assert sel.sum() == 4  # 2 pulses: on and off edges
        assert res.resistance_ohm[sel].mean() == pytest.approx(st.dcir_ohm, rel=1e-9)
        assert (0.9 * spec.resistance.r0_ohm <= res.resistance_ohm[sel].min()
                <= res.resistance_ohm[sel].max()
                <= 1.3 * (spec.resistance.r0_ohm + spec.resistance.r1_ohm))
        # After 10 s the slower polarisation has added to the edge value.
        on = sel & (res.current_after_a < 0)
        assert np.all(res.resistance_after_ohm[on] > res.resistance_ohm[on])
