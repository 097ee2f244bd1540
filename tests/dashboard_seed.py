"""Finished runs and channel queues written straight into the database, for the dashboard's
flows that look at stored data and need no live acquisition (the run page's plots and
exports, dQ/dV and the Nyquist fit, the cell page, the queue page).

A seeded run is what the engine would have left: samples (a CC charge, a rest, a CC
discharge, a rest per cycle, from a smooth OCV curve with two plateaus and an ohmic drop,
capacity fading 2 % a cycle), its steps and cycles, and an impedance spectrum at the end of
every cycle computed from the equivalent circuit (labdaq.analysis.eis) with its parameters
in ``EIS_PARAMS`` and a little deterministic noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.analysis import circuit_impedance
from labdaq.runs import RunCreate, resolve_request
from labdaq.storage import models as m

EIS_PARAMS = {"r0_ohm": 0.020, "r1_ohm": 0.010, "tau1_s": 1e-3, "cpe1_n": 0.9,
              "r2_ohm": 0.025, "tau2_s": 0.1, "cpe2_n": 0.85,
              "warburg_sigma_ohm_per_sqrt_s": 0.002}
EIS_FREQS_HZ = np.geomspace(10_000.0, 0.05, 40)
SAMPLES_PER_STEP = 120
SAMPLE_PERIOD_S = 30.0


def _ocv(x: np.ndarray) -> np.ndarray:
    """Open-circuit voltage of state of charge x (0..1): two plateaus, 3.0 V to 4.2 V."""
    return (3.0 + 0.9 * x + 0.12 * np.tanh((x - 0.2) / 0.06)
            + 0.12 * np.tanh((x - 0.7) / 0.08) + 0.06 * x**4)


@dataclass
class SeededRun:
    run_id: int
    cycles: int
    samples: int
    spectra: list[int] = field(default_factory=list)


async def _plan(s: AsyncSession, channel: m.Channel, cell: m.Cell,
                cycles: int) -> tuple[int, dict[str, Any], int]:
    """The protocol row, the resolved plan and its step count a request for the simple
    cycle would store (labdaq.runs.resolve_request, as create_run does)."""
    req = RunCreate.model_validate({
        "channel": channel.name, "sample_period_s": SAMPLE_PERIOD_S,
        "protocol": {"charge_current_a": 0.5 * cell.capacity_ah,
                     "charge_voltage_v": cell.charge_cutoff_v,
                     "discharge_current_a": 0.5 * cell.capacity_ah,
                     "discharge_cutoff_v": cell.discharge_cutoff_v, "cycles": cycles}})
    protocol, resolved, _ = resolve_request(req, cell, channel)
    digest = protocol.content_hash()
    proto = await s.scalar(select(m.Protocol).where(m.Protocol.content_hash == digest))
    if proto is None:
        proto = m.Protocol(name=protocol.name, content_hash=digest,
                           document=protocol.model_dump(mode="json"))
        s.add(proto)
        await s.flush()
    return proto.id, resolved.model_dump(mode="json"), len(resolved.program)


async def seed_finished_run(s: AsyncSession, channel: m.Channel, cell: m.Cell, *,
                            cycles: int = 3, eis: bool = True, first_cycle_capacity: float = 1.0,
                            started: datetime | None = None) -> SeededRun:
    """A completed run of ``cycles`` cycles on ``cell`` with every stored row it makes."""
    cap0 = cell.capacity_ah * first_cycle_capacity
    current_a = 0.5 * cell.capacity_ah
    r_ohm = EIS_PARAMS["r0_ohm"] + EIS_PARAMS["r1_ohm"]
    started = started or datetime.now(UTC) - timedelta(days=1)
    proto_id, plan, step_count = await _plan(s, channel, cell, cycles)
    run = m.Run(channel_id=channel.id, cell_id=cell.id, protocol_id=proto_id, plan=plan,
                state=m.RunState.completed.value, sample_period_s=SAMPLE_PERIOD_S,
                created_at=started, started_at=started, step_count=step_count,
                end_reason="program complete")
    s.add(run)
    await s.flush()
    s.add(m.Event(run_id=run.id, kind="state", message="run running: claimed", ts=started,
                  data={"state": "running"}, actor="node1"))
    rows: list[dict[str, Any]] = []
    steps: list[m.Step] = []
    cyc_rows: list[m.Cycle] = []
    spectra: list[m.EisSpectrum] = []
    rng = np.random.default_rng(run.id)
    t, seq, number = 0.0, 0, 0
    n = SAMPLES_PER_STEP
    for c in range(1, cycles + 1):
        cap = cap0 * (1 - 0.02 * (c - 1))
        c_start = t
        x = np.linspace(0.0, 1.0, n)
        # (kind, current, voltage curve) of the cycle's four steps, program steps 1-4 of
        # the simple cycle's plan (0 and 5 are its loop's start and end).
        program = [("cccv", current_a, _ocv(x) + current_a * r_ohm),
                   ("rest", 0.0, np.full(n, float(_ocv(np.ones(1))[0]))),
                   ("cc", -current_a, _ocv(1.0 - x) - current_a * r_ohm),
                   ("rest", 0.0, np.full(n, float(_ocv(np.zeros(1))[0])))]
        totals: dict[str, float] = {}
        for k, (kind, i_a, volts) in enumerate(program, start=1):
            dt = cap / abs(i_a) * 3600.0 / (n - 1) if i_a else SAMPLE_PERIOD_S
            start_t = t
            q = np.arange(n) * abs(i_a) * dt / 3600.0
            e = q * volts
            # Joule heating: warms towards a plateau under current, cools back at rest.
            warm = 1.5 * (1 - np.exp(-3.0))
            temp = 25.0 + (1.5 * (1 - np.exp(-3.0 * x)) if i_a else warm * np.exp(-4.0 * x))
            temp = temp + rng.normal(0, 0.01, n)
            for j in range(n):
                seq += 1
                rows.append({
                    "run_id": run.id, "seq": seq, "t_s": t, "ts_utc": started.timestamp() + t,
                    "step_index": k, "cycle_index": c, "voltage_v": float(volts[j]),
                    "current_a": i_a, "temperature_c": float(temp[j]),
                    "step_capacity_ah": float(q[j]), "step_energy_wh": float(e[j]), "flags": 0,
                })
                t += dt
            number += 1
            steps.append(m.Step(run_id=run.id, step_number=number, step_index=k,
                                cycle_index=c, kind=kind, start_t_s=start_t, end_t_s=t - dt,
                                end_reason="voltage_v" if i_a else "duration_s",
                                capacity_ah=float(q[-1]), energy_wh=float(e[-1]),
                                end_voltage_v=float(volts[-1]), dcir_ohm=None))
            totals[kind] = float(q[-1])
            totals[f"{kind}_wh"] = float(e[-1])
        ch, dis = totals["cccv"], totals["cc"]
        cyc_rows.append(m.Cycle(
            run_id=run.id, cycle_index=c, start_t_s=c_start, end_t_s=t,
            charge_capacity_ah=ch, discharge_capacity_ah=dis,
            charge_energy_wh=totals["cccv_wh"], discharge_energy_wh=totals["cc_wh"],
            coulombic_efficiency=dis / ch, energy_efficiency=totals["cc_wh"] / totals["cccv_wh"],
            mean_charge_voltage_v=3.7, mean_discharge_voltage_v=3.6))
        if eis:
            params = {**EIS_PARAMS, "r2_ohm": EIS_PARAMS["r2_ohm"] * (1 + 0.05 * (c - 1))}
            z = circuit_impedance(EIS_FREQS_HZ, params)
            z = z * (1 + rng.normal(0, 0.002, z.size))
            spectra.append(m.EisSpectrum(
                run_id=run.id, step_index=4, cycle_index=c, t_s=t, instrument="hioki1",
                dc_voltage_v=3.0, frequency_hz=EIS_FREQS_HZ.tolist(),
                z_real_ohm=z.real.tolist(), z_imag_ohm=z.imag.tolist()))
    await s.execute(insert(m.Sample), rows)
    s.add_all([*steps, *cyc_rows, *spectra])
    run.step_index, run.cycle_index = step_count - 1, cycles
    run.elapsed_s, run.last_seq = t, seq
    run.ended_at = started + timedelta(seconds=t)
    s.add(m.Event(run_id=run.id, kind="state", message="run completed: program complete",
                  ts=run.ended_at, data={"state": "completed"}, actor="node1"))
    await s.flush()
    return SeededRun(run.id, cycles, seq, [sp.id for sp in spectra])


async def seed_queue(s: AsyncSession, channel: m.Channel, cell: m.Cell,
                     waiting: int = 3) -> list[int]:
    """A channel's queue as the engine leaves it after a safety abort: the previous run
    ended ``aborted_safety``, so the head waits ``awaiting_cell`` for a technician and
    holds up ``waiting`` queued runs behind it (the queue is strict). Every waiting run
    has a ``not_before`` a day ahead, so none starts during a test even once confirmed.
    Returns the waiting runs' ids, head first."""
    pid, plan, step_count = await _plan(s, channel, cell, 1)
    now = datetime.now(UTC)
    prev = m.Run(channel_id=channel.id, cell_id=cell.id, protocol_id=pid,
                 plan=plan, state=m.RunState.aborted_safety.value,
                 sample_period_s=SAMPLE_PERIOD_S, started_at=now - timedelta(hours=2),
                 ended_at=now - timedelta(hours=1), end_reason="safety: max_temperature_c",
                 step_count=step_count)
    s.add(prev)
    await s.flush()
    ids = []
    for k in range(waiting + 1):
        run = m.Run(channel_id=channel.id, cell_id=cell.id, protocol_id=pid,
                    state=(m.RunState.awaiting_cell if k == 0 else m.RunState.queued).value,
                    plan=plan, sample_period_s=SAMPLE_PERIOD_S, step_count=step_count,
                    queue_order=k + 1,
                    not_before=now + timedelta(days=1),
                    waiting_reason=(f"the previous run on channel {channel.name}, {prev.id}, "
                                    "ended aborted_safety; a technician checks the cell and "
                                    "confirms before the queue goes on") if k == 0 else None)
        s.add(run)
        await s.flush()
        ids.append(run.id)
    return ids
