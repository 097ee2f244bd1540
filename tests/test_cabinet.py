"""Cycler cabinet: byte-exact driver protocol, simulator dialect and physics, and the
driver against the simulator over TCP (pyvisa-py SOCKET) and a pty (pyvisa ASRL, pyserial).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from labdaq.drivers.cabinet import (
    MODE_CC,
    MODE_CV,
    MODE_OFF,
    STAT_CC,
    STAT_COMPLIANCE,
    STAT_CV,
    STAT_OCP,
    STAT_OUTPUT,
    STAT_OVP,
    STAT_TEMP_FAULT,
    STAT_WATCHDOG,
    CyclerCabinet,
    channel_list,
)
from labdaq.drivers.errors import (
    ConnectionFailed,
    GarbledReply,
    InstrumentError,
    InstrumentReportedError,
    InstrumentTimeout,
    InstrumentValueError,
)
from labdaq.drivers.opener import open_instrument
from labdaq.drivers.transport import ScriptedTransport, format_block, open_transport
from labdaq.sims.cabinet import (
    CabinetSim,
    format_meas_all,
    format_nr1_list,
    format_nr3_list,
    parse_channel_list,
)
from labdaq.sims.cell import CellBank
from labdaq.sims.clock import ManualClock
from labdaq.sims.scpi import ScpiError, format_nr3
from labdaq.sims.server import PtySimServer, SimServer, TcpSimServer
from tests.sim_probes import ServerProbe

TIMEOUT_S = 0.5
NO_ERROR = '0,"No error"'
CTOR = [("SYST:CHAN:COUN?", "8"), ("SYST:CHAN:LIM?", "+1.00000000E+01,+5.00000000E+00"),
        ("FORM:DATA REAL,32;:FORM:BORD NORM", None), (":SYST:ERR?", NO_ERROR)]


def scripted(script: list[tuple[str | None, str | None]]) -> tuple[CyclerCabinet,
                                                                   ScriptedTransport]:
    transport = ScriptedTransport(CTOR + script)
    return CyclerCabinet(transport, "cab-test"), transport


# ---------------------------------------------------------------------------------------
# Driver protocol, byte-exact
# ---------------------------------------------------------------------------------------


def test_channel_list_compresses_runs_and_keeps_order() -> None:
    assert channel_list([1, 2, 3, 4, 7, 9, 10]) == "(@1:4,7,9,10)"
    assert channel_list([5]) == "(@5)"
    assert channel_list([3, 1, 2]) == "(@3,1,2)"
    assert channel_list(range(1, 65)) == "(@1:64)"
    with pytest.raises(ValueError):
        channel_list([])


def test_constructor_discovers_channels_and_limits() -> None:
    cab, t = scripted([])
    assert cab.channels == list(range(1, 9))
    assert (cab.current_max_a, cab.voltage_max_v) == (10.0, 5.0)
    t.assert_all_used()
    # Given explicitly, nothing is asked.
    quiet = CyclerCabinet(ScriptedTransport([]), channels=16, current_max_a=5.0,
                          voltage_max_v=5.0, data_format="ascii")
    assert quiet.channels[-1] == 16
    assert quiet.validator("source_current_a").max == 5.0  # type: ignore[union-attr]


def test_set_current_is_one_line_then_error_check() -> None:
    cab, t = scripted([
        ("SOUR:FUNC CURR,(@3);:SOUR:CURR:VLIM 4.2,(@3);:SOUR:CURR 1.5,(@3)", None),
        (":SYST:ERR?", NO_ERROR),
        ("SOUR:FUNC CURR,(@1:4,7);:SOUR:CURR:VLIM 4.1,(@1:4,7);:SOUR:CURR -2,(@1:4,7)", None),
        (":SYST:ERR?", NO_ERROR),
    ])
    cab.set_current(3, 1.5, 4.2)
    cab.set_current([1, 2, 3, 4, 7], -2.0, 4.1)
    t.assert_all_used()


def test_set_voltage_protection_output_and_all_off() -> None:
    cab, t = scripted([
        ("SOUR:FUNC VOLT,(@2);:SOUR:VOLT:ILIM 0.5,(@2);:SOUR:VOLT 4.2,(@2)", None),
        (":SYST:ERR?", NO_ERROR),
        ("SOUR:VOLT:PROT 4.3,(@1:8);:SOUR:CURR:PROT 6,(@1:8)", None),
        (":SYST:ERR?", NO_ERROR),
        ("OUTP ON,(@2)", None),
        (":SYST:ERR?", NO_ERROR),
        ("OUTP OFF,(@1:8)", None),
        (":SYST:ERR?", NO_ERROR),
        ("OUTP:PROT:CLE (@2,5)", None),
        (":SYST:ERR?", NO_ERROR),
    ])
    cab.set_voltage(2, 4.2, 0.5)
    cab.configure_protection(cab.channels, 4.3, 6.0)
    cab.output(2, True)
    cab.all_off()
    cab.clear_protection([2, 5])
    t.assert_all_used()


def test_channel_properties_one_command_per_list() -> None:
    cab, t = scripted([
        ("SOUR:CURR? (@1:3)", "+1.00000000E+00,-2.50000000E+00,+0.00000000E+00"),
        ("OUTP? (@1,2)", "1,0"),
        ("SOUR:CURR:VLIM 4.2,(@5)", None),
        (":SYST:ERR?", NO_ERROR),
        ("SOUR:FUNC? (@4)", "VOLT"),
        ("OUTP:PROT:TRIP? (@1:8)", "0,0,1,0,0,0,0,0"),
    ])
    np.testing.assert_allclose(cab.source_current_a.get([1, 2, 3]), [1.0, -2.5, 0.0])
    assert cab.output_enabled.get([1, 2]).tolist() == [True, False]
    cab.voltage_limit_v[5] = 4.2
    assert cab.source_function[4] == "VOLT"
    assert cab.protection_tripped.get().tolist() == [False, False, True] + [False] * 5
    with pytest.raises(AttributeError):
        cab.source_current_a = 1.0  # type: ignore[assignment]
    with pytest.raises(TypeError):
        cab.set("source_current_a", 1.0)
    t.assert_all_used()


def test_measure_is_one_query_parsed_with_numpy() -> None:
    row1 = "+3.70000000E+00,+1.50000000E+00,+2.51000000E+01,1,3"
    row2 = "+3.60000000E+00,+0.00000000E+00,+9.91000000E+37,0,128"
    cab, t = scripted([("MEAS:ALL? (@1,2)", f"{row1},{row2}"),
                       ("MEAS:ALL? (@1,2)", f"{row1},{row2}")])
    data = cab.measure([1, 2])
    assert data.shape == (2, 3) and data.dtype == np.float64
    np.testing.assert_allclose(data[0], [3.7, 1.5, 25.1])
    assert math.isnan(data[1, 2])  # 9.91E+37 = open sensor -> NaN
    full = cab.measure_full([1, 2])
    assert full.mode.tolist() == [MODE_CC, MODE_OFF]
    assert full.status.tolist() == [STAT_OUTPUT | STAT_CC, STAT_TEMP_FAULT]
    assert full.channels.tolist() == [1, 2]
    # The last selection is kept between ticks; any other is still validated.
    with pytest.raises(InstrumentValueError):
        cab.measure([1, 9])
    with pytest.raises(InstrumentValueError):
        cab.measure([])
    t.assert_all_used()


def test_invalid_values_and_channels_send_nothing() -> None:
    cab, t = scripted([])
    with pytest.raises(InstrumentValueError) as exc:
        cab.set_current(1, 11.0, 4.2)
    msg = str(exc.value)
    assert "cab-test" in msg and "SOUR:CURR" in msg and "[-10, 10]" in msg
    with pytest.raises(InstrumentValueError, match="channel 9 does not exist"):
        cab.set_current(9, 1.0, 4.2)
    with pytest.raises(InstrumentValueError):
        cab.set_voltage(1, 5.5, 1.0)
    with pytest.raises(InstrumentValueError):
        cab.measure([0])
    with pytest.raises(InstrumentValueError):
        cab.configure_protection(1, 0.0, 1.0)
    t.assert_all_used()  # nothing beyond the constructor traffic was written


def test_software_protection_limit_rejects_before_sending() -> None:
    cab, t = scripted([("SOUR:VOLT:PROT 4.25,(@1);:SOUR:CURR:PROT 2,(@1)", None),
                       (":SYST:ERR?", NO_ERROR)])
    cab.configure_protection(1, 4.25, 2.0)
    with pytest.raises(InstrumentValueError, match="protection"):
        cab.set_current(1, 3.0, 4.2)
    with pytest.raises(InstrumentValueError, match="protection"):
        cab.set_current(1, 1.0, 4.3)
    t.assert_all_used()


def test_instrument_error_is_raised_with_code() -> None:
    cab, t = scripted([("OUTP ON,(@3)", None),
                       (":SYST:ERR?", '-221,"Settings conflict; protection tripped"'),
                       (":SYST:ERR?", NO_ERROR)])
    with pytest.raises(InstrumentReportedError) as exc:
        cab.output(3, True)
    assert exc.value.code == -221 and "OUTP ON,(@3)" in str(exc.value)
    t.assert_all_used()


@pytest.mark.parametrize("reply", [
    "+3.7E+00,+1.0E+00,+2.5E+01,1",  # a field missing
    "+3.7E+00,+1.0E+00,+2.5E+01,1,3,+3.6E+00",  # extra
    "+3.7E+00,garbage,+2.5E+01,1,3",
    "",
])
def test_garbled_meas_all_reply_raises(reply: str) -> None:
    cab, _ = scripted([("MEAS:ALL? (@1)", reply)])
    with pytest.raises(GarbledReply) as exc:
        cab.measure([1])
    assert exc.value.command == "MEAS:ALL? (@1)"


def test_safe_shutdown_confirms_every_output_off() -> None:
    cab, t = scripted([("OUTP OFF,(@1:8)", None), ("OUTP? (@1:8)", "0,0,0,0,0,0,0,0")])
    cab.safe_shutdown()
    t.assert_all_used()
    cab, t = scripted([("OUTP OFF,(@1:8)", None), ("OUTP? (@1:8)", "0,0,1,0,0,0,0,0")])
    with pytest.raises(InstrumentError, match=r"outputs still on: \[3\]"):
        cab.safe_shutdown()


# ---------------------------------------------------------------------------------------
# Simulator: dialect and formatting
# ---------------------------------------------------------------------------------------


def test_numpy_formatting_matches_scpi_nr3_exactly() -> None:
    rng = np.random.default_rng(7)
    values = rng.standard_normal(20000) * 10.0 ** rng.integers(-30, 30, 20000)
    values = np.concatenate([values, [0.0, -0.0, 1.0, 9.999999999, 9.9999999949, 1e-5,
                                      -4.2, np.nan, np.inf, -np.inf, 1e-120]])
    got = format_nr3_list(values).split(",")
    want = [format_nr3(float(v)) if abs(v) >= 1e-99 or v == 0 or not math.isfinite(v)
            else format_nr3(0.0) for v in values]
    want = [w.replace("-0.00000000E+00", "+0.00000000E+00") for w in want]
    assert got == want
    assert format_nr1_list(np.array([0, 7, 42, 255])) == "0,7,42,255"
    line = format_meas_all(np.array([3.7, 3.6]), np.array([1.5, -2.0]),
                           np.array([25.0, np.nan]), np.array([1, 0]), np.array([3, 128]))
    assert line == ("+3.70000000E+00,+1.50000000E+00,+2.50000000E+01,1,3,"
                    "+3.60000000E+00,-2.00000000E+00,+9.91000000E+37,0,128")


def test_channel_list_parser() -> None:
    assert parse_channel_list("(@1:4,7,9:10)", 64).tolist() == [0, 1, 2, 3, 6, 8, 9]
    assert parse_channel_list("( @ 3:1 )", 8).tolist() == [2, 1, 0]
    for bad, code in [("(@65)", -222), ("(@0:3)", -222), ("(@1:9)", -222), ("1:4", -171),
                      ("(@)", -171), ("(@1;2)", -171), ("(@a)", -171)]:
        with pytest.raises(ScpiError) as exc:
            parse_channel_list(bad, 8 if bad != "(@65)" else 64)
        assert exc.value.code == code, bad


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock()


@pytest.fixture
def sim(clock: ManualClock) -> CabinetSim:
    return CabinetSim(8, "nmc811", clock=clock, seed=3)


def test_sim_identity_reset_and_errors(sim: CabinetSim) -> None:
    h = sim.handle_line
    assert h("*IDN?") == "LABDAQ,CYC-8,CYC0000001,1.0.0"
    assert h("SYST:CHAN:COUN?") == "8"
    assert h("SYST:CHAN:LIM?") == "+1.00000000E+01,+5.00000000E+00"
    assert h("SOUR:CURR 10.5,(@1)") is None
    assert h("SYST:ERR?") == '-222,"Data out of range"'
    assert h("SOUR:CURR 1,(@9)") is None
    assert h("SYST:ERR?") == '-222,"Data out of range; channel 9 not in 1:8"'
    assert h("SOUR:CURR 1") is None  # set commands need an explicit list
    assert h("SYST:ERR?") == '-109,"Missing parameter"'
    assert h("SOUR:VOLT -0.1,(@1)") is None
    assert h("SYST:ERR?") == '-222,"Data out of range"'
    assert h("SOUR:FUNC POW,(@1)") is None
    assert h("SYST:ERR?") == '-224,"Illegal parameter value"'
    assert h("MEAS:ALL? (@1:9)") is None
    assert h("SYST:ERR?").startswith("-222,")
    assert h("MEAS:ALL? (@1:2),(@3)") is None
    assert h("SYST:ERR?") == '-108,"Parameter not allowed"'
    h("SOUR:CURR 2.5,(@1:2);:SOUR:FUNC VOLT,(@3);:OUTP ON,(@1)")
    assert h("SOUR:CURR? (@1:3)") == "+2.50000000E+00,+2.50000000E+00,+0.00000000E+00"
    assert h("SOUR:FUNC? (@2:3)") == "CURR,VOLT"
    assert h("OUTP? (@1:3)") == "1,0,0"
    assert h("SYST:ERR?") == NO_ERROR
    h("*RST")
    assert h("OUTP?") == "0,0,0,0,0,0,0,0"  # a query without a list covers every channel
    assert h("SOUR:CURR? (@1)") == "+0.00000000E+00"
    assert len(h("MEAS:ALL?").split(",")) == 8 * 5


def test_sim_meas_all_matches_single_queries(sim: CabinetSim, clock: ManualClock) -> None:
    h = sim.handle_line
    h("SOUR:CURR 2,(@1);:SOUR:CURR -1,(@2);:OUTP ON,(@1:2)")
    clock.advance(30.0)
    table = np.array(h("MEAS:ALL? (@1:8)").split(","), float).reshape(8, 5)
    np.testing.assert_allclose(table[:, 0], np.array(h("MEAS:VOLT? (@1:8)").split(","), float))
    np.testing.assert_allclose(table[:, 1], np.array(h("MEAS:CURR? (@1:8)").split(","), float))
    np.testing.assert_allclose(table[:, 2], np.array(h("MEAS:TEMP? (@1:8)").split(","), float))
    assert table[:, 4].astype(int).tolist() == [int(s) for s in h("STAT:CHAN? (@1:8)").split(",")]
    assert table[:2, 1].tolist() == [2.0, -1.0]
    assert table[:2, 3].tolist() == [MODE_CC, MODE_CC]
    # Reversed list: same values, reversed order.
    rev = np.array(h("MEAS:ALL? (@8:1)").split(","), float).reshape(8, 5)
    np.testing.assert_allclose(rev[::-1], table)


def test_sim_protection_trips_latch_and_clear(sim: CabinetSim, clock: ManualClock) -> None:
    h = sim.handle_line
    # OCP: a set point above the trip level trips the moment the output closes.
    h("SOUR:CURR:PROT 1,(@1);:SOUR:CURR 2,(@1);:OUTP ON,(@1)")
    assert h("OUTP? (@1)") == "0"
    assert int(h("STAT:CHAN? (@1)")) & STAT_OCP
    assert h("OUTP:PROT:TRIP? (@1:2)") == "1,0"
    h("OUTP ON,(@1:2)")  # refused as a whole while channel 1 is tripped
    assert h("SYST:ERR?").startswith('-221,"Settings conflict; protection tripped on channel 1')
    assert h("OUTP? (@1:2)") == "0,0"
    h("OUTP:PROT:CLE (@1);:SOUR:CURR 0.5,(@1);:OUTP ON,(@1)")
    assert h("OUTP? (@1)") == "1" and h("SYST:ERR?") == NO_ERROR
    # OVP: charging with a compliance above the trip level trips when V crosses it.
    v0 = float(h("MEAS:VOLT? (@2)"))
    h(f"SOUR:VOLT:PROT {v0 + 0.05:.4f},(@2);:SOUR:CURR:VLIM 5,(@2);:SOUR:CURR 5,(@2)")
    h("OUTP ON,(@2)")
    for _ in range(40):
        clock.advance(30.0)
        if h("OUTP? (@2)") == "0":
            break
    status = int(h("STAT:CHAN? (@2)"))
    assert status & STAT_OVP and not status & STAT_OUTPUT
    assert float(h("MEAS:CURR? (@2)")) == 0.0
    assert h("OUTP? (@1)") == "1"  # other channels keep running


def test_sim_sensor_dropout_reads_scpi_nan(sim: CabinetSim) -> None:
    sim.set_sensor_dropout(4)
    fields = sim.handle_line("MEAS:ALL? (@4)").split(",")
    assert fields[2] == "+9.91000000E+37"
    assert int(fields[4]) & STAT_TEMP_FAULT


# ---------------------------------------------------------------------------------------
# Driver against the simulator over real transports
# ---------------------------------------------------------------------------------------


@pytest.fixture
def tcp_sim(clock: ManualClock) -> Iterator[tuple[CabinetSim, TcpSimServer]]:
    bank = CellBank("nmc811", n=8, soc=[0.9, 0.6, 0.3, 0.5, 0.5, 0.5, 0.5, 0.5], seed=11)
    sim = CabinetSim(8, bank, clock=clock)
    with SimServer.tcp(sim) as server:
        yield sim, server


@pytest.fixture
def cab(tcp_sim: tuple[CabinetSim, TcpSimServer]) -> Iterator[CyclerCabinet]:
    _, server = tcp_sim
    inst = open_instrument(server.resource, timeout_s=TIMEOUT_S)
    assert isinstance(inst, CyclerCabinet)
    yield inst
    inst.close()


async def test_ameasure_on_the_loop_thread_reads_what_measure_reads(
    cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]
) -> None:
    """The engine's per-tick read without a worker thread: same command on the wire,
    same parse; the simulated time does not move, so the values are the same."""
    sim, _ = tcp_sim
    cab.set_current(2, -3.0, 4.2)
    cab.output(2, True)
    want = cab.measure([1, 2, 3])
    got = await cab.ameasure([1, 2, 3])
    assert got is not None and got.shape == (3, 3)
    np.testing.assert_array_equal(got, want)
    assert got[1, 1] == pytest.approx(-3.0, rel=1e-3)
    # Twice more through the fast path, then the worker path: the link stays in step.
    for _ in range(2):
        np.testing.assert_array_equal(await cab.ameasure([1, 2, 3]), want)
    np.testing.assert_array_equal(cab.measure([1, 2, 3]), want)
    # Only queries that may be repeated go this way (the caller may ask again).
    assert await cab.aquery("SYST:ERR?") is None
    assert await cab.aquery("OUTP OFF,(@2)") is None


@contextlib.contextmanager
def held_by_another_thread(cab: CyclerCabinet) -> Iterator[None]:
    """The instrument's lock held by another thread (an exchange in the middle of its
    round trip) for the body of the ``with``."""
    held, done = threading.Event(), threading.Event()

    def hold() -> None:
        with cab._lock:
            held.set()
            done.wait(5)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(5)
        yield
    finally:
        done.set()
        t.join()


async def test_ameasure_steps_aside_when_the_instrument_is_busy(cab: CyclerCabinet) -> None:
    """Another thread in the middle of an exchange: None, nothing sent (the caller
    queues behind it in the worker thread)."""
    with held_by_another_thread(cab):
        assert await cab.ameasure([1]) is None
    assert await cab.ameasure([1]) is not None


async def test_ameasure_timeout_and_lost_link_fall_back_to_the_worker_path(
    cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]
) -> None:
    """A late reply: None within the timeout and the link marked stale, so the worker
    path reconnects before its own query and does not take the late reply for its
    answer. A closed connection: None, and the worker path reconnects."""
    _, server = tcp_sim
    want = cab.measure([1, 2])
    # Far later than the timeout: None can only mean the timeout fired (a reply would
    # have been returned), however the machine's load stretches the wait.
    server.set_reply_delay(TIMEOUT_S * 20)
    assert await cab.ameasure([1, 2]) is None
    server.set_reply_delay(0.0)
    reconnects = cab.transport.reconnects
    np.testing.assert_array_equal(await asyncio.to_thread(cab.measure, [1, 2]), want)
    assert cab.transport.reconnects == reconnects + 1
    np.testing.assert_array_equal(await cab.ameasure([1, 2]), want)
    server.drop_connections()  # closes the sockets before it returns
    assert await cab.ameasure([1, 2]) is None
    np.testing.assert_array_equal(await asyncio.to_thread(cab.measure, [1, 2]), want)
    np.testing.assert_array_equal(await cab.ameasure([1, 2]), want)


async def test_ameasure_one_exchange_at_a_time_on_the_loop_thread(
    cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]
) -> None:
    """A second coroutine on the loop's thread while the first awaits its reply: None
    (the instrument's re-entrant lock alone would have let it onto the same link)."""
    _, server = tcp_sim
    # The first exchange is held open for 2 s (its timeout raised to allow it): the
    # second call comes once the server has the first query, so well within that.
    cab.transport.timeout_s = 30.0
    server.set_reply_delay(2.0)
    probe = ServerProbe(server)
    first = asyncio.create_task(cab.ameasure([1]))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30.0
    while not probe.received:
        assert loop.time() < deadline, "the first query never reached the server"
        await asyncio.sleep(0.005)
    assert await cab.ameasure([1]) is None
    assert await first is not None
    server.set_reply_delay(0.0)
    assert await cab.ameasure([1]) is not None


async def test_ameasure_timeout_counts_as_the_first_try(
    cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]
) -> None:
    """An instrument that stopped answering is given up on after as many timeouts as
    without the loop-thread path: its timeout, then one reconnect and one query in the
    worker path (not a second retry)."""
    _, server = tcp_sim
    server.set_reply_delay(30.0)
    assert await cab.ameasure([1]) is None
    reconnects = cab.transport.reconnects
    with pytest.raises(InstrumentTimeout):
        await asyncio.to_thread(cab.measure, [1])
    assert cab.transport.reconnects == reconnects + 1
    server.set_reply_delay(0.0)


