"""Keithley 2450 driver and simulator: byte-exact protocol, then the real thing over TCP
and a pty (pyvisa-py ASRL and plain pyserial), physics, faults and the watchdog."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pytest

from labdaq.drivers.base import (
    Instrument,
    control,
    get_driver,
    load_entry_point_drivers,
    match_driver,
    measurement,
    parse_error_reply,
    register_driver,
    setting,
    strict_discrete_set,
    strict_range,
    truncated_range,
    unregister_driver,
)
from labdaq.drivers.errors import (
    ConnectionFailed,
    GarbledReply,
    InstrumentReportedError,
    InstrumentTimeout,
    InstrumentValueError,
    UnknownInstrument,
)
from labdaq.drivers.keithley2450 import Keithley2450
from labdaq.drivers.opener import open_instrument
from labdaq.drivers.roles import Cycler
from labdaq.drivers.transport import ScriptedTransport, open_transport
from labdaq.sims.clock import ManualClock
from labdaq.sims.keithley2450 import Keithley2450Sim
from labdaq.sims.server import PtySimServer, SimServer
from tests.sim_probes import ServerProbe, pty_unread_by_client, until

OK = '0,"No error"'
IDN = "KEITHLEY INSTRUMENTS INC.,MODEL 2450,04412345,1.7.12b"
TIMEOUT_S = 0.5


class StubCell:
    """Tiny cell for these tests only: linear OCV 3.0 V + 1.2 V x SOC, 0.1 ohm, 0.1 Ah."""

    def __init__(self, soc: float = 0.5, capacity_ah: float = 0.1, r_ohm: float = 0.1) -> None:
        self.soc = soc
        self.capacity_ah = capacity_ah
        self.r_ohm = r_ohm
        self.temperature_c = 25.0
        self.last_current = 0.0
        self.steps: list[tuple[float, float]] = []

    @property
    def ocv_v(self) -> float:
        return 3.0 + 1.2 * self.soc

    @property
    def voltage_v(self) -> float:
        return self.terminal_voltage(self.last_current)

    def terminal_voltage(self, current_a: float) -> float:
        return self.ocv_v + current_a * self.r_ohm

    def current_for_voltage(self, voltage_v: float) -> float:
        return (voltage_v - self.ocv_v) / self.r_ohm

    def step(self, current_a: float, dt_s: float) -> None:
        self.steps.append((current_a, dt_s))
        self.last_current = current_a
        self.soc += current_a * dt_s / 3600.0 / self.capacity_ah


def scripted(*pairs: tuple[str | None, str | None], model: str = "2450") -> Keithley2450:
    return Keithley2450(ScriptedTransport(pairs), "smu", model=model)


def used(k: Keithley2450) -> None:
    assert isinstance(k.transport, ScriptedTransport)
    k.transport.assert_all_used()


# -- byte-exact protocol ------------------------------------------------------------------


def test_set_current_protocol() -> None:
    k = scripted(
        (":SOUR:FUNC CURR", None),
        (":SOUR:CURR:VLIM 4.2", None),
        (":SOUR:CURR 0.5", None),
        (":SYST:ERR?", OK),
    )
    k.set_current(1, 0.5, 4.2)
    used(k)


def test_set_current_discharge_protocol() -> None:
    k = scripted(
        (":SOUR:FUNC CURR", None),
        (":SOUR:CURR:VLIM 4.25", None),
        (":SOUR:CURR -0.125", None),
        (":SYST:ERR?", OK),
    )
    k.set_current(1, -0.125, 4.25)
    used(k)


def test_set_voltage_protocol() -> None:
    k = scripted(
        (":SOUR:FUNC VOLT", None),
        (":SOUR:VOLT:ILIM 0.05", None),
        (":SOUR:VOLT 4.2", None),
        (":SYST:ERR?", OK),
    )
    k.set_voltage(1, 4.2, 0.05)
    used(k)


def test_output_protocol() -> None:
    k = scripted((":OUTP 1", None), (":SYST:ERR?", OK), (":OUTP 0", None), (":SYST:ERR?", OK),
                 (":OUTP?", "1"))
    k.output(1, True)
    k.all_off()
    assert k.output_enabled is True
    used(k)


def test_measure_protocol_one_round_trip() -> None:
    k = scripted((":MEAS:VOLT?;:MEAS:CURR?", "+3.71234500E+00;-5.00000000E-01"))
    data = k.measure([1])
    assert data.shape == (1, 3) and data.dtype == np.float64
    assert data[0, 0] == pytest.approx(3.712345)
    assert data[0, 1] == pytest.approx(-0.5)
    assert math.isnan(data[0, 2])
    used(k)


def test_protection_at_the_model_rating_uses_no_level_beyond_its_range() -> None:
    """A run limited only by the channel (an abuse run on a 2460, 105 V): PROT120 is out
    of a 2460's range, so the range itself bounds the voltage."""
    k = scripted(
        (":OUTP:CURR:SMOD HIMP", None),
        (":OUTP:VOLT:SMOD HIMP", None),
        (":SOUR:VOLT:PROT NONE", None),
        (":SYST:ERR?", OK),
        model="2460",
    )
    k.configure_protection(1, 105.0, 7.35)
    used(k)


