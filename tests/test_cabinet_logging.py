"""Cabinet hardware-timed logging: the simulator's ring and its readings' times and set
points, the driver's exact bytes, and blocks split, short, long or overflowed, through a
scripted transport, a byte-exact TCP peer and the simulator over TCP."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from labdaq.drivers.cabinet import CyclerCabinet
from labdaq.drivers.cabinet_log import parse_logged, reading_dtype
from labdaq.drivers.errors import GarbledReply, InstrumentReportedError, InstrumentValueError
from labdaq.drivers.transport import ScriptedTransport, format_block, open_transport
from labdaq.sims.cabinet import CabinetSim
from labdaq.sims.clock import ManualClock
from labdaq.sims.server import SimServer, TcpSimServer
from tests.test_transport_blocks import BytePeer, Gate

NO_ERROR = '0,"No error"'
CTOR = [("FORM:DATA REAL,32;:FORM:BORD NORM", None), (":SYST:ERR?", NO_ERROR)]


def block(first: int, index: list[int], t_s: list[float], vit: np.ndarray) -> bytes:
    """A TRAC:DATA? block as the cabinet sends it (big-endian)."""
    rec = np.empty(len(index), reading_dtype(vit.shape[1]))
    rec["index"], rec["t_s"], rec["vit"] = index, t_s, vit
    return format_block(np.array([first, len(index)], ">f8").tobytes() + rec.tobytes())


def scripted(script: list[tuple[str | None, str | bytes | None]]
             ) -> tuple[CyclerCabinet, ScriptedTransport]:
    transport = ScriptedTransport(CTOR + script)
    cab = CyclerCabinet(transport, "cab-test", channels=8, current_max_a=10.0,
                        voltage_max_v=5.0, acquisition="buffered", buffer_points=500)
    return cab, transport


def unblock(reply: str) -> tuple[np.ndarray, np.ndarray]:
    """Header and readings of a simulator's TRAC:DATA? reply."""
    raw = reply.encode("latin-1")
    n = raw[1] - 0x30
    payload = raw[2 + n:]
    head = np.frombuffer(payload[:16], ">f8")
    size = (len(payload) - 16) // int(head[1]) if head[1] else 16  # bytes per reading
    return head, np.frombuffer(payload[16:], reading_dtype((size - 16) // 12))


# -- simulator ----------------------------------------------------------------------------


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(100.0)


@pytest.fixture
def sim(clock: ManualClock) -> CabinetSim:
    s = CabinetSim(8, "nmc811", clock=clock, seed=3)
    for line in ("FORM:DATA REAL,32", "TRAC:POIN 20", "TRIG:TIM 0.01"):
        assert s.handle_line(line) is None
    return s


def test_sim_logs_on_its_clock_with_the_set_points_in_force(sim: CabinetSim,
                                                            clock: ManualClock) -> None:
    h = sim.handle_line
    assert h("INIT") is None and h("SYST:ERR?") == NO_ERROR
    clock.advance(0.045)
    h("SOUR:CURR 2,(@1:2)")
    h("OUTP ON,(@1:2)")  # between reading 5 (t0 + 0.04) and 6 (t0 + 0.05)
    clock.advance(0.03)
    head, rec = unblock(h("TRAC:DATA? 1,(@1,2,5)"))  # type: ignore[arg-type]
    assert head.tolist() == [1.0, 8.0]
    assert rec["index"].tolist() == list(range(1, 9))
    assert np.allclose(rec["t_s"], 100.0 + 0.01 * np.arange(8))
    current = rec["vit"][:, :, 1]
    assert (current[:5] == 0).all() and (current[5:, :2] == 2).all()
    assert (current[:, 2] == 0).all()
    # Only what is new: from index 7 on.
    head, rec = unblock(h("TRAC:DATA? 7"))  # type: ignore[arg-type]
    assert head.tolist() == [1.0, 2.0] and rec["index"].tolist() == [7, 8]
    assert h("TRAC:ACT?") == "8" and h("TRAC:ACT:STAR?") == "1" and h("TRAC:ACT:END?") == "8"
    # Nothing new yet: an empty block with the header only.
    head, rec = unblock(h("TRAC:DATA? 9"))  # type: ignore[arg-type]
    assert head.tolist() == [1.0, 0.0] and len(rec) == 0


def test_sim_ring_overflow_says_what_it_still_holds(sim: CabinetSim,
                                                   clock: ManualClock) -> None:
    h = sim.handle_line
    h("INIT")
    clock.advance(1.0)  # 101 readings into a ring of 20
    head, rec = unblock(h("TRAC:DATA? 5"))  # type: ignore[arg-type]
    assert head.tolist() == [82.0, 20.0]
    assert rec["index"].tolist() == list(range(82, 102))
    assert np.allclose(rec["t_s"], 100.0 + 0.01 * np.arange(81, 101))
    # Much longer than the ring: the cells still move through the time, in big steps.
    clock.advance(600.0)
    assert h("TRAC:ACT:END?") == str(60101) and h("TRAC:ACT:STAR?") == str(60082)


def test_sim_logging_commands_refuse_what_a_running_log_cannot_take(
        sim: CabinetSim, clock: ManualClock) -> None:
    h = sim.handle_line
    h("INIT")
    h("INIT")
    assert h("SYST:ERR?") == '-213,"Init ignored; logging is already running"'
    h("TRAC:POIN 50")
    assert h("SYST:ERR?").startswith("-221,")
    clock.advance(0.02)
    h("ABOR")
    clock.advance(1.0)  # stopped: no more readings
    assert h("TRAC:ACT:END?") == "3"
    h("TRAC:POIN 5")
    assert h("SYST:ERR?").startswith("-222,")
    h("FORM:DATA ASC")
    assert h("TRAC:DATA? 1") is None
    assert h("SYST:ERR?").startswith("-221,")
    h("*RST")
    assert h("TRAC:ACT:END?") == "0" and h("TRAC:POIN?") == "1000"


# -- driver, byte-exact ---------------------------------------------------------------------


def test_driver_start_fetch_stop_bytes() -> None:
    vit = np.arange(3 * 3 * 3, dtype=np.float32).reshape(3, 3, 3)
    vit[1, 2, 2] = 9.91e37  # an open sensor
    reply = block(4, [4, 5, 6], [1.5, 1.51, 1.52], vit)
    cab, t = scripted([
        ("ABOR;:TRAC:POIN 500;:TRIG:TIM 0.01;:INIT", None), (":SYST:ERR?", NO_ERROR),
        ("TRAC:DATA? 2,(@1,3,8)", reply),
        ("ABOR", None), (":SYST:ERR?", NO_ERROR),
    ])
    assert cab.acquisition == "buffered" and cab.buffer_depth == 500
    cab.start_logging(0.01)
    got = cab.fetch_logged(2, [1, 3, 8])
    assert got.first_held == 4 and got.lost_before(2) == 2
    assert got.indices.tolist() == [4, 5, 6] and got.t_s.tolist() == [1.5, 1.51, 1.52]
    assert got.voltage_v.shape == (3, 3)
    assert np.array_equal(got.current_a[0], vit[0, :, 1])
    assert np.isnan(got.temperature_c[1, 2]) and np.isnan(got.temperature_c).sum() == 1
    cab.stop_logging()
    t.assert_all_used()


def test_driver_validates_before_sending() -> None:
    cab, t = scripted([])
    with pytest.raises(InstrumentValueError):
        cab.fetch_logged(0)
    with pytest.raises(InstrumentValueError):
        cab.fetch_logged(1, [9])
    with pytest.raises(InstrumentValueError):
        cab.start_logging(0.0001)
    t.assert_all_used()
    with pytest.raises(ValueError):
        CyclerCabinet(ScriptedTransport([]), "x", channels=8, current_max_a=1.0,
                      voltage_max_v=5.0, data_format="ascii", acquisition="buffered")


@pytest.mark.parametrize("bad", [
    b"+1.0,+2.0",  # not a block
    format_block(b"\0" * 8),  # shorter than its header
    format_block(np.array([1, 2], ">f8").tobytes() + b"\0" * 40),  # readings != header
    block(1, [2, 3], [0.0, 0.01], np.zeros((2, 2, 3), np.float32)),  # starts past 1
    block(1, [1, 3], [0.0, 0.01], np.zeros((2, 2, 3), np.float32)),  # a hole
    block(1, [1], [0.0], np.zeros((1, 3, 3), np.float32)),  # three channels, not two
], ids=["text", "short", "length", "start", "hole", "channels"])
def test_wrong_blocks_are_garbled(bad: bytes) -> None:
    with pytest.raises(GarbledReply):
        parse_logged(bad, 2, 1)


# -- a block split across reads, and a wrong length, over a real socket ----------------------


@pytest.fixture
def peer() -> Iterator[BytePeer]:
    p = BytePeer()
    yield p
    p.close()


def _peer_cabinet(peer: BytePeer, stream: bool) -> CyclerCabinet:
    peer.plan()  # FORM:DATA ... (no reply)
    peer.plan(NO_ERROR.encode() + b"\n")
    return CyclerCabinet(open_transport(peer.resource, timeout_s=5.0, stream=stream), "cab",
                         channels=8, current_max_a=10.0, voltage_max_v=5.0,
                         acquisition="buffered")


@pytest.mark.parametrize("stream", [False, True], ids=["pyvisa", "stream"])
def test_fetch_waits_for_a_block_split_across_reads(peer: BytePeer, stream: bool) -> None:
    vit = np.random.default_rng(1).random((40, 8, 3)).astype(np.float32)
    reply = block(1, list(range(1, 41)), [0.01 * k for k in range(40)], vit) + b"\n"
    gates = [Gate(), Gate()]
    cab = _peer_cabinet(peer, stream)
    try:
        peer.plan(reply[:5], gates[0], reply[5:3000], gates[1], reply[3000:])
        with ThreadPoolExecutor(1) as pool:
            got = pool.submit(cab.fetch_logged, 1)
            for gate in gates:
                assert peer.sent.acquire(timeout=5.0)
                assert not got.done()
                gate.set()
            r = got.result(5.0)
        assert r.indices.tolist() == list(range(1, 41))
        assert np.array_equal(r.voltage_v, vit[:, :, 0].astype(float))
        # A whole block whose header counts one reading more than it holds: garbled, and
        # the next fetch reads its own reply.
        one = block(1, [1], [0.0], np.zeros((1, 8, 3), np.float32))
        payload = np.array([1, 2], ">f8").tobytes() + one[len(one) - 112:]
        peer.plan(format_block(payload) + b"\n")
        with pytest.raises(GarbledReply):
            cab.fetch_logged(1)
        peer.plan(one + b"\n")
        assert cab.fetch_logged(1).indices.tolist() == [1]
    finally:
        cab.close()


# -- the driver against the simulator over TCP ------------------------------------------------


@pytest.fixture
def tcp_sim(clock: ManualClock) -> Iterator[tuple[CabinetSim, TcpSimServer]]:
    s = CabinetSim(8, "nmc811", clock=clock, seed=5)
    with SimServer.tcp(s) as server:
        yield s, server


async def test_logging_over_tcp_every_reading_once_and_the_overflow(
        tcp_sim: tuple[CabinetSim, TcpSimServer], clock: ManualClock) -> None:
    _, server = tcp_sim
    cab = CyclerCabinet(open_transport(server.resource, timeout_s=2.0, stream=True), "cab",
                        acquisition="buffered", buffer_points=50)
    try:
        cab.start_logging(0.01)  # blocking calls first: none awaited on this link yet
        assert cab.buffer_points == 50 and cab.logging_period_s == pytest.approx(0.01)
        cab.set_current([3], -1.0, 4.2)
        cab.output([3], True)
        seen: list[int] = []
        t_seen: list[float] = []
        nxt = 1
        for _ in range(7):
            clock.advance(0.033)
            got = await cab.afetch_logged(nxt, [3, 4])
            assert got is not None and got.lost_before(nxt) == 0
            seen += got.indices.tolist()
            t_seen += got.t_s.tolist()
            nxt = int(got.indices[-1]) + 1 if len(got.indices) else nxt
        assert seen == list(range(1, len(seen) + 1)) and len(seen) == 24
        assert np.allclose(np.diff(t_seen), 0.01)
        clock.advance(1.0)  # 100 readings into a ring of 50
        got = await asyncio.to_thread(cab.fetch_logged, nxt, [3])
        first = await asyncio.to_thread(lambda: cab.buffer_first_index)
        last = await asyncio.to_thread(lambda: cab.buffer_last_index)
        assert got.first_held == first > nxt
        assert got.lost_before(nxt) == got.first_held - nxt
        assert got.indices[-1] == last
        assert (got.current_a[:, 0] == -1.0).all()
        await asyncio.to_thread(cab.stop_logging)
        with pytest.raises(InstrumentReportedError):
            await asyncio.to_thread(cab.write_checked, "TRAC:CLE;:INIT;:INIT")
    finally:
        cab.close()