def test_open_instrument_picks_cabinet_driver(cab: CyclerCabinet) -> None:
    assert cab.driver_name == "cabinet"
    assert cab.idn.startswith("LABDAQ,CYC-8,")
    assert cab.channels == list(range(1, 9))


def test_cc_charge_several_channels_at_once(cab: CyclerCabinet, clock: ManualClock) -> None:
    """Ch1 charges into its 4.2 V compliance and tapers while ch2 discharges at constant
    current, ch3 charges at constant current and ch4 rests with its output off."""
    cab.configure_protection([1, 2, 3], 4.3, 8.0)
    cab.set_current(1, 5.0, 4.2)
    cab.set_current(2, -3.0, 4.2)
    cab.set_current(3, 1.0, 4.2)
    cab.output([1, 2, 3], True)
    first = cab.measure_full()
    samples = []
    for _ in range(20):
        clock.advance(60.0)
        samples.append(cab.measure_full())
    v = np.array([s.voltage_v for s in samples])
    i = np.array([s.current_a for s in samples])
    mode = np.array([s.mode for s in samples])
    status = np.array([s.status for s in samples])
    # Channel 1: reaches 4.2 V, then holds it (CV) with a falling current.
    assert first.current_a[0] == 5.0 and first.mode[0] == MODE_CC
    clamped = mode[:, 0] == MODE_CV
    assert clamped[-5:].all()
    np.testing.assert_allclose(v[clamped, 0], 4.2, atol=1e-6)
    taper = i[clamped, 0]
    assert (np.diff(taper) <= 1e-9).all() and taper[-1] < 0.6 * 5.0 and taper[-1] > 0
    assert (status[clamped, 0] & (STAT_COMPLIANCE | STAT_CV) == STAT_COMPLIANCE | STAT_CV).all()
    # Channel 2: exactly -3 A, voltage falling.
    np.testing.assert_array_equal(i[:, 1], -3.0)
    assert (np.diff(v[:, 1]) < 0).all() and (mode[:, 1] == MODE_CC).all()
    assert not (status[:, 1] & STAT_COMPLIANCE).any()
    # Channel 3: exactly +1 A, voltage rising, not yet at the limit.
    np.testing.assert_array_equal(i[:, 2], 1.0)
    assert (np.diff(v[:, 2]) > 0).all() and v[-1, 2] < 4.2
    assert (status[:, 2] & STAT_CC).all()
    # Channel 4: off, no current, voltage steady.
    assert (i[:, 3] == 0.0).all() and (mode[:, 3] == MODE_OFF).all()
    assert np.ptp(v[:, 3]) < 1e-3
    assert np.isfinite(np.array([s.temperature_c for s in samples])).all()
    cab.safe_shutdown()
    assert not cab.output_enabled.get().any()


