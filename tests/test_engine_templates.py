"""Every shipped protocol template runs to completion on a simulated cell, through the
drivers and real TCP sockets, with the engine in this process on the lab's clock.

What each run is checked for (``check_run``):

* it completes, and its samples are numbered 1..N without a gap;
* every step ended on the condition its record names, within one reading's worth of
  change: a voltage end within the voltage change of the last interval (plus the clamp
  overshoot, see labdaq.engine.channel.CLAMP_OVERSHOOT_V), a capacity end within
  |I|·Δt of the target, a duration end at the first reading at or past the deadline (at
  most one interval after it), a current end below its threshold;
* the step's recorded end crossing (steps.end_crossing_t_s) lies between the two
  readings around the end, where the line between them meets the threshold;
* the cycles table agrees within 0.1 % with a numpy integration of the stored samples.
  Why it can: the engine integrates between its readings; it stores the reading that
  ends a phase and one right after the new set point (flag EDGE), and here every control
  tick (sample period = control period = 1 s, shorter than a tick at these speeds), so
  the stored samples are the points the engine integrated between. Each interval counts
  for the cycle of its end sample and as charge or discharge by the sign of its
  trapezoid, as in the engine.

Each template runs in a lab of its own (a Keithley 2460 SMU with the cell, a chamber the
cell sits in, an impedance meter clipped to it), with its own node and database; the
labs run concurrently in four worker processes. Pacing (tests/engine_rig.py): the lab's
clock is a LockstepClock, which lets simulated time run at up to 10^6× but never more
than a gap past the engine's last reading; a SpeedGovernor sets that gap from what the
run does — up to 120 s in the middle of a CC or CV step, less as a deadline, an end
voltage or capacity, or an empty cell nears, 1 s in pulses, a tenth of what is left in
a rest. So the engine always sees the cell every few simulated seconds where it matters,
however busy the machine (a stall pauses the simulated world instead of letting a cell
run through its cut-off unseen), and the 30-day storage of calendar_retention takes a
few seconds.

The cell: every template must resolve for it and the 2460 (7.35 A) must drive its 3C
discharge, so it is an 18650-size NMC (2.4 Ah, 3C = 7.2 A) derived from the shipped
nmc811 spec. cycle_life_1c runs on a copy that ages 100× faster, so that "until below
80 % of the first cycle" happens within ~8 cycles. Every other template runs as shipped.
"""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labdaq.engine.channel import CLAMP_OVERSHOOT_V
from labdaq.protocol import list_templates
from labdaq.sims.cell import load_cell_spec
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from tests.engine_rig import (
    LockstepClock,
    SpeedGovernor,
    assert_contiguous,
    nmc_18650_spec,
    plan_of,
    rows_of,
    samples,
    start_rig,
)

REPO = Path(__file__).resolve().parents[1]


def numpy_cycles(s: dict[str, np.ndarray]) -> dict[int, dict[str, float]]:
    """Charge/discharge capacity and energy per cycle from the stored samples alone."""
    t, i, v, cyc = s["t_s"], s["current_a"], s["voltage_v"], s["cycle_index"]
    dt = np.diff(t)
    dq = np.array([np.trapezoid(i[j : j + 2], t[j : j + 2]) for j in range(len(t) - 1)]) / 3600
    de = np.abs(0.5 * (i[1:] * v[1:] + i[:-1] * v[:-1]) * dt / 3600)
    # Cross-check the per-interval form against one np.trapezoid over the whole run.
    assert dq.sum() == pytest.approx(np.trapezoid(i, t) / 3600, rel=1e-9, abs=1e-12)
    end_cycle = cyc[1:]
    out: dict[int, dict[str, float]] = {}
    for c in np.unique(end_cycle).tolist():
        sel = end_cycle == c
        q, e = dq[sel], de[sel]
        out[c] = {
            "charge_capacity_ah": float(q[q > 0].sum()),
            "discharge_capacity_ah": float(-q[q < 0].sum()),
            "charge_energy_wh": float(e[q > 0].sum()),
            "discharge_energy_wh": float(e[q < 0].sum()),
        }
    return out


