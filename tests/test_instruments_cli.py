"""`labdaq sim` + `labdaq instruments probe|check` as a user runs them: a small simulated
lab in its own process, every printed resource probed by a separate CLI process, the
written instruments file checked; bad input (malformed resource, silence, an unknown
instrument, a broken file) ends with exit code 2 and one line naming resource, command and
expectation, quickly. Also the configuration loader itself (resources, schema errors)."""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from labdaq.cli import app
from labdaq.drivers.opener import open_configured
from labdaq.instruments_config import (
    InstrumentConfigError,
    ResourceError,
    dump_instruments_toml,
    load_instruments_config,
    parse_instruments_config,
    parse_resource,
)
from labdaq.sims.scpi import ScpiParser
from labdaq.sims.server import SimServer

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
CLI = [sys.executable, "-m", "labdaq.cli"]
# Only a hang guard for one failing probe (interpreter start-up included, which a loaded
# machine stretches): which timeout applied is checked in the messages ("no reply within
# 1 s"), not by the clock.
BAD_INPUT_BUDGET_S = 30.0

LAB_ARGS = [
    "sim", "--speed", "10", "--smus", "1", "--cabinets", "1", "--cabinet-channels", "2",
    "--impedance", "1", "--loggers", "1", "--logger-channels", "3", "--chamber",
    "--transport", "chamber=pty", "--transport", "eis1=pty", "--watchdog", "0",
]
EXPECTED_DRIVERS = {
    "smu1": "keithley2450", "cabinet1": "cabinet", "eis1": "hioki_bt4560",
    "logger1": "keysight_daq970a", "chamber1": "espec_chamber",
}


def _reader(stream: object, lines: queue.Queue[str | None]) -> None:
    for line in iter(stream.readline, ""):  # type: ignore[attr-defined]
        lines.put(line)
    lines.put(None)