def test_measure_overrange_is_nan() -> None:
    k = scripted((":MEAS:VOLT?;:MEAS:CURR?", "+9.90000000E+37;+1.0E-03"))
    assert math.isnan(k.measure()[0, 0])


def test_configure_protection_protocol() -> None:
    k = scripted(
        (":OUTP:CURR:SMOD HIMP", None),
        (":OUTP:VOLT:SMOD HIMP", None),
        (":SOUR:VOLT:PROT PROT5", None),
        (":SYST:ERR?", OK),
    )
    k.configure_protection(1, 4.3, 1.0)
    assert k.protection == (4.3, 1.0)
    used(k)
    # The run's limits now guard every later command, before anything is sent.
    with pytest.raises(InstrumentValueError):
        k.set_current(1, 0.5, 4.5)
    with pytest.raises(InstrumentValueError):
        k.set_voltage(1, 4.2, 1.02)


def test_safe_shutdown_protocol() -> None:
    k = scripted((":OUTP 0", None), (":OUTP:CURR:SMOD HIMP", None),
                 (":OUTP:VOLT:SMOD HIMP", None), (":OUTP?", "0"))
    k.safe_shutdown()
    used(k)


def test_properties_protocol() -> None:
    k = scripted(
        (":SOUR:FUNC?", "CURR"),
        (":SOUR:CURR?", "+5.00000000E-01"),
        (":SOUR:CURR:VLIM 4.2", None), (":SYST:ERR?", OK),
        (":MEAS:VOLT?", "+3.90000000E+00"),
        (":SOUR:CURR:VLIM:TRIP?", "1"),
        ("*IDN?", IDN),
    )
    assert k.source_function == "CURR"
    assert k.source_current_a == 0.5
    k.voltage_limit_v = 4.2
    assert k.voltage_v == 3.9
    assert k.in_voltage_compliance is True
    assert k.idn == IDN
    assert k.idn == IDN  # cached: no second *IDN?
    used(k)


def test_out_of_range_rejected_before_sending() -> None:
    k = scripted()
    for call in (
        lambda: k.set_current(1, 1.2, 4.2),
        lambda: k.set_current(1, 0.5, 250.0),
        lambda: k.set_voltage(1, 4.2, 2.0),
        lambda: setattr(k, "source_current_a", -1.06),
        lambda: setattr(k, "source_function", "RES"),
        lambda: k.set_current(2, 0.1, 4.2),
    ):
        with pytest.raises(InstrumentValueError) as exc:
            call()
        assert exc.value.instrument == "smu"
    assert isinstance(k.transport, ScriptedTransport) and k.transport.sent == []