def check_cycles(cycles: list[m.Cycle], s: dict[str, np.ndarray]) -> None:
    ref = numpy_cycles(s)
    assert cycles, "no cycle summary"
    for c in cycles:
        mine = ref.get(c.cycle_index)
        assert mine is not None, f"cycle {c.cycle_index} has no samples"
        for key, want in mine.items():
            got = getattr(c, key)
            # 0.1 %, or 1 µAh / µWh for quantities that are practically zero.
            assert got == pytest.approx(want, rel=1e-3, abs=1e-6), (c.cycle_index, key, got, want)


def check_steps(run: m.Run, steps: list[m.Step], s: dict[str, np.ndarray]) -> None:
    plan = plan_of(run).program
    t, v, i, cap, idx = s["t_s"], s["voltage_v"], s["current_a"], s["step_capacity_ah"], s[
        "step_index"
    ]
    for st in steps:
        entry = plan[st.step_index]
        until = getattr(entry, "until", None)
        # The reading that ended the step: its first stored sample at/after end_t_s.
        k_all = np.flatnonzero((idx == st.step_index) & (t >= st.end_t_s - 1e-6))
        assert k_all.size, f"step {st.step_number}: no sample at its end"
        k = int(k_all[0])
        dt_last = t[k] - t[k - 1]
        dv_last = abs(v[k] - v[k - 1])
        what = f"run {run.id} step {st.step_number} ({st.kind}, {st.end_reason})"
        reason = st.end_reason
        if reason == "voltage_below":
            thr = until.voltage_below_v
            assert v[k] <= thr + 1e-9, what
            assert thr - v[k] <= dv_last + CLAMP_OVERSHOOT_V + 1e-3, (what, v[k], thr, dv_last)
        elif reason == "voltage_above":
            thr = until.voltage_above_v
            assert v[k] >= thr - 1e-9, what
            assert v[k] - thr <= dv_last + CLAMP_OVERSHOOT_V + 1e-3, (what, v[k], thr, dv_last)
        elif reason == "capacity":
            thr = until.capacity_ah
            assert cap[k] >= thr - 1e-12, what
            step_i = max(abs(i[k]), abs(i[k - 1]))
            assert cap[k] - thr <= step_i * dt_last / 3600 + 1e-9, (what, cap[k], thr)
        elif reason == "duration":
            if st.kind == "pulse":
                continue  # ended by its pulse train; the phases have their own deadlines
            # It ends at the first reading at or past its deadline.
            deadline = st.start_t_s + until.duration_s
            assert st.end_t_s == t[k], what
            assert 0 <= t[k] - deadline <= dt_last + 1e-6, (what, t[k], deadline, dt_last)
        elif reason == "current_below":
            assert abs(i[k]) <= until.current_below_a + 1e-9, (what, i[k])
        elif reason == "dvdt_below":
            assert until.dvdt_below_v_per_s is not None, what
        elif reason == "done":
            assert st.kind in ("eis", "set_temperature"), what
        else:
            raise AssertionError(f"{what}: unexpected end reason")
        check_crossing(st, until, t, v, i, cap, k, what)


