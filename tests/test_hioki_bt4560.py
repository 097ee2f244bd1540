"""Hioki BT4560 driver and simulator: byte-exact protocol (incl. CR+LF on the wire), the
simulator on its own, then EIS sweeps of a simulated cell over TCP (pyvisa-py SOCKET) and
a pty (pyvisa-py ASRL and plain pyserial), with error, timeout and garbled-reply cases."""

from __future__ import annotations

import math
import socket
import time
from collections import deque
from collections.abc import Iterator

import numpy as np
import pytest

from labdaq.drivers.base import get_driver, match_driver
from labdaq.drivers.errors import (
    GarbledReply,
    InstrumentReportedError,
    InstrumentTimeout,
    InstrumentValueError,
)
from labdaq.drivers.hioki_bt4560 import (
    HiokiBT4560,
    ImpedanceOverRange,
    LeadContactError,
)
from labdaq.drivers.opener import open_driver, open_instrument
from labdaq.drivers.roles import ImpedanceAnalyser
from labdaq.drivers.transport import ScriptedTransport, Transport
from labdaq.sims.cell import CellBank
from labdaq.sims.clock import ManualClock
from labdaq.sims.hioki_bt4560 import HiokiBT4560Sim, make_server
from labdaq.sims.server import SimServer

IDN = "HIOKI,BT4560,230912345,V1.05"
TIMEOUT_S = 0.5
SEED_REPLY = "0.0065671,0.00282787,7.37814"  # 1 kHz point of a public BT4560 log
CONFIGURE = [
    ":FUNCtion RV", ":RANGe 30E-3", ":SAMPle:RATE V,MED", ":SAMPle:RATE Z,MED",
    ":SAMPle:DELay:MODE WAVE", ":SAMPle:DELay:WAVE 0.5", ":TRIGger:SOURce EXT",
    ":INITiate:CONTinuous ON",
]


def scripted(*pairs: tuple[str | None, str | None]) -> HiokiBT4560:
    return HiokiBT4560(ScriptedTransport(pairs), "eis")


def used(h: HiokiBT4560) -> None:
    assert isinstance(h.transport, ScriptedTransport)
    h.transport.assert_all_used()


def configured(*pairs: tuple[str | None, str | None]) -> HiokiBT4560:
    """A driver whose configure() traffic is already scripted and consumed."""
    h = scripted(*[(c, None) for c in CONFIGURE], ("*ESR?", "0"), *pairs)
    h.configure()
    return h


# -- byte-exact protocol ------------------------------------------------------------------


def test_configure_protocol() -> None:
    h = scripted(*[(c, None) for c in CONFIGURE], ("*ESR?", "0"))
    h.configure(range_ohm=0.03, speed="MED", delay_waves=0.5)
    used(h)


def test_sweep_protocol_and_values() -> None:
    h = configured(
        (":FREQuency 1000", None), ("*ESR?", "0"), ("*TRG;*WAI;:FETCh?", SEED_REPLY),
        (":FREQuency 0.1", None), ("*ESR?", "0"),
        ("*TRG;*WAI;:FETCh?", "0.0107295,-0.00461955,7.37794"),
        ("*ESR?", "0"),
    )
    z = h.sweep([1000, 0.1])
    assert z.dtype == np.complex128 and z.shape == (2,)
    assert z[0] == complex(0.0065671, 0.00282787)
    assert z[1] == complex(0.0107295, -0.00461955)
    assert [r.voltage_v for r in h.last_sweep] == [7.37814, 7.37794]
    assert [r.frequency_hz for r in h.last_sweep] == [1000.0, 0.1]
    used(h)


def test_sweep_sets_up_bus_trigger_when_not_configured() -> None:
    h = scripted(
        (":FREQuency 123.456789", None), ("*ESR?", "0"),
        (":TRIGger:SOURce EXT", None), (":INITiate:CONTinuous ON", None), ("*ESR?", "0"),
        ("*TRG;*WAI;:FETCh?", "0.02,-1E-04,3.7"), ("*ESR?", "0"),
    )
    assert h.sweep(np.array([123.456789]))[0] == complex(0.02, -1e-4)
    used(h)


def test_dc_voltage_protocol() -> None:
    # The frequency is asked once (the reading records it), then each point is one query.
    h = configured((":FREQuency?", "+1.00000000E+03"), ("*TRG;*WAI;:FETCh?", SEED_REPLY),
                   ("*TRG;*WAI;:FETCh?", SEED_REPLY))
    assert h.dc_voltage_v() == 7.37814
    assert h.measure_point().frequency_hz == 1000.0
    used(h)


