"""Fault injection (labdaq.sims.faults): scenario and --fault parsing with errors that name
the entry and field; every instrument fault seen through a real driver over TCP; cell
faults (internal short, thermal runaway, sensor dropout) in the physics and in what the
instruments report; overcharge with the safety limits disabled ending in the configured
runaway; faults on a SimClock firing by themselves; `labdaq sim --fault/--scenario`; and
sample-for-sample reproducibility of a seeded scenario on a ManualClock."""

from __future__ import annotations

import math
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from labdaq.cli import app
from labdaq.drivers.errors import (
    ConnectionFailed,
    GarbledReply,
    InstrumentReportedError,
    InstrumentTimeout,
)
from labdaq.drivers.opener import open_configured
from labdaq.instruments_config import parse_instruments_config
from labdaq.sims.cell import CellBank
from labdaq.sims.clock import ManualClock
from labdaq.sims.faults import (
    FAULT_MODELS,
    ScenarioError,
    list_scenarios,
    load_scenario,
    parse_fault_option,
    parse_scenario,
)
from labdaq.sims.keithley2450 import Keithley2450Sim
from labdaq.sims.lab import SimLab
from tests.service_wait import SERVICE_START_S, SERVICE_TEST_TIMEOUT_S

# Short transport timeouts and quick reconnects: a broken link must fail fast here.
FAST = {"timeout_s": 0.5, "reconnect_attempts": 3, "backoff_initial_s": 0.01}


def _lab(seed: int = 1, **kwargs: Any) -> SimLab:
    """smu1 (cell SIM-...-001), cabinet1 with 2 channels, logger1 on 101 smu1's cell,
    102/103 cabinet1/1 and /2's cells; a ManualClock so time moves only when told."""
    opts: dict[str, Any] = dict(smus=1, cabinets=1, cabinet_channels=2, loggers=1,
                                logger_channels=3, watchdog_s=None, seed=seed)
    opts.update(kwargs)
    return SimLab(clock=ManualClock(), **opts)


def _drivers(lab: SimLab) -> dict[str, Any]:
    cfg = parse_instruments_config({"instruments": lab.instruments_config()})
    return {inst.name: open_configured(inst, **FAST) for inst in cfg.instruments}


@pytest.fixture
def lab() -> Iterator[SimLab]:
    lab = _lab()
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture
def drivers(lab: SimLab) -> Iterator[dict[str, Any]]:
    opened = _drivers(lab)
    try:
        yield opened
    finally:
        for drv in opened.values():
            drv.close()


# -- parsing -----------------------------------------------------------------------------


def test_shipped_scenarios_parse_and_run_on_the_lab_they_ask_for() -> None:
    names = list_scenarios()
    assert {"internal_short", "thermal_runaway", "flaky_link", "sensor_dropout"} <= set(names)
    for name in names:
        sc = load_scenario(name)
        assert sc.name == name and sc.faults
        kwargs = sc.lab.apply({"smus": 0})
        lab = SimLab(clock=ManualClock(), watchdog_s=None, **kwargs)
        scheduled = lab.faults.load(sc)  # every target resolves on that lab
        assert [f.kind for f in scheduled] == [f.kind for f in sc.faults]
    flaky = {f.kind for f in load_scenario("flaky_link").faults}
    assert {"drop_connection", "garbled_replies", "slow_replies"} <= flaky


