"""ESPEC chamber driver and simulator: byte-exact protocol, air-temperature physics (ramp
rate, first-order approach, door and alarms), cells following the chamber, and the real
thing over TCP and a pty (pyvisa-py and plain pyserial)."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator

import numpy as np
import pytest

from labdaq.drivers.base import get_driver, load_entry_point_drivers
from labdaq.drivers.errors import GarbledReply, InstrumentTimeout, InstrumentValueError
from labdaq.drivers.espec_chamber import EspecChamber, EspecCommandError, EspecOutOfRange
from labdaq.drivers.roles import Chamber
from labdaq.drivers.transport import ScriptedTransport, open_transport
from labdaq.sims.cell import CellBank
from labdaq.sims.clock import ManualClock
from labdaq.sims.espec_chamber import ALARM_DOOR_OPEN, ALARM_REFRIGERATOR, EspecChamberSim
from labdaq.sims.server import SimServer
from tests.sim_probes import ServerProbe

TIMEOUT_S = 0.5
CRLF = {"read_termination": "\r\n", "write_termination": "\r\n"}


def scripted(*pairs: tuple[str | None, str | None], **kwargs: object) -> EspecChamber:
    return EspecChamber(ScriptedTransport(pairs), "chamber", **kwargs)  # type: ignore[arg-type]


def used(ch: EspecChamber) -> None:
    assert isinstance(ch.transport, ScriptedTransport)
    ch.transport.assert_all_used()


def ok(command: str) -> tuple[str, str]:
    return command, f"OK:{command}"


# -- byte-exact protocol ------------------------------------------------------------------


def test_set_point_protocol() -> None:
    ch = scripted(ok("TEMP, S45.0"), ok("MODE, CONSTANT"))
    ch.set_point_c(45)
    used(ch)


def test_negative_set_point_protocol() -> None:
    ch = scripted(ok("TEMP, S-10.5"), ok("MODE, CONSTANT"))
    ch.set_point_c(-10.54)
    used(ch)


def test_ramp_protocol() -> None:
    ch = scripted(
        ("TEMP?", "25.0,25.0,150.0,-40.0"),
        ok("TEMP, S45.0"),
        ok("RUN PRGM, TEMP25.0 GOTEMP45.0 TIME0:10"),
    )
    ch.ramp(45.0, 2.0)
    used(ch)


def test_ramp_duration_rounds_up_so_never_faster() -> None:
    # 25 -> 0 °C at 3 °C/min is 8.33 min: the controller counts minutes, so 9.
    ch = scripted(
        ("TEMP?", "25.0,25.0,150.0,-40.0"),
        ok("TEMP, S0.0"),
        ok("RUN PRGM, TEMP25.0 GOTEMP0.0 TIME0:09"),
    )
    ch.ramp(0.0, 3.0)
    used(ch)
    # 100 °C at 1 °C/min: hours and minutes.
    ch = scripted(
        ("TEMP?", "-20.0,-20.0,150.0,-40.0"),
        ok("TEMP, S80.0"),
        ok("RUN PRGM, TEMP-20.0 GOTEMP80.0 TIME1:40"),
    )
    ch.ramp(80.0, 1.0)
    used(ch)


def test_readings_protocol() -> None:
    ch = scripted(
        ("TEMP?", "23.5,25.0,80.0,-40.0"),
        ("TEMP?", "23.5,25.0,80.0,-40.0"),
        ("TEMP?", "23.5,25.0,80.0,-40.0"),
        ("MODE?", "CONSTANT"),
        ("ROM?", "P300 Ver.1.20"),
    )
    assert ch.actual_c() == 23.5
    assert ch.set_point == 25.0
    assert ch.temperatures() == {"actual_c": 23.5, "set_point_c": 25.0, "upper_c": 80.0,
                                 "lower_c": -40.0}
    assert ch.mode == "CONSTANT"
    assert ch.rom == "P300 Ver.1.20"
    used(ch)


def test_limits_and_mode_protocol() -> None:
    ch = scripted(ok("TEMP, H60.0"), ok("TEMP, L-5.0"), ok("MODE, STANDBY"), ok("MODE, OFF"))
    ch.upper_limit_c = 60
    ch.lower_limit_c = -5
    ch.standby()
    ch.mode = "off"
    used(ch)


@pytest.mark.parametrize(
    ("mon", "extra", "expected"),
    [
        ("25.1,,CONSTANT,0", [("TEMP?", "25.1,25.0,150.0,-40.0")], "stable"),
        ("31.0,,CONSTANT,0", [("TEMP?", "31.0,45.0,150.0,-40.0")], "settling"),
        ("31.0,,RMT RUN,0", [], "ramping"),
        ("45.0,,RMT RUN END HOLD,0", [("TEMP?", "45.0,45.0,150.0,-40.0")], "stable"),
        ("31.0,,RUN PAUSE,0", [], "paused"),
        ("24.0,,STANDBY,0", [], "standby"),
        ("24.0,,OFF,0", [], "off"),
        ("30.0,,CONSTANT,1", [("ALARM?", "1,30")], "door open"),
        ("30.0,,CONSTANT,2", [("ALARM?", "2,30,6")], "alarm: refrigerator fault (code 6)"),
        ("30.0,,CONSTANT,1", [("ALARM?", "1,77")], "alarm: alarm 77 (code 77)"),
    ],
)
def test_status_protocol(mon: str, extra: list[tuple[str, str]], expected: str) -> None:
    ch = scripted(("MON?,DETAIL", mon), *extra)
    assert ch.status() == expected
    used(ch)


def test_rs485_address_prefix() -> None:
    ch = scripted(("1,TEMP?", "23.5,25.0,80.0,-40.0"), ("1,TEMP, S25.0", "OK:TEMP, S25.0"),
                  ("1,MODE, CONSTANT", "OK:MODE, CONSTANT"), address=1)
    assert ch.actual_c() == 23.5
    ch.set_point_c(25)
    used(ch)


def test_identification_without_idn() -> None:
    ch = scripted(("TYPE?", "T,P300,150.0"), ("ROM?", "P300 Ver.1.20"))
    assert ch.idn == "ESPEC,T,P300,150.0,P300 Ver.1.20"
    assert ch.idn == "ESPEC,T,P300,150.0,P300 Ver.1.20"  # cached: no second query
    used(ch)


def test_na_replies_raise_typed_errors() -> None:
    ch = scripted(("TEMP, S45.0", "NA:PROTECT ON"))
    with pytest.raises(EspecCommandError) as err:
        ch.set_point = 45
    assert err.value.reason == "PROTECT ON"
    assert "TEMP, S45.0" in str(err.value) and "front panel" in str(err.value)
    used(ch)
    ch = scripted(("TEMP, S140.0", "NA:DATA OUT OF RANGE"))
    with pytest.raises(EspecOutOfRange, match="DATA OUT OF RANGE"):
        ch.set_point_c(140)
    used(ch)


def test_bad_replies_are_garbled_errors() -> None:
    ch = scripted(("TEMP?", "hello"))
    with pytest.raises(GarbledReply, match="TEMP"):
        ch.actual_c()
    ch = scripted(("TEMP?", "23.5"))
    with pytest.raises(GarbledReply):
        ch.set_point  # noqa: B018 - the property read is the test
    ch = scripted(("TEMP, S25.0", "25.0"))
    with pytest.raises(GarbledReply, match="OK:TEMP, S25.0"):
        ch.set_point = 25
    ch = scripted(("ALARM?", "2,30"))
    with pytest.raises(GarbledReply, match="ALARM"):
        ch.alarms()


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda ch: ch.set_point_c(200), r"\[-20, 100\]"),
        (lambda ch: ch.set_point_c(float("nan")), "temperature"),
        (lambda ch: ch.set_point_c("warm"), "temperature"),
        (lambda ch: ch.ramp(45, 0), "rate"),
        (lambda ch: ch.ramp(45, -1), "rate"),
        (lambda ch: ch.ramp(45, 11), "rate <= 10"),
        (lambda ch: ch.ramp(-30, 1), r"\[-20, 100\]"),
    ],
)
def test_invalid_values_rejected_before_sending(call: object, match: str) -> None:
    ch = scripted(min_c=-20, max_c=100)
    with pytest.raises(InstrumentValueError, match=match):
        call(ch)  # type: ignore[operator]
    assert ch.transport.sent == []  # type: ignore[attr-defined]


def test_too_long_ramp_rejected() -> None:
    ch = scripted(("TEMP?", "-40.0,-40.0,150.0,-40.0"))
    with pytest.raises(InstrumentValueError, match="99:59"):
        ch.ramp(150, 0.01)
    used(ch)


def test_registry_and_role() -> None:
    assert issubclass(EspecChamber, Chamber)
    assert get_driver("espec_chamber") is EspecChamber
    assert load_entry_point_drivers()["espec_chamber"] is EspecChamber


# -- simulator ------------------------------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


def test_sim_replies(clock: ManualClock) -> None:
    sim = EspecChamberSim(clock=clock, room_c=23.0)
    assert sim.handle_line("*IDN?") == "NA:CMD ERR"
    assert sim.handle_line("ROM?").startswith("P300")
    assert sim.handle_line("TEMP?") == "23.0,23.0,150.0,-40.0"
    assert sim.handle_line("MON?") == "23.0,,STANDBY,0"
    assert sim.handle_line("HUMI?") == "NA:CONT NOT READY-1"
    assert sim.handle_line("TEMP, S25.0 H60.0 L-10.0") == "OK:TEMP, S25.0 H60.0 L-10.0"
    assert sim.handle_line("TEMP?") == "23.0,25.0,60.0,-10.0"
    assert sim.handle_line("TEMP, S70") == "NA:DATA OUT OF RANGE"  # above H
    assert sim.handle_line("TEMP, S200") == "NA:DATA OUT OF RANGE"
    assert sim.handle_line("TEMP, X5") == "NA:PARA ERR"
    assert sim.handle_line("TEMP,") == "NA:PARA ERR"
    assert sim.handle_line("MODE, WARP") == "NA:PARA ERR"
    assert sim.handle_line("FROB?") == "NA:CMD ERR"
    assert sim.handle_line("RUN PRGM MON?") == "NA:CONT NOT READY-2"
    assert sim.handle_line("CONSTANT SET?,TEMP") == "25.0,ON"
    assert sim.handle_line("ALARM?") == "0"
    assert sim.handle_line("RUN PRGM, TEMP23.0 GOTEMP40.0 TIME0:00") == "NA:DATA OUT OF RANGE"
    assert sim.handle_line("RUN PRGM, GOTEMP40.0") == "NA:PARA ERR"


def test_sim_rs485_address(clock: ManualClock) -> None:
    sim = EspecChamberSim(clock=clock, address=2)
    assert sim.handle_line("1,TEMP?") is None  # for another controller on the bus
    assert sim.handle_line("2,MODE?") == "STANDBY"
    assert sim.handle_line("MODE?") == "STANDBY"


def _air(sim: EspecChamberSim) -> float:
    sim.advance()
    return sim.air_c


def test_sim_heating_is_rate_limited_then_first_order(clock: ManualClock) -> None:
    sim = EspecChamberSim(clock=clock, room_c=25.0, tau_s=90.0, heat_rate_c_per_min=3.0)
    sim.handle_line("TEMP, S45.0")
    sim.handle_line("MODE, CONSTANT")
    clock.advance(60.0)
    assert _air(sim) == pytest.approx(28.0, abs=0.01)  # hardware limit: 3 °C/min
    clock.advance(240.0)
    assert _air(sim) == pytest.approx(40.0, abs=0.1)
    # Close to the set point the approach is exponential with tau.
    clock.advance(120.0)
    err1 = 45.0 - _air(sim)
    clock.advance(90.0)
    err2 = 45.0 - _air(sim)
    assert 0 < err1 < 3.0
    assert err2 / err1 == pytest.approx(math.exp(-1.0), rel=0.02)
    clock.advance(3600.0)
    assert _air(sim) == pytest.approx(45.0, abs=1e-3)


def test_sim_ramp_follows_rate_and_cells_follow(clock: ManualClock) -> None:
    banks = [CellBank("nmc811", n=2, soc=0.5, ambient_c=25.0, seed=1),
             CellBank("lfp", n=1, soc=0.5, ambient_c=25.0, seed=2)]
    sim = EspecChamberSim(banks, clock, room_c=25.0, tau_s=60.0)
    with SimServer.tcp(sim, read_termination="\r\n", write_termination="\r\n") as server:
        ch = EspecChamber(open_transport(server.resource, timeout_s=TIMEOUT_S, **CRLF), "ch")
        ch.ramp(45.0, 1.0)  # 20 minutes
        assert ch.status() == "ramping"
        temps = []
        for _ in range(25):
            clock.advance(60.0)
            temps.append(ch.actual_c())
            # The cells' ambient is the chamber air, at every step.
            for bank in banks:
                assert np.allclose(bank.ambient_c, sim.air_c)
        slope = np.diff(temps[5:18])  # steady part of the ramp, °C per minute
        assert np.all(np.abs(slope - 1.0) < 0.15)
        assert float(np.mean(slope)) == pytest.approx(1.0, abs=0.03)
        # Following a ramp, a first-order chamber lags by tau x rate.
        live_sp = ch.temperatures()["set_point_c"]
        assert live_sp == pytest.approx(45.0)
        assert temps[10] == pytest.approx(25.0 + 11.0 - 1.0, abs=0.3)
        clock.advance(1800.0)
        assert ch.actual_c() == pytest.approx(45.0, abs=0.1)
        assert ch.status() == "stable"
        assert sim.mode_text(detail=True) == "RMT RUN END HOLD"
        # A cell left in the chamber warms to the chamber air (its own thermal model).
        banks[0].step(0.0, 4 * 3600.0)
        assert np.allclose(banks[0].temperature_c, 45.0, atol=0.2)
        # set_point_c ends the program and holds a new temperature.
        ch.set_point_c(0.0)
        clock.advance(3 * 3600.0)
        assert ch.actual_c() == pytest.approx(0.0, abs=0.1)
        assert sim.mode == "CONSTANT"
        ch.close()


def test_sim_door_and_alarms(clock: ManualClock) -> None:
    bank = CellBank("nmc811", n=1, soc=0.5, ambient_c=25.0, seed=1)
    sim = EspecChamberSim([bank], clock, room_c=25.0, mode="CONSTANT", set_point_c=45.0,
                          initial_c=45.0)
    ch = EspecChamber(_LoopTransport(sim), "ch")
    assert ch.status() == "stable"
    sim.open_door()
    clock.advance(600.0)
    assert ch.status() == "door open"
    assert ch.door_open
    assert ch.alarms() == [(ALARM_DOOR_OPEN, "door open")]
    # The controller fights the leak but the air sags below the set point.
    assert 40.0 < ch.actual_c() < 44.9
    sim.open_door(False)
    clock.advance(1200.0)
    assert ch.status() == "stable"
    # A latched fault stops control: the air drifts back towards the room.
    sim.inject_alarm(ALARM_REFRIGERATOR)
    clock.advance(3600.0)
    assert ch.status() == "alarm: refrigerator fault (code 6)"
    assert 25.0 < ch.actual_c() < 35.0
    assert float(bank.ambient_c[0]) == pytest.approx(sim.air_c)
    sim.clear_alarms()
    assert ch.status() == "settling"


def test_sim_limit_alarm_latches(clock: ManualClock) -> None:
    sim = EspecChamberSim(clock=clock, room_c=25.0, initial_c=40.0)
    assert sim.handle_line("TEMP, S28.0 H30.0 L0.0").startswith("OK:")
    assert sim.handle_line("MODE, CONSTANT").startswith("OK:")
    clock.advance(1.0)
    assert sim.handle_line("ALARM?") == "1,1"
    assert sim.handle_line("MON?").endswith(",CONSTANT,1")


def test_sim_end_program_hold(clock: ManualClock) -> None:
    sim = EspecChamberSim(clock=clock, room_c=25.0)
    ch = EspecChamber(_LoopTransport(sim), "ch")
    ch.ramp(45.0, 2.0)
    clock.advance(300.0)
    assert sim.handle_line("RUN PRGM MON?") == "1,35.0,0:05,0"
    ch.end_ramp(hold=True)
    assert sim.mode == "CONSTANT" and sim.constant_sp_c == pytest.approx(35.0)
    with pytest.raises(EspecCommandError, match="not running a program"):
        ch.end_ramp()


class _LoopTransport(ScriptedTransport):
    """In-process transport straight into a simulator (physics tests without sockets)."""

    def __init__(self, sim: EspecChamberSim) -> None:
        super().__init__([])
        self.sim = sim

    def query(self, command: str) -> str:
        reply = self.sim.handle_line(command)
        assert reply is not None
        return reply


# -- over real transports ----------------------------------------------------------------------


@pytest.fixture(params=["tcp-visa", "pty-visa", "pty-pyserial"])
def chamber(request: pytest.FixtureRequest, clock: ManualClock,
            ) -> Iterator[tuple[EspecChamber, EspecChamberSim, SimServer]]:
    bank = CellBank("nmc811", n=1, soc=0.5, ambient_c=25.0, seed=3)
    sim = EspecChamberSim([bank], clock, room_c=25.0)
    kind = request.param
    opts = {"read_termination": "\r\n", "write_termination": "\r\n"}
    server = SimServer.tcp(sim, **opts) if kind.startswith("tcp") else SimServer.pty(sim, **opts)
    with server:
        resource = server.path if kind == "pty-pyserial" else server.resource  # type: ignore
        transport = open_transport(resource, timeout_s=TIMEOUT_S, **EspecChamber.transport_options)
        ch = EspecChamber(transport, "chamber")
        try:
            yield ch, sim, server
        finally:
            ch.close()


def test_over_transport(chamber: tuple[EspecChamber, EspecChamberSim, SimServer],
                        clock: ManualClock) -> None:
    ch, sim, _ = chamber
    assert ch.idn.startswith("ESPEC,")
    assert ch.status() == "standby"
    ch.set_point_c(45.0)
    clock.advance(1800.0)
    assert ch.actual_c() == pytest.approx(45.0, abs=0.1)
    assert ch.status() == "stable"
    assert float(sim.cell_banks[0].ambient_c[0]) == pytest.approx(sim.air_c)
    ch.ramp(0.0, 2.0)
    assert ch.status() == "ramping"
    with pytest.raises(EspecOutOfRange):
        ch.write("TEMP, S-60.0")
    # The link is still in step after an error reply.
    assert ch.mode == "RUN"


def test_settled_chamber_answers_after_a_month_of_storage(
        chamber: tuple[EspecChamber, EspecChamberSim, SimServer], clock: ManualClock) -> None:
    """A 30-day storage at a constant set point, then a command: the simulator answers
    within the host's timeout (it used to integrate the month in 2 s steps first) and the
    air is still at the set point."""
    ch, sim, _ = chamber
    ch.set_point_c(25.0)
    clock.advance(3600.0)
    assert ch.actual_c() == pytest.approx(25.0, abs=1e-3)
    clock.advance(30 * 86400.0)
    ch.set_point_c(45.0)  # raises InstrumentTimeout if the reply comes too late
    assert sim.air_c == pytest.approx(25.0, abs=1e-3)
    clock.advance(1800.0)
    assert ch.actual_c() == pytest.approx(45.0, abs=0.1)  # and it still moves


def test_timeout_over_transport(chamber: tuple[EspecChamber, EspecChamberSim, SimServer],
                                ) -> None:
    ch, _, server = chamber
    server.swallow_next_reply(1)
    probe = ServerProbe(server)
    t0 = time.monotonic()
    with pytest.raises(InstrumentTimeout) as err:
        ch.write("MODE, CONSTANT")  # a setting is not idempotent: no blind retry
    assert time.monotonic() - t0 >= TIMEOUT_S * 0.95  # it waited out its timeout
    assert probe.received == ["MODE, CONSTANT"]  # ... once
    assert "MODE, CONSTANT" in str(err.value)
    # Reconnects and carries on.
    assert ch.mode == "CONSTANT"
