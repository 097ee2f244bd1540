"""Keysight DAQ970A driver and simulator: byte-exact protocol, the simulator on its own,
then thermocouple reads of a simulated cell over TCP (pyvisa-py SOCKET) and a pty (pyvisa-py
ASRL and plain pyserial), with open thermocouples, errors, timeouts and garbled replies."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator

import numpy as np
import pytest

from labdaq.drivers.base import get_driver, match_driver
from labdaq.drivers.errors import (
    GarbledReply,
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeout,
    InstrumentValueError,
)
from labdaq.drivers.keysight_daq970a import (
    KeysightDAQ970A,
    OpenThermocouple,
    TemperatureReadout,
    channel_list,
    is_open_reading,
)
from labdaq.drivers.opener import open_instrument
from labdaq.drivers.roles import TemperatureLogger
from labdaq.drivers.transport import ScriptedTransport
from labdaq.sims.cell import CellBank
from labdaq.sims.clock import ManualClock
from labdaq.sims.keysight_daq970a import DAQ970ASim, parse_channel_list
from labdaq.sims.server import SimServer
from tests.sim_probes import ServerProbe

IDN = "Keysight Technologies,DAQ970A,MY58012345,A.03.02-01.00-03.02-00.02-03.02"
OK = '+0,"No error"'
TIMEOUT_S = 0.5
OPEN = "+9.90000000E+37"


def scripted(*pairs: tuple[str | None, str | None], **kwargs: object) -> KeysightDAQ970A:
    return KeysightDAQ970A(ScriptedTransport(pairs), "tc", **kwargs)  # type: ignore[arg-type]


def used(d: KeysightDAQ970A) -> None:
    assert isinstance(d.transport, ScriptedTransport)
    d.transport.assert_all_used()


# -- byte-exact protocol ------------------------------------------------------------------


def test_read_protocol_one_query_after_setup() -> None:
    d = scripted(
        ("CONF:TEMP TC,K,(@101:103)", None), ("UNIT:TEMP C,(@101:103)", None),
        (":SYST:ERR?", OK),
        ("MEAS:TEMP? TC,K,(@101:103)", "+2.51000000E+01,+2.62000000E+01," + OPEN),
        ("MEAS:TEMP? TC,K,(@101:103)", "+2.52000000E+01,+2.63000000E+01,+2.70000000E+01"),
    )
    first = d.read_temperatures_c([101, 102, 103])
    assert first.dtype == np.float64
    assert first[:2].tolist() == [25.1, 26.2] and math.isnan(first[2])
    # Units are set once per channel; later reads are a single query for all channels.
    assert d.read_temperatures_c([101, 102, 103]).tolist() == [25.2, 26.3, 27.0]
    used(d)


def test_read_with_status_reports_open_thermocouple(caplog: pytest.LogCaptureFixture) -> None:
    d = scripted(
        ("CONF:TEMP TC,T,(@101,105)", None), ("UNIT:TEMP C,(@101,105)", None),
        (":SYST:ERR?", OK),
        ("MEAS:TEMP? TC,T,(@101,105)", f"+2.50000000E+01,{OPEN}"),
        ("MEAS:TEMP? TC,T,(@101,105)", "+2.50000000E+01,+2.40000000E+01"),
        tc_type="T",
    )
    with caplog.at_level(logging.WARNING):
        readout = d.read_with_status([105, 101])
    assert isinstance(readout, TemperatureReadout)
    assert readout.channels == (105, 101)  # the caller's order, not the scan order
    assert readout.open_mask.tolist() == [True, False]
    assert readout.open_channels == (105,) and readout.any_open
    assert math.isnan(readout.temperatures_c[0]) and readout.temperatures_c[1] == 25.0
    assert "open thermocouple" in caplog.text and "105" in caplog.text
    repaired = d.read_with_status([105, 101])
    assert not repaired.any_open and repaired.temperatures_c.tolist() == [24.0, 25.0]
    used(d)


def test_strict_mode_raises_open_thermocouple() -> None:
    d = scripted(
        ("CONF:TEMP TC,K,(@101:102)", None), ("UNIT:TEMP C,(@101:102)", None),
        (":SYST:ERR?", OK), ("MEAS:TEMP? TC,K,(@101:102)", f"{OPEN},+2.5E+01"),
        strict=True,
    )
    with pytest.raises(OpenThermocouple) as exc:
        d.read_temperatures_c([101, 102])
    assert exc.value.channels == (101,) and exc.value.instrument == "tc"
    assert isinstance(exc.value, InstrumentError)
    used(d)


def test_default_channels_and_list_compression() -> None:
    assert channel_list([105, 101, 102, 103, 201, 105]) == "(@101:103,105,201)"
    d = scripted(
        ("CONF:TEMP TC,K,(@101:102)", None), ("UNIT:TEMP C,(@101:102)", None),
        (":SYST:ERR?", OK), ("MEAS:TEMP? TC,K,(@101:102)", "+2.0E+01,+2.1E+01"),
        channels=[101, 102],
    )
    assert d.read_temperatures_c().tolist() == [20.0, 21.0]
    used(d)


def test_invalid_channels_rejected_before_sending() -> None:
    d = scripted()
    for bad in ([100], [141], [401], [101, 0], [], ["101"], [True]):
        with pytest.raises(InstrumentValueError) as exc:
            d.read_temperatures_c(bad)  # type: ignore[arg-type]
        assert exc.value.instrument == "tc" and exc.value.expected
    with pytest.raises(ValueError):
        KeysightDAQ970A(ScriptedTransport([]), tc_type="Q")
    assert isinstance(d.transport, ScriptedTransport) and d.transport.sent == []


def test_setup_error_from_queue_is_raised() -> None:
    d = scripted(
        ("CONF:TEMP TC,K,(@101)", None), ("UNIT:TEMP C,(@101)", None),
        (":SYST:ERR?", '-221,"Settings conflict"'), (":SYST:ERR?", OK),
    )
    with pytest.raises(InstrumentReportedError) as exc:
        d.read_temperatures_c([101])
    assert exc.value.code == -221 and "CONF:TEMP TC,K,(@101)" in exc.value.command
    used(d)


def test_garbled_and_short_replies() -> None:
    d = scripted(
        ("CONF:TEMP TC,K,(@101:102)", None), ("UNIT:TEMP C,(@101:102)", None),
        (":SYST:ERR?", OK),
        ("MEAS:TEMP? TC,K,(@101:102)", "+2.5E+01"),
        ("MEAS:TEMP? TC,K,(@101:102)", "+2.5E+01,#garbage"),
    )
    with pytest.raises(GarbledReply) as exc:
        d.read_temperatures_c([101, 102])
    assert "2 readings" in exc.value.expected and exc.value.command.startswith("MEAS:TEMP?")
    with pytest.raises(GarbledReply):
        d.read_temperatures_c([101, 102])
    used(d)


def test_configured_scan_with_channel_tags() -> None:
    d = scripted(
        ("CONF:TEMP TC,K,(@101:102)", None), ("UNIT:TEMP C,(@101:102)", None),
        (":FORM:READ:CHAN ON", None), (":SYST:ERR?", OK),
        ("READ?", f"+2.50000000E+01,101,{OPEN},102"),
        ("READ?", "+2.50000000E+01,101,+2.60000000E+01,103"),
        ("READ?", "+2.50000000E+01,101"),
    )
    d.configure_scan([102, 101])
    readout = d.read_scan()
    assert readout.channels == (102, 101) and readout.open_channels == (102,)
    assert readout.temperatures_c[1] == 25.0
    with pytest.raises(GarbledReply) as exc:  # a reading tagged with another channel
        d.read_scan()
    assert "103" in str(exc.value)
    with pytest.raises(GarbledReply):
        d.read_scan()
    used(d)


def test_read_scan_needs_configuration_and_survives_meas() -> None:
    d = scripted(
        ("CONF:TEMP TC,K,(@101)", None), ("UNIT:TEMP C,(@101)", None),
        (":FORM:READ:CHAN ON", None), (":SYST:ERR?", OK),
        ("MEAS:TEMP? TC,K,(@101)", "+2.5E+01"),
        # MEAS? replaced the scan and turned channel tags off: set them up again first.
        ("CONF:TEMP TC,K,(@101)", None), ("UNIT:TEMP C,(@101)", None),
        (":FORM:READ:CHAN ON", None), (":SYST:ERR?", OK),
        ("READ?", "+2.5E+01,101"),
    )
    with pytest.raises(InstrumentError):
        d.read_scan()
    d.configure_scan([101])
    d.read_temperatures_c([101])
    assert d.read_scan().temperatures_c.tolist() == [25.0]
    used(d)


def test_identify_modules_narrows_channels() -> None:
    d = scripted(
        ("SYST:CTYP? 100", "Keysight Technologies,DAQM901A,0,1.0"),
        ("SYST:CTYP? 200", "0,0,0,0"),
        ("SYST:CTYP? 300", "Keysight Technologies,DAQM908A,0,1.0"),
    )
    assert d.identify_modules() == {1: "DAQM901A", 3: "DAQM908A"}
    for bad in (121, 201, 341):
        with pytest.raises(InstrumentValueError):
            d.read_temperatures_c([bad])
    used(d)


def test_registry_and_idn_matching() -> None:
    assert match_driver(IDN) == "keysight_daq970a"
    assert match_driver("HEWLETT-PACKARD,34970A,0,13-2-2") == "keysight_daq970a"
    assert get_driver("keysight_daq970a") is KeysightDAQ970A
    assert issubclass(KeysightDAQ970A, TemperatureLogger)
    assert is_open_reading(9.9e37) and not is_open_reading(25.0)


# -- simulator unit (no transport) --------------------------------------------------------


def test_sim_measure_format_and_open_channels() -> None:
    temps = {101: 25.0, 102: 30.0}
    sim = DAQ970ASim({ch: (lambda t=t: t) for ch, t in temps.items()}
                     | {104: lambda: math.nan}, seed=1, open_channels={103}, noise_c=0.0)
    assert sim.handle_line("*IDN?") == IDN
    reply = sim.handle_line("MEAS:TEMP? TC,K,(@101:105)") or ""
    assert reply == ",".join(["+2.50000000E+01", "+3.00000000E+01"] + [OPEN] * 3)
    assert sim.handle_line("ROUT:SCAN?") == "(@101,102,103,104,105)"
    sim.set_open(103, False)
    sim.set_open(101)
    assert (sim.handle_line("MEAS:TEMP? TC,K,(@101)") or "") == OPEN
    assert sim.handle_line("SYST:ERR?") == OK


def test_sim_noise_is_seeded_and_small() -> None:
    def scans(seed: int, repeats: int = 1) -> list[str | None]:
        clock = ManualClock()
        sim = DAQ970ASim({101: lambda: 25.0}, clock=clock, seed=seed, noise_c=0.05)
        replies = []
        for _ in range(50):
            clock.advance(1.0)
            for _ in range(repeats):
                reply = sim.handle_line("MEAS:TEMP? TC,K,(@101)")
            replies.append(reply)
        return replies

    ra, rb, rc = scans(1), scans(1), scans(2)
    assert ra == rb != rc
    values = np.array([float(v or "") for v in ra])
    assert abs(values.mean() - 25.0) < 0.03 and 0.02 < values.std() < 0.1
    # Noise is keyed on the scan's simulated time, not drawn in call order: a query
    # re-sent at the same moment (a driver's retry after a timeout) reads the same and
    # leaves every later reading as it was.
    assert scans(1, repeats=2) == ra


def test_sim_scan_units_and_reading_format() -> None:
    clock = ManualClock()
    sim = DAQ970ASim({101: lambda: 25.0, 102: lambda: 0.0}, clock=clock, noise_c=0.0)
    sim.handle_line("CONF:TEMP TC,K,(@102,101)")
    sim.handle_line("UNIT:TEMP F,(@101);:UNIT:TEMP K,(@102)")
    assert sim.handle_line("ROUT:SCAN?") == "(@101,102)"
    assert sim.handle_line("ROUT:SCAN:SIZE?") == "2"
    assert sim.handle_line("FETC?") is None  # nothing measured yet
    assert sim.handle_line("SYST:ERR?") == '-230,"Data corrupt or stale"'
    sim.handle_line("FORM:READ:CHAN ON")
    assert sim.handle_line("READ?") == "+7.70000000E+01,101,+2.73150000E+02,102"
    sim.handle_line("FORM:READ:UNIT ON;TIME ON")
    clock.advance(1.5)
    sim.handle_line("INIT")
    assert sim.handle_line("FETC?") == ("+7.70000000E+01 F,000000001.500,101,"
                                         "+2.73150000E+02 K,000000001.500,102")
    # CONF (and MEAS?) turn the extra fields off again.
    sim.handle_line("CONF:TEMP TC,K,(@101)")
    assert sim.handle_line("READ?") == "+7.70000000E+01"
    sim.handle_line("*RST")
    assert sim.handle_line("MEAS:TEMP? TC,K,(@101)") == "+2.50000000E+01"  # *RST: back to C


def test_sim_errors_and_card_types() -> None:
    sim = DAQ970ASim({101: lambda: 25.0})
    assert sim.handle_line("SYST:CTYP? 100") == "Keysight Technologies,DAQM901A,0,1.0"
    assert sim.handle_line("SYST:CTYP? 200") == "0,0,0,0"
    assert sim.handle_line("MEAS:TEMP? TC,K,(@201)") is None
    assert sim.handle_line("MEAS:TEMP? TC,Q,(@101)") is None
    assert sim.handle_line("MEAS:TEMP? RTD,85,(@101)") is None
    assert sim.handle_line("BOGUS") is None
    assert sim.handle_line("SYST:ERR?") == '-221,"Settings conflict (channel 201 not available)"'
    assert sim.handle_line("SYST:ERR?") == '-224,"Illegal parameter value"'
    assert (sim.handle_line("SYST:ERR?") or "").startswith("-221,")
    assert sim.handle_line("SYST:ERR?") == '-113,"Undefined header"'
    assert sim.handle_line("SYST:ERR?") == OK
    assert parse_channel_list("(@101,103:105)") == [101, 103, 104, 105]


# -- integration over real transports ---------------------------------------------------------


Rig = tuple[KeysightDAQ970A, DAQ970ASim, SimServer, CellBank]


@pytest.fixture(params=["tcp-visa", "pty-visa", "pty-pyserial"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    cells = CellBank("lfp", n=2, soc=0.5, temperature_c=[31.5, 27.0], seed=2)
    sim = DAQ970ASim({101: lambda: float(cells.temperature_c[0]),
                      102: lambda: float(cells.temperature_c[1]),
                      110: lambda: float(cells.ambient_c[0])},
                     clock=ManualClock(), seed=5, open_channels={103})
    kind = request.param
    server = SimServer.tcp(sim) if kind.startswith("tcp") else SimServer.pty(sim)
    with server:
        resource = server.path if kind == "pty-pyserial" else server.resource  # type: ignore[attr-defined]
        inst = open_instrument(resource, "tc", timeout_s=TIMEOUT_S)
        assert isinstance(inst, KeysightDAQ970A)
        try:
            inst.reset()
            yield inst, sim, server, cells
        finally:
            inst.close()


def test_reads_simulated_cell_temperatures(rig: Rig) -> None:
    d, sim, _, cells = rig
    temps = d.read_temperatures_c([110, 102, 101])
    np.testing.assert_allclose(temps, [25.0, 27.0, 31.5], atol=0.1)
    cells.step([0.0, 0.0], 600.0)  # the cells cool toward ambient
    later = d.read_temperatures_c([101, 102])
    assert later[0] < temps[2] - 0.2 and later[1] < temps[1]
    np.testing.assert_allclose(later, cells.temperature_c, atol=0.1)
    assert sim.units == {101: "C", 102: "C", 110: "C"}


def test_open_thermocouple_reported(rig: Rig) -> None:
    d, sim, _, cells = rig
    readout = d.read_with_status([101, 103])
    assert readout.open_channels == (103,) and math.isnan(readout.temperatures_c[1])
    cells.sensor_dropout[0] = True  # the cell's own sensor drops out mid-test
    assert d.read_with_status([101]).open_channels == (101,)
    d.strict = True
    with pytest.raises(OpenThermocouple) as exc:
        d.read_temperatures_c([101, 102, 103])
    assert exc.value.channels == (101, 103)
    cells.sensor_dropout[0] = False
    sim.set_open(103, False)
    sim.sources[103] = lambda: 22.0
    assert not np.isnan(d.read_temperatures_c([101, 103])).any()


def test_scan_over_transport(rig: Rig) -> None:
    d, sim, _, cells = rig
    d.configure_scan([102, 101])
    readout = d.read_scan()
    np.testing.assert_allclose(readout.temperatures_c,
                               [cells.temperature_c[1], cells.temperature_c[0]], atol=0.1)
    assert sim.format_fields["CHAN"] and d.scan_size == 2
    assert d.reading_channel_field is True


def test_unknown_command_and_bad_channel_errors(rig: Rig) -> None:
    d, *_ = rig
    with pytest.raises(InstrumentReportedError) as exc:
        d.write_checked("ROUT:BOGUS (@101)")
    assert exc.value.code == -113 and exc.value.instrument == "tc"
    d.check_errors()  # queue drained
    with pytest.raises(InstrumentReportedError) as slot:  # slot 2 is empty in the sim
        d.configure_scan([201])
    assert slot.value.code == -221


def test_timeout_then_recovery(rig: Rig) -> None:
    d, _, server, _ = rig
    d.read_temperatures_c([101])
    server.swallow_next_reply()
    d.transport.retry_timeouts = False
    probe = ServerProbe(server)
    t0 = time.monotonic()
    with pytest.raises(InstrumentTimeout) as exc:
        d.read_temperatures_c([101])
    # One try that waited out its timeout (the wait's length itself is up to the load).
    assert time.monotonic() - t0 >= TIMEOUT_S * 0.95
    assert probe.received == ["MEAS:TEMP? TC,K,(@101)"]
    assert exc.value.command == "MEAS:TEMP? TC,K,(@101)"
    assert d.read_temperatures_c([101]).shape == (1,)


def test_idempotent_read_is_retried_once_after_timeout(rig: Rig) -> None:
    d, _, server, cells = rig
    d.read_temperatures_c([101])
    server.swallow_next_reply()
    # MEAS? is a pure query: the transport reconnects and asks again once.
    assert d.read_temperatures_c([101])[0] == pytest.approx(cells.temperature_c[0], abs=0.1)


def test_garbled_reply_then_recovery(rig: Rig) -> None:
    d, _, server, _ = rig
    d.read_temperatures_c([101, 102])
    server.garble_next_reply()
    with pytest.raises(GarbledReply):
        d.read_temperatures_c([101, 102])
    assert d.read_temperatures_c([101, 102]).shape == (2,)