def test_properties_protocol() -> None:
    h = scripted(
        (":RANGe?", "3.0000E-02"), (":RANGe 3", None), ("*ESR?", "0"),
        (":FREQuency?", "1.0000E+03"), (":INITiate:CONTinuous?", "ON"),
        (":INITiate:CONTinuous?", "0"), (":SAMPle:RATE? Z", "SLOW"),
        (":SAMPle:RATE V,FAST", None), ("*ESR?", "0"), (":TRIGger:SOURce?", "EXT"),
        ("*IDN?", IDN),
    )
    assert h.impedance_range_ohm == 0.03
    h.impedance_range_ohm = 3.0
    assert h.frequency_hz == 1000.0
    assert h.continuous is True
    assert h.continuous is False
    assert h.speed_z == "SLOW"
    h.speed_v = "fast"
    assert h.trigger_source == "EXT"
    assert h.idn == IDN
    used(h)


class WireTransport(Transport):
    """Real Transport framing over an in-memory wire: records the bytes written and hands
    back scripted raw reply bytes, so the CR+LF on the wire is checked byte for byte."""

    def __init__(self, replies: list[bytes], **kwargs: object) -> None:
        super().__init__("WIRE::INSTR", **kwargs)  # type: ignore[arg-type]
        self.wire: list[bytes] = []
        self.replies = deque(replies)

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def _send(self, data: bytes) -> None:
        self.wire.append(data)

    def _receive(self) -> bytes:
        return self.replies.popleft()


def test_crlf_framing_on_the_wire() -> None:
    wire = WireTransport([b"0\r\n", SEED_REPLY.encode() + b"\r\n", b"0\r\n"],
                         read_termination=HiokiBT4560.read_termination,
                         write_termination=HiokiBT4560.write_termination)
    h = HiokiBT4560(wire, "eis")
    h._bus_trigger_ready = True  # configure() traffic is covered by test_configure_protocol
    z = h.sweep([1000])
    assert wire.wire == [b":FREQuency 1000\r\n", b"*ESR?\r\n", b"*TRG;*WAI;:FETCh?\r\n",
                         b"*ESR?\r\n"]
    assert z[0] == complex(0.0065671, 0.00282787)


def test_open_uses_crlf_terminations() -> None:
    sim = HiokiBT4560Sim(CellBank("nmc811", soc=0.5, seed=1), seed=1)
    with make_server(sim, "tcp") as server:
        h = open_driver("hioki_bt4560", server.resource, timeout_s=TIMEOUT_S)
        try:
            assert (h.transport.read_termination, h.transport.write_termination) == (
                "\r\n", "\r\n")
            assert h.idn == IDN
        finally:
            h.close()
        # The simulator answers with CR+LF, byte for byte.
        with socket.create_connection((server.host, server.port), timeout=1.0) as sock:
            sock.sendall(b"*IDN?\r\n")
            data = b""
            while not data.endswith(b"\n"):
                data += sock.recv(256)
        assert data == IDN.encode() + b"\r\n"


def test_out_of_range_frequency_rejected_before_sending() -> None:
    h = scripted()
    for bad in (2000.0, 0.05, math.nan, -1.0):
        with pytest.raises(InstrumentValueError) as exc:
            h.sweep([1000.0, bad])
        err = exc.value
        assert err.instrument == "eis"
        assert err.command.startswith(":FREQuency")
        assert "0.1" in err.expected and "1050" in err.expected
    with pytest.raises(InstrumentValueError):
        h.impedance_range_ohm = 0.01  # not one of the four ranges
    with pytest.raises(InstrumentValueError):
        h.configure(speed="TURBO")
    assert isinstance(h.transport, ScriptedTransport) and h.transport.sent == []


def test_esr_execution_error_raises_typed_error() -> None:
    h = configured((":FREQuency 1000", None), ("*ESR?", "16"))
    with pytest.raises(InstrumentReportedError) as exc:
        h.sweep([1000])
    err = exc.value
    assert err.code == 16 and "execution error" in err.text
    assert err.command == ":FREQuency 1000" and err.instrument == "eis"
    assert "expected" in str(err) and "*ESR?" in str(err)
    used(h)


def test_esr_command_error_and_several_bits() -> None:
    h = scripted((":BOGus 1", None), ("*ESR?", "48"))
    with pytest.raises(InstrumentReportedError) as exc:
        h.write_checked(":BOGus 1")
    assert exc.value.code == 32 and "command error" in exc.value.text
    assert [code for code, _ in exc.value.others] == [16]
    h2 = scripted(("*ESR?", "128"))  # power-on bit alone is not an error
    h2.check_errors()
    used(h2)