def test_cv_mode_current_limited_then_tapering(cab: CyclerCabinet, clock: ManualClock) -> None:
    cab.set_voltage(2, 4.1, 2.0)
    cab.output(2, True)
    s = cab.measure_full([2])
    assert s.current_a[0] == pytest.approx(2.0) and s.mode[0] == MODE_CC  # at ILIM
    assert s.status[0] & STAT_COMPLIANCE
    for _ in range(120):
        clock.advance(60.0)
        s = cab.measure_full([2])
        if s.mode[0] == MODE_CV:
            break
    assert s.mode[0] == MODE_CV and s.voltage_v[0] == pytest.approx(4.1, abs=1e-6)
    assert 0 < s.current_a[0] < 2.0


def test_hardware_protection_trip_over_tcp(cab: CyclerCabinet, clock: ManualClock) -> None:
    v_now = float(cab.measure([3])[0, 0])
    # Program only the hardware trip (no software limit in the driver), with the
    # compliance above it: the instrument itself must switch the output off.
    cab.over_voltage_protection_v.set(round(v_now + 0.02, 3), 3)
    cab.set_current(3, 2.0, 4.2)
    cab.output(3, True)
    for _ in range(60):
        clock.advance(30.0)
        if not cab.output_enabled[3]:
            break
    bits = cab.status([3])[0]
    assert bits & STAT_OVP and not bits & STAT_OUTPUT
    assert cab.protection_tripped[3]
    with pytest.raises(InstrumentReportedError) as exc:
        cab.output(3, True)
    assert exc.value.code == -221
    cab.clear_protection(3)
    cab.set_current(3, -1.0, 4.2)
    cab.output(3, True)
    assert cab.output_enabled[3]


