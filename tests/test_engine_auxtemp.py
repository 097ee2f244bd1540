"""Wired temperature sensors in every sample, and the limits that trip on them.

Through the simulated lab over real TCP: a Keithley 2460 (which measures no temperature),
a two-channel cabinet (a temperature sensor on each channel) and a Keysight DAQ970A
whose thermocouples 101 and 102 sit on the SMU's cell and on the cabinet's first one,
wired as ``labdaq serve --sim`` wires them; the cabinet's second channel has only the
cabinet's own sensor. The engine runs in
this process on the lab's clock (tests/engine_rig.py). Faults are injected through the
lab's fault scheduler (``labdaq.sims.faults``), as ``labdaq sim --fault`` would:

* an internal short (1 Ω, ~13 W) heats the SMU's cell at ~0.28 °C/s; past its ARC
  self-heating onset (T1, 40 °C in this cell's spec) the decomposition adds heat of its
  own, faster and faster, and the cell runs away: at 70 °C it climbs at ~0.3 °C/s, at
  85 °C at ~0.6 °C/s, and at T2 (90 °C, about 35 simulated seconds after 70 °C) the
  separator fails and the voltage collapses. The logger's thermocouple sees the climb and
  the tightest temperature limit (70 °C) stops the run while the voltage is normal;
* a thermocouple that opens reads +9.9E+37 on the logger, a cabinet's own sensor that
  drops out reads NaN: a lost sensor;
* ``max_capacity_ah`` (the charge moved in a step) trips on the sample that passes it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import select, update

from labdaq.engine.group import FLAG_BREACH
from labdaq.protocol import Safety
from labdaq.runs import RunCreate, create_run
from labdaq.sims.lab import SimLab
from labdaq.storage import models as m
from labdaq.storage.db import session_scope
from tests.engine_rig import (
    Rig,
    assert_contiguous,
    channel_cell,
    eventually,
    nmc_18650_spec,
    samples,
    start_rig,
    wait_for,
)

TEMP_STALE = int(m.SampleFlag.TEMP_STALE)
TEMP_LOST = int(m.SampleFlag.TEMP_LOST)
SPEED = 100.0
CHARGE_1A = {"step": "cc", "current_a": 1.0, "until": {"duration_s": 36000}}


def document(step: dict[str, Any], **safety: float) -> dict[str, Any]:
    doc: dict[str, Any] = {"schema_version": 1, "name": "auxtemp test", "steps": [step]}
    if safety:
        doc["safety"] = safety
    return doc


@pytest.fixture
async def rig(sqlite_url: str, tmp_path: Path) -> AsyncIterator[Rig]:
    spec = nmc_18650_spec(tmp_path, **{"thermal.self_heating_onset_c": 40.0,
                                       "thermal.runaway_onset_c": 90.0})
    lab = SimLab(smus=1, cabinets=1, cabinet_channels=2, loggers=1, logger_channels=2,
                 cell_spec=spec, soc=0.5, seed=7)
    # A reading is stale past 20 simulated seconds (200 ms of wall time at 100x): the
    # engine's default of 3 s would be 30 ms here, which a busy machine can exceed.
    rig = await start_rig(sqlite_url, lab, SPEED, temperature_stale_s=20.0)
    yield rig
    await rig.stop()


async def start(rig: Rig, channel: str, doc: dict[str, Any],
                lab_limits: Safety | None = None) -> int:
    async with session_scope(rig.maker) as s:
        run = await create_run(s, RunCreate(channel=channel,
                                            cell_serial=channel_cell(rig.desc, channel),
                                            sample_period_s=1.0, protocol_document=doc),
                               actor="test", lab_limits=lab_limits)
        await s.flush()
        return int(run.id)


async def events(rig: Rig, run_id: int, kind: str) -> list[m.Event]:
    async with session_scope(rig.maker) as s:
        return list((await s.scalars(select(m.Event).where(
            m.Event.run_id == run_id, m.Event.kind == kind).order_by(m.Event.id))).all())


async def until_samples(rig: Rig, run_id: int, n: int) -> None:
    """Until the run has stored ``n`` samples with a temperature from the logger."""
    async def count() -> int:
        s = await samples(rig.maker, run_id)
        return int(np.isfinite(s["temperature_c"]).sum())

    async def enough() -> bool:
        return await count() >= n

    await eventually(enough, f"run {run_id}: {n} samples with a temperature")


async def aborted(rig: Rig, run_id: int, limit: str) -> tuple[m.Run, m.Event, Any]:
    run = await rig.wait_end(run_id, timeout_s=60)
    assert run.state == "aborted_safety", (run.state, run.end_reason)
    trips = await events(rig, run_id, "safety")
    assert len(trips) == 1, [e.message for e in trips]
    ev = trips[0]
    assert ev.data["limit"] == limit, ev.message
    s = await samples(rig.maker, run_id)
    assert_contiguous(s["seq"])
    assert s["flags"][-1] & FLAG_BREACH and int(s["seq"][-1]) == ev.data["seq"]
    return run, ev, s


async def test_samples_carry_the_loggers_temperatures_one_scan_for_all(rig: Rig) -> None:
    logger = rig.lab.by_name("logger1").sim
    queries: list[list[int]] = []  # the channels of each scan the logger made
    scan = logger._scan

    def counting() -> None:
        queries.append(list(logger.scan_list))
        scan()

    logger._scan = counting
    smu_run = await start(rig, "smu1/1", document(CHARGE_1A))
    cab_run = await start(rig, "cabinet1/1", document(CHARGE_1A))
    await until_samples(rig, smu_run, 20)
    await until_samples(rig, cab_run, 20)
    n_before = len(queries)
    await wait_for(lambda: len(queries) >= n_before + 10, 30, "ten more scans")
    # Every scan while both runs measure is ONE query for both wired channels.
    both = queries[n_before:]
    assert both and all(q == [101, 102] for q in both), both
    for run_id, cell in ((smu_run, rig.lab.by_name("smu1").sim.cell),
                         (cab_run, rig.lab.by_name("cabinet1").sim.bank)):
        s = await samples(rig.maker, run_id)
        # Samples taken before the logger's first scan answered have no temperature and
        # say so (stale); from the first reading on, every sample carries one: a current
        # reading, or, when a busy machine delays a scan past the staleness bound, the last
        # one flagged stale.
        have = np.isfinite(s["temperature_c"])
        assert have.any()
        first = int(np.argmax(have))
        assert have[first:].all()
        assert (s["flags"][:first] & TEMP_STALE).all()
        fresh = (s["flags"] & (TEMP_STALE | TEMP_LOST)) == 0
        assert not (s["flags"] & TEMP_LOST).any() and fresh.any()
        temps = s["temperature_c"][fresh]
        # The cell's temperature (about room temperature at 1 A), plus 0.02 °C noise.
        true_c = float(cell.cell_temperature_c[0])
        assert abs(temps[-1] - true_c) < 1.0 and np.ptp(temps) > 0
    smu = rig.lab.by_name("smu1").sim
    assert smu.output_on


async def test_thermal_runaway_on_smu_stops_on_the_temperature_limit(rig: Rig) -> None:
    """Done-when: a runaway on an SMU channel with a wired thermocouple stops the run on
    the temperature limit, output off, the event naming the limit and its source."""
    smu = rig.lab.by_name("smu1").sim
    serial = channel_cell(rig.desc, "smu1/1")
    async with session_scope(rig.maker) as s:  # the cell's datasheet window
        await s.execute(update(m.Cell).where(m.Cell.serial == serial)
                        .values(min_temperature_c=-20.0, max_temperature_c=80.0))
    run_id = await start(rig, "smu1/1", document(CHARGE_1A, max_temperature_c=85.0),
                         lab_limits=Safety(max_temperature_c=70.0, max_voltage_v=4.5))
    created = (await events(rig, run_id, "audit"))[0]
    # Each active limit with its source, the tightest of cell, channel, protocol and lab.
    assert created.data["limits"]["max_temperature_c"] == {"value": 70.0, "source": "lab"}
    assert created.data["limits"]["min_temperature_c"] == {"value": -20.0, "source": "cell"}
    assert created.data["limits"]["max_voltage_v"]["source"] == "cell"
    await until_samples(rig, run_id, 3)
    rig.lab.faults.inject("internal_short", "smu1", resistance_ohm=1.0)
    run, ev, s = await aborted(rig, run_id, "max_temperature_c")
    assert ev.data["source"] == "lab" and ev.data["bound"] == 70.0
    assert ev.data["value"] > 70.0 and "limit from lab" in ev.message
    assert "max_temperature_c" in (run.end_reason or "")
    assert not smu.output_on
    # Tripped in the self-heating climb (above T1), before the runaway took the voltage:
    # below T2 and at a normal voltage.
    assert 70.0 < s["temperature_c"][-1] < 90.0
    assert np.nanmax(s["temperature_c"][:-1]) <= 70.0
    assert s["voltage_v"][-1] > 3.3
    # The thermocouple followed the whole climb from room temperature.
    assert np.nanmin(s["temperature_c"]) < 30.0
    # (Distinct fresh readings on the way; a busy machine delays scans, so the count has a
    # wide margin.)
    climb = np.unique(s["temperature_c"][(s["flags"] & TEMP_STALE) == 0])
    assert ((climb > 40.0) & (climb < 70.0)).sum() >= 5


async def test_open_thermocouple_is_a_lost_sensor_and_stops_a_run_with_a_limit(
        rig: Rig) -> None:
    smu = rig.lab.by_name("smu1").sim
    cab = rig.lab.by_name("cabinet1").sim
    guarded = await start(rig, "smu1/1", document(CHARGE_1A, max_temperature_c=60.0))
    # No temperature limit on this one: it records the lost sensor and goes on.
    unguarded = await start(rig, "cabinet1/1", document(CHARGE_1A))
    await until_samples(rig, guarded, 5)
    await until_samples(rig, unguarded, 5)
    rig.lab.faults.inject("sensor_dropout", "logger1/101")
    rig.lab.faults.inject("sensor_dropout", "logger1/102")
    run, ev, s = await aborted(rig, guarded, "temperature_sensor_lost")
    assert not smu.output_on
    assert ev.data["source"] == "protocol" and ev.data["bound"] == 60.0
    assert ev.data["sensor"]["logger"] == "logger1" and ev.data["sensor"]["channel"] == 101
    assert ev.data["sensor"]["cause"] == "open"
    assert "temperature sensor lost" in (run.end_reason or "")
    assert s["flags"][-1] & TEMP_LOST and np.isnan(s["temperature_c"][-1])
    assert np.isfinite(s["temperature_c"][:-1][(s["flags"][:-1] & TEMP_STALE) == 0]).all()
    lost = await events(rig, guarded, "sensor")
    assert [e.severity for e in lost] == ["error"] and "logger1 channel 101" in lost[0].message

    # The run without a temperature limit keeps running, its samples say the sensor is
    # lost; once the thermocouple is repaired they carry temperatures again.
    seq_lost = int((await samples(rig.maker, unguarded))["seq"][-1])
    async def three_lost() -> bool:
        u = await samples(rig.maker, unguarded)
        return bool((u["flags"][u["seq"] > seq_lost] & TEMP_LOST).sum() >= 3)

    await eventually(three_lost, "three samples flagged with the sensor lost")
    assert (await events(rig, unguarded, "sensor"))[0].severity == "error"
    rig.lab.faults.clear_all()
    async def repaired() -> bool:
        return len(await events(rig, unguarded, "sensor")) >= 2

    await eventually(repaired, "the sensor's repair event")
    sensor = await events(rig, unguarded, "sensor")
    assert [e.severity for e in sensor] == ["error", "info"]
    async with session_scope(rig.maker) as ss:
        other = await ss.get(m.Run, unguarded)
        assert other is not None and other.state == "running"
    assert cab.output_on[0]


async def test_max_capacity_ah_trips_on_every_sample(rig: Rig) -> None:
    smu = rig.lab.by_name("smu1").sim
    # The step would run 10 h on time alone: the lab's 0.02 Ah per step stops it (72 s).
    run_id = await start(rig, "smu1/1", document(CHARGE_1A),
                         lab_limits=Safety(max_capacity_ah=0.02))
    run, ev, s = await aborted(rig, run_id, "max_capacity_ah")
    assert ev.data["source"] == "lab" and ev.data["bound"] == 0.02
    assert ev.data["value"] > 0.02
    assert s["step_capacity_ah"][-1] > 0.02 and s["step_capacity_ah"][:-1].max() <= 0.02
    assert not smu.output_on


async def test_a_logger_that_stops_answering_loses_the_sensor(rig: Rig) -> None:
    smu = rig.lab.by_name("smu1").sim
    run_id = await start(rig, "smu1/1", document(CHARGE_1A, max_temperature_c=60.0))
    await until_samples(rig, run_id, 5)
    # The logger drops off the network: connections broken and refused. Its transport
    # reconnects with backoff and gives up; the sensor is then lost.
    rig.lab.faults.inject("drop_connection", "logger1", duration_s=1e7)
    run, ev, s = await aborted(rig, run_id, "temperature_sensor_lost")
    assert ev.data["sensor"]["cause"] == "no_answer", ev.data
    assert ev.data["source"] == "protocol"
    assert not smu.output_on
    assert s["flags"][-1] & TEMP_LOST
    # While the transport was still trying, the readings aged: stale, not lost.
    assert not (s["flags"][:-1] & TEMP_LOST).any()


def test_lab_limits_from_the_configuration(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from labdaq.config import load_settings

    for key in [k for k in os.environ if k.startswith("LABDAQ_")]:
        monkeypatch.delenv(key)
    toml = tmp_path / "labdaq.toml"
    toml.write_text("[labdaq]\nlab_limits = { max_temperature_c = 60.0, "
                    "max_capacity_ah = 10.0 }\n")
    monkeypatch.setenv("LABDAQ_CONFIG", str(toml))
    lab = load_settings().lab_limits
    assert lab is not None and lab.max_temperature_c == 60.0 and lab.max_capacity_ah == 10.0
    monkeypatch.setenv("LABDAQ_LAB_LIMITS", '{"max_temperature_c": 45}')
    lab = load_settings().lab_limits
    assert lab is not None and lab.max_temperature_c == 45.0 and lab.max_capacity_ah is None
    monkeypatch.setenv("LABDAQ_LAB_LIMITS", '{"max_temperature_c": 4500}')
    with pytest.raises(ValueError, match="max_temperature_c"):
        load_settings()


async def test_cell_window_from_the_instruments_file_combines_with_lab_and_protocol(
        db_url: str, tmp_path: Path) -> None:
    """A ``[[cells]]`` table's temperature window is a limit of every run on the cell;
    with the lab's and the protocol's, the tightest wins and its source is recorded."""
    from labdaq.cli_instruments import apply_file
    from labdaq.config import Settings
    from labdaq.instruments_config import dump_instruments_toml
    from labdaq.storage.db import create_engine, sessionmaker

    cell = {"serial": "W-001", "chemistry": "nmc811", "capacity_ah": 4.9,
            "charge_cutoff_v": 4.2, "discharge_cutoff_v": 2.5, "max_charge_current_a": 4.9,
            "min_temperature_c": 0.0, "max_temperature_c": 45.0}
    instruments = [
        {"name": "smu1", "driver": "keithley2450", "resource": "TCPIP::127.0.0.1::5025::SOCKET",
         "channels": [{"index": 1, "name": "smu1/1", "max_current_a": 7.35, "cell": "W-001",
                       "thermocouple": {"logger": "logger1", "channel": 101, "type": "K"}}]},
        {"name": "logger1", "driver": "keysight_daq970a",
         "resource": "TCPIP::127.0.0.1::5026::SOCKET", "options": {"channels": [101]},
         "channels": []}]
    path = tmp_path / "lab.toml"
    path.write_text(dump_instruments_toml(instruments, cells=[cell]))
    settings = Settings(database_url=db_url, data_dir=tmp_path)
    await asyncio.to_thread(apply_file, settings, path, actor="test")
    engine = create_engine(db_url)
    try:
        maker = sessionmaker(engine)
        for safety, lab, expect in (
                ({}, Safety(max_temperature_c=60.0), (45.0, "cell", 0.0, "cell")),
                ({"max_temperature_c": 40.0}, Safety(min_temperature_c=5.0),
                 (40.0, "protocol", 5.0, "lab"))):
            async with session_scope(maker) as s:
                run = await create_run(
                    s, RunCreate(channel="smu1/1", protocol_document=document(
                        CHARGE_1A, **safety)), actor="test", lab_limits=lab)
                await s.flush()
                lim = run.plan["limits"]
                got = (lim["max_temperature_c"], lim["sources"]["max_temperature_c"],
                       lim["min_temperature_c"], lim["sources"]["min_temperature_c"])
                assert got == expect
                run.state = "stopped"  # frees the channel for the next one
    finally:
        await engine.dispose()


async def test_one_garbled_logger_reply_does_not_lose_the_sensor(rig: Rig) -> None:
    run_id = await start(rig, "smu1/1", document(CHARGE_1A, max_temperature_c=60.0))
    await until_samples(rig, run_id, 5)
    temps = rig.node.temperatures
    fault = rig.lab.faults.inject("garbled_replies", "logger1", count=1)
    await until_samples(rig, run_id, 10)
    scans = temps.scans
    await wait_for(lambda: temps.scans >= scans + 5 or run_id not in rig.node.active,
                   30, "five more scans")  # well after the garbled reply
    assert fault.state == "done"
    assert await events(rig, run_id, "sensor") == []
    async with session_scope(rig.maker) as s:
        run = await s.get(m.Run, run_id)
        assert run is not None and run.state == "running", run.end_reason
    s_ = await samples(rig.maker, run_id)
    assert not (s_["flags"] & TEMP_LOST).any()


def test_overlay_fresh_stale_lost_and_unwired() -> None:
    """What a sample gets from its wired sensor's state (no instruments involved)."""
    from labdaq.engine.aux_temps import WiredTemperatures
    from labdaq.engine.clock import EngineClock

    w = WiredTemperatures({}, {}, EngineClock(1.0), stale_s=3.0, lost_s=15.0)
    fresh, old, open_tc, gone, never, slow, silent, never_long = (
        w.slot(("logger1", ch)) for ch in range(101, 109))
    w.since_clock_s[:] = 90.0  # when the scan began wanting them
    w.since_clock_s[never_long] = 80.0
    w.state[[fresh, old, slow, silent]] = 1  # read
    w.value_c[[fresh, old, slow, silent]] = [30.0, 31.0, 32.0, 33.0]
    w.t_clock_s[[fresh, old, slow, silent]] = [98.0, 96.5, 92.0, 84.0]
    w.since_clock_s[silent] = 70.0
    w.state[open_tc], w.state[gone] = 2, 3  # open thermocouple, logger not answering
    w.stale_after_s[slow] = 10.0  # scanned every 5 s: two periods
    slots = np.array([fresh, old, open_tc, gone, never, slow, silent, never_long, -1], np.int64)
    cycler_c = np.array([np.nan] * 8 + [24.0])
    o = w.overlay(slots, 100.0, cycler_c)
    nan = np.nan
    np.testing.assert_array_equal(o.check_c, [30.0, nan, nan, nan, nan, 32.0, nan, nan, 24.0])
    np.testing.assert_array_equal(o.stored_c,
                                  [30.0, 31.0, nan, nan, nan, 32.0, nan, nan, 24.0])
    # Stale for 16 s (past lost_s = 15 s), or never read 20 s after the scan began: lost.
    np.testing.assert_array_equal(
        o.flags, [0, TEMP_STALE, TEMP_LOST, TEMP_LOST, TEMP_STALE, 0, TEMP_LOST, TEMP_LOST, 0])
    np.testing.assert_array_equal(o.lost, [False, False, True, True, False, False, True, True,
                                           False])
    # The stored reading's age; none without a reading, for a lost sensor or unwired.
    np.testing.assert_array_equal(o.age_s, [2.0, 3.5, nan, nan, nan, 8.0, nan, nan, nan])
    assert w.describe(silent)["cause"] == "stale"