def test_overflow_and_contact_fault() -> None:
    h = configured(
        (":FREQuency 0.1", None), ("*ESR?", "0"), ("*TRG;*WAI;:FETCh?", "1E+09,-1E+09,3.7"),
        (":FREQuency 0.1", None), ("*ESR?", "0"), ("*TRG;*WAI;:FETCh?", "1E+09,-1E+09,3.7"),
        ("*ESR?", "0"),
        (":FREQuency 1", None), ("*ESR?", "0"), ("*TRG;*WAI;:FETCh?", "1E+10,1E+10,1E+10"),
        ("*TRG;*WAI;:FETCh?", "1E+10,1E+10,1E+10"),  # frequency known from the sweep
    )
    with pytest.raises(ImpedanceOverRange) as exc:
        h.sweep([0.1])
    assert exc.value.frequency_hz == 0.1 and exc.value.range_ohm == 0.03
    assert "larger range" in str(exc.value)
    z = h.sweep([0.1], on_overflow="nan")
    assert np.isnan(z[0].real) and np.isnan(z[0].imag) and h.last_sweep[0].overflow
    assert h.last_sweep[0].voltage_v == 3.7  # V stays valid on an impedance overflow
    with pytest.raises(LeadContactError) as lead:
        h.sweep([1])
    assert "contact" in str(lead.value)
    with pytest.raises(LeadContactError):
        h.dc_voltage_v()
    used(h)


def test_reversed_polarity_is_flagged_not_hidden() -> None:
    h = configured((":FREQuency?", "1E+03"), ("*TRG;*WAI;:FETCh?", "0.02,-0.001,-3.7"))
    reading = h.measure_point()
    assert reading.reversed_polarity and reading.voltage_v == -3.7


def test_garbled_replies() -> None:
    h = configured(
        (":FREQuency 1000", None), ("*ESR?", "0"), ("*TRG;*WAI;:FETCh?", "0.02,-0.001"),
        (":FREQuency 1000", None), ("*ESR?", "0"), ("*TRG;*WAI;:FETCh?", "0.02,abc,3.7"),
        (":FREQuency 1000", None), ("*ESR?", "#?"),
    )
    with pytest.raises(GarbledReply) as exc:
        h.sweep([1000])
    assert exc.value.command == "*TRG;*WAI;:FETCh?" and "R,X,V" in exc.value.expected
    with pytest.raises(GarbledReply):
        h.sweep([1000])
    with pytest.raises(GarbledReply) as esr:
        h.sweep([1000])
    assert esr.value.command == "*ESR?"
    used(h)


def test_registry_and_idn_matching() -> None:
    assert match_driver(IDN) == "hioki_bt4560"
    assert get_driver("hioki_bt4560") is HiokiBT4560
    assert issubclass(HiokiBT4560, ImpedanceAnalyser)


# -- simulator unit (no transport) --------------------------------------------------------


@pytest.fixture
def bank() -> CellBank:
    return CellBank("nmc811", n=1, soc=0.5, seed=1)


def fetch(sim: HiokiBT4560Sim) -> tuple[float, float, float]:
    r, x, v = (float(p) for p in (sim.handle_line("*TRG;*WAI;:FETCh?") or "").split(","))
    return r, x, v


def test_sim_identity_esr_and_no_error_queue(bank: CellBank) -> None:
    sim = HiokiBT4560Sim(bank, seed=1)
    assert sim.handle_line("*IDN?") == IDN
    assert sim.handle_line("*ESR?") == "128"  # power-on
    assert sim.handle_line("*ESR?") == "0"  # read-and-clear
    sim.handle_line(":FREQuency 2000")
    assert sim.handle_line("*ESR?") == "16"
    assert sim.handle_line(":FREQuency?") == "+1.00000000E+03"  # unchanged
    assert sim.handle_line(":SYSTem:ERRor?") is None  # no SCPI error queue on a BT4560
    assert sim.handle_line("*ESR?") == "32"
    sim.handle_line(":FREQ 10;*CLS")
    assert sim.handle_line("*ESR?") == "0"
    assert sim.handle_line(":FREQ?") == "+1.00000000E+01"