def test_model_limits() -> None:
    k2450 = scripted()
    assert k2450.validator("source_current_a").max == 1.05  # type: ignore[union-attr]
    k2460 = scripted((":SOUR:FUNC CURR", None), (":SOUR:CURR:VLIM 4.2", None),
                     (":SOUR:CURR 5", None), (":SYST:ERR?", OK), model="2460")
    assert k2460.validator("source_current_a").max == 7.35  # type: ignore[union-attr]
    k2460.set_current(1, 5.0, 4.2)
    used(k2460)
    from_idn = Keithley2450(ScriptedTransport([]), idn=IDN.replace("2450", "2460"))
    assert from_idn.model == "2460"
    # Neither model nor idn given: the driver asks the instrument once.
    asked = Keithley2450(ScriptedTransport([("*IDN?", IDN.replace("2450", "2460"))]), "smu")
    assert asked.model == "2460" and asked.validator("source_current_a").max == 7.35  # type: ignore[union-attr]
    unknown = Keithley2450(ScriptedTransport([("*IDN?", "KEITHLEY INSTRUMENTS,MODEL 2470,1,1")]))
    assert unknown.model == "2450"


def test_reported_error_is_raised_and_queue_drained() -> None:
    k = scripted(
        (":SOUR:FUNC CURR", None),
        (":SOUR:CURR:VLIM 4.2", None),
        (":SOUR:CURR 0.5", None),
        (":SYST:ERR?", '-222,"Data out of range"'),
        (":SYST:ERR?", '-113,"Undefined header"'),
        (":SYST:ERR?", OK),
    )
    with pytest.raises(InstrumentReportedError) as exc:
        k.set_current(1, 0.5, 4.2)
    err = exc.value
    assert (err.code, err.text) == (-222, "Data out of range")
    assert err.others == [(-113, "Undefined header")]
    assert ":SOUR:CURR 0.5" in str(err) and "smu" in str(err) and "expected" in str(err)
    used(k)


def test_garbled_property_reply() -> None:
    k = scripted((":MEAS:CURR?", "#@!garbage"), (":MEAS:VOLT?;:MEAS:CURR?", "3.7"),
                 (":OUTP?", "maybe"))
    with pytest.raises(GarbledReply) as exc:
        _ = k.current_a
    assert exc.value.command == ":MEAS:CURR?"
    with pytest.raises(GarbledReply):
        k.measure()
    with pytest.raises(GarbledReply):
        _ = k.output_enabled


def test_registry_and_idn_matching() -> None:
    assert match_driver(IDN) == "keithley2450"
    assert match_driver("KEITHLEY INSTRUMENTS INC.,MODEL 2460,1,1.0") == "keithley2450"
    assert get_driver("keithley2450") is Keithley2450
    assert issubclass(Keithley2450, Cycler)
    with pytest.raises(UnknownInstrument):
        match_driver("ACME,TOASTER,1,0")


# -- simulator unit (no transport) --------------------------------------------------------


def test_sim_identity_ranges_and_errors() -> None:
    sim = Keithley2450Sim(clock=ManualClock())
    assert sim.handle_line("*IDN?") == IDN
    sim.handle_line(":SOUR:CURR 1.1")
    sim.handle_line(":SOUR:VOLT 211")
    assert sim.handle_line(":SYST:ERR?;:SYST:ERR?;:SYST:ERR?") == (
        '-222,"Data out of range";-222,"Data out of range";0,"No error"'
    )
    big = Keithley2450Sim(clock=ManualClock(), model="2460")
    big.handle_line(":SOUR:CURR 7;:SOUR:VOLT 106")
    assert big.handle_line(":SOUR:CURR?;:SYST:ERR?") == '+7.00000000E+00;-222,"Data out of range"'