async def test_cells_service_keeps_a_temperature_window(db_url: str) -> None:
    from labdaq.cells import CellCreate, CellPatch, create_cell, update_cell
    from labdaq.errors import Invalid
    from labdaq.storage.db import create_engine, sessionmaker

    engine = create_engine(db_url)
    try:
        async with session_scope(sessionmaker(engine)) as s:
            cell = await create_cell(s, CellCreate(serial="TW-1", spec="lfp",
                                                   min_temperature_c=-10.0,
                                                   max_temperature_c=55.0), actor="test")
            assert (cell.min_temperature_c, cell.max_temperature_c) == (-10.0, 55.0)
            with pytest.raises(Invalid, match="cell is not valid"):
                await update_cell(s, cell.id, CellPatch(min_temperature_c=60.0), actor="test")
            await update_cell(s, cell.id, CellPatch(max_temperature_c=50.0), actor="test")
            assert cell.max_temperature_c == 50.0
            audit = (await s.scalars(select(m.Event).where(
                m.Event.kind == "audit").order_by(m.Event.id.desc()))).first()
            assert audit is not None
            assert audit.data["before"]["max_temperature_c"] == 55.0
            assert audit.data["after"]["max_temperature_c"] == 50.0
    finally:
        await engine.dispose()


async def test_a_logger_not_open_at_start_is_opened_when_a_run_needs_it(rig: Rig) -> None:
    # As if the logger had been off when the engine started: the node does not have it.
    (row_id, inst), = [(k, v) for k, v in rig.node.instruments.items() if v.name == "logger1"]
    del rig.node.instruments[row_id]
    await inst.worker.call(inst.driver.close)
    inst.worker.shutdown()
    run_id = await start(rig, "smu1/1", document(CHARGE_1A, max_temperature_c=60.0))
    await until_samples(rig, run_id, 5)
    assert any(i.name == "logger1" for i in rig.node.instruments.values())
    assert await events(rig, run_id, "sensor") == []


