"""Transport layer: worker ordering off the event loop, resource dispatch, scripted
transport, reconnect/backoff, stale-reply handling, serial framing."""

from __future__ import annotations

import asyncio
import math
import socket
import threading
import time

import pytest

from labdaq.drivers.errors import ConnectionFailed, GarbledReply, InstrumentTimeout
from labdaq.drivers.transport import (
    InstrumentWorker,
    ScriptedTransport,
    SerialTransport,
    StreamTransport,
    VisaTransport,
    is_idempotent,
    open_transport,
)
from labdaq.sims.server import SimServer
from tests.sim_probes import (
    ServerProbe,
    open_connections,
    pty_unread_by_server,
    until,
)

TIMEOUT_S = 0.5
# Every TCP test runs on both links a SOCKET resource can have: pyvisa-py, and the
# asyncio stream transport of the engine's hot path.
TCP_KINDS = pytest.mark.parametrize("stream", [False, True], ids=["pyvisa", "stream"])


class Echo:
    """Answers ``X?`` with ``X`` and counts commands; enough to test framing."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def handle_line(self, line: str) -> str | None:
        self.lines.append(line)
        if line.endswith("?"):
            return line[:-1]
        return None


# -- InstrumentWorker ---------------------------------------------------------------------


async def test_worker_keeps_order_under_concurrency() -> None:
    worker = InstrumentWorker("order")
    seen: list[int] = []

    def io(k: int) -> int:
        time.sleep(0.002 if k % 3 == 0 else 0.0)  # uneven durations must not reorder
        seen.append(k)
        return k * 10

    try:
        results = await asyncio.gather(*(worker.call(io, k) for k in range(40)))
    finally:
        worker.shutdown()
    assert seen == list(range(40))
    assert results == [k * 10 for k in range(40)]


async def test_worker_does_not_block_the_loop() -> None:
    """The worker's call blocks until the event loop has run other coroutines: it can
    only return True if the loop kept running while the worker thread was blocked."""
    worker = InstrumentWorker("slow")
    released = threading.Event()

    async def ticker() -> None:
        for _ in range(5):
            await asyncio.sleep(0)
        released.set()

    task = asyncio.create_task(ticker())
    try:
        assert await worker.call(released.wait, 60.0)
    finally:
        task.cancel()
        worker.shutdown()


async def test_workers_of_different_instruments_run_in_parallel() -> None:
    """Each call waits at a barrier for the other: both pass only if the two workers'
    calls are in progress at the same time (one at a time would break the barrier)."""
    a, b = InstrumentWorker("a"), InstrumentWorker("b")
    both = threading.Barrier(2, timeout=60.0)
    try:
        await asyncio.gather(a.call(both.wait), b.call(both.wait))
        assert not both.broken
    finally:
        a.shutdown()
        b.shutdown()


async def test_worker_propagates_exceptions_and_runs_on_one_thread() -> None:
    worker = InstrumentWorker("err")
    threads: set[int] = set()

    def record() -> None:
        threads.add(threading.get_ident())

    def boom() -> None:
        raise InstrumentTimeout("late", instrument="x")

    try:
        for _ in range(5):
            await worker.call(record)
        with pytest.raises(InstrumentTimeout):
            await worker.call(boom)
        await worker.call(record)
    finally:
        worker.shutdown()
    assert len(threads) == 1 and threading.get_ident() not in threads


# -- dispatch and helpers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "kind"),
    [
        ("TCPIP::127.0.0.1::5025::SOCKET", VisaTransport),
        ("TCPIP::10.0.0.2::INSTR", VisaTransport),
        ("ASRL/dev/ttyUSB0::INSTR", VisaTransport),
        ("GPIB0::24::INSTR", VisaTransport),
        ("USB0::0x05E6::0x2450::04412345::INSTR", VisaTransport),
        ("/dev/ttyUSB0", SerialTransport),
        ("serial:///dev/ttyS1?baudrate=115200", SerialTransport),
        ("COM3", SerialTransport),
    ],
)
def test_open_transport_dispatch(resource: str, kind: type) -> None:
    t = open_transport(resource, connect=False, timeout_s=0.1)
    assert isinstance(t, kind)
    assert not t.is_open


def test_stream_is_chosen_for_socket_resources_only() -> None:
    t = open_transport("TCPIP::10.0.0.1::5025::SOCKET", connect=False, stream=True)
    assert isinstance(t, StreamTransport) and (t.host, t.port) == ("10.0.0.1", 5025)
    # pyvisa-py stays for every other resource, asked or not.
    assert isinstance(open_transport("TCPIP::10.0.0.2::INSTR", connect=False, stream=True),
                      VisaTransport)
    assert isinstance(open_transport("/dev/ttyUSB0", connect=False, stream=True),
                      SerialTransport)


def test_serial_url_options() -> None:
    t = open_transport("serial:///dev/ttyS1?baudrate=115200", connect=False,
                       read_termination="\r\n")
    assert isinstance(t, SerialTransport)
    assert t.port == "/dev/ttyS1"
    assert t.serial_kwargs["baudrate"] == 115200
    assert t.read_termination == "\r\n"


def test_visa_gets_baud_rate_alias() -> None:
    t = open_transport("ASRL/dev/ttyS0::INSTR", connect=False, baudrate=19200)
    assert isinstance(t, VisaTransport)
    assert t.visa_kwargs["baud_rate"] == 19200


@pytest.mark.parametrize(
    ("command", "idempotent"),
    [
        ("*IDN?", True),
        (":MEAS:VOLT?;:MEAS:CURR?", True),
        (":SOUR:CURR 1", False),
        (":SOUR:CURR 1;:SOUR:CURR?", False),
        (":SYST:ERR?", False),
        ("SYSTEM:ERROR:NEXT?", False),
        ("*ESR?", False),
    ],
)
def test_is_idempotent(command: str, idempotent: bool) -> None:
    assert is_idempotent(command) is idempotent


def test_scripted_transport() -> None:
    t = ScriptedTransport([("*IDN?", "ACME"), (":OUTP 1", None), (None, "late")])
    assert t.query("*IDN?") == "ACME"
    t.write(":OUTP 1")
    assert t.read() == "late"
    t.assert_all_used()
    with pytest.raises(AssertionError, match="script exhausted"):
        t.write("*RST")
    t2 = ScriptedTransport([("*IDN?", "ACME")])
    with pytest.raises(AssertionError, match="expected"):
        t2.write("*idn?")
    with pytest.raises(AssertionError):
        ScriptedTransport([("*RST", None)]).assert_all_used()


# -- against a live TCP server ---------------------------------------------------------------


@TCP_KINDS
def test_tcp_query_and_framing(stream: bool) -> None:
    sim = Echo()
    with SimServer.tcp(sim) as srv:
        t = open_transport(srv.resource, stream=stream, timeout_s=TIMEOUT_S)
        try:
            assert t.query("HELLO?") == "HELLO"
            t.write("SET 1")
            assert t.query("A?") == "A"
            assert sim.lines == ["HELLO?", "SET 1", "A?"]
        finally:
            t.close()


@TCP_KINDS
def test_crlf_terminations(stream: bool) -> None:
    sim = Echo()
    with SimServer.tcp(sim, read_termination="\r\n", write_termination="\r\n") as srv:
        t = open_transport(srv.resource, stream=stream, timeout_s=TIMEOUT_S,
                           read_termination="\r\n", write_termination="\r\n")
        try:
            assert t.query("X?") == "X"
        finally:
            t.close()


@pytest.mark.parametrize("kind", [VisaTransport, StreamTransport], ids=["pyvisa", "stream"])
def test_connect_to_closed_port_fails_fast(kind: type[VisaTransport | StreamTransport]
                                           ) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t = kind(f"TCPIP::127.0.0.1::{port}::SOCKET", timeout_s=0.3,
             reconnect_attempts=3, backoff_initial_s=0.01)
    with pytest.raises(ConnectionFailed) as exc:
        t.reconnect()
    assert t.reconnect_attempts == 3
    assert str(port) in str(exc.value) and "after 3 attempts" in str(exc.value)


@TCP_KINDS
def test_reconnect_after_server_restart(stream: bool) -> None:
    sim = Echo()
    srv = SimServer.tcp(sim).start()
    # Attempts spread over ~40 s (backoff capped at 2 s): the restart below falls inside
    # them however late its timer thread runs on a busy machine.
    t = open_transport(srv.resource, stream=stream, timeout_s=TIMEOUT_S, backoff_initial_s=0.05,
                       reconnect_attempts=25)
    restart = threading.Timer(0.15, srv.start)
    try:
        assert t.query("A?") == "A"
        srv.stop()
        # Restart on the same port a little later: backoff keeps trying meanwhile.
        restart.start()
        assert t.query("B?") == "B"
        assert t.reconnects >= 1
    finally:
        t.close()
        restart.cancel()
        if restart.is_alive():
            restart.join()
        srv.stop()


@TCP_KINDS
def test_late_reply_is_not_taken_for_the_next_answer(stream: bool) -> None:
    sim = Echo()
    with SimServer.tcp(sim) as srv:
        t = open_transport(srv.resource, stream=stream, timeout_s=0.2, retry_timeouts=False)
        try:
            # Five timeouts late: the client times out first even if it is descheduled
            # for a while between sending and reading.
            srv.set_reply_delay(1.0)
            with pytest.raises(InstrumentTimeout):
                t.query("OLD?")
            srv.set_reply_delay(0)
            assert t.query("NEW?") == "NEW"
            # The late "OLD" goes out on the abandoned connection: its handler sends it
            # once the delay is over, then sees the client gone and ends.
            until(lambda: open_connections(srv) == 1, "the abandoned connection's late reply")
            assert t.query("NEXT?") == "NEXT"
        finally:
            t.close()


@TCP_KINDS
def test_garbled_reply_raises(stream: bool) -> None:
    with SimServer.tcp(Echo()) as srv:
        t = open_transport(srv.resource, stream=stream, timeout_s=TIMEOUT_S)
        try:
            srv.garble_next_reply()
            with pytest.raises(GarbledReply) as exc:
                t.query("ABC?")
            assert exc.value.command == "ABC?"
            assert t.query("OK?") == "OK"
        finally:
            t.close()


# -- pty: both client stacks, reopen -------------------------------------------------------


@pytest.mark.parametrize("use_visa", [True, False], ids=["pyvisa-asrl", "pyserial"])
def test_pty_reopen(use_visa: bool) -> None:
    with SimServer.pty(Echo()) as srv:
        resource = srv.resource if use_visa else srv.path
        for _ in range(3):  # clients come and go; the server keeps serving
            t = open_transport(resource, timeout_s=TIMEOUT_S)
            try:
                assert t.query("PING?") == "PING"
            finally:
                t.close()


def test_serial_timeout_is_bounded() -> None:
    with SimServer.pty(Echo()) as srv:
        t = open_transport(srv.path, timeout_s=0.2, retry_timeouts=False)
        try:
            srv.swallow_next_reply()
            t0 = time.monotonic()
            with pytest.raises(InstrumentTimeout):
                t.query("LOST?")
            # Not before the configured 0.2 s, and not a blocking read (that would hang
            # until the test's own timeout): a margin that no load reaches.
            assert 0.19 <= time.monotonic() - t0 < 10.0
            # The link still works afterwards; a generous timeout so that a loaded machine's
            # slow pty cannot turn the answer into a partial read.
            t.timeout_s = 10.0
            assert t.query("BACK?") == "BACK"
        finally:
            t.close()


@TCP_KINDS
def test_timeout_change_applies_to_open_link(stream: bool) -> None:
    with SimServer.tcp(Echo()) as srv:
        t = open_transport(srv.resource, stream=stream, timeout_s=60.0, retry_timeouts=False)
        try:
            t.timeout_s = 0.15
            srv.swallow_next_reply()
            t0 = time.monotonic()
            with pytest.raises(InstrumentTimeout):
                t.query("GONE?")
            # The new 0.15 s, not the 60 s the link was opened with.
            assert 0.14 <= time.monotonic() - t0 < 30.0
        finally:
            t.close()


@TCP_KINDS
def test_many_clients_and_threads_share_one_simulator(stream: bool) -> None:
    sim = Echo()
    with SimServer.tcp(sim) as srv:
        transports = [open_transport(srv.resource, stream=stream, timeout_s=TIMEOUT_S)
                      for _ in range(4)]
        errors: list[BaseException] = []

        def hammer(k: int) -> None:
            t = transports[k % len(transports)]
            try:
                for j in range(50):
                    assert t.query(f"C{k}X{j}?") == f"C{k}X{j}"
            except BaseException as exc:  # surface failures from the threads
                errors.append(exc)

        threads = [threading.Thread(target=hammer, args=(k,)) for k in range(8)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        for t in transports:
            t.close()
        assert not any(th.is_alive() for th in threads)
        assert not errors
        assert len(sim.lines) == 400


@TCP_KINDS
def test_server_stops_with_clients_connected(stream: bool) -> None:
    srv = SimServer.tcp(Echo()).start()
    t = open_transport(srv.resource, stream=stream, timeout_s=TIMEOUT_S)
    assert t.query("A?") == "A" and open_connections(srv) == 1
    srv.stop()  # returns (a hang would hit the test's timeout) with the client cut off
    assert open_connections(srv) == 0
    t.reconnect_attempts = 1
    with pytest.raises(ConnectionFailed):
        t.query("B?")
    t.close()


@TCP_KINDS
def test_refused_connections_end_in_connection_failed(stream: bool) -> None:
    with SimServer.tcp(Echo()) as srv:
        t = open_transport(srv.resource, stream=stream, timeout_s=0.3, reconnect_attempts=2,
                           backoff_initial_s=0.01)
        try:
            assert t.query("A?") == "A"
            srv.refuse_connections()
            srv.drop_connections()
            with pytest.raises(ConnectionFailed):
                t.query("B?")
            srv.refuse_connections(False)
            t.reconnect()
            assert t.query("C?") == "C"
        finally:
            t.close()


def test_pty_drop_loses_the_command_then_recovers() -> None:
    with SimServer.pty(Echo()) as srv:
        t = open_transport(srv.path, timeout_s=0.15, retry_timeouts=False)
        probe = ServerProbe(srv)
        try:
            srv.drop_connections()  # a serial line cannot be cut: it goes deaf briefly
            # ... for 0.2 s of wall time, which a busy machine can let pass before the
            # server thread reads the command: deaf until it has been read (and dropped).
            srv._silent_until = math.inf
            with pytest.raises(InstrumentTimeout):
                t.query("LOST?")
            until(lambda: pty_unread_by_server(srv) == 0, "the server to read the lost command")
            srv._silent_until = 0.0
            assert t.query("BACK?") == "BACK"
            assert probe.received == ["BACK?"]  # LOST? never reached the simulator
        finally:
            t.close()


def test_stream_connection_follows_the_loop_that_queries_it() -> None:
    """A stream connection moves to the loop of its asynchronous queries; blocking calls
    from other threads then run on that loop, a blocking call on the loop itself is
    refused (it would deadlock), and once the loop is gone the connection comes back to
    the background loop."""
    sim = Echo()
    with SimServer.tcp(sim) as srv:
        t = open_transport(srv.resource, stream=True, timeout_s=TIMEOUT_S)
        assert isinstance(t, StreamTransport)
        try:
            assert t.query("A?") == "A"  # opened on the background loop

            async def on_a_loop() -> None:
                assert await t.aquery("B?") == "B"  # moved here
                with pytest.raises(RuntimeError, match="deadlock"):
                    t.query("NEVER?")
                assert await asyncio.to_thread(t.query, "C?") == "C"
                assert await t.aquery("D?") == "D"

            asyncio.run(on_a_loop())
            assert t.query("E?") == "E"  # that loop has closed: reconnected
            assert t.reconnects == 1
            assert sim.lines == ["A?", "B?", "C?", "D?", "E?"]
        finally:
            t.close()