@pytest.fixture(scope="module")
def sim_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """`labdaq sim` as a subprocess; yields {name: (driver, resource)}, the config path."""
    config = tmp_path_factory.mktemp("simlab") / "instruments.toml"
    proc = subprocess.Popen([*CLI, *LAB_ARGS, "--write-config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=ENV)
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    seen: list[str] = []
    table: dict[str, tuple[str, str]] = {}
    deadline = time.monotonic() + 30
    try:
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                pytest.fail("labdaq sim did not become ready:\n" + "".join(seen))
            seen.append(line)
            if line.startswith("ready:"):
                break
            m = re.match(r"^(\S+)\s+(\S+)\s+((?:TCPIP|ASRL)\S+)\s*$", line)
            if m:
                table[m.group(1)] = (m.group(2), m.group(3))
        yield {"table": table, "config": config, "output": "".join(seen)}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _cli(*args: str, timeout: float = 30.0) -> tuple[int, str, str, float]:
    """The real thing: a separate `python -m labdaq.cli` process."""
    t0 = time.monotonic()
    done = subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)
    return done.returncode, done.stdout, done.stderr, time.monotonic() - t0


def _cli_in_process(*args: str) -> tuple[int, str, str, float]:
    """Same command through typer's runner (no interpreter start-up: variants stay fast)."""
    t0 = time.monotonic()
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr, time.monotonic() - t0


# -- the simulated lab, probed by separate processes --------------------------------------


def test_sim_prints_every_instrument(sim_lab: dict[str, object]) -> None:
    table = sim_lab["table"]
    assert isinstance(table, dict)
    assert {name: drv for name, (drv, _) in table.items()} == EXPECTED_DRIVERS
    assert table["chamber1"][1].startswith("ASRL/dev/")
    assert table["eis1"][1].startswith("ASRL/dev/")
    assert table["smu1"][1].startswith("TCPIP::127.0.0.1::")


def test_probe_names_the_driver_of_each_resource(sim_lab: dict[str, object]) -> None:
    table = sim_lab["table"]
    assert isinstance(table, dict)
    # All probes at once: separate processes, as several users would run them.
    procs = {
        # The reply timeout is generous and the wait only stops a hang: six interpreters
        # start at once here, and on a loaded machine a simulator's reply can take seconds.
        name: subprocess.Popen([*CLI, "instruments", "probe", resource, "--json",
                                "--timeout", "10"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=ENV)
        for name, (_, resource) in table.items()
    }
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=100)
        assert proc.returncode == 0, f"{name}: {err}"
        result = json.loads(out)
        assert result["driver"] == table[name][0] == EXPECTED_DRIVERS[name]
        assert result["resource"] == table[name][1]
    # Human-readable form for one SCPI instrument and the non-SCPI chamber.
    code, out, err, _ = _cli_in_process("instruments", "probe", table["smu1"][1],
                                        "--timeout", "2")
    assert code == 0, err
    assert re.search(r"^idn\s+KEITHLEY INSTRUMENTS INC\.,MODEL 2460,", out, re.M)
    assert re.search(r"^driver\s+keithley2450$", out, re.M)
    code, out, err, _ = _cli_in_process("instruments", "probe", table["chamber1"][1],
                                        "--timeout", "2", "--termination", r"\r\n")
    assert code == 0, err
    assert re.search(r"^driver\s+espec_chamber$", out, re.M)
    assert "(via ROM?)" in out


def test_written_config_checks_and_opens(sim_lab: dict[str, object]) -> None:
    config = sim_lab["config"]
    assert isinstance(config, Path) and config.is_file()
    code, out, err, _ = _cli("instruments", "check", str(config), "--probe")
    assert code == 0, out + err
    assert f"{len(EXPECTED_DRIVERS)} instrument(s)" in out  # five kinds, one each
    assert out.count("ok: ") == len(EXPECTED_DRIVERS)
    assert "configuration is valid" in out
    cfg = load_instruments_config(config)
    # Every entry opens with its driver and framing, straight from the file.
    for inst in cfg.instruments:
        driver = open_configured(inst, timeout_s=2.0)
        try:
            assert type(driver).driver_name == inst.driver
            if inst.driver == "espec_chamber":
                assert driver.actual_c() == pytest.approx(25.0, abs=0.5)
                assert driver.status() == "standby"
        finally:
            driver.close()
    cabinet = cfg.by_name("cabinet1")
    assert [ch.cell for ch in cabinet.channels] == ["SIM-NMC811-C1-001", "SIM-NMC811-C1-002"]


# -- bad input: exit 2, one line naming resource, command and expectation ---------------------


def _assert_one_line_error(code: int, out: str, err: str, elapsed: float, *needles: str
                           ) -> None:
    assert code == 2, (code, out, err)
    assert "Traceback" not in err + out
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert elapsed < BAD_INPUT_BUDGET_S


@pytest.mark.parametrize(
    ("resource", "needles"),
    [
        ("TCPIP::localhost", ["'TCPIP::localhost'", "malformed", "expected", "::SOCKET"]),
        ("garbage", ["'garbage'", "malformed resource string", "expected one of"]),
        ("TCPIP::127.0.0.1::99999::SOCKET", ["99999", "expected TCPIP::<host>::<port"]),
        ("serial://", ["'serial://'", "expected serial://<port>"]),
        ("ASRL/dev/pts/99999::INSTR", ["'ASRL/dev/pts/99999::INSTR'", "cannot open",
                                       "expected"]),
    ],
)
def test_probe_malformed_or_missing_resource(resource: str, needles: list[str]) -> None:
    # One variant end to end in its own process, the others through the runner.
    run = _cli if resource == "TCPIP::localhost" else _cli_in_process
    _assert_one_line_error(*run("instruments", "probe", resource, "--timeout", "1"), *needles)


def test_probe_refused_connection() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nobody listens there
    resource = f"TCPIP::127.0.0.1::{port}::SOCKET"
    _assert_one_line_error(*_cli("instruments", "probe", resource, "--timeout", "1"),
                           repr(resource), "cannot open", "expected")


def test_probe_silent_instrument_times_out() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # accepts (kernel backlog) but never answers
        resource = f"TCPIP::127.0.0.1::{silent.getsockname()[1]}::SOCKET"
        code, out, err, elapsed = _cli("instruments", "probe", resource, "--timeout", "1")
    _assert_one_line_error(code, out, err, elapsed, repr(resource), "'*IDN?'",
                           "no reply within 1 s", "expected an identification")


@pytest.mark.parametrize("kind", ["tcp", "pty"])
def test_probe_unknown_instrument(kind: str) -> None:
    sim = ScpiParser(idn="ACME,WIDGET-9,0,1.0")
    server = SimServer.tcp(sim) if kind == "tcp" else SimServer.pty(sim)
    run = _cli if kind == "tcp" else _cli_in_process
    with server:
        code, out, err, elapsed = run("instruments", "probe", server.resource, "--timeout", "1")
    _assert_one_line_error(code, out, err, elapsed, repr(server.resource), "'*IDN?'",
                           "'ACME,WIDGET-9,0,1.0'", "matches no driver", "expected",
                           "keithley2450", "espec_chamber")


def test_probe_bad_options() -> None:
    _assert_one_line_error(*_cli_in_process("instruments", "probe", "COM3", "--timeout", "0"),
                           "--timeout", "expected")


def test_check_bad_file_names_instrument_and_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(
        '[[instruments]]\nname = "smu1"\ndriver = "keithley2450"\n'
        'resource = "TCPIP::10.0.0.5::70000::SOCKET"\n'
        '[[instruments]]\nname = "chamber1"\ndriver = "espec_chamber"\n'
        'resource = "ASRL/dev/ttyUSB0::INSTR"\noptions = { speed = 3 }\n'
    )
    code, out, err, _ = _cli("instruments", "check", str(path))
    assert code == 2 and "Traceback" not in err
    assert "instrument 'smu1' (instruments[0]), field 'resource'" in err
    assert "70000" in err
    # Schema and driver problems come in one report.
    assert "instrument 'chamber1' (instruments[1]), field 'options.speed'" in err
    path.write_text('[[instruments]]\nname = "x"\ndriver = "frobnicator"\nresource = "COM3"\n')
    code, out, err, _ = _cli_in_process("instruments", "check", str(path))
    assert code == 2
    assert "instrument 'x' (instruments[0]), field 'driver': unknown driver 'frobnicator'" in err
    path.write_text("[[instruments]\nname = 1\n")
    code, out, err, _ = _cli_in_process("instruments", "check", str(path))
    assert code == 2 and "not valid TOML" in err and "line 1" in err
    code, out, err, _ = _cli_in_process("instruments", "check", str(tmp_path / "missing.toml"))
    assert code == 2 and "missing.toml" in err and "cannot read" in err


# -- configuration loader, in process ---------------------------------------------------------


@pytest.mark.parametrize(
    "resource",
    ["TCPIP::127.0.0.1::5025::SOCKET", "TCPIP0::lab-smu-3.local::5025::SOCKET",
     "TCPIP::10.0.0.5::INSTR", "TCPIP::10.0.0.5::inst0::INSTR", "ASRL/dev/ttyUSB0::INSTR",
     "ASRL3::INSTR", "ASRLCOM3::INSTR", "GPIB0::24::INSTR",
     "USB0::0x05E6::0x2450::04412345::INSTR", "serial:///dev/ttyUSB0?baudrate=9600",
     "/dev/ttyS0", "COM4"],
)
def test_valid_resources(resource: str) -> None:
    info = parse_resource(resource)
    assert info.kind in ("visa", "serial")


@pytest.mark.parametrize(
    ("resource", "match"),
    [("", "empty"), ("TCPIP::host", "resource class"), ("TCPIP::h::0::SOCKET", "port"),
     ("TCPIP::h::port::SOCKET", "port"), ("GPIB0::44::INSTR", "0-30"),
     ("FOO::1::INSTR", "malformed"), (" COM3", "whitespace"), ("serial://", "no port")],
)
def test_invalid_resources(resource: str, match: str) -> None:
    with pytest.raises(ResourceError, match=match):
        parse_resource(resource)


def _one(**fields: object) -> dict[str, object]:
    base: dict[str, object] = {"name": "smu1", "driver": "keithley2450",
                               "resource": "TCPIP::127.0.0.1::5025::SOCKET"}
    base.update(fields)
    return {"instruments": [base]}


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        (_one(resource="TCPIP::h"), ["instrument 'smu1' (instruments[0]), field 'resource'",
                                     "resource class", "(got 'TCPIP::h')"]),
        (_one(name="bad name"), ["instruments[0]", "field 'name'"]),
        (_one(channels=[1, 1]), ["instrument 'smu1'", "channel index 1 appears twice"]),
        (_one(channels=[{"index": 1, "max_current_a": -1}]),
         ["field 'channels[0].max_current_a'", "greater than 0"]),
        (_one(colour="red"), ["field 'colour'", "unknown key"]),
        (_one(options={"transport": {"timeout": 3}}),
         ["field 'options'", "unknown transport option 'timeout'"]),
        (_one(options={"transport": {"timeout_s": "3"}}), ["'timeout_s'", "wrong type"]),
        (_one(options={"modle": "2460"}),
         ["field 'options.modle'", "driver 'keithley2450' has no option 'modle'", "model"]),
        (_one(driver="nope"), ["field 'driver': unknown driver 'nope'", "keithley2450"]),
        ({"instruments": [{"name": "a"}]}, ["instrument 'a' (instruments[0]), field 'driver'",
                                            "required but missing"]),
        ({"instruments": "x"}, ["field 'instruments'"]),
        (["not", "tables"], ["instruments[0]"]),
    ],
)
def test_schema_errors_name_instrument_and_field(data: object, needles: list[str]) -> None:
    with pytest.raises(InstrumentConfigError) as err:
        parse_instruments_config(data, "lab.toml")
    text = str(err.value)
    assert text.startswith("lab.toml:")
    for needle in needles:
        assert needle in text, (needle, text)