def test_sim_trigger_modes(bank: CellBank) -> None:
    sim = HiokiBT4560Sim(bank, seed=1)
    sim.handle_line("*ESR?")
    assert sim.handle_line(":FETCh?") is not None  # *RST default: free run, always fresh
    assert sim.handle_line(":READ?") is None  # refused while continuous
    assert sim.handle_line("*ESR?") == "16"
    sim.handle_line(":INIT:CONT OFF")
    assert len((sim.handle_line(":READ?") or "").split(",")) == 3
    sim.handle_line(":TRIG:SOUR EXT;:INIT:CONT ON")
    n = sim.measurements
    fetch(sim)
    assert sim.measurements == n + 1
    assert sim.handle_line(":FETCh?") is not None  # last reading, no new measurement
    assert sim.measurements == n + 1


def test_sim_spectrum_matches_cell_model(bank: CellBank) -> None:
    sim = HiokiBT4560Sim(bank, seed=3)
    sim.handle_line(":RANGe 30E-3;:TRIG:SOUR EXT;:INIT:CONT ON")
    r0 = float(bank.r0_ohm[0])
    sim.handle_line(":FREQ 1050")
    r_hi, _, v = fetch(sim)
    assert r_hi == pytest.approx(r0, rel=0.02)
    assert v == pytest.approx(float(bank.voltage_v[0]), abs=1e-4)
    reals, imags = [], []
    for f in (1000, 100, 10, 1, 0.1):
        sim.handle_line(f":FREQ {f}")
        r, x, _ = fetch(sim)
        z_true = sim.true_impedance_ohm()
        assert abs(complex(r, x) - z_true) < 0.002 * abs(z_true)  # noise only
        reals.append(r)
        imags.append(x)
    # R grows toward low frequency (arcs + diffusion); 1 kHz vs 100 Hz is within noise.
    assert reals[1:] == sorted(reals[1:]) and reals[0] < reals[-1]
    assert all(x < 0 for x in imags[2:])  # capacitive at low frequency
    assert min(imags) == imags[-1]


def test_sim_is_reproducible_with_a_seed(bank: CellBank) -> None:
    clock = ManualClock()
    a = HiokiBT4560Sim(bank, clock=clock, seed=7)
    b = HiokiBT4560Sim(bank, clock=clock, seed=7)
    c = HiokiBT4560Sim(bank, clock=clock, seed=8)
    replies = [s.handle_line(":FETCh?") for s in (a, b, c)]
    assert replies[0] == replies[1] != replies[2]
    # Noise is keyed on simulated time and frequency, not on how often the meter was
    # asked: a repeated :FETCh? (a driver's retry) reads the same; a later one does not.
    assert a.handle_line(":FETCh?") == replies[0]
    clock.advance(1.0)
    later = a.handle_line(":FETCh?")
    assert later != replies[0] and later == b.handle_line(":FETCh?")


def test_sim_lead_inductance_makes_high_frequency_inductive(bank: CellBank) -> None:
    sim = HiokiBT4560Sim(bank, seed=1, lead_inductance_h=0.5e-6, noise_rel=0.0)
    sim.handle_line(":RANGe 30E-3;:FREQ 1000")
    assert float((sim.handle_line(":FETCh?") or "").split(",")[1]) > 0
    sim.handle_line(":FREQ 0.1")
    assert float((sim.handle_line(":FETCh?") or "").split(",")[1]) < 0


def test_sim_overflow_and_contact_fault_replies(bank: CellBank) -> None:
    sim = HiokiBT4560Sim(bank, seed=1)
    sim.handle_line(":RANGe 3E-3;:FREQ 1")  # ~20 mOhm cell on the 3 mOhm range
    r, x, v = (sim.handle_line(":FETCh?") or "").split(",")
    assert (r, x) == ("1E+09", "-1E+09") and 3.0 < float(v) < 4.5
    sim.disconnect_leads()
    assert sim.handle_line(":FETCh?") == "1E+10,1E+10,1E+10"
    sim.connect_leads()
    sim.reversed_leads = True
    assert float((sim.handle_line(":FETCh?") or "").split(",")[2]) < 0
    assert HiokiBT4560Sim(None).handle_line(":FETCh?") == "1E+10,1E+10,1E+10"  # no cell


def test_sim_range_selection(bank: CellBank) -> None:
    sim = HiokiBT4560Sim(bank)
    for text, expected in (("3E-3", 3e-3), ("0.02", 30e-3), ("300E-3", 0.3), ("3", 3.0)):
        sim.handle_line(f":RANGe {text}")
        assert sim.range_ohm == expected
    sim.handle_line("*ESR?")
    sim.handle_line(":RANGe 5")
    assert sim.handle_line("*ESR?") == "16" and sim.range_ohm == 3.0