@pytest.mark.parametrize(("data", "message"), [
    ([1, 2], "expected a mapping"),
    ({"name": "x", "fault": []}, "unknown field(s) fault"),
    ({"name": "x", "faults": []}, "faults: expected a non-empty list"),
    ({"name": "x", "faults": [{"kind": "internal_short", "target": "smu1"}]},
     "t.yaml: faults[0] (internal_short on smu1): resistance_ohm: Field required"),
    ({"name": "x", "faults": [{"kind": "sensor_dropout", "target": "smu1"},
                              {"kind": "internal_shrt", "target": "smu1"}]},
     "t.yaml: faults[1]: kind: unknown fault 'internal_shrt'"),
    ({"name": "x", "faults": [{"target": "smu1"}]}, "faults[0]: kind: missing"),
    ({"name": "x", "faults": [{"kind": "internal_short", "target": "smu1",
                               "resistence_ohm": 1}]},
     "faults[0] (internal_short on smu1): resistance_ohm: Field required; "
     "resistence_ohm: unknown field"),
    ({"name": "x", "faults": [{"kind": "slow_replies", "target": "smu1", "delay_s": 1,
                               "at_s": -5}]},
     "faults[0] (slow_replies on smu1): at_s: Input should be greater than or equal to 0"),
    ({"name": "x", "faults": [{"kind": "thermal_runaway", "target": "smu1",
                               "duration_s": 10}]},
     "faults[0] (thermal_runaway on smu1): duration_s: a thermal_runaway fault cannot be "
     "undone"),
    ({"name": "x", "faults": [{"kind": "error_queue", "target": "smu1", "code": 0}]},
     "faults[0] (error_queue on smu1): code: 0 means 'No error'"),
    ({"name": "x", "faults": ["internal_short"]}, "faults[0]: expected a mapping"),
    ({"name": "x", "lab": {"cabinets": -1},
      "faults": [{"kind": "sensor_dropout", "target": "smu1"}]}, "t.yaml: lab: cabinets:"),
])
def test_scenario_errors_name_entry_and_field(data: Any, message: str) -> None:
    with pytest.raises(ScenarioError) as exc:
        parse_scenario(data, "t.yaml")
    assert message in str(exc.value)


