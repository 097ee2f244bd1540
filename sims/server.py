"""Serve a simulator over a real transport: a TCP socket or a pseudo-terminal.

One job: move lines between clients and a simulator object (anything with
``handle_line(line) -> str | None`` and optionally ``on_idle()`` / ``on_watchdog()``), in
background threads, with a command watchdog and fault injection (dropped connections,
slow, missing and garbled replies), so drivers are exercised through pyvisa-py and
pyserial exactly as against hardware.

Usage::

    with SimServer.tcp(sim) as srv:      # or SimServer.pty(sim)
        transport = open_transport(srv.resource)
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import socketserver
import threading
import time
import tty
from typing import Any, Protocol, Self

log = logging.getLogger(__name__)


class Simulator(Protocol):
    def handle_line(self, line: str) -> str | None: ...


class SimServer:
    """Base class: line framing, shared simulator lock, watchdog and fault injection.

    ``read_termination`` frames incoming commands (its last character ends a line, the
    rest is stripped, so ``"\\r\\n"`` also accepts bare ``"\\n"``); ``write_termination``
    ends each reply. ``watchdog_s`` (wall seconds) calls ``sim.on_watchdog()`` once when
    no command has arrived for that long after the last one (outputs off when the
    controlling PC dies). ``idle_interval_s`` is how often ``sim.on_idle()`` runs.
    """

    def __init__(
        self,
        sim: Simulator,
        *,
        read_termination: str = "\n",
        write_termination: str = "\n",
        encoding: str = "latin-1",
        watchdog_s: float | None = None,
        idle_interval_s: float = 0.1,
        name: str | None = None,
    ) -> None:
        if not read_termination:
            raise ValueError("read_termination must not be empty")
        self.sim = sim
        self.read_termination = read_termination
        self.write_termination = write_termination
        self.encoding = encoding
        self.watchdog_s = watchdog_s
        self.idle_interval_s = idle_interval_s
        self.name = name or type(sim).__name__
        self.lock = threading.RLock()  # one simulator, many client threads
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._started = False
        self._last_command = time.monotonic()
        self._watchdog_armed = False
        self.watchdog_trips = 0
        # fault injection state (guarded by _fault_lock)
        self._fault_lock = threading.Lock()
        self.reply_delay_s = 0.0
        self._garble_next = 0
        self._swallow_next = 0

    # -- public API ------------------------------------------------------------------
    @classmethod
    def tcp(cls, sim: Simulator, *, host: str = "127.0.0.1", port: int = 0,
            **kwargs: Any) -> TcpSimServer:
        return TcpSimServer(sim, host=host, port=port, **kwargs)

    @classmethod
    def pty(cls, sim: Simulator, **kwargs: Any) -> PtySimServer:
        return PtySimServer(sim, **kwargs)

    @property
    def resource(self) -> str:
        raise NotImplementedError

    def start(self) -> Self:
        if self._started:
            return self
        self._started = True
        self._stop.clear()
        self._start_transport()
        self._spawn(self._housekeeping, "housekeeping")
        return self

    def stop(self) -> None:
        if not self._started:
            return
        self._stop.set()
        self._stop_transport()
        for t in self._threads:
            t.join(timeout=2.0)
        self._threads.clear()
        self._started = False

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- fault injection ---------------------------------------------------------------
    def set_reply_delay(self, seconds: float) -> None:
        """Delay every reply by ``seconds`` (0 restores normal behaviour)."""
        with self._fault_lock:
            self.reply_delay_s = max(0.0, float(seconds))

    def garble_next_reply(self, count: int = 1) -> None:
        """Corrupt the body of the next ``count`` replies (termination kept)."""
        with self._fault_lock:
            self._garble_next += count

    def swallow_next_reply(self, count: int = 1) -> None:
        """Execute but never answer the next ``count`` queries (client times out)."""
        with self._fault_lock:
            self._swallow_next += count

    def drop_connections(self) -> None:
        """Break every current client connection (a pulled cable / rebooted instrument)."""
        raise NotImplementedError

    # -- shared line processing ----------------------------------------------------------
    def _spawn(self, target: Any, what: str, *args: Any) -> threading.Thread:
        t = threading.Thread(target=target, args=args, name=f"sim-{self.name}-{what}",
                             daemon=True)
        self._threads.append(t)
        t.start()
        return t

    def _split_lines(self, buffer: bytearray) -> list[str]:
        """Pop complete lines from ``buffer`` (framing on the termination's last char)."""
        term = self.read_termination.encode(self.encoding)
        last = term[-1:]
        lines: list[str] = []
        while True:
            idx = buffer.find(last)
            if idx < 0:
                return lines
            raw = bytes(buffer[: idx + 1])
            del buffer[: idx + 1]
            if raw.endswith(term):
                raw = raw[: -len(term)]
            else:
                raw = raw[:-1]
            lines.append(raw.decode(self.encoding, errors="replace").strip("\r\n"))

    def _process(self, line: str) -> bytes | None:
        """Run one command line through the simulator and apply reply faults."""
        with self.lock:
            self._last_command = time.monotonic()
            self._watchdog_armed = self.watchdog_s is not None
            try:
                reply = self.sim.handle_line(line)
            except Exception:  # a simulator bug must not kill the server thread
                log.exception("%s: simulator failed on %r", self.name, line)
                reply = None
        if reply is None:
            return None
        with self._fault_lock:
            delay = self.reply_delay_s
            swallow = self._swallow_next > 0
            if swallow:
                self._swallow_next -= 1
            garble = not swallow and self._garble_next > 0
            if garble:
                self._garble_next -= 1
        if delay:
            # Sleep in slices so stop() is not held up by a long injected delay.
            self._stop.wait(delay)
        if swallow:
            return None
        body = reply.encode(self.encoding, errors="replace")
        if garble:
            body = _garble(body)
        return body + self.write_termination.encode(self.encoding)

    def _housekeeping(self) -> None:
        """Periodic ``on_idle`` and the command watchdog."""
        on_idle = getattr(self.sim, "on_idle", None)
        on_watchdog = getattr(self.sim, "on_watchdog", None)
        interval = self.idle_interval_s
        if self.watchdog_s is not None:
            interval = min(interval, max(0.005, self.watchdog_s / 4))
        while not self._stop.wait(interval):
            with self.lock:
                if on_idle is not None:
                    try:
                        on_idle()
                    except Exception:
                        log.exception("%s: on_idle failed", self.name)
                if (
                    self._watchdog_armed
                    and self.watchdog_s is not None
                    and time.monotonic() - self._last_command > self.watchdog_s
                ):
                    self._watchdog_armed = False  # trip once per silence
                    self.watchdog_trips += 1
                    log.warning("%s: no command for %.3g s, watchdog trips", self.name,
                                self.watchdog_s)
                    if on_watchdog is not None:
                        try:
                            on_watchdog()
                        except Exception:
                            log.exception("%s: on_watchdog failed", self.name)

    def _start_transport(self) -> None:
        raise NotImplementedError

    def _stop_transport(self) -> None:
        raise NotImplementedError


def _garble(body: bytes) -> bytes:
    """Corrupt a reply the way line noise would: high bits set, digits mangled."""
    if not body:
        return b"\xff\xfe#"
    return bytes((b ^ 0x80) if i % 2 == 0 else (b ^ 0x1F) for i, b in enumerate(body))


class _TcpHandler(socketserver.BaseRequestHandler):
    server: _ThreadingTcp

    def handle(self) -> None:
        owner = self.server.owner
        sock: socket.socket = self.request
        if owner._refuse:
            return
        with owner._conn_lock:
            owner._connections.add(sock)
        sock.settimeout(0.1)  # wake up regularly to notice stop()
        buffer = bytearray()
        try:
            while not owner._stop.is_set():
                try:
                    chunk = sock.recv(4096)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not chunk:
                    return
                buffer += chunk
                for line in owner._split_lines(buffer):
                    reply = owner._process(line)
                    if reply is not None:
                        try:
                            sock.sendall(reply)
                        except OSError:
                            return
        finally:
            with owner._conn_lock:
                owner._connections.discard(sock)


class _ThreadingTcp(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: TcpSimServer


class TcpSimServer(SimServer):
    """Raw-socket simulator (like an instrument's port 5025); many clients, reconnects."""

    def __init__(self, sim: Simulator, *, host: str = "127.0.0.1", port: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(sim, **kwargs)
        self.host = host
        self._requested_port = port
        self.port = port
        self._server: _ThreadingTcp | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()
        self._refuse = False

    @property
    def resource(self) -> str:
        return f"TCPIP::{self.host}::{self.port}::SOCKET"

    def _start_transport(self) -> None:
        server = _ThreadingTcp((self.host, self._requested_port), _TcpHandler)
        server.owner = self
        self.port = server.server_address[1]
        # Keep the same port across stop()/start() so a client can reconnect to it.
        self._requested_port = self.port
        self._server = server
        self._spawn(server.serve_forever, "accept", 0.05)

    def _stop_transport(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        self.drop_connections()

    def drop_connections(self) -> None:
        with self._conn_lock:
            conns = list(self._connections)
            self._connections.clear()
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                sock.close()

    def refuse_connections(self, refuse: bool = True) -> None:
        """Accept-then-close every new connection (a hung network stack)."""
        self._refuse = refuse


class PtySimServer(SimServer):
    """Serial-line simulator on a pseudo-terminal; clients open ``.path`` (``/dev/pts/N``).

    The slave fd stays open for the server's lifetime so clients can close and reopen the
    port (otherwise the master reads EIO once the last slave closes).
    """

    def __init__(self, sim: Simulator, **kwargs: Any) -> None:
        super().__init__(sim, **kwargs)
        self._master: int | None = None
        self._slave: int | None = None
        self.path = ""
        self._silent_until = 0.0

    @property
    def resource(self) -> str:
        return f"ASRL{self.path}::INSTR"

    def _start_transport(self) -> None:
        import pty

        master, slave = pty.openpty()
        tty.setraw(slave)  # no echo, no CR/LF translation, whoever opens the port
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.path = os.ttyname(slave)
        self._spawn(self._serve, "pty")

    def _stop_transport(self) -> None:
        pass  # the serving thread closes the fds when it sees _stop

    def drop_connections(self) -> None:
        """A serial line has no connection: go deaf for a moment and lose buffered bytes."""
        self._silent_until = time.monotonic() + 0.2

    def _write(self, data: bytes) -> None:
        assert self._master is not None
        deadline = time.monotonic() + 1.0
        view = memoryview(data)
        while view and time.monotonic() < deadline:
            try:
                n = os.write(self._master, view)
                view = view[n:]
            except BlockingIOError:
                # Nobody is reading the slave and its buffer is full: wait briefly, then
                # give up on this reply rather than block the simulator forever.
                time.sleep(0.005)
            except OSError:
                return

    def _serve(self) -> None:
        master = self._master
        assert master is not None
        buffer = bytearray()
        try:
            while not self._stop.is_set():
                ready, _, _ = select.select([master], [], [], 0.05)
                if not ready:
                    continue
                try:
                    chunk = os.read(master, 4096)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    if exc.errno == errno.EIO:
                        # No slave open (client closed): wait for the next client.
                        time.sleep(0.02)
                        continue
                    raise
                if not chunk:
                    time.sleep(0.02)
                    continue
                if time.monotonic() < self._silent_until:
                    buffer.clear()
                    continue
                buffer += chunk
                for line in self._split_lines(buffer):
                    reply = self._process(line)
                    if reply is not None:
                        self._write(reply)
        finally:
            for fd in (self._master, self._slave):
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)
            self._master = self._slave = None
