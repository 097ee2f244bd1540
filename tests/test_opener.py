"""The one instrument opener (drivers/opener.py): drivers by entry point, the driver's
declared framing under the configuration's options, identification — against the
simulators over real transports (pty and TCP), with the bytes on the wire checked."""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Any

import pytest

from labdaq.drivers.base import Instrument, register_driver, unregister_driver
from labdaq.drivers.errors import UnknownInstrument
from labdaq.drivers.espec_chamber import EspecChamber
from labdaq.drivers.hioki_bt4560 import HiokiBT4560
from labdaq.drivers.keithley2450 import Keithley2450
from labdaq.drivers.keysight_daq970a import KeysightDAQ970A
from labdaq.drivers.opener import (
    declared_transport_options,
    open_configured,
    open_driver,
    open_instrument,
    resolve_driver,
    transport_options_for,
)
from labdaq.drivers.transport import Transport
from labdaq.instruments_config import InstrumentConfig
from labdaq.sims.cell import CellBank
from labdaq.sims.clock import ManualClock
from labdaq.sims.espec_chamber import EspecChamberSim
from labdaq.sims.hioki_bt4560 import HiokiBT4560Sim
from labdaq.sims.keysight_daq970a import DAQ970ASim
from labdaq.sims.server import PtySimServer, SimServer, TcpSimServer

CRLF = {"read_termination": "\r\n", "write_termination": "\r\n"}
TIMEOUT_S = 5.0
SHIPPED = {"keithley2450", "cabinet", "hioki_bt4560", "keysight_daq970a", "espec_chamber"}


class RecordingPty(PtySimServer):
    """A pty simulator server that keeps every byte the host sent, in order."""

    def __init__(self, sim: Any, **kwargs: Any) -> None:
        super().__init__(sim, **kwargs)
        self.wire = bytearray()

    def _split_lines(self, buffer: bytearray) -> list[str]:
        before = bytes(buffer)
        lines = super()._split_lines(buffer)
        self.wire.extend(before[: len(before) - len(buffer)])
        return lines


def _hioki_sim() -> HiokiBT4560Sim:
    return HiokiBT4560Sim(CellBank("nmc811", n=1, soc=0.5, seed=1), clock=ManualClock(), seed=3)


def _commands(wire: bytes) -> list[bytes]:
    """Each command as sent, terminator included."""
    out, start = [], 0
    for i, byte in enumerate(wire):
        if byte == ord("\n"):
            out.append(wire[start:i + 1])
            start = i + 1
    return out


def test_declared_framing_of_the_shipped_drivers() -> None:
    assert declared_transport_options(HiokiBT4560) == CRLF  # class attributes
    assert declared_transport_options(EspecChamber) == CRLF  # transport_options dict
    assert declared_transport_options(KeysightDAQ970A) == {"read_termination": "\n",
                                                           "write_termination": "\n"}
    assert declared_transport_options(Keithley2450) == {}  # the transport's LF default


def test_configuration_overrides_framing_and_callers_override_both() -> None:
    opts = transport_options_for(HiokiBT4560, {"read_termination": "\n", "timeout_s": 3.0},
                                 timeout_s=1.0)
    assert opts == {"read_termination": "\n", "write_termination": "\r\n", "timeout_s": 1.0}


def test_drivers_resolve_through_the_entry_point_group() -> None:
    eps = {ep.name: ep for ep in entry_points(group="labdaq.drivers")}
    assert SHIPPED <= set(eps)
    for name, ep in eps.items():
        assert resolve_driver(name) is ep.load()
    with pytest.raises(UnknownInstrument) as exc:
        resolve_driver("nonesuch")
    assert "nonesuch" in str(exc.value) and "hioki_bt4560" in str(exc.value)


