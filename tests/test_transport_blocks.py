"""IEEE 488.2 definite-length blocks, byte by byte: the framing function, and every
SOCKET link (pyvisa-py, asyncio streams) against a peer that sends exactly the bytes a
test scripts — partial blocks, a block split across reads, wrong lengths, a timeout in
the middle of a block, a connection dropped mid-block."""

from __future__ import annotations

import asyncio
import queue
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from labdaq.drivers.errors import ConnectionFailed, GarbledReply, InstrumentTimeout
from labdaq.drivers.transport import (
    FramingError,
    ScriptedTransport,
    Transport,
    block_payload,
    format_block,
    message_end,
    open_transport,
)

TIMEOUT_S = 5.0  # generous: only the tests about timeouts use a short one
SHORT_TIMEOUT_S = 0.3

# A payload holding the bytes a line reader would stop at or misread.
PAYLOAD = bytes([0x0A, 0x23, 0x31, 0x0D, 0x0A, 0x00, 0xFF]) + bytes(range(256))
BLOCK = format_block(PAYLOAD)


# -- framing, no I/O ----------------------------------------------------------------------


def test_format_block_header_counts_digits_and_bytes() -> None:
    assert format_block(b"abc") == b"#13abc"
    assert format_block(b"x" * 1280)[:6] == b"#41280"
    assert bytes(block_payload(format_block(b"x" * 1280))) == b"x" * 1280


@pytest.mark.parametrize("term", [b"\n", b"\r\n"], ids=["lf", "crlf"])
def test_message_end_at_every_split_point(term: bytes) -> None:
    """Fed one byte more at a time, a block is incomplete until its last termination
    byte arrives — whatever bytes the payload holds."""
    message = BLOCK + term
    for cut in range(len(message)):
        assert message_end(message[:cut], term) == -1, cut
    assert message_end(message, term) == len(message)
    # Bytes behind the message (the next reply) are not part of it.
    assert message_end(message + b"+1\n", term) == len(message)


def test_message_end_text_lines_and_indefinite_blocks() -> None:
    assert message_end(b"+1.0,+2.0", b"\n") == -1
    assert message_end(b"+1.0,+2.0\n", b"\n") == 10
    assert message_end(b"+1\r\n", b"\r\n") == 4
    assert message_end(b"#0abc\n", b"\n") == 6  # #0 ends at the termination
    assert message_end(b"#", b"\n") == -1
    assert message_end(b"#3", b"\n") == -1  # header digits not here yet
    assert message_end(b"#3\n", b"\n") == -1  # a length digit that is a newline...
    with pytest.raises(FramingError):
        message_end(b"#3\n12abc\n", b"\n")  # ...is no digit once the header is whole
    # A bare LF after a block is accepted where CRLF is expected (as for lines).
    assert message_end(b"#13abc\n", b"\r\n") == 7


def test_message_end_rejects_a_block_longer_than_its_header() -> None:
    with pytest.raises(FramingError, match="header's length is wrong"):
        message_end(b"#14abcdef\n", b"\n")


def test_block_payload_checks_the_length() -> None:
    assert bytes(block_payload(b"#14abcd")) == b"abcd"
    for bad in (b"#14abc", b"#14abcde", b"+1.0", b"#"):
        with pytest.raises(FramingError):
            block_payload(bad)


def test_scripted_transport_replays_binary_replies() -> None:
    t = ScriptedTransport([("DATA?", BLOCK)])
    assert t.query_raw("DATA?") == BLOCK
    t.assert_all_used()


# -- a TCP peer that sends exactly what the test scripts -------------------------------------

Gate = threading.Event
CLOSE = "close"
Action = bytes | Gate | str