def check_crossing(
    st: m.Step, until: Any, t: np.ndarray, v: np.ndarray, i: np.ndarray, cap: np.ndarray,
    k: int, what: str,
) -> None:
    """The recorded crossing lies between the two readings around the end, where the
    straight line between them meets the threshold (a deadline: exactly there).

    Here every reading is stored, so samples k-1 and k are the readings the engine
    interpolated between."""
    tc = st.end_crossing_t_s
    assert tc is not None, what
    assert t[k - 1] - 1e-6 <= tc <= t[k] + 1e-6, (what, t[k - 1], tc, t[k])
    reason = st.end_reason
    series = {
        "voltage_below": (v, getattr(until, "voltage_below_v", None)),
        "voltage_above": (v, getattr(until, "voltage_above_v", None)),
        "current_below": (np.abs(i), getattr(until, "current_below_a", None)),
        "capacity": (cap, getattr(until, "capacity_ah", None)),
    }
    if reason in series:
        y, thr = series[reason]
        if thr is None or st.kind == "cccv" and reason != "current_below":
            return
        y0, y1 = float(y[k - 1]), float(y[k])
        if (y0 - thr) * (y1 - thr) < 0:  # the previous reading was on the other side
            at = float(np.interp(tc, [t[k - 1], t[k]], [y0, y1]))
            assert at == pytest.approx(thr, abs=1e-9 + 1e-9 * abs(thr)), (what, tc, at, thr)
            assert tc < t[k], what
    elif reason == "duration" and st.kind != "pulse":
        assert tc == pytest.approx(st.start_t_s + until.duration_s, abs=1e-6), (what, tc)
    else:
        assert tc == st.end_t_s, what


async def check_run(rig: Any, run_id: int) -> dict[str, Any]:
    run = await rig.wait_end(run_id, timeout_s=1)
    s = await samples(rig.maker, run_id)
    if run.state != "completed":
        steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
        last = [
            (int(s["seq"][j]), round(float(s["t_s"][j]), 1), int(s["step_index"][j]),
             float(s["voltage_v"][j]), float(s["current_a"][j]), int(s["flags"][j]))
            for j in range(max(0, len(s["seq"]) - 8), len(s["seq"]))
        ]
        where = [(st.step_index, st.kind, st.end_reason) for st in steps[-3:]]
        raise AssertionError(f"run {run.state}: {run.end_reason}; last steps {where}; "
                             f"last samples (seq, t, step, V, A, flags) {last}")
    assert_contiguous(s["seq"])
    assert s["seq"][-1] == run.last_seq
    steps = await rows_of(rig.maker, m.Step, run_id, m.Step.step_number)
    cycles = await rows_of(rig.maker, m.Cycle, run_id, m.Cycle.cycle_index)
    check_steps(run, steps, s)
    check_cycles(cycles, s)
    # Every step of the plan that measures was executed at least once.
    plan = plan_of(run).program
    executed = {st.step_index for st in steps}
    measuring = {p.index for p in plan if p.step not in ("loop_start", "loop_end")}
    assert executed == measuring, (run.id, sorted(measuring - executed))
    return {"run": run, "samples": s, "steps": steps, "cycles": cycles}


async def run_template(name: str, url: str, spec: str, seed: int) -> dict[str, Any]:
    """One lab (an SMU with the cell, a chamber, an impedance meter on the cell), one
    node and one database per template, so each lab's speed follows its own run.
    Returns what the final assertions need, as JSON-able data."""
    lab = SimLab(
        smus=1, cell_spec=spec, impedance=1, chamber=True, seed=seed, clock=LockstepClock()
    )
    rig = await start_rig(url, lab, 1000.0)
    gov = SpeedGovernor(lab, rig.node)
    rig.extra.append(asyncio.create_task(gov.run()))
    t0 = time.monotonic()
    try:
        run_id = await rig.start_run("smu1/1", template=name)
        await rig.wait_end(run_id, timeout_s=500)  # a hang guard
        out = await check_run(rig, run_id)
        spectra = await rows_of(rig.maker, m.EisSpectrum, run_id, m.EisSpectrum.id)
        ticks = sum(g.ticks for g in rig.node.groups.values())
        wall_s = time.monotonic() - t0
    finally:
        await rig.stop()
    plan = plan_of(out["run"]).program
    return {
        "steps": [
            {
                "kind": st.kind,
                "tag": plan[st.step_index].tag,
                "duration_s": st.end_t_s - st.start_t_s,
                "end_reason": st.end_reason,
                "capacity_ah": st.capacity_ah,
                "energy_wh": st.energy_wh,
                "dcir_ohm": st.dcir_ohm,
            }
            for st in out["steps"]
        ],
        "discharge_ah": [c.discharge_capacity_ah for c in out["cycles"]],
        "spectra": [
            {"f": sp.frequency_hz, "zr": sp.z_real_ohm, "v": sp.dc_voltage_v} for sp in spectra
        ],
        "samples": int(out["run"].last_seq),
        "ticks": ticks,
        "wall_s": wall_s,
        "max_speed": max(gov.history),
        "min_speed": min(gov.history),
    }