def test_hioki_on_a_pty_without_options_is_framed_crlf() -> None:
    sim = _hioki_sim()
    with RecordingPty(sim, **CRLF) as server:
        spec = InstrumentConfig(name="eis1", driver="hioki_bt4560", resource=server.resource)
        assert spec.options == {}
        h = open_configured(spec, timeout_s=TIMEOUT_S)
        try:
            assert isinstance(h, HiokiBT4560) and h.name == "eis1"
            assert (h.transport.read_termination, h.transport.write_termination) == (
                "\r\n", "\r\n")
            assert h.idn.startswith("HIOKI,BT4560,")
            h.configure(range_ohm=0.03)
            z = h.sweep([1000.0])
            assert z[0].real == pytest.approx(sim.true_impedance_ohm(1000.0).real, rel=0.01)
        finally:
            h.close()
        commands = _commands(bytes(server.wire))
        assert commands and commands[0] == b"*IDN?\r\n"
        assert all(c.endswith(b"\r\n") for c in commands), commands


def test_configured_transport_options_keep_the_declared_framing() -> None:
    with RecordingPty(_hioki_sim(), **CRLF) as server:
        spec = InstrumentConfig(name="eis1", driver="hioki_bt4560", resource=server.resource,
                                options={"transport": {"timeout_s": 4.5}})
        h = open_configured(spec)
        try:
            assert h.transport.timeout_s == 4.5
            assert h.transport.write_termination == "\r\n"
            assert h.idn.startswith("HIOKI,BT4560,")
        finally:
            h.close()


def test_driver_options_reach_the_constructor() -> None:
    sim = DAQ970ASim({101: lambda: 25.0, 102: lambda: 30.0}, clock=ManualClock(), noise_c=0.0)
    with SimServer.tcp(sim) as server:
        logger = open_driver("keysight_daq970a", server.resource, name="logger1",
                             options={"channels": [101, 102], "tc_type": "T",
                                      "transport": {"timeout_s": TIMEOUT_S}})
        try:
            assert isinstance(logger, KeysightDAQ970A)
            assert logger.channels == [101, 102] and logger.tc_type == "T"
            assert logger.transport.timeout_s == TIMEOUT_S
        finally:
            logger.close()


def test_the_link_is_closed_when_the_driver_cannot_be_built() -> None:
    built: list[Transport] = []

    class Refuses(Instrument):
        def __init__(self, transport: Transport, name: str | None = None, **kw: Any) -> None:
            built.append(transport)
            raise ValueError("refused on purpose")

    register_driver("test_refuses")(Refuses)
    sim = DAQ970ASim({101: lambda: 25.0}, clock=ManualClock())
    try:
        with SimServer.tcp(sim) as server:
            with pytest.raises(ValueError, match="on purpose"):
                open_driver("test_refuses", server.resource, timeout_s=TIMEOUT_S)
    finally:
        unregister_driver("test_refuses")
    assert len(built) == 1 and not built[0].is_open


@pytest.mark.parametrize("kind", ["hioki", "espec"])
def test_identified_instrument_gets_its_drivers_framing(kind: str) -> None:
    """Probed with LF, the ESPEC controller (no *IDN?: identified by ROM?) and the Hioki
    (by *IDN?) end up on a CR+LF link, as their drivers declare."""
    server: TcpSimServer
    if kind == "hioki":
        server = SimServer.tcp(_hioki_sim(), **CRLF)
        expected: type = HiokiBT4560
    else:
        sim = EspecChamberSim([CellBank("nmc811", n=1, soc=0.5, seed=1)], ManualClock(),
                              room_c=25.0)
        server = SimServer.tcp(sim, **CRLF)
        expected = EspecChamber
    with server:
        inst = open_instrument(server.resource, "x", timeout_s=TIMEOUT_S)
        try:
            assert type(inst) is expected
            assert (inst.transport.read_termination, inst.transport.write_termination) == (
                "\r\n", "\r\n")
            if kind == "espec":
                assert isinstance(inst, EspecChamber)
                assert inst.status() == "standby"
        finally:
            inst.close()