def test_out_of_range_over_the_wire(cab: CyclerCabinet) -> None:
    # Bypass the driver's validators to see the instrument's own checks.
    with pytest.raises(InstrumentReportedError) as exc:
        cab.write_checked("SOUR:CURR 12,(@1)")
    assert exc.value.code == -222
    with pytest.raises(InstrumentReportedError) as exc:
        cab.write_checked("OUTP ON,(@0:2)")
    assert exc.value.code == -222 and "channel 0" in exc.value.text
    with pytest.raises(InstrumentValueError):
        cab.source_current_a.set(-10.5, [1])


def test_watchdog_turns_every_output_off(clock: ManualClock) -> None:
    sim = CabinetSim(8, "nmc811", clock=clock)
    # The window is short only while the test waits for the trip: a test descheduled for
    # 0.15 s between two commands on a loaded machine would trip it while setting up.
    with SimServer.tcp(sim, watchdog_s=3600.0) as server:
        cab = open_instrument(server.resource, timeout_s=TIMEOUT_S)
        assert isinstance(cab, CyclerCabinet)
        cab.set_current([1, 2, 5], 1.0, 4.2)
        cab.output([1, 2, 5], True)
        assert cab.output_enabled.get().sum() == 3
        server.watchdog_s = 0.15  # counted from that last command
        deadline = time.monotonic() + 30.0
        while server.watchdog_trips == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        server.watchdog_s = 3600.0
        assert server.watchdog_trips == 1
        bits = cab.status()
        assert not (bits & STAT_OUTPUT).any()
        assert [bool(b & STAT_WATCHDOG) for b in bits] == [True, True, False, False, True,
                                                         False, False, False]
        cab.output(1, True)  # switching on again clears that channel's watchdog flag
        assert not cab.status([1])[0] & STAT_WATCHDOG
        cab.close()