async def run_templates(names: list[str], tmp: Path, db: Path) -> dict[str, Any]:
    """Run templates concurrently; a failure is reported as its message."""
    spec = nmc_18650_spec(tmp)
    # Ages 100x faster than that cell: 80 % of the first cycle's capacity after ~7
    # equivalent full cycles, so cycle_life_1c's "until" loop ends within seconds.
    fast_ageing = nmc_18650_spec(
        tmp, name="nmc_18650_fast_ageing", **{"ageing.cycle_capacity_fade_per_efc": 0.03}
    )
    jobs = []
    for name in names:
        path = tmp / f"{name}.db"
        shutil.copy(db, path)  # already migrated
        cell = fast_ageing if name == "cycle_life_1c" else spec
        jobs.append(run_template(name, f"sqlite:///{path}", cell, seed=len(name)))
    done = await asyncio.gather(*jobs, return_exceptions=True)
    return {
        n: (f"{type(d).__name__}: {d}" if isinstance(d, BaseException) else d)
        for n, d in zip(names, done, strict=True)
    }


# Four worker processes with two labs each, a long template with a short one: the OS
# shares the two cores between them in short slices, where more labs sharing one
# interpreter would stall each other for up to ~0.3 s (the GIL, a garbage collection, the
# impedance meter's fit) — long enough at these speeds to carry a cell through its
# cut-off — and one process per template would spend ~14 s of CPU on imports alone.
SHARES = [
    ["calendar_retention", "capacity_check_c3"],
    ["formation", "eis_soc"],
    ["rate_capability", "basic_cycle"],
    ["cycle_life_1c", "hppc_dcir"],
]