async def test_a_cabinets_own_sensor_dropping_out_is_a_lost_sensor(rig: Rig) -> None:
    cab = rig.lab.by_name("cabinet1").sim
    guarded = await start(rig, "cabinet1/2", document(CHARGE_1A, max_temperature_c=60.0))
    await until_samples(rig, guarded, 5)
    rig.lab.faults.inject("sensor_dropout", "cabinet1/2")
    run, ev, s = await aborted(rig, guarded, "temperature_sensor_lost")
    assert not cab.output_on[1]
    assert ev.data["sensor"]["instrument"] == "cabinet1" and ev.data["sensor"]["channel"] == 2
    assert "cycler's own sensor" in ev.message
    assert s["flags"][-1] & TEMP_LOST and not (s["flags"][:-1] & TEMP_LOST).any()
    assert np.isfinite(s["temperature_c"][:-1]).all()  # the cabinet's readings until then


async def test_each_sample_stores_its_readings_age_from_the_loggers_scan(rig: Rig) -> None:
    """``temperature_age_s`` is the time from the logger's reading to the sample: the
    reading a sample stores is the simulated logger's first scan after ``t - age``, and
    that time is after the scan before it (the engine queries once the last one came).
    Age 0 is a scan that began after the sample's query went out and answered before the
    sample was processed (aux_temps.overlay): on a loaded machine more than one can, and
    the sample has the latest of them, so it is one of the scans from ``t`` on."""
    logger = rig.lab.by_name("logger1").sim
    scans: list[tuple[float, float]] = []  # (lab clock time, reading of 101) per scan
    scan = logger._scan

    def recording() -> None:
        scan()
        scans.append((logger.clock.now(), float(logger.readings[0][1])))

    logger._scan = recording
    run_id = await start(rig, "smu1/1", document(CHARGE_1A))
    await until_samples(rig, run_id, 15)
    group = rig.node.run_groups[run_id]
    k = [r.run_id for r in group.runs].index(run_id)
    t0 = float(group.state.t0_clock_s[k])
    s = await samples(rig.maker, run_id)
    times = np.array([t for t, _ in scans])
    aged = np.flatnonzero(np.isfinite(s["temperature_age_s"]))
    assert len(aged) >= 10 and (s["temperature_age_s"][aged] >= 0).all()
    for j in aged.tolist():
        read_at = t0 + s["t_s"][j] - s["temperature_age_s"][j]
        n = int(np.searchsorted(times, read_at - 1e-6))  # first scan at or after it
        assert n < len(scans), (j, read_at, times[-3:])
        assert n == 0 or times[n - 1] < read_at + 1e-6, (j, read_at, times[n - 1])
        if s["temperature_age_s"][j] > 0:
            assert abs(s["temperature_c"][j] - scans[n][1]) < 1e-6, (
                j, s["temperature_age_s"][j], scans[n - 1 if n else 0:n + 2])
        else:
            assert min(abs(s["temperature_c"][j] - c) for _, c in scans[n:]) < 1e-6, (
                j, scans[n:])
    # No wired reading, no age: a sample taken before the logger's first scan answered
    # (the first one, unless the scan came first) has neither.
    none = np.isnan(s["temperature_c"])
    assert np.isnan(s["temperature_age_s"][none]).all()
    assert ((s["flags"][none] & TEMP_STALE) != 0).all()