def test_sim_cc_charge_reaches_compliance_and_tapers() -> None:
    clock = ManualClock()
    # 1 Ah, 0.1 ohm: compliance after ~35 min at 0.5 A, then a CV taper with tau ~ 300 s.
    cell = StubCell(soc=0.5, capacity_ah=1.0)
    sim = Keithley2450Sim(cell_bank=cell, clock=clock, adaptive_steps=False)
    sim.handle_line(":OUTP:CURR:SMOD HIMP;:SOUR:FUNC CURR;:SOUR:CURR:VLIM 4.0;:SOUR:CURR 0.5")
    sim.handle_line(":OUTP ON")
    currents, voltages = [], []
    for _ in range(90):
        clock.advance(60.0)
        v, i = (float(x) for x in (sim.handle_line(":MEAS:VOLT?;:MEAS:CURR?") or "").split(";"))
        voltages.append(v)
        currents.append(i)
    assert currents[0] == pytest.approx(0.5)  # CC phase first
    assert currents[30] == pytest.approx(0.5)
    assert max(voltages) <= 4.0 + 1e-9  # never above compliance
    tail = currents[-10:]
    assert all(b < a for a, b in zip(tail, tail[1:], strict=False))  # CV taper
    assert currents[-1] < 0.01
    assert voltages[-1] == pytest.approx(4.0, abs=1e-6)
    assert sim.handle_line(":SOUR:CURR:VLIM:TRIP?") == "1"
    # Long gaps are split into steps of at most 1 s simulated while current flows.
    assert max(dt for i, dt in cell.steps if i != 0.0) <= 1.0


def test_sim_discharge_and_cv_mode() -> None:
    clock = ManualClock()
    cell = StubCell(soc=0.5)
    sim = Keithley2450Sim(cell_bank=cell, clock=clock)
    sim.handle_line(":SOUR:FUNC CURR;:SOUR:CURR:VLIM 4.2;:SOUR:CURR -0.05;:OUTP ON")
    clock.advance(600)
    assert float(sim.handle_line(":MEAS:CURR?") or "") == pytest.approx(-0.05)
    assert cell.soc < 0.5
    # CV: the current limit holds when the target is far from the cell voltage.
    sim.handle_line(":SOUR:FUNC VOLT;:SOUR:VOLT:ILIM 0.02;:SOUR:VOLT 4.2")
    assert float(sim.handle_line(":MEAS:CURR?") or "") == pytest.approx(0.02)
    assert sim.handle_line(":SOUR:VOLT:ILIM:TRIP?") == "1"


def test_sim_output_off_states() -> None:
    clock = ManualClock()
    cell = StubCell(soc=0.5)
    sim = Keithley2450Sim(cell_bank=cell, clock=clock)
    sim.handle_line(":SOUR:FUNC CURR;:OUTP:CURR:SMOD HIMP;:SOUR:CURR 0.5")
    clock.advance(3600)
    assert float(sim.handle_line(":MEAS:CURR?") or "") == 0.0
    assert cell.soc == pytest.approx(0.5)
    # NORM (the *RST default) holds 0 V with the output off and drains the cell.
    sim.handle_line(":OUTP:CURR:SMOD NORM")
    clock.advance(60)
    assert float(sim.handle_line(":MEAS:CURR?") or "") < 0
    assert cell.soc < 0.5


def test_adaptive_steps_match_one_second_steps() -> None:
    """Large steps far from compliance must not change the result, only the cost."""
    results = []
    for adaptive in (False, True):
        clock = ManualClock()
        cell = StubCell(soc=0.2, capacity_ah=1.0)
        sim = Keithley2450Sim(cell_bank=cell, clock=clock, adaptive_steps=adaptive)
        sim.handle_line(":OUTP:CURR:SMOD HIMP;:SOUR:FUNC CURR;:SOUR:CURR:VLIM 4.0")
        sim.handle_line(":SOUR:CURR 0.5;:OUTP ON")
        trace = []
        for _ in range(30):
            clock.advance(300.0)
            reply = sim.handle_line(":MEAS:VOLT?;:MEAS:CURR?") or ""
            trace.append([float(x) for x in reply.split(";")])
        results.append((np.array(trace), cell.soc, sim.steps_taken))
    (strict, soc_strict, n_strict), (fast, soc_fast, n_fast) = results
    assert n_fast < n_strict / 5
    assert soc_fast == pytest.approx(soc_strict, abs=1e-3)
    assert fast[:, 0].max() <= 4.0 + 1e-9
    np.testing.assert_allclose(fast, strict, atol=0.01)