def test_sensor_dropout_reads_nan_through_driver(
        cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]) -> None:
    sim, _ = tcp_sim
    sim.set_sensor_dropout(6)
    data = cab.measure()
    assert math.isnan(data[5, 2]) and np.isfinite(np.delete(data[:, 2], 5)).all()


def test_garbled_reply_raises_typed_error(cab: CyclerCabinet,
                                          tcp_sim: tuple[CabinetSim, TcpSimServer]) -> None:
    _, server = tcp_sim
    server.garble_next_reply()
    with pytest.raises(GarbledReply):
        cab.measure()
    assert cab.measure().shape == (8, 3)  # the link is usable afterwards


def test_timeout_raises_typed_error(cab: CyclerCabinet,
                                    tcp_sim: tuple[CabinetSim, TcpSimServer]) -> None:
    _, server = tcp_sim
    server.swallow_next_reply(2)  # the idempotent MEAS:ALL? is retried once, then fails
    with pytest.raises(InstrumentTimeout):
        cab.measure()
    assert cab.measure().shape == (8, 3)


def test_dropped_connection_reconnects_or_fails_typed(
        cab: CyclerCabinet, tcp_sim: tuple[CabinetSim, TcpSimServer]) -> None:
    _, server = tcp_sim
    server.drop_connections()
    assert cab.measure().shape == (8, 3)  # transparent reconnect
    assert cab.transport.reconnects >= 1
    server.stop()
    cab.transport.reconnect_attempts = 2
    with pytest.raises(ConnectionFailed):
        cab.measure()