# -- integration over real transports ---------------------------------------------------------


Rig = tuple[HiokiBT4560, HiokiBT4560Sim, SimServer, CellBank]


@pytest.fixture(params=["tcp-visa", "pty-visa", "pty-pyserial"])
def rig(request: pytest.FixtureRequest) -> Iterator[Rig]:
    cells = CellBank("nmc811", n=1, soc=0.5, seed=1)
    sim = HiokiBT4560Sim(cells, clock=ManualClock(), seed=11)
    kind = request.param
    with make_server(sim, "tcp" if kind.startswith("tcp") else "pty") as server:
        resource = server.path if kind == "pty-pyserial" else server.resource  # type: ignore[attr-defined]
        h = open_driver("hioki_bt4560", resource, name="eis", timeout_s=TIMEOUT_S)
        try:
            h.reset()
            h.configure(range_ohm=0.03)
            yield h, sim, server, cells
        finally:
            h.close()


def test_sweep_of_simulated_cell(rig: Rig) -> None:
    h, sim, _, cells = rig
    freqs = np.array([1050.0, 500.0, 100.0, 10.0, 1.0, 0.1])
    z = h.sweep(freqs)
    assert z.shape == freqs.shape
    assert z[0].real == pytest.approx(float(cells.r0_ohm[0]), rel=0.02)
    assert np.all(z[3:].imag < 0)  # capacitive at low frequency
    assert np.all(np.diff(z.real[2:]) > 0)  # R grows as frequency falls (below 100 Hz)
    expected = np.array([sim.true_impedance_ohm(f) for f in freqs])
    np.testing.assert_allclose(z, expected, rtol=0.003)
    assert sim.frequency_hz == 0.1 and sim.trigger_source == "EXT"
    assert h.dc_voltage_v() == pytest.approx(float(cells.voltage_v[0]), abs=1e-4)


def test_open_instrument_identifies_the_meter(rig: Rig) -> None:
    _, _, server, _ = rig
    inst = open_instrument(server.resource, timeout_s=TIMEOUT_S,
                           read_termination="\r\n", write_termination="\r\n")
    try:
        assert isinstance(inst, HiokiBT4560)
    finally:
        inst.close()


def test_forced_out_of_range_frequency_is_an_esr_execution_error(rig: Rig) -> None:
    h, sim, _, _ = rig
    h.set_validator("frequency_hz", None)  # bypass the driver's check to reach the meter
    with pytest.raises(InstrumentReportedError) as exc:
        h.set_frequency(2000.0)
    err = exc.value
    assert err.code == 16 and err.command == ":FREQuency 2000" and err.instrument == "eis"
    assert sim.frequency_hz != 2000.0
    h.check_errors()  # ESR was read-and-cleared


def test_unknown_command_is_an_esr_command_error(rig: Rig) -> None:
    h, *_ = rig
    with pytest.raises(InstrumentReportedError) as exc:
        h.write_checked(":BOGus:COMMand 1")
    assert exc.value.code == 32 and ":BOGus:COMMand 1" in str(exc.value)
    h.check_errors()


def test_contact_fault_over_transport(rig: Rig) -> None:
    h, sim, _, _ = rig
    sim.disconnect_leads()
    with pytest.raises(LeadContactError):
        h.sweep([1000.0])
    sim.connect_leads()
    assert h.sweep([1000.0]).shape == (1,)


def test_timeout_then_recovery(rig: Rig) -> None:
    h, _, server, _ = rig
    h.set_frequency(1000.0)
    server.swallow_next_reply()
    # The point's timeout is stretched by the integration time at 1 kHz: tens of ms.
    stretched_s = h._reply_timeout_s(1000.0)
    assert TIMEOUT_S < stretched_s < TIMEOUT_S + 0.5
    t0 = time.monotonic()
    with pytest.raises(InstrumentTimeout) as exc:
        h.measure_point()
    assert time.monotonic() - t0 >= TIMEOUT_S * 0.95  # not before its timeout
    assert exc.value.command == "*TRG;*WAI;:FETCh?"
    assert h.transport.timeout_s == TIMEOUT_S  # the per-point stretch was undone
    assert h.sweep([1000.0]).shape == (1,)  # link resynchronised


def test_garbled_reply_then_recovery(rig: Rig) -> None:
    h, _, server, _ = rig
    h.set_frequency(1000.0)
    server.garble_next_reply()
    with pytest.raises(GarbledReply):
        h.measure_point()
    assert h.measure_point().r_ohm > 0