def test_sim_with_real_cell_bank() -> None:
    cell_mod = pytest.importorskip("labdaq.sims.cell")
    names = cell_mod.list_cell_specs()
    bank = cell_mod.CellBank(names[0], n=1, soc=0.9)
    clock = ManualClock()
    sim = Keithley2450Sim(cell_bank=bank, clock=clock)
    v0 = float(sim.handle_line(":MEAS:VOLT?") or "")
    vlim = v0 + 0.05
    sim.handle_line(f":OUTP:CURR:SMOD HIMP;:SOUR:FUNC CURR;:SOUR:CURR:VLIM {vlim:.4f}")
    sim.handle_line(":SOUR:CURR 1.0;:OUTP ON")
    clock.advance(600)
    v, i = (float(x) for x in (sim.handle_line(":MEAS:VOLT?;:MEAS:CURR?") or "").split(";"))
    assert v <= vlim + 1e-6
    assert 0 <= i < 1.0


# -- integration over real transports ---------------------------------------------------------


@pytest.fixture(params=["tcp-visa", "pty-visa", "pty-pyserial"])
def smu(request: pytest.FixtureRequest) -> Iterator[tuple[Keithley2450, Keithley2450Sim,
                                                          SimServer, ManualClock]]:
    clock = ManualClock()
    sim = Keithley2450Sim(cell_bank=StubCell(), clock=clock)
    kind = request.param
    server = SimServer.tcp(sim) if kind.startswith("tcp") else SimServer.pty(sim)
    with server:
        resource = server.path if kind == "pty-pyserial" else server.resource
        inst = open_instrument(resource, timeout_s=TIMEOUT_S)
        assert isinstance(inst, Keithley2450)
        try:
            yield inst, sim, server, clock
        finally:
            inst.close()


def test_cycle_over_transport(smu: tuple[Keithley2450, Keithley2450Sim, SimServer,
                                         ManualClock]) -> None:
    k, sim, _, clock = smu
    assert k.model == "2450"
    k.configure_protection(1, 4.3, 1.0)
    k.set_current(1, 0.1, 4.0)
    k.output(1, True)
    assert k.output_enabled is True and sim.output_on
    first = k.measure()
    assert first[0, 1] == pytest.approx(0.1)
    for _ in range(40):
        clock.advance(60)
        last = k.measure()
    assert last[0, 0] == pytest.approx(4.0, abs=1e-6)  # clamped at compliance
    assert last[0, 1] < 0.05  # tapering
    assert k.in_voltage_compliance is True
    k.set_voltage(1, 4.0, 0.2)
    assert k.source_function == "VOLT"
    k.safe_shutdown()
    assert not sim.output_on
    assert sim.off_mode == {"CURR": "HIMP", "VOLT": "HIMP"}


def test_unknown_command_reports_error(smu: tuple[Keithley2450, Keithley2450Sim, SimServer,
                                                  ManualClock]) -> None:
    k, *_ = smu
    with pytest.raises(InstrumentReportedError) as exc:
        k.write_checked(":SOUR:CURR:BOGUS 1")
    assert exc.value.code == -113
    k.check_errors()  # drained: nothing left