# -- pty: pyvisa ASRL and plain pyserial --------------------------------------------------


@pytest.fixture
def pty_server(clock: ManualClock) -> Iterator[PtySimServer]:
    sim = CabinetSim(8, "lfp", clock=clock, seed=5)
    with SimServer.pty(sim) as server:
        yield server


@pytest.mark.parametrize("kind", ["visa", "pyserial"])
def test_over_pty(pty_server: PtySimServer, clock: ManualClock, kind: str) -> None:
    resource = pty_server.resource if kind == "visa" else pty_server.path
    transport = open_transport(resource, timeout_s=1.0)
    cab = CyclerCabinet(transport, f"pty-{kind}")
    try:
        assert cab.idn.startswith("LABDAQ,CYC-8,")
        cab.set_current([2, 4], 1.5, 3.6)
        cab.output([2, 4], True)
        clock.advance(10.0)
        s = cab.measure_full()
        assert s.current_a.tolist() == [0.0, 1.5, 0.0, 1.5, 0.0, 0.0, 0.0, 0.0]
        assert (s.status[[1, 3]] & STAT_OUTPUT).all()
        with pytest.raises(InstrumentReportedError):
            cab.write_checked("SOUR:CURR:PROT 20,(@1)")
        cab.safe_shutdown()
    finally:
        cab.close()


