"""capacity_check_c3 and hppc_dcir as delegated runs on a simulated Neware BTS channel agree
with the same templates run directly on the simulated Keithley SMU with the same cell.

Direct side: the lab of tests/test_engine_templates.py (SMU, chamber; LockstepClock and
SpeedGovernor). Delegated side: a simulated BTS server with one channel whose cell is
built exactly as the SMU's (same spec, seed and state of charge), a chamber wired to the
channel (the templates begin with a set_temperature step, which the engine holds before
it starts the program), the node on a clock at the server's speed. Both over real TCP.

Compared: the cycle's discharge capacity, and each pulse's 10 s resistance
``|V(t0 + 10 s) − V(t0)| / |ΔI|`` from the stored samples (t0: the pulse step's start,
V interpolated between the readings of the pulse). The edge resistance at the first
reading after the current step (``steps.dcir_ohm``) is not compared: a direct run reads
right after its set point, a Neware record comes a record period (1 s) later, which with
this cell's 4 s RC pair includes part of the fast polarisation (docs/instruments/neware_bts.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from labdaq.channels import upsert_instrument
from labdaq.sims.lab import SimLab
from labdaq.sims.neware_bts import BtsServer, NewareBtsSim
from labdaq.storage import models as m
from labdaq.storage.db import session_scope, upgrade
from tests.engine_rig import (
    LockstepClock,
    assert_contiguous,
    rows_of,
    samples,
    start_paced_rig,
    start_rig,
    wait_end,
)

SEED, SOC, SPEED = 7, 0.5, 2000.0


def resistances_10s(s: dict[str, np.ndarray], steps: list[m.Step]) -> list[float]:
    """The 10 s resistance of every pulse step, from its samples (see module docstring)."""
    out = []
    for st in steps:
        if st.kind != "pulse":
            continue
        t0 = st.start_t_s
        # the previous step's last reading (a direct run's first reading of the pulse,
        # right after its set point, may carry the same time on a held lockstep clock)
        before = np.flatnonzero((s["t_s"] <= t0 + 1e-9) & (s["step_index"] != st.step_index))[-1]
        v0, i0 = s["voltage_v"][before], s["current_a"][before]
        sel = (s["t_s"] > t0 + 1e-9) & (s["t_s"] <= t0 + 11.5) & (s["step_index"] == st.step_index)
        i_on = s["current_a"][sel]
        on = np.abs(i_on - np.median(i_on[: max(1, i_on.size // 2)])) < 1e-3
        t_on, v_on = s["t_s"][sel][on], s["voltage_v"][sel][on]
        v10 = float(np.interp(t0 + 10.0, t_on, v_on))
        out.append(abs((v10 - v0) / (float(np.median(i_on[on])) - i0)))
    return out


async def results(maker: Any, run_id: int) -> dict[str, Any]:
    run = await wait_end(maker, run_id, timeout_s=1)
    assert run.state == "completed", run.end_reason
    s = await samples(maker, run_id)
    assert_contiguous(s["seq"])
    steps = await rows_of(maker, m.Step, run_id, m.Step.step_number)
    cycles = await rows_of(maker, m.Cycle, run_id, m.Cycle.cycle_index)
    return {"discharge_ah": [c.discharge_capacity_ah for c in cycles],
            "r10_ohm": resistances_10s(s, steps),
            "dcir_ohm": [st.dcir_ohm for st in steps if st.kind == "pulse"],
            "steps": [(st.step_index, st.kind) for st in steps]}


async def direct(template: str, url: str) -> tuple[dict[str, Any], dict[str, Any]]:
    lab = SimLab(smus=1, cell_spec="nmc811", chamber=True, seed=SEED, soc=SOC,
                 clock=LockstepClock())
    rig = await start_paced_rig(url, lab, 1000.0)
    try:
        (cell,) = [ch["cell"] for inst in rig.desc["instruments"] for ch in inst["channels"]]
        run_id = await rig.start_run("smu1/1", template=template)
        await rig.wait_end(run_id, timeout_s=300)
        return await results(rig.maker, run_id), cell
    finally:
        await rig.stop()


async def delegated(template: str, url: str, cell: dict[str, Any], tmp: Path
                    ) -> dict[str, Any]:
    # The SMU's cell is CellBank(nmc811, n=1, soc, seed=SEED + 1) (sims/lab.py).
    sim = NewareBtsSim(channels=1, cell="nmc811", soc=SOC, seed=SEED + 1)
    server = BtsServer(sim, speed=SPEED).start()
    lab = SimLab(smus=0, chamber=True, seed=SEED)
    rig = await start_rig(url, lab, SPEED)
    try:
        (chamber,) = [i["name"] for i in rig.desc["instruments"]
                      if i["driver"] == "espec_chamber"]
        host, port = server.address
        async with session_scope(rig.maker) as s:
            await upsert_instrument(
                s, "bts1", "neware_bts", f"TCPIP::{host}::{port}::SOCKET",
                [{"index": 1, "name": "bts1/1", "max_current_a": 20.0, "max_voltage_v": 5.0,
                  "aux": {"chamber": chamber}}],
                options={"step_dir_remote": str(tmp / "steps")})
            s.add(m.Cell(**{**cell, "serial": "NEWARE-1"}))
        async with session_scope(rig.maker) as s:
            from labdaq.runs import RunCreate, create_run

            run = await create_run(s, RunCreate(channel="bts1/1", cell_serial="NEWARE-1",
                                                sample_period_s=1.0, template=template),
                                   actor="test")
            await s.flush()
            run_id = int(run.id)
        await rig.wait_end(run_id, timeout_s=300)
        return await results(rig.maker, run_id)
    finally:
        await rig.stop()
        server.stop()


@pytest.fixture
def urls(tmp_path: Path) -> list[str]:
    """A migrated SQLite database for each side."""
    out = []
    for side in ("direct", "neware"):
        url = f"sqlite:///{tmp_path / side}.db"
        upgrade(url)
        out.append(url)
    return out


@pytest.mark.slow  # two templates, each twice: hours of simulated time
@pytest.mark.timeout(900)
@pytest.mark.parametrize("template", ["capacity_check_c3", "hppc_dcir"])
async def test_template_on_neware_agrees_with_the_smu(
        template: str, urls: list[str], tmp_path: Path) -> None:
    ref, cell = await direct(template, urls[0])
    got = await delegated(template, urls[1], cell, tmp_path)
    print(template, "direct", ref, "neware", got)
    assert got["steps"] == ref["steps"]
    assert len(got["discharge_ah"]) == len(ref["discharge_ah"]) >= 1
    np.testing.assert_allclose(got["discharge_ah"], ref["discharge_ah"], rtol=0.005)
    if template == "hppc_dcir":
        assert len(got["r10_ohm"]) == len(ref["r10_ohm"]) == 10
        np.testing.assert_allclose(got["r10_ohm"], ref["r10_ohm"], rtol=0.005)