def test_duplicates_rejected() -> None:
    a = {"name": "a", "driver": "keithley2450", "resource": "COM3"}
    with pytest.raises(InstrumentConfigError, match="used twice"):
        parse_instruments_config({"instruments": [a, dict(a)]})
    with pytest.raises(InstrumentConfigError, match="share the resource 'COM3'"):
        parse_instruments_config({"instruments": [a, {**a, "name": "b"}]})
    # A disabled duplicate is fine (spare instrument kept in the file).
    parse_instruments_config({"instruments": [a, {**a, "name": "b", "enabled": False}]})


def test_toml_and_yaml_round_trip(tmp_path: Path) -> None:
    tables: list[dict[str, Any]] = [
        {"name": "chamber1", "driver": "espec_chamber", "resource": "ASRL/dev/ttyUSB0::INSTR",
         "options": {"min_c": -20.0, "max_c": 100.0,
                     "transport": {"read_termination": "\r\n", "write_termination": "\r\n",
                                   "baudrate": 19200}}},
        {"name": "smu1", "driver": "keithley2450", "resource": "TCPIP::10.0.0.5::5025::SOCKET",
         "description": 'SMU "left" bench', "options": {"model": "2460"},
         "channels": [{"index": 1, "name": "smu1/1", "max_current_a": 7.35,
                       "max_voltage_v": 21.0, "cell": "A-001"}]},
    ]
    toml_path = tmp_path / "lab.toml"
    toml_path.write_text(dump_instruments_toml(tables, header="test lab"))
    cfg = load_instruments_config(toml_path)
    chamber = cfg.by_name("chamber1")
    assert chamber.transport_options == {"read_termination": "\r\n", "write_termination": "\r\n",
                                         "baudrate": 19200}
    assert chamber.driver_options == {"min_c": -20.0, "max_c": 100.0}
    assert cfg.by_name("smu1").description == 'SMU "left" bench'
    assert cfg.by_name("smu1").channels[0].cell == "A-001"
    import yaml

    yaml_path = tmp_path / "lab.yaml"
    yaml_path.write_text(yaml.safe_dump({"instruments": tables}))
    assert load_instruments_config(yaml_path) == cfg
    yaml_path.write_text("instruments: [a: b\n")
    with pytest.raises(InstrumentConfigError, match="not valid YAML"):
        load_instruments_config(yaml_path)