# ---------------------------------------------------------------------------------------
# Binary MEAS:ALL? (FORM:DATA REAL,32)
# ---------------------------------------------------------------------------------------


def _block_values(reply: str, dtype: str) -> np.ndarray:
    raw = reply.encode("latin-1")  # the servers send replies as latin-1: one byte a char
    assert raw.startswith(b"#")
    digits = raw[1] - 0x30
    length = int(raw[2 : 2 + digits])
    payload = raw[2 + digits :]
    assert len(payload) == length
    return np.frombuffer(payload, dtype=dtype).astype(float)


def test_sim_real32_block_holds_what_ascii_says(sim: CabinetSim, clock: ManualClock) -> None:
    sim.handle_line("SOUR:CURR 2.5,(@1:4);:OUTP ON,(@1:4)")
    clock.advance(30.0)
    text = sim.handle_line("MEAS:ALL? (@1:8)")
    assert text is not None
    ascii_values = np.array(text.split(","), dtype=float)
    assert sim.handle_line("FORM:DATA?") == "ASC,0"
    sim.handle_line("FORM:DATA REAL,32")
    assert sim.handle_line("FORM:DATA?;:FORM:BORD?") == "REAL,32;NORM"
    big = sim.handle_line("MEAS:ALL? (@1:8)")
    assert big is not None and big.startswith("#3160")  # 8 channels x 5 x 4 bytes
    np.testing.assert_array_equal(_block_values(big, ">f4"),
                                  ascii_values.astype(np.float32).astype(float))
    sim.handle_line("FORM:BORD SWAP")
    little = sim.handle_line("MEAS:ALL? (@2,1)")
    assert little is not None
    np.testing.assert_array_equal(_block_values(little, "<f4").reshape(2, 5)[[1, 0]],
                                  _block_values(big, ">f4").reshape(8, 5)[:2])
    # Other queries stay ASCII; *RST restores ASCII replies and normal byte order.
    assert sim.handle_line("OUTP? (@1,5)") == "1,0"
    sim.handle_line("*RST")
    assert sim.handle_line("FORM:DATA?;:FORM:BORD?") == "ASC,0;NORM"
    assert sim.parser.errors == []