# Every template at once: 66 s under a load average of 20 here, so more than the
# default per-test hang guard.
@pytest.mark.slow  # make test-slow: keeps make test within its budget
@pytest.mark.timeout(600)
async def test_every_template_completes(sqlite_url: str, tmp_path: Path) -> None:
    # Templates named for a standard's clause (seeds/benchmarks catalogue) are checked in
    # tests/test_benchmark_catalogue.py; several are abuse tests no healthy cell runs.
    clause = ("un383_", "iec62133_", "iec62660_", "iso12405_", "lab_")
    general = [n for n in list_templates() if not n.startswith(clause)]
    assert sorted(n for share in SHARES for n in share) == general
    db = Path(sqlite_url.removeprefix("sqlite:///"))
    procs = []
    for j, names in enumerate(SHARES):
        work = tmp_path / f"worker{j}"
        work.mkdir()
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tests.test_engine_templates", str(work), str(db), *names,
                cwd=str(REPO), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            )
        )
    r: dict[str, Any] = {}
    errors = []
    # One hang guard for the workers together (they run at once), inside the test's
    # 600 s: at a load average of 34 the first worker was still running at 110 s.
    deadline = asyncio.get_running_loop().time() + 540
    for p in procs:
        left_s = max(1.0, deadline - asyncio.get_running_loop().time())
        out, err = await asyncio.wait_for(p.communicate(), left_s)
        if p.returncode != 0:
            errors.append(err.decode()[-3000:])
            continue
        r.update(json.loads(out.decode().strip().splitlines()[-1]))
    assert not errors, "\n".join(errors)
    failed = {k: v for k, v in r.items() if isinstance(v, str)}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in failed.items())
    for name, res in sorted(r.items()):
        print(
            f"{name}: {res['wall_s']:.1f} s wall, {res['ticks']} ticks, "
            f"{res['samples']} samples, speed {res['min_speed']:.0f}-{res['max_speed']:.0f}x"
        )
    cell = load_cell_spec(str(nmc_18650_spec(tmp_path)))

    # EIS: one spectrum per eis step, 10 points per decade over 4 decades, a cell-like
    # impedance (positive real part of tens of mΩ), taken at rest, SOC falling.
    spectra = r["eis_soc"]["spectra"]
    assert len(spectra) == 4
    for sp in spectra:
        f = np.asarray(sp["f"])
        assert len(f) == 41 and f[0] == pytest.approx(1000) and f[-1] == pytest.approx(0.1)
        zr = np.asarray(sp["zr"])
        assert np.all(zr > 0) and 0.5 * cell.resistance.r0_ohm < zr.min() < 0.5, zr.min()
        assert cell.discharge_cutoff_v < sp["v"] < cell.charge_cutoff_v
    ocv = [sp["v"] for sp in spectra]
    assert ocv == sorted(ocv, reverse=True), ocv  # 100 → 75 → 50 → 25 % SOC

    # HPPC: every pulse step has a DC resistance between R0 (ohmic) and R0 + R1 (the
    # reading after the current step comes ~1 s of simulated time later, so part of the
    # fast RC pair is in it), with 30 % for the model's SOC and temperature factors.
    res = cell.resistance
    pulses = [st for st in r["hppc_dcir"]["steps"] if st["kind"] == "pulse"]
    assert len(pulses) == 10
    for st in pulses:
        dcir = st["dcir_ohm"]
        assert dcir is not None
        assert 0.9 * res.r0_ohm <= dcir <= 1.3 * (res.r0_ohm + res.r1_ohm), dcir

    # Loops are cycles: basic_cycle 3; formation 1 + 2 (its loop); the rest one each.
    assert len(r["basic_cycle"]["discharge_ah"]) == 3
    assert len(r["formation"]["discharge_ah"]) == 3
    # Rate capability: five discharges to the cut-off, C/5 ... 3C. The energy they deliver
    # falls as the rate rises (more of the voltage is lost in the cell's resistance); the
    # capacity barely does on this model (its OCV drops by a volt within the last 1 % of
    # charge, so even at 3C the cut-off comes at ~99 %), so only 3C < C/5 is asserted.
    dis = [
        st
        for st in r["rate_capability"]["steps"]
        if st["kind"] == "cc" and st["end_reason"] == "voltage_below"
    ]
    assert len(dis) == 5
    energy = [st["energy_wh"] for st in dis]
    assert energy == sorted(energy, reverse=True), energy
    assert dis[-1]["capacity_ah"] < dis[0]["capacity_ah"], [st["capacity_ah"] for st in dis]

    # Cycle life: the loop ended after the first cycle below 80 % of the first one.
    dis = r["cycle_life_1c"]["discharge_ah"]
    assert dis[-1] < 0.8 * dis[0]
    assert all(c >= 0.8 * dis[0] for c in dis[:-1])
    assert 4 <= len(dis) <= 20, dis

    # Calendar: 30 days of storage at 45 °C, then less capacity than before (retained)
    # and some of it back after a full recharge (recovered).
    cal = r["calendar_retention"]
    storage = [st for st in cal["steps"] if st["tag"] == "storage"]
    assert len(storage) == 1
    assert storage[0]["duration_s"] == pytest.approx(30 * 86400)
    tagged = {st["tag"]: st["capacity_ah"] for st in cal["steps"]}
    assert tagged["retained_capacity"] < tagged["recovered_capacity"], tagged
    assert tagged["retained_capacity"] < tagged["capacity_check"], tagged


if __name__ == "__main__":
    # Worker: python -m tests.test_engine_templates WORKDIR MIGRATED_DB NAME...; prints
    # one JSON line {template: result dict or failure message}.
    work_dir, migrated, *template_names = sys.argv[1:]
    # Everything imported so far lives as long as the process: keep it out of the
    # collector, whose full collections otherwise stall this busy process for ~0.1 s.
    gc.freeze()
    results = asyncio.run(run_templates(template_names, Path(work_dir), Path(migrated)))
    print(json.dumps(results), flush=True)