async def test_a_reading_that_stays_stale_loses_the_sensor(sqlite_url: str,
                                                           tmp_path: Path) -> None:
    """A logger that answers, but later than ``engine_temperature_lost_s``: its readings
    go stale, then the sensor counts as lost and the run with a temperature limit stops
    safely (output off, the safety event names the sensor and why)."""
    spec = nmc_18650_spec(tmp_path)
    lab = SimLab(smus=1, loggers=1, logger_channels=1, cell_spec=spec, soc=0.5, seed=7)
    rig = await start_rig(sqlite_url, lab, SPEED, temperature_stale_s=20.0,
                          temperature_lost_s=60.0)
    try:
        smu = rig.lab.by_name("smu1").sim
        run_id = await start(rig, "smu1/1", document(CHARGE_1A, max_temperature_c=60.0))
        await until_samples(rig, run_id, 5)
        # Every reply 1 wall second late: 100 simulated seconds at 100x, past the 60 s
        # lost bound, and within the transport's 2 s timeout (it does not give up).
        rig.lab.faults.inject("slow_replies", "logger1", delay_s=1.0)
        run, ev, s = await aborted(rig, run_id, "temperature_sensor_lost")
        assert ev.data["sensor"]["cause"] == "stale", ev.data
        assert "no current reading" in ev.data["sensor"]["error"]
        assert ev.data["source"] == "protocol" and ev.data["bound"] == 60.0
        assert not smu.output_on
        assert s["flags"][-1] & TEMP_LOST and np.isnan(s["temperature_age_s"][-1])
        # Stale first (with the reading's age growing past the staleness bound), then lost.
        stale = (s["flags"] & TEMP_STALE) != 0
        assert stale.any() and not (s["flags"][:-1] & TEMP_LOST).any()
        assert np.nanmax(s["temperature_age_s"][stale]) > 20.0
        rig.lab.faults.clear_all()
    finally:
        await rig.stop()