def test_scenario_files_by_path_and_their_errors(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text("name: mine\nfaults:\n  - {kind: frozen_readings, target: smu1, "
                    "at_s: 10, duration_s: 5}\n")
    sc = load_scenario(str(good))
    assert sc.faults[0].kind == "frozen_readings" and sc.faults[0].duration_s == 5
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: broken\nfaults: [\n")
    with pytest.raises(ScenarioError, match="broken.yaml: not valid YAML"):
        load_scenario(broken)
    with pytest.raises(ScenarioError, match="unknown scenario 'nope'.*flaky_link"):
        load_scenario("nope")


def test_fault_option_syntax() -> None:
    spec = parse_fault_option("internal_short:cabinet1/3:resistance_ohm=0.5,duration_s=60@600")
    assert (spec.kind, spec.target, spec.at_s, spec.duration_s) == (
        "internal_short", "cabinet1/3", 600.0, 60.0)
    assert spec.params == {"resistance_ohm": 0.5}
    spec = parse_fault_option("error_queue:smu1:code=-363,text=Input overrun")
    assert spec.params["code"] == -363 and spec.params["text"] == "Input overrun"
    assert spec.at_s is None  # no @: at once
    assert parse_fault_option("drop_connection:smu1@1.5").at_s == 1.5
    for text, message in [
        ("internal_short", "expected <kind>:<target>"),
        ("slow_replies:smu1:delay_s", "parameter 'delay_s' is not key=value"),
        ("slow_replies:smu1:delay_s=1@soon", "time 'soon' after @"),
        ("slow_replies:smu1:delay_s=fast", "delay_s: Input should be a valid number"),
        ("melt:smu1", "kind: unknown fault 'melt'"),
    ]:
        with pytest.raises(ScenarioError) as exc:
            parse_fault_option(text)
        assert message in str(exc.value) and text in str(exc.value)


def test_targets_are_checked_against_the_lab() -> None:
    lab = _lab(transport={"default": "tcp", "logger1": "pty"})
    faults = lab.faults
    for kind, target, params, message in [
        ("internal_short", "cabinet9/1", {"resistance_ohm": 1}, "no instrument or cell"),
        ("internal_short", "cabinet1", {"resistance_ohm": 1}, "needs a channel 1..2"),
        ("internal_short", "cabinet1/3", {"resistance_ohm": 1}, "needs a channel 1..2"),
        ("internal_short", "smu1/2", {"resistance_ohm": 1}, "has one channel"),
        ("thermal_runaway", "logger1", {}, "is a logger, not a cycler"),
        ("sensor_dropout", "logger1/150", {}, "one of [101, 102, 103]"),
        ("garbled_replies", "cabinet1/2", {}, "acts on the whole instrument"),
        ("frozen_readings", "logger1", {}, "no frozen readings hook"),
        ("drop_connection", "logger1", {"duration_s": 5}, "needs a TCP instrument"),
        ("internal_short", "cabinet1/x", {"resistance_ohm": 1}, "channel 'x' is not"),
    ]:
        with pytest.raises(ScenarioError) as exc:
            faults.inject(kind, target, **params)
        assert message in str(exc.value), (kind, target, str(exc.value))
    assert faults.faults == []  # nothing half-scheduled
    # A cell serial works as a target too.
    serial = lab.by_name("cabinet1").channels[1]["cell"]["serial"]
    fault = faults.inject("sensor_dropout", serial)
    assert fault.target == "cabinet1/2" and fault.state == "active"
    assert bool(lab.by_name("cabinet1").sim.bank.sensor_dropout[1])
    assert set(FAULT_MODELS) == {
        "internal_short", "external_short", "sensor_dropout", "thermal_runaway",
        "drop_connection", "slow_replies", "garbled_replies", "lost_replies", "error_queue",
        "frozen_readings"}


def test_clear_cancels_pending_and_ends_active_faults() -> None:
    lab = _lab()
    bank = lab.by_name("cabinet1").sim.bank
    later = lab.faults.inject("internal_short", "cabinet1/1", at_s=50, resistance_ohm=1.0)
    now = lab.faults.inject("external_short", "cabinet1/2", resistance_ohm=0.5)
    runaway = lab.faults.inject("thermal_runaway", "smu1", at_s=100)
    assert [f.state for f in lab.faults.faults] == ["pending", "active", "pending"]
    assert lab.faults.active == [now] and lab.faults.pending == [later, runaway]
    lab.faults.clear(later)  # cancelled before it fired
    lab.faults.advance(100)
    assert later.state == "cleared" and later.fired_at_s is None
    assert runaway.state == "done" and runaway.fired_at_s == 100.0
    lab.faults.clear_all()
    assert now.state == "cleared" and now.cleared_at_s == 100.0
    lab.faults.advance(10)
    assert bank.cell_current_a.tolist() == [0.0, 0.0]  # outputs off and no shorts left
    assert lab.faults.next_time_s() is None


# -- instrument faults through real drivers over TCP --------------------------------------


def test_dropped_connection_reconnects_and_an_outage_fails(lab: SimLab,
                                                           drivers: dict[str, Any]) -> None:
    smu = drivers["smu1"]
    assert np.isfinite(smu.measure()[0, 0])
    fault = lab.faults.inject("drop_connection", "smu1")
    assert fault.state == "done" and fault.fired_at_s == 0.0
    assert np.isfinite(smu.measure()[0, 0])  # the transport reconnected by itself
    assert smu.transport.reconnects >= 1
    # Off the network for 10 simulated seconds: connections are refused meanwhile.
    outage = lab.faults.inject("drop_connection", "smu1", duration_s=10)
    with pytest.raises(ConnectionFailed):
        smu.measure()
    lab.faults.advance(10)
    assert outage.state == "cleared" and outage.cleared_at_s == pytest.approx(10.0)
    assert np.isfinite(smu.measure()[0, 0])


def test_garbled_and_lost_replies(lab: SimLab, drivers: dict[str, Any]) -> None:
    smu = drivers["smu1"]
    lab.faults.inject("garbled_replies", "smu1")
    with pytest.raises(GarbledReply):
        smu.measure()
    assert np.isfinite(smu.measure()[0, 0])
    smu.transport.retry_timeouts = False
    smu.transport.timeout_s = 0.2
    lab.faults.inject("lost_replies", "smu1")
    with pytest.raises(InstrumentTimeout):
        smu.measure()
    assert np.isfinite(smu.measure()[0, 0])


def test_slow_replies_time_out_until_cleared(lab: SimLab, drivers: dict[str, Any]) -> None:
    smu = drivers["smu1"]
    smu.transport.retry_timeouts = False
    # The delay is 60x the timeout: a timeout (not a late reply) on however busy a
    # machine. The server's stop() cuts the delayed reply short.
    smu.transport.timeout_s = 0.5
    lab.faults.inject("slow_replies", "smu1", at_s=5, duration_s=5, delay_s=30.0)
    lab.faults.advance(4)
    assert np.isfinite(smu.measure()[0, 0])  # not yet
    lab.faults.advance(1)
    with pytest.raises(InstrumentTimeout):
        smu.measure()
    lab.faults.advance(5)
    assert lab.by_name("smu1").server.reply_delay_s == 0.0
    assert np.isfinite(smu.measure()[0, 0])


def test_error_queue_entry_is_reported(lab: SimLab, drivers: dict[str, Any]) -> None:
    lab.faults.inject("error_queue", "smu1", code=-363, text="Input buffer overrun")
    with pytest.raises(InstrumentReportedError) as exc:
        drivers["smu1"].set_current(1, 0.5, 4.2)
    assert exc.value.code == -363 and "overrun" in exc.value.text
    lab.faults.inject("error_queue", "cabinet1", code=-222)
    with pytest.raises(InstrumentReportedError) as exc:
        drivers["cabinet1"].set_current(1, 0.5, 4.2)
    assert exc.value.code == -222


def test_frozen_readings_repeat_while_the_cell_moves(lab: SimLab,
                                                     drivers: dict[str, Any]) -> None:
    smu, cab = drivers["smu1"], drivers["cabinet1"]
    smu_sim = lab.by_name("smu1").sim
    bank = lab.by_name("cabinet1").sim.bank
    smu.set_current(1, 2.0, 4.3)
    smu.output(1, True)
    cab.set_current(1, -3.0, 2.5)
    cab.output(1, True)
    lab.faults.advance(10)
    smu_before, cab_before = smu.measure(), cab.measure()
    lab.faults.inject("frozen_readings", "smu1", duration_s=120)
    lab.faults.inject("frozen_readings", "cabinet1", duration_s=120)
    true_v = []
    for _ in range(3):
        lab.faults.advance(30)
        np.testing.assert_array_equal(smu.measure(), smu_before)
        np.testing.assert_array_equal(cab.measure(), cab_before)
        true_v.append((smu_sim.terminal_voltage(), float(bank.voltage_v[0])))
    # Meanwhile the cells really moved: charging up, discharging down (by millivolts).
    assert true_v[-1][0] > smu_before[0, 0] + 0.005
    assert true_v[-1][1] < cab_before[0, 0] - 0.005
    lab.faults.advance(30)  # the freeze ends at t = 130 s
    smu_after, cab_after = smu.measure(), cab.measure()
    assert smu_after[0, 0] == pytest.approx(smu_sim.terminal_voltage(), abs=1e-6)
    assert cab_after[0, 0] == pytest.approx(float(bank.voltage_v[0]), abs=1e-6)
    assert smu_after[0, 0] != smu_before[0, 0] and cab_after[0, 0] != cab_before[0, 0]


# -- cell faults ----------------------------------------------------------------------------


def test_internal_short_drains_and_heats(lab: SimLab, drivers: dict[str, Any]) -> None:
    bank = lab.by_name("cabinet1").sim.bank
    soc0 = bank.soc
    fault = lab.faults.inject("internal_short", "cabinet1/1", at_s=60, resistance_ohm=2.0,
                              duration_s=1200)
    lab.faults.advance(60)
    assert fault.state == "active" and fault.fired_at_s == 60.0
    lab.faults.advance(1200)
    assert fault.state == "cleared"
    drained = soc0 - bank.soc
    # Outputs are off: only self-discharge on channel 2; ~V/R = 1.9 A for 20 min on 1.
    assert drained[1] < 1e-4
    assert drained[0] == pytest.approx(1.9 * 1200 / 3600 / float(bank.capacity_ah[0]),
                                       rel=0.15)
    temps = drivers["cabinet1"].measure()[:, 2]
    assert temps[0] > temps[1] + 50.0 and temps[1] == pytest.approx(25.0, abs=0.5)
    logger = drivers["logger1"].read_temperatures_c()
    assert logger[1] == pytest.approx(temps[0], abs=0.5)  # 102 is on cabinet1/1's cell
    assert not bank.runaway.any()  # 2 ohm heats it but stays below onset
    # Cleared: the cell cools again.
    lab.faults.advance(600)
    assert float(bank.cell_temperature_c[0]) < temps[0] - 20.0


def test_thermal_runaway_climbs_fast_and_collapses_the_voltage(
        lab: SimLab, drivers: dict[str, Any]) -> None:
    bank = lab.by_name("cabinet1").sim.bank
    lab.faults.inject("thermal_runaway", "cabinet1/2", at_s=60)
    lab.faults.advance(60)
    cab = drivers["cabinet1"]
    first = cab.measure()
    lab.faults.advance(60)
    second = cab.measure()
    # A forced runaway reacts at least at its trigger rate (1 degC/s adiabatic): tens of
    # degC in the first minute, then past T2 it climbs to hundreds of degC.
    rise_c_per_min = second[1, 2] - first[1, 2]
    assert rise_c_per_min > 30.0
    assert second[1, 0] < 0.1 and second[0, 0] > 3.0  # only the runaway cell collapses
    lab.faults.advance(600)
    thermal = bank.spec.thermal
    assert float(bank.cell_temperature_c[1]) > thermal.runaway_onset_c
    assert float(bank.decomposed_fraction[1]) > 0.9
    assert bank.runaway.tolist() == [False, True]


def test_sensor_dropout_reads_as_missing_temperature(lab: SimLab,
                                                     drivers: dict[str, Any]) -> None:
    cab, logger = drivers["cabinet1"], drivers["logger1"]
    assert np.isfinite(cab.measure()[:, 2]).all()
    lab.faults.load("sensor_dropout")  # cabinet1/2 at 120-720 s, logger1/101 from 300 s
    lab.faults.advance(120)
    sample = cab.measure_full()
    assert math.isnan(sample.temperature_c[1]) and np.isfinite(sample.temperature_c[0])
    assert sample.status[1] & 128 and not sample.status[0] & 128
    assert cab.query("MEAS:TEMP? (@2)") == "+9.91000000E+37"
    # The logger thermocouple on that cell (103) reads open as well; 101 still reads.
    temps = logger.read_temperatures_c()
    assert math.isnan(temps[2]) and np.isfinite(temps[:2]).all()
    lab.faults.advance(180)
    temps = logger.read_temperatures_c()
    assert math.isnan(temps[0]) and math.isnan(temps[2]) and np.isfinite(temps[1])
    assert logger.query("MEAS:TEMP? TC,K,(@101)") == "+9.90000000E+37"
    lab.faults.advance(420)  # the cabinet sensor is back at 720 s; the thermocouple is not
    assert np.isfinite(cab.measure()[:, 2]).all()
    assert math.isnan(logger.read_temperatures_c()[0])


def test_overcharge_with_safety_limits_disabled_runs_away_as_configured() -> None:
    """A 1C charge past full with VLIM at 21 V and OVP off: the overcharge heat takes the
    cell past its self-heating onset T1 to the trigger T2, then it runs away in seconds to
    near its ARC maximum T3."""

    def overcharge(vlim_v: float) -> tuple[CellBank, list[tuple[float, float, float]]]:
        clock = ManualClock()
        bank = CellBank("nmc811", n=1, soc=1.0, seed=1)
        smu = Keithley2450Sim(bank, clock, model="2460")
        for cmd in (":SOUR:FUNC CURR", f":SOUR:CURR:VLIM {vlim_v}", ":SOUR:VOLT:PROT NONE",
                    ":SOUR:CURR 4.9", ":OUTP ON"):
            smu.handle_line(cmd)
        rows = []
        for _ in range(360):  # one simulated hour in 10 s samples
            clock.advance(10.0)
            rows.append((clock.now(), float(smu.handle_line(":MEAS:VOLT?") or "nan"),
                         float(bank.cell_temperature_c[0])))
        return bank, rows

    bank, rows = overcharge(21.0)
    thermal = bank.spec.thermal
    assert bank.runaway[0]
    onset = next(k for k, r in enumerate(rows) if r[2] >= thermal.runaway_onset_c)
    assert rows[onset - 1][1] > 6.0  # overcharged far above 4.2 V before the onset
    # From T2 the climb takes seconds: within two 10 s samples the cell is within 20 % of
    # the T2 -> T3 span of its peak.
    span = thermal.runaway_peak_c - thermal.runaway_onset_c
    top_c = max(r[2] for r in rows)
    assert top_c > thermal.runaway_onset_c + 0.8 * span
    assert rows[onset + 1][2] > thermal.runaway_onset_c + 0.8 * span
    assert all(r[1] < 0.1 for r in rows[onset + 2:])  # the voltage has collapsed
    # Same hour with the charger's 4.2 V compliance in force: no runaway.
    safe_bank, safe_rows = overcharge(4.2)
    assert not safe_bank.runaway[0] and max(r[2] for r in safe_rows) < 40.0


# -- SimClock, CLI, determinism ------------------------------------------------------------


def test_faults_fire_by_themselves_on_a_sim_clock() -> None:
    lab = SimLab(speed=1000.0, smus=1, watchdog_s=None)
    sim = lab.by_name("smu1").sim
    # What the scheduler thread did, in its order, with the simulator's state right after:
    # the test's own polling could miss a 0.3 s (wall) active window on a busy machine.
    seen: list[tuple[str, str, bool]] = []
    lab.faults.on_event = lambda f, what: seen.append((what, f.state, bool(sim.frozen)))
    with lab:
        start = lab.clock.now()
        fault = lab.faults.inject("frozen_readings", "smu1", at_s=start + 200, duration_s=300)
        deadline = time.monotonic() + 60.0
        while fault.state != "cleared" and time.monotonic() < deadline:
            time.sleep(0.005)
        assert seen == [("applied", "active", True), ("cleared", "cleared", False)]
        assert not sim.frozen
        # Fired by itself on the sim clock, never before its time (late by as much as
        # the scheduler thread was kept waiting: at 1000x a wall millisecond is 1 s).
        assert fault.fired_at_s is not None and fault.fired_at_s >= fault.at_s
        assert fault.cleared_at_s is not None and fault.cleared_at_s >= fault.at_s + 300
        with pytest.raises(TypeError, match="ManualClock"):
            lab.faults.advance(1.0)
    assert lab.faults._thread is None  # stopped with the lab


def test_cli_bad_fault_exits_2_with_one_line() -> None:
    result = CliRunner().invoke(app, ["sim", "--fault", "internal_short:smu1@5"])
    assert result.exit_code == 2
    assert "resistance_ohm: Field required" in result.output
    result = CliRunner().invoke(app, ["sim", "--fault", "garbled_replies:cabinet1"])
    assert result.exit_code == 2 and "no instrument or cell 'cabinet1'" in result.output
    result = CliRunner().invoke(app, ["sim", "--scenario", "no_such_scenario"])
    assert result.exit_code == 2 and "unknown scenario" in result.output


@pytest.mark.timeout(SERVICE_TEST_TIMEOUT_S)
def test_cli_scenario_and_fault_fire() -> None:
    cmd = [sys.executable, "-m", "labdaq.cli", "sim", "--speed", "200", "--watchdog", "0",
           "--scenario", "sensor_dropout", "--fault",
           "internal_short:cabinet1/1:resistance_ohm=2,duration_s=20@100"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in iter(proc.stdout.readline, ""):
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    seen: list[str] = []
    try:
        deadline = time.monotonic() + SERVICE_START_S  # a hang guard: a saturated machine
        while not any("fault 3 cleared" in s for s in seen):
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                break
            seen.append(line)
    except queue.Empty:
        pass
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    text = "".join(seen)
    # The scenario added the cabinet and logger it needs next to the default smu1.
    names = [s.split()[0] for s in seen[:3]]
    assert names == ["smu1", "cabinet1", "logger1"], text
    assert "fault 3      internal_short on cabinet1/1 at 100 s until 120 s" in text
    assert text.index("fault 1 ") < text.index("ready:") < text.index("fault 3 applied")
    # Fired by the scheduler thread, not before its time (how late depends on how long
    # the thread waited for a CPU: at speed 200 a wall millisecond is 0.2 s), then cleared.
    fired = re.search(r"t=([\d.]+) s fault 3 applied", text)
    assert fired is not None and float(fired.group(1)) >= 100.0, text
    assert "fault 3 cleared" in text, text
    assert text.index("fault 3 applied") < text.index("fault 3 cleared"), text


def _run_scenario(seed: int, lost_logger_reply_at_s: float | None = None) -> list[np.ndarray]:
    """A short scenario on a ManualClock lab, through real drivers over TCP: SMU charging,
    two cabinet channels discharging and charging, the logger on every cell; an internal
    short, a frozen SMU, a thermal runaway and a sensor dropout on the way. With
    ``lost_logger_reply_at_s`` the logger executes its first query from then on but never
    answers it, so the driver times out and re-sends it."""
    lab = _lab(seed=seed)
    lab.faults.inject("internal_short", "cabinet1/1", at_s=25, resistance_ohm=1.5)
    lab.faults.inject("frozen_readings", "smu1", at_s=40, duration_s=20)
    lab.faults.inject("thermal_runaway", "cabinet1/2", at_s=65)
    lab.faults.inject("sensor_dropout", "logger1/101", at_s=80)
    if lost_logger_reply_at_s is not None:
        lost = lab.faults.inject("lost_replies", "logger1", at_s=lost_logger_reply_at_s)
    samples: list[np.ndarray] = []
    with lab:
        drv = _drivers(lab)
        try:
            drv["smu1"].set_current(1, 3.0, 4.3)
            drv["smu1"].output(1, True)
            drv["cabinet1"].set_current(1, -4.0, 2.5)
            drv["cabinet1"].set_current(2, 2.0, 4.2)
            drv["cabinet1"].output(1, True)
            drv["cabinet1"].output(2, True)
            for _ in range(24):
                lab.faults.advance(5.0)
                samples.append(np.concatenate([
                    drv["smu1"].measure().ravel(), drv["cabinet1"].measure().ravel(),
                    drv["logger1"].read_temperatures_c()]))
        finally:
            for d in drv.values():
                d.close()
    if lost_logger_reply_at_s is not None:
        assert lost.fired_at_s == lost_logger_reply_at_s  # and the read still succeeded
    return samples


def test_same_seed_same_scenario_same_samples() -> None:
    first, second = _run_scenario(seed=7), _run_scenario(seed=7)
    assert len(first) == len(second) == 24
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)  # exactly, NaN where NaN
    # The faults really happened (frozen SMU, collapsed cell, open thermocouple) ...
    assert np.array_equal(first[8][:2], first[10][:2])
    assert first[-1][6] < 0.1 and math.isnan(first[-1][-3])
    # ... and the comparison can fail: another seed gives other cells and other noise.
    other = _run_scenario(seed=8)
    assert not all(np.array_equal(a, b, equal_nan=True)
                   for a, b in zip(first, other, strict=True))


def test_re_sent_query_reads_what_the_first_copy_did() -> None:
    # On a loaded machine a reply can miss the transport timeout after the instrument
    # executed the query; the driver re-sends it. The retry must read the same readings
    # and shift nothing after it, or a seeded run depends on how busy the machine was.
    plain = _run_scenario(seed=7)
    retried = _run_scenario(seed=7, lost_logger_reply_at_s=30)
    for a, b in zip(plain, retried, strict=True):
        np.testing.assert_array_equal(a, b)