def test_sim_real32_refuses_other_lengths(sim: CabinetSim) -> None:
    for bad, code in [("FORM:DATA REAL,64", -222), ("FORM:DATA ASC,8", -108),
                      ("FORM:DATA INT", -224), ("FORM:BORD BIG", -224)]:
        sim.handle_line(bad)
        assert sim.parser.pop_error()[0] == code, bad
    assert sim.handle_line("FORM:DATA?") == "ASC,0"


def test_driver_keeps_ascii_where_the_instrument_has_no_binary_form() -> None:
    transport = ScriptedTransport([
        ("SYST:CHAN:COUN?", "2"), ("SYST:CHAN:LIM?", "+1.00000000E+01,+5.00000000E+00"),
        ("FORM:DATA REAL,32;:FORM:BORD NORM", None),
        (":SYST:ERR?", '-113,"Undefined header"'), (":SYST:ERR?", '-113,"Undefined header"'),
        (":SYST:ERR?", NO_ERROR),
        ("MEAS:ALL? (@1,2)", "+3.7E+00,+1.0E+00,+2.5E+01,1,3,+3.6E+00,+0.0E+00,+2.5E+01,0,0"),
    ])
    cab = CyclerCabinet(transport, "old-cab")
    assert cab.data_format == "ascii"
    assert cab.measure().tolist() == [[3.7, 1.0, 25.0], [3.6, 0.0, 25.0]]
    transport.assert_all_used()


def test_driver_parses_binary_blocks_and_checks_their_length() -> None:
    table = np.array([[3.7, 1.0, 25.0, 1, 3], [3.6, 0.0, 9.91e37, 0, 128]], dtype=">f4")
    block = format_block(table.tobytes())
    transport = ScriptedTransport([
        ("FORM:DATA REAL,32;:FORM:BORD NORM", None), (":SYST:ERR?", NO_ERROR),
        ("MEAS:ALL? (@1,2)", block),
        ("MEAS:ALL? (@1,2)", block[:-4]),  # one float short: the header says so too
        ("MEAS:ALL? (@1)", block),  # a block for two channels when one was asked
        ("MEAS:ALL? (@1,2)", "+3.7E+00,+1.0E+00,+2.5E+01,1,3,+3.6E+00,+0,+2.5E+01,0,0"),
    ])
    cab = CyclerCabinet(transport, "cab", channels=2, current_max_a=10.0, voltage_max_v=5.0,
                        data_format="real32")
    full = cab.measure_full()
    np.testing.assert_array_equal(full.voltage_v, np.float32([3.7, 3.6]).astype(float))
    assert math.isnan(full.temperature_c[1]) and full.status.tolist() == [3, 128]
    with pytest.raises(GarbledReply):
        cab.measure()
    with pytest.raises(GarbledReply, match="160 bytes|40 bytes"):
        cab.measure([1])
    # An instrument reset to ASCII behind the driver's back is still read right.
    assert cab.measure()[:, 0].tolist() == [3.7, 3.6]
    transport.assert_all_used()


@pytest.mark.parametrize("stream", [False, True], ids=["pyvisa", "stream"])
async def test_binary_measure_over_tcp_matches_ascii(
    tcp_sim: tuple[CabinetSim, TcpSimServer], stream: bool
) -> None:
    """The same reading through both formats and both SOCKET links, blocking and on
    the loop thread: equal to float32 precision (the block's own precision)."""
    sim, server = tcp_sim

    def open_cab(data_format: str | None) -> CyclerCabinet:
        return CyclerCabinet(open_transport(server.resource, timeout_s=TIMEOUT_S,
                                            stream=stream), "cab", data_format=data_format)

    text_cab = await asyncio.to_thread(open_cab, "ascii")
    bin_cab = await asyncio.to_thread(open_cab, None)
    try:
        assert bin_cab.data_format == "real32" and sim.data_format == "REAL"
        await asyncio.to_thread(bin_cab.set_current, [1, 2], 3.0, 4.2)
        await asyncio.to_thread(bin_cab.output, [1, 2], True)
        with server.lock:  # the format *RST would restore, without touching the settings
            sim.handle_line("FORM:DATA ASC")
        want = await asyncio.to_thread(text_cab.measure)
        with server.lock:
            sim.handle_line("FORM:DATA REAL,32")
        blocking = await asyncio.to_thread(bin_cab.measure)
        on_loop = await bin_cab.ameasure()
        assert on_loop is not None
        for got in (blocking, on_loop):
            np.testing.assert_array_equal(got, want.astype(np.float32).astype(float))
        assert got[0, 1] == pytest.approx(3.0)
    finally:
        text_cab.close()
        bin_cab.close()