def test_timeout_within_budget(smu: tuple[Keithley2450, Keithley2450Sim, SimServer,
                                          ManualClock]) -> None:
    k, _, server, _ = smu
    probe = ServerProbe(server)
    # 4x the timeout: a timeout, not the late reply, even with the client kept off the
    # CPU for a while (the timing itself is not asserted).
    server.set_reply_delay(TIMEOUT_S * 4)
    k.transport.retry_timeouts = False
    t0 = time.monotonic()
    with pytest.raises(InstrumentTimeout) as exc:
        _ = k.voltage_v
    assert time.monotonic() - t0 >= TIMEOUT_S * 0.95  # not before its timeout
    assert exc.value.command == ":MEAS:VOLT?"
    server.set_reply_delay(0)
    # A serial instrument is busy until it has answered; let the late reply arrive so the
    # transport must discard it rather than take it for the next answer.
    until(lambda: len(probe.replies) >= 1, "the late reply to be sent")
    if isinstance(server, PtySimServer):
        until(lambda: pty_unread_by_client(server) > 0, "the late reply to arrive")
    assert k.measure().shape == (1, 3)  # link resynchronised afterwards


def test_garbled_reply_over_transport(smu: tuple[Keithley2450, Keithley2450Sim, SimServer,
                                                 ManualClock]) -> None:
    k, _, server, _ = smu
    server.garble_next_reply()
    with pytest.raises(GarbledReply):
        k.measure()
    assert k.measure()[0, 0] > 3.0


def test_dropped_connection_reconnects() -> None:
    sim = Keithley2450Sim(clock=ManualClock())
    with SimServer.tcp(sim) as server:
        k = open_instrument(server.resource, timeout_s=TIMEOUT_S)
        try:
            k.measure()
            server.drop_connections()
            assert k.measure().shape == (1, 3)
            assert k.transport.reconnects == 1
            server.stop()
            k.transport.reconnect_attempts = 2
            k.transport.backoff_initial_s = 0.01
            with pytest.raises(ConnectionFailed):
                k.measure()
        finally:
            k.close()


def test_watchdog_turns_output_off() -> None:
    sim = Keithley2450Sim(cell_bank=StubCell(), clock=ManualClock())
    # The window is 1 s only from the last command on: a test descheduled for a second
    # between two commands on a loaded machine would otherwise trip it while setting up.
    with SimServer.tcp(sim, watchdog_s=3600.0) as server:
        t = open_transport(server.resource, timeout_s=TIMEOUT_S)
        try:
            k = Keithley2450(t, "smu")  # asks *IDN? for the model
            assert k.model == "2450"
            k.set_current(1, 0.1, 4.2)
            k.output(1, True)
            assert sim.output_on
            server.watchdog_s = 1.0
            # Taken before the last command goes out, so the server's silence starts
            # after it: the trip cannot come less than the window after this.
            last_command = time.monotonic()
            k.measure()
            deadline = last_command + 30.0
            while sim.output_on and time.monotonic() < deadline:
                time.sleep(0.02)
            assert time.monotonic() - last_command >= 1.0  # not before the window closed
            server.watchdog_s = 3600.0  # the query below must not wait for a second trip
            assert not sim.output_on and sim.watchdog_tripped
            assert server.watchdog_trips == 1
            assert k.output_enabled is False
        finally:
            t.close()


# -- driver base (declarations shared by every driver) -------------------------------------


class Toy(Instrument):
    """A made-up instrument exercising each declaration style."""

    idn_patterns = [r"^TOYCO,T1"]
    level = control(":LEV?", ":LEV %g", "Level.", validator=strict_range, values=(0, 10))
    clamp = control(":CLAMP?", ":CLAMP %.1f", "Clamped.", validator=truncated_range(0, 5),
                    check_errors=False)
    mode = control(":MODE?", ":MODE {}", "Mode.", values={"fast": "FAST", "slow": "SLOW"},
                   map_values=True, cast=str)
    channel = setting(":CHAN %d", "Channel.", validator=strict_discrete_set([1, 2, 3]))
    reading = measurement(":READ?", "Reading.")