class BytePeer:
    """Answers each received command line with the next scripted plan: bytes to send,
    gates to wait for (set by the test), or CLOSE. ``sent`` is set after each chunk
    goes out, so a test knows the peer has got that far."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)  # accept wakes up to notice close()
        self.port = self._listener.getsockname()[1]
        self.plans: queue.Queue[list[Action]] = queue.Queue()
        self.lines: list[bytes] = []
        self.connections = 0
        self.sent = threading.Semaphore(0)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    @property
    def resource(self) -> str:
        return f"TCPIP::127.0.0.1::{self.port}::SOCKET"

    def plan(self, *actions: Action) -> None:
        self.plans.put(list(actions))

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, conn: socket.socket) -> None:
        buf = b""
        conn.settimeout(0.1)
        with conn:
            while not self._stop.is_set():
                try:
                    chunk = conn.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buf += chunk
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    self.lines.append(line)
                    for action in self.plans.get(timeout=TIMEOUT_S):
                        if isinstance(action, bytes):
                            try:
                                conn.sendall(action)
                            except OSError:
                                return
                            self.sent.release()
                        elif isinstance(action, Gate):
                            if not action.wait(TIMEOUT_S):
                                return
                        else:  # CLOSE
                            conn.shutdown(socket.SHUT_RDWR)
                            return

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        for t in self._threads:
            t.join(timeout=2)


@pytest.fixture
def peer() -> Iterator[BytePeer]:
    p = BytePeer()
    yield p
    p.close()


KINDS = pytest.mark.parametrize("stream", [False, True], ids=["pyvisa", "stream"])


def connect(peer: BytePeer, stream: bool, **opts: object) -> Transport:
    opts.setdefault("timeout_s", TIMEOUT_S)
    return open_transport(peer.resource, stream=stream, **opts)  # type: ignore[arg-type]


@KINDS
def test_block_with_termination_bytes_inside(peer: BytePeer, stream: bool) -> None:
    t = connect(peer, stream)
    try:
        peer.plan(BLOCK + b"\n")
        assert t.query_raw("DATA?") == BLOCK
        peer.plan(b"+1.5\n")  # text replies still frame at the termination
        assert t.query("NEXT?") == "+1.5"
    finally:
        t.close()


@KINDS
def test_block_split_across_reads(peer: BytePeer, stream: bool) -> None:
    """Header, part of the payload, the rest and the termination in separate sends:
    the query waits for the whole block."""
    gates = [Gate(), Gate()]
    peer.plan(BLOCK[:1], gates[0], BLOCK[1:40], gates[1], BLOCK[40:] + b"\n")
    t = connect(peer, stream)
    try:
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(t.query_raw, "DATA?")
            for gate in gates:
                assert peer.sent.acquire(timeout=TIMEOUT_S)
                assert not reply.done()  # still waiting for the rest
                gate.set()
            assert reply.result(TIMEOUT_S) == BLOCK
    finally:
        t.close()


@KINDS
def test_block_shorter_than_its_header_times_out_then_recovers(peer: BytePeer,
                                                               stream: bool) -> None:
    """The header promises more than comes (the termination is taken for payload):
    a timeout, and the next query gets its own reply on a fresh connection."""
    peer.plan(b"#210" + b"abcdef" + b"\n")
    t = connect(peer, stream, timeout_s=SHORT_TIMEOUT_S, retry_timeouts=False)
    try:
        with pytest.raises(InstrumentTimeout) as exc:
            t.query_raw("DATA?")
        assert exc.value.command == "DATA?"
        peer.plan(b"+2\n")
        assert t.query("NEXT?") == "+2"
        assert peer.connections == 2  # the out-of-step link was replaced
    finally:
        t.close()


@KINDS
def test_block_longer_than_its_header_is_garbled(peer: BytePeer, stream: bool) -> None:
    peer.plan(b"#14abcdef\n")
    t = connect(peer, stream)
    try:
        with pytest.raises(GarbledReply, match="header's length is wrong"):
            t.query_raw("DATA?")
        peer.plan(BLOCK + b"\n")
        assert t.query_raw("DATA?") == BLOCK  # resynchronised
        assert peer.connections == 2
    finally:
        t.close()


@KINDS
def test_timeout_mid_block_never_leaks_into_the_next_reply(peer: BytePeer,
                                                          stream: bool) -> None:
    """Half a block, then silence past the timeout; the rest arrives late on the old
    connection and is never taken for the next answer."""
    late = Gate()
    peer.plan(BLOCK[:100], late, BLOCK[100:] + b"\n")
    t = connect(peer, stream, timeout_s=SHORT_TIMEOUT_S, retry_timeouts=False)
    try:
        with pytest.raises(InstrumentTimeout):
            t.query_raw("DATA?")
        late.set()  # the rest of the old block goes out now
        assert peer.sent.acquire(timeout=TIMEOUT_S) and peer.sent.acquire(timeout=TIMEOUT_S)
        peer.plan(b"+3\n")
        assert t.query("NEXT?") == "+3"
    finally:
        t.close()


@KINDS
def test_connection_dropped_mid_block_reconnects_and_retries(peer: BytePeer,
                                                            stream: bool) -> None:
    """The instrument goes away half way through a block: an idempotent query is sent
    again on a new connection and its whole block is returned."""
    peer.plan(BLOCK[:50], CLOSE)
    peer.plan(BLOCK + b"\n")
    t = connect(peer, stream, backoff_initial_s=0.01)
    try:
        assert t.query_raw("DATA?") == BLOCK
        assert t.reconnects == 1
        assert peer.lines == [b"DATA?", b"DATA?"]
    finally:
        t.close()


@KINDS
def test_connection_dropped_mid_block_for_good(peer: BytePeer, stream: bool) -> None:
    peer.plan(BLOCK[:50], CLOSE)
    t = connect(peer, stream, reconnect_attempts=2, backoff_initial_s=0.01)
    try:
        peer.close()  # no instrument to come back to
        with pytest.raises(ConnectionFailed):
            t.query_raw("DATA?")
    finally:
        t.close()


# -- the asynchronous hot path ------------------------------------------------------------


@KINDS
async def test_aquery_raw_reads_split_blocks_on_the_loop(peer: BytePeer, stream: bool) -> None:
    t = connect(peer, stream)
    try:
        gate = Gate()
        peer.plan(BLOCK[:3], gate, BLOCK[3:] + b"\n")
        pending = asyncio.ensure_future(t.aquery_raw("DATA?"))  # type: ignore[attr-defined]
        await asyncio.to_thread(peer.sent.acquire, True, TIMEOUT_S)
        assert not pending.done()
        gate.set()
        assert await pending == BLOCK
        for _ in range(3):  # and again, in step
            peer.plan(BLOCK + b"\n")
            assert await t.aquery_raw("DATA?") == BLOCK  # type: ignore[attr-defined]
    finally:
        t.close()


@KINDS
async def test_aquery_raw_gives_way_after_a_bad_block(peer: BytePeer, stream: bool) -> None:
    """A misframed block or a timeout mid-block on the hot path: None, the link is
    marked out of step, and the worker path (blocking query) reconnects and answers."""
    t = connect(peer, stream, timeout_s=SHORT_TIMEOUT_S)
    try:
        peer.plan(b"#14abcdef\n")
        assert await t.aquery_raw("DATA?") is None  # type: ignore[attr-defined]
        peer.plan(BLOCK + b"\n")
        assert await asyncio.to_thread(t.query_raw, "DATA?") == BLOCK
        silent = Gate()
        peer.plan(BLOCK[:20], silent)
        assert await t.aquery_raw("DATA?") is None  # type: ignore[attr-defined]
        silent.set()
        peer.plan(BLOCK + b"\n")
        assert await asyncio.to_thread(t.query_raw, "DATA?") == BLOCK
        assert t.reconnects == 2
    finally:
        t.close()


def test_big_endian_float32_block_parses_with_frombuffer() -> None:
    """What the cabinet driver does with a REAL,32 payload (FORM:BORD NORM)."""
    values = np.array([3.5, -2.25, 25.0, 1.0, 3.0], dtype=">f4")
    block = format_block(values.tobytes())
    parsed = np.frombuffer(block_payload(block), dtype=">f4").astype(float)
    assert parsed.tolist() == [3.5, -2.25, 25.0, 1.0, 3.0]


@KINDS
def test_unparseable_reading_resynchronises_the_link(peer: BytePeer, stream: bool) -> None:
    """A garbled reply may hold a termination byte in its middle: the driver's parse
    fails on the first piece, and the rest must never be read as the next reply."""
    from labdaq.drivers.cabinet import CyclerCabinet

    table = np.array([[3.7, 1.0, 25.0, 1, 3], [3.6, 0.0, 25.0, 0, 0]], dtype=">f4")
    peer.plan(b"\xa3\x0a\x99\xfe\n")  # line noise with an LF inside
    peer.plan(format_block(table.tobytes()) + b"\n")
    cab = CyclerCabinet(connect(peer, stream), "cab", channels=2, current_max_a=10.0,
                        voltage_max_v=5.0, data_format="ascii")
    try:
        with pytest.raises(GarbledReply):
            cab.measure()
        np.testing.assert_array_equal(cab.measure(), table[:, :3].astype(float))
        assert peer.connections == 2
    finally:
        cab.close()


class BlockSim:
    """A simulator whose ``DATA?`` answers the block (latin-1: one character a byte)."""

    def handle_line(self, line: str) -> str | None:
        return BLOCK.decode("latin-1") if line == "DATA?" else line[:-1] or None


@pytest.mark.parametrize("kind", ["pyvisa-tcp", "stream-tcp", "pyvisa-asrl", "pyserial"])
def test_block_through_every_link_to_a_simulator(kind: str) -> None:
    """The simulator servers send a block byte for byte; every client stack frames it."""
    from labdaq.sims.server import SimServer

    server = SimServer.pty(BlockSim()) if kind in ("pyvisa-asrl", "pyserial") else (
        SimServer.tcp(BlockSim()))
    with server as srv:
        resource = srv.path if kind == "pyserial" else srv.resource  # type: ignore[attr-defined]
        t = open_transport(resource, timeout_s=TIMEOUT_S, stream=kind == "stream-tcp")
        try:
            for _ in range(3):
                assert t.query_raw("DATA?") == BLOCK
                assert t.query("OK?") == "OK"
        finally:
            t.close()


class WrongBlockSim:
    """``SHORT?`` answers a block whose header promises more bytes than follow (the
    server's LF is taken for payload), ``LONG?`` one with more bytes than its header
    says; anything else ending in ``?`` is echoed."""

    def handle_line(self, line: str) -> str | None:
        if line == "SHORT?":
            return "#210abcdef"
        if line == "LONG?":
            return "#13abcdef"
        return line[:-1] if line.endswith("?") else None


@pytest.mark.parametrize("kind", ["pyvisa-tcp", "stream-tcp", "pyvisa-asrl", "pyserial"])
def test_wrong_block_lengths_through_every_link(kind: str) -> None:
    """Short: a timeout mid-block; long: a garbled reply; either way the next query gets
    its own answer — on serial lines too, where 'reconnect' means reopening the port."""
    from labdaq.sims.server import SimServer

    pty = kind in ("pyvisa-asrl", "pyserial")
    server = SimServer.pty(WrongBlockSim()) if pty else SimServer.tcp(WrongBlockSim())
    with server as srv:
        resource = srv.path if kind == "pyserial" else srv.resource  # type: ignore[attr-defined]
        t = open_transport(resource, timeout_s=SHORT_TIMEOUT_S, retry_timeouts=False,
                           stream=kind == "stream-tcp")
        try:
            with pytest.raises(InstrumentTimeout):
                t.query_raw("SHORT?")
            assert t.query("A?") == "A"
            with pytest.raises(GarbledReply):
                t.query_raw("LONG?")
            assert t.query("B?") == "B"
            assert t.query("C?") == "C"
        finally:
            t.close()