async def test_a_running_run_keeps_the_wiring_it_started_with(rig: Rig) -> None:
    """The engine reads the run's wiring snapshot (``runs.wiring``), not the channel's
    wiring now: rewired in the database under the run (which ``instruments apply``
    refuses), then the engine restarted, the resumed run still reads its thermocouple."""
    from labdaq.engine.node import AcquisitionNode

    logger = rig.lab.by_name("logger1").sim
    run_id = await start(rig, "smu1/1", document(CHARGE_1A))
    await until_samples(rig, run_id, 3)
    assert rig.node.aux.wiring[run_id]["thermocouple"]["channel"] == 101
    async with session_scope(rig.maker) as s:
        ch = (await s.scalars(select(m.Channel).where(m.Channel.name == "smu1/1"))).one()
        aux = dict(ch.aux or {})
        aux["thermocouple"] = {**aux["thermocouple"], "channel": 102}
        ch.aux = aux
    rig.node.request_stop()
    await asyncio.wait_for(rig.task, 30)
    n_before = len((await samples(rig.maker, run_id))["seq"])
    rig.node = AcquisitionNode(rig.engine, rig.clock, poll_s=0.25, batch_age_s=0.2,
                               temperature_stale_s=20.0, temperature_lost_s=1e9)
    rig.task = asyncio.create_task(rig.node.run_forever(), name="node-2")
    await wait_for(lambda: run_id in rig.node.active, 30, "the run to resume")
    await until_samples(rig, run_id, n_before + 5)
    assert rig.node.aux.wiring[run_id]["thermocouple"]["channel"] == 101
    assert logger.scan_list == [101]  # the logger is asked for the snapshot's input only
    async with session_scope(rig.maker) as s:
        run = await s.get(m.Run, run_id)
        assert run is not None and run.state == "running"
        assert run.wiring is not None and run.wiring["thermocouple"]["channel"] == 101