class EsrToy(Toy):
    """Instruments without an error queue check the event status register instead."""

    def check_errors(self, command: str = "") -> None:
        esr = int(self.query("*ESR?"))
        if esr & 0b00111100:
            raise InstrumentReportedError(code=esr, text="ESR", instrument=self.name,
                                          command=command)


def test_declarations() -> None:
    toy = Toy(ScriptedTransport([
        (":LEV 2.5", None), (":SYST:ERR?", "+0,\"No error\""),
        (":CLAMP 5.0", None),
        (":MODE SLOW", None), (":SYST:ERR?", "0, No Error"),
        (":MODE?", "SLOW"),
        (":CHAN 2", None), (":SYST:ERR?", OK),
        (":READ?", " +1.25E+00 "),
    ]), "toy")
    toy.level = 2.5
    toy.clamp = 7  # truncated, not rejected
    toy.mode = "slow"
    assert toy.mode == "slow"
    toy.channel = 2
    assert toy.reading == 1.25
    with pytest.raises(AttributeError):
        _ = toy.channel
    with pytest.raises(AttributeError):
        toy.reading = 3  # type: ignore[misc]
    with pytest.raises(InstrumentValueError):
        toy.level = 11
    with pytest.raises(InstrumentValueError):
        toy.mode = "medium"
    with pytest.raises(InstrumentValueError):
        toy.channel = True  # a bool is not channel 1
    lim = toy.validator("level")
    assert lim is not None and (lim.min, lim.max) == (0, 10)
    assert toy.command_for("clamp", -3) == ":CLAMP 0.0"
    used_toy = toy.transport
    assert isinstance(used_toy, ScriptedTransport)
    used_toy.assert_all_used()


def test_check_errors_override() -> None:
    toy = EsrToy(ScriptedTransport([(":LEV 1", None), ("*ESR?", "32")]), "esr-toy")
    with pytest.raises(InstrumentReportedError) as exc:
        toy.level = 1
    assert exc.value.code == 32 and exc.value.command == ":LEV 1"


def test_error_reply_garbage_is_garbled() -> None:
    toy = Toy(ScriptedTransport([(":LEV 1", None), (":SYST:ERR?", "no idea")]), "toy")
    with pytest.raises(GarbledReply):
        toy.level = 1
    assert parse_error_reply('-113,"Undefined header"') == (-113, "Undefined header")
    assert parse_error_reply("+0") == (0, "")


def test_register_driver_and_entry_points() -> None:
    register_driver("toy-test")(Toy)
    try:
        assert get_driver("toy-test") is Toy
        assert match_driver("TOYCO,T1,0,1") == "toy-test"
        with pytest.raises(ValueError):
            register_driver("toy-test")(EsrToy)  # a name belongs to one driver
    finally:
        unregister_driver("toy-test")
    with pytest.raises(UnknownInstrument):
        match_driver("TOYCO,T1,0,1")
    drivers = load_entry_point_drivers(force=True)
    assert drivers["keithley2450"] is Keithley2450


def test_marked_send_times_the_command_not_its_error_check(
    smu: tuple[Keithley2450, Keithley2450Sim, SimServer, ManualClock],
) -> None:
    """The interlock times its output-off command on the wire apart from the error-queue
    check that follows it: with every reply 0.15 s late, the mark is taken before the
    first reply could have arrived, and output() returns only after one."""
    k, sim, server, _ = smu
    k.output(1, True)
    server.set_reply_delay(0.15)
    t0 = time.perf_counter()
    k.transport.mark_next_send()
    k.output(1, False)
    t_done = time.perf_counter()
    sent = k.transport.marked_send_s
    # The mark is the command's send, at least one delayed reply before output()
    # returns (a mark taken at the error check's reply would fail the second bound).
    assert t0 <= sent <= t_done - 0.15, (sent - t0, t_done - t0)
    assert t_done - t0 >= 0.15
    server.set_reply_delay(0.0)
    assert k.output_enabled is False
    # One mark per request: later commands leave it as it was.
    k.output(1, True)
    assert k.transport.marked_send_s == sent
