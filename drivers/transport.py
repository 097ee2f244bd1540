"""Transports: line-oriented write/read/query to an instrument over pyvisa or pyserial.

One job: move command strings to an instrument and reply strings back, with timeouts,
terminations, typed errors, reconnection after a dropped link, and an executor that keeps
blocking I/O off the asyncio loop while keeping commands to one instrument in order.

Resource strings are the lab's language (as in NI-MAX / pyvisa-shell):

- ``TCPIP::10.0.0.5::5025::SOCKET``, ``TCPIP::10.0.0.5::INSTR``, ``ASRL/dev/ttyUSB0::INSTR``,
  ``USB0::...::INSTR``, ``GPIB0::24::INSTR`` -> :class:`VisaTransport` (pyvisa-py);
- ``serial:///dev/ttyUSB0?baudrate=115200`` or a plain ``/dev/...`` path (``COM3`` on
  Windows) -> :class:`SerialTransport` (plain pyserial).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
import re
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlsplit

from .errors import ConnectionFailed, GarbledReply, InstrumentError, InstrumentTimeout

log = logging.getLogger(__name__)

T = TypeVar("T")

# Queries that change instrument state when read (read-and-clear): never blindly repeated.
_READ_AND_CLEAR = re.compile(r"(^|[:;])\s*(\*ESR\?|SYST(EM)?:ERR(OR)?)", re.IGNORECASE)


def is_idempotent(command: str) -> bool:
    """True when sending ``command`` twice has the same effect as once (pure queries)."""
    units = [u.strip() for u in command.split(";") if u.strip()]
    if not units:
        return False
    if any(not u.split(None, 1)[0].endswith("?") for u in units):
        return False
    return _READ_AND_CLEAR.search(command) is None


class Transport(ABC):
    """A line-oriented link to one instrument (thread-safe: one lock per transport).

    Subclasses implement ``_open``, ``_close``, ``_send`` and ``_receive``; this class adds
    encoding/termination, error mapping, resynchronisation after a timeout, reconnection
    with exponential backoff, and the retry policy of :meth:`query`.
    """

    def __init__(
        self,
        resource: str,
        *,
        read_termination: str = "\n",
        write_termination: str = "\n",
        timeout_s: float = 2.0,
        encoding: str = "ascii",
        reconnect_attempts: int = 5,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        retry_timeouts: bool = True,
    ) -> None:
        self._is_open = False
        self.resource = resource
        self.read_termination = read_termination
        self.write_termination = write_termination
        self.timeout_s = timeout_s
        self.encoding = encoding
        self.reconnect_attempts = reconnect_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.retry_timeouts = retry_timeouts
        self._lock = threading.RLock()
        self._stale = False  # a reply may still be in flight after a timeout
        self.reconnects = 0
        # When the next command went out (perf_counter), once mark_next_send() asked for it:
        # how a safety interlock times its output-off command apart from the error-queue
        # check that follows it.
        self._mark_next = False
        self.marked_send_s = math.nan
        # An asynchronous query (VisaTransport.aquery) timed out: the next query's first
        # timeout is its second, and is not retried.
        self._async_timed_out = False

    # -- to implement -------------------------------------------------------------------
    @abstractmethod
    def _open(self) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _send(self, data: bytes) -> None:
        """Send bytes; raise InstrumentTimeout / ConnectionFailed."""

    @abstractmethod
    def _receive(self) -> bytes:
        """Bytes up to and including the read termination; raise InstrumentTimeout /
        ConnectionFailed."""

    def _preflight(self) -> None:
        """Hook before each write: detect a closed peer or discard stale input."""
        return None

    def _apply_timeout(self) -> None:
        """Hook: push a changed ``timeout_s`` to an open link."""
        return None

    # -- public API -------------------------------------------------------------------
    @property
    def timeout_s(self) -> float:
        """I/O timeout in seconds; changing it applies to an open link at once."""
        return self._timeout_s

    @timeout_s.setter
    def timeout_s(self, value: float) -> None:
        if value <= 0:
            raise ValueError(f"timeout_s must be > 0, got {value!r}")
        self._timeout_s = float(value)
        if self._is_open:
            self._apply_timeout()

    @property
    def is_open(self) -> bool:
        return self._is_open

    def open(self) -> None:
        with self._lock:
            if self._is_open:
                return
            try:
                self._open()
            except InstrumentError:
                raise
            except Exception as exc:
                raise ConnectionFailed(str(exc) or type(exc).__name__,
                                       instrument=self.resource,
                                       expected="the instrument to accept a connection") from exc
            self._is_open = True
            self._stale = False

    def close(self) -> None:
        with self._lock:
            if not self._is_open:
                return
            self._is_open = False
            try:
                self._close()
            except Exception as exc:  # closing a dead link must not raise
                log.debug("%s: close failed: %r", self.resource, exc)

    def reconnect(self) -> None:
        """Close and reopen with exponential backoff; ConnectionFailed if it never works."""
        with self._lock:
            self.close()
            delay = self.backoff_initial_s
            last: Exception | None = None
            for attempt in range(1, max(1, self.reconnect_attempts) + 1):
                try:
                    self.open()
                    self.reconnects += 1
                    log.info("%s: reconnected (attempt %d)", self.resource, attempt)
                    return
                except ConnectionFailed as exc:
                    last = exc
                    if attempt < self.reconnect_attempts:
                        time.sleep(delay)
                        delay = min(delay * 2, self.backoff_max_s)
            raise ConnectionFailed(
                f"reconnect failed after {self.reconnect_attempts} attempts: {last}",
                instrument=self.resource,
                expected="the instrument to accept a connection",
            )

    def write(self, command: str) -> None:
        """Send one command line (termination appended); retried once after a reconnect
        when the link turns out to be broken (nothing was executed then)."""
        with self._lock:
            try:
                self._write_once(command)
            except ConnectionFailed:
                self.reconnect()
                self._write_once(command)

    def read(self) -> str:
        """Read one reply line without its termination."""
        with self._lock:
            if not self._is_open:
                self.open()
            try:
                raw = self._receive()
            except InstrumentTimeout:
                self._stale = True
                raise
            return self._decode(raw, command="")

    def query(self, command: str) -> str:
        """Write ``command`` and read its reply.

        Retries once after reconnecting when the connection broke; a timeout is retried
        once only for idempotent queries (never for read-and-clear ones like SYST:ERR?).
        """
        with self._lock:
            retried, self._async_timed_out = self._async_timed_out, False
            try:
                return self._query_once(command)
            except ConnectionFailed as exc:
                log.warning("%s: %s; reconnecting", self.resource, exc.detail)
                self.reconnect()
                return self._query_once(command)
            except InstrumentTimeout:
                if retried or not (self.retry_timeouts and is_idempotent(command)):
                    raise
                log.warning("%s: timeout on %r; reconnecting and retrying once",
                            self.resource, command)
                self.reconnect()
                return self._query_once(command)

    def __enter__(self) -> Transport:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resource!r})"

    # -- internals --------------------------------------------------------------------
    def _ensure_open(self) -> None:
        if not self._is_open:
            self.open()
        elif self._stale:
            # A late reply to a timed-out query could be taken as the answer to the next
            # one; a fresh connection (or reopened port) discards it.
            self.reconnect()

    def mark_next_send(self) -> None:
        """Record in ``marked_send_s`` the moment the next command has been sent."""
        self._mark_next = True
        self.marked_send_s = math.nan

    def _sent(self) -> None:
        """A command has just gone out: stamp it if mark_next_send() asked for it."""
        if self._mark_next:
            self.marked_send_s = time.perf_counter()
            self._mark_next = False

    def _write_once(self, command: str) -> None:
        self._ensure_open()
        self._preflight()
        try:
            self._send((command + self.write_termination).encode(self.encoding))
            self._sent()
        except InstrumentError as exc:
            exc.command = exc.command or command
            raise
        except UnicodeEncodeError as exc:
            raise InstrumentError(f"cannot encode command: {exc}", instrument=self.resource,
                                  command=command) from exc

    def _query_once(self, command: str) -> str:
        self._write_once(command)
        try:
            raw = self._receive()
        except InstrumentTimeout as exc:
            self._stale = True
            exc.command = command
            exc.args = (exc._message(),)
            raise
        except InstrumentError as exc:
            exc.command = command
            exc.args = (exc._message(),)
            raise
        return self._decode(raw, command=command)

    def _decode(self, raw: bytes, *, command: str) -> str:
        term = self.read_termination.encode(self.encoding)
        if term and raw.endswith(term):
            raw = raw[: -len(term)]
        elif term and raw.endswith(term[-1:]):
            raw = raw[:-1]
        try:
            text = raw.decode(self.encoding)
        except UnicodeDecodeError as exc:
            raise GarbledReply(f"undecodable bytes ({exc.reason})", reply=raw,
                               instrument=self.resource, command=command,
                               expected=f"{self.encoding} text") from exc
        return text.strip()


# ---------------------------------------------------------------------------------------
# pyvisa
# ---------------------------------------------------------------------------------------

_rm_lock = threading.Lock()
_resource_managers: dict[str, Any] = {}


def _resource_manager(backend: str) -> Any:
    """One pyvisa ResourceManager per backend per process (they are heavyweight)."""
    import pyvisa

    with _rm_lock:
        rm = _resource_managers.get(backend)
        if rm is None:
            rm = pyvisa.ResourceManager(backend)
            _resource_managers[backend] = rm
        return rm


class VisaTransport(Transport):
    """Any VISA resource pyvisa-py opens (TCPIP SOCKET/INSTR, ASRL, USB, GPIB).

    Terminations are always set: pyvisa sets none for SOCKET resources, and without one
    every query times out (pyvisa#98, pyvisa-py#301). Extra ``visa_kwargs`` (e.g.
    ``baud_rate=115200``) go to ``open_resource``.
    """

    def __init__(
        self,
        resource: str,
        read_termination: str = "\n",
        write_termination: str = "\n",
        timeout_s: float = 2.0,
        *,
        backend: str = "@py",
        encoding: str = "ascii",
        reconnect_attempts: int = 5,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        retry_timeouts: bool = True,
        **visa_kwargs: Any,
    ) -> None:
        super().__init__(
            resource,
            read_termination=read_termination,
            write_termination=write_termination,
            timeout_s=timeout_s,
            encoding=encoding,
            reconnect_attempts=reconnect_attempts,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            retry_timeouts=retry_timeouts,
        )
        self.backend = backend
        self.visa_kwargs = visa_kwargs
        self._inst: Any = None

    def _open(self) -> None:
        rm = _resource_manager(self.backend)
        kwargs = dict(self.visa_kwargs)
        kwargs.setdefault("open_timeout", int(self.timeout_s * 1000))
        inst = rm.open_resource(
            self.resource,
            read_termination=self.read_termination,
            write_termination=self.write_termination,
            timeout=int(round(self.timeout_s * 1000)),
            **kwargs,
        )
        inst.encoding = self.encoding
        self._inst = inst
        sock = self._socket()
        if sock is not None:
            # pyvisa-py reports success for a refused non-blocking connect; ask the socket.
            try:
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise ConnectionRefusedError(err, os.strerror(err))
                sock.getpeername()
                # A command is a few bytes followed at once by a query (e.g. SYST:ERR?):
                # with Nagle on, the second write waits for the peer's delayed ACK,
                # ~40 ms on Linux loopback, which would put that delay between a safety
                # breach and the output-off reaching the instrument.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError as exc:
                self._close()
                raise ConnectionFailed(f"connect failed: {exc}", instrument=self.resource,
                                       expected="the instrument to accept a connection"
                                       ) from exc

    def _apply_timeout(self) -> None:
        if self._inst is not None:
            self._inst.timeout = int(round(self.timeout_s * 1000))

    def _close(self) -> None:
        inst, self._inst = self._inst, None
        if inst is not None:
            inst.close()

    def _socket(self) -> socket.socket | None:
        """The raw socket of a pyvisa-py TCPIP SOCKET session (None otherwise)."""
        try:
            session = self._inst.visalib.sessions[self._inst.session]
            sock = getattr(session, "interface", None)
        except Exception:
            return None
        return sock if isinstance(sock, socket.socket) else None

    def _preflight(self) -> None:
        # pyvisa-py spins until timeout when the peer has closed a SOCKET session, so look
        # before sending: EOF -> reconnect now; leftover bytes -> a stale reply, drop it.
        sock = self._socket()
        if sock is None:
            return
        try:
            peek = sock.recv(4096, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ConnectionFailed(f"connection lost ({exc})", instrument=self.resource,
                                   expected="an open connection") from exc
        if peek == b"":
            raise ConnectionFailed("connection closed by the instrument",
                                   instrument=self.resource, expected="an open connection")
        log.warning("%s: discarding %d stale bytes", self.resource, len(peek))
        with contextlib.suppress(OSError):
            sock.recv(len(peek))

    def _send(self, data: bytes) -> None:
        from pyvisa.errors import VisaIOError

        try:
            self._inst.write_raw(data)
        except VisaIOError as exc:
            raise self._map_visa_error(exc, "write") from exc
        except OSError as exc:
            raise ConnectionFailed(f"write failed: {exc}", instrument=self.resource,
                                   expected="an open connection") from exc

    def _receive(self) -> bytes:
        from pyvisa.errors import VisaIOError

        term_last = self.read_termination.encode(self.encoding)[-1:]
        deadline = time.monotonic() + self.timeout_s
        data = b""
        # pyvisa-py may hand back a partial line when a reply arrives in pieces; keep
        # reading until the termination or the deadline.
        while True:
            try:
                data += bytes(self._inst.read_raw())
            except VisaIOError as exc:
                raise self._map_visa_error(exc, "read", partial=data) from exc
            except OSError as exc:
                raise ConnectionFailed(f"read failed: {exc}", instrument=self.resource,
                                       expected="a reply") from exc
            if data.endswith(term_last):
                return data
            if time.monotonic() >= deadline:
                raise InstrumentTimeout(
                    f"incomplete reply {data!r} after {self.timeout_s:g} s",
                    instrument=self.resource, expected="a terminated reply")
            self._check_eof()

    async def aquery(self, command: str) -> str | None:
        """:meth:`query` on the event loop's own thread, for a TCPIP SOCKET session and
        an idempotent query: no hand-off to the instrument's worker thread and back per
        reply (an engine reads every cabinet up to 100 times a second; the hand-offs
        cost more than the query).

        Returns None when it cannot be done that way — not a socket session, not open,
        bytes pending in pyvisa-py's buffer, the peer gone, the link busy in another
        thread — or when the exchange failed (timeout, connection closed, more
        than one line came back): the caller then asks through :meth:`query` in the
        worker thread, which resynchronises (the link is marked stale), reconnects and
        retries as usual — except after a timeout here, which counts as the first try,
        so a dead instrument is given up on after as many timeouts as before. Only for
        idempotent queries, since the command may then be sent twice. Errors of the reply
        itself (undecodable) are raised.
        """
        if not is_idempotent(command) or not self._lock.acquire(blocking=False):
            return None
        try:
            # Checked under the lock: a reconnect in another thread holds it.
            if not self._is_open or self._stale:
                return None
            sock = self._socket()
            if sock is None or self._visa_pending():
                return None
            term = self.read_termination.encode(self.encoding)
            data = (command + self.write_termination).encode(self.encoding)
            loop = asyncio.get_running_loop()
            buf = bytearray()
            try:
                # The same look before sending as the worker path: stale bytes dropped;
                # a closed peer -> None, and the worker path reconnects.
                self._preflight()
            except ConnectionFailed:
                return None
            try:
                sock.setblocking(False)
                async with asyncio.timeout(self.timeout_s):
                    await loop.sock_sendall(sock, data)
                    self._sent()
                    while term[-1:] not in buf:
                        chunk = await loop.sock_recv(sock, 65536)
                        if not chunk:
                            raise ConnectionResetError("closed by the instrument")
                        buf += chunk
            except TimeoutError:
                self._stale = True
                self._async_timed_out = True
                return None
            except OSError:
                self._stale = True
                return None
            except BaseException:  # cancelled mid-exchange: the reply may still come
                self._stale = True
                raise
            finally:
                with contextlib.suppress(OSError):
                    sock.setblocking(True)
            end = buf.index(term[-1:]) + 1
            if end != len(buf):
                # A second line: the link is out of step; resynchronise in the worker.
                self._stale = True
                return None
            return self._decode(bytes(buf), command=command)
        finally:
            self._lock.release()

    def _visa_pending(self) -> bool:
        """Bytes pyvisa-py has read from the socket but not handed out yet."""
        try:
            session = self._inst.visalib.sessions[self._inst.session]
        except Exception:
            return True  # cannot tell: take the worker path
        return bool(getattr(session, "_pending_buffer", b""))

    def _check_eof(self) -> None:
        sock = self._socket()
        if sock is None:
            return
        try:
            peek = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            raise ConnectionFailed(f"connection lost ({exc})", instrument=self.resource,
                                   expected="a reply") from exc
        if peek == b"":
            raise ConnectionFailed("connection closed by the instrument",
                                   instrument=self.resource, expected="a reply")

    def _map_visa_error(self, exc: Exception, op: str, partial: bytes = b"") -> InstrumentError:
        from pyvisa import constants

        code = getattr(exc, "error_code", None)
        if code == constants.StatusCode.error_timeout:
            # A closed socket also looks like a timeout to pyvisa-py; tell them apart.
            try:
                self._check_eof()
            except ConnectionFailed as lost:
                return lost
            return InstrumentTimeout(
                f"no reply within {self.timeout_s:g} s" + (f" (got {partial!r})" if partial
                                                            else ""),
                instrument=self.resource, expected="a reply" if op == "read" else "write")
        return ConnectionFailed(f"{op} failed: {exc}", instrument=self.resource,
                                expected="an open connection")


# ---------------------------------------------------------------------------------------
# pyserial
# ---------------------------------------------------------------------------------------


class SerialTransport(Transport):
    """A serial port through plain pyserial (``serial_for_url``: paths, ``COM3``,
    ``loop://``, ``rfc2217://`` ...)."""

    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        *,
        read_termination: str = "\n",
        write_termination: str = "\n",
        timeout_s: float = 2.0,
        encoding: str = "ascii",
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        xonxoff: bool = False,
        rtscts: bool = False,
        dsrdtr: bool = False,
        reconnect_attempts: int = 5,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        retry_timeouts: bool = True,
    ) -> None:
        super().__init__(
            port,
            read_termination=read_termination,
            write_termination=write_termination,
            timeout_s=timeout_s,
            encoding=encoding,
            reconnect_attempts=reconnect_attempts,
            backoff_initial_s=backoff_initial_s,
            backoff_max_s=backoff_max_s,
            retry_timeouts=retry_timeouts,
        )
        self.port = port
        self.serial_kwargs: dict[str, Any] = {
            "baudrate": int(baudrate), "bytesize": int(bytesize), "parity": parity,
            "stopbits": stopbits, "xonxoff": xonxoff, "rtscts": rtscts, "dsrdtr": dsrdtr,
        }
        self._ser: Any = None
        self._pending = b""

    def _open(self) -> None:
        import serial

        self._pending = b""
        # serial_for_url resets the input buffer on open, which discards stale replies.
        self._ser = serial.serial_for_url(
            self.port, timeout=self.timeout_s, write_timeout=self.timeout_s,
            **self.serial_kwargs
        )

    def _apply_timeout(self) -> None:
        if self._ser is not None:
            self._ser.timeout = self.timeout_s
            self._ser.write_timeout = self.timeout_s

    def _close(self) -> None:
        ser, self._ser = self._ser, None
        if ser is not None:
            ser.close()

    def _preflight(self) -> None:
        import serial

        try:
            waiting = self._ser.in_waiting
            if self._pending:
                log.warning("%s: discarding %d stale bytes", self.resource, len(self._pending))
                self._pending = b""
            if waiting:
                stale = self._ser.read(waiting)
                log.warning("%s: discarding %d stale bytes", self.resource, len(stale))
        except (serial.SerialException, OSError) as exc:
            raise ConnectionFailed(f"port failed: {exc}", instrument=self.resource,
                                   expected="an open port") from exc

    def _send(self, data: bytes) -> None:
        import serial

        try:
            # No flush(): on POSIX pyserial's write() has handed every byte to the driver
            # when it returns, and tcdrain() would wait for the line to transmit them
            # (measured ~0.7 ms per query on a pty) without making the reply come sooner.
            self._ser.write(data)
        except serial.SerialTimeoutException as exc:
            raise InstrumentTimeout(f"write not accepted within {self.timeout_s:g} s",
                                    instrument=self.resource, expected="write") from exc
        except (serial.SerialException, OSError) as exc:
            raise ConnectionFailed(f"write failed: {exc}", instrument=self.resource,
                                   expected="an open port") from exc

    def _read_line(self, term: bytes) -> bytes:
        """Read up to ``term`` in chunks of what is waiting.

        pyserial's ``read_until`` reads one byte per system call (two with its select),
        which cost ~0.4 ms for a 50-byte reply; reading what is waiting is 5-10x cheaper.
        Bytes after the terminator stay in ``_pending`` for the next read.
        """
        buf = self._pending
        deadline = time.monotonic() + self.timeout_s
        while term not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            # read(n) returns at once when n bytes are waiting; read(1) waits up to the
            # port timeout (not re-set here: changing it reconfigures the tty).
            chunk = self._ser.read(max(1, self._ser.in_waiting))
            if not chunk:
                break
            buf += chunk
        cut = buf.find(term)
        if cut < 0:
            self._pending = b""
            return buf
        self._pending = buf[cut + 1 :]
        return buf[: cut + 1]

    def _receive(self) -> bytes:
        import serial

        term_last = self.read_termination.encode(self.encoding)[-1:]
        try:
            data = self._read_line(term_last)
        except (serial.SerialException, OSError) as exc:
            raise ConnectionFailed(f"read failed: {exc}", instrument=self.resource,
                                   expected="a reply") from exc
        if not data.endswith(term_last):
            raise InstrumentTimeout(
                f"no reply within {self.timeout_s:g} s" + (f" (got {data!r})" if data else ""),
                instrument=self.resource, expected="a reply")
        return data


# ---------------------------------------------------------------------------------------
# Scripted transport for byte-exact protocol tests
# ---------------------------------------------------------------------------------------


class ScriptedTransport(Transport):
    """Replays ``[(sent, reply_or_None), ...]`` exactly, like PyMeasure's expected_protocol.

    Each write must equal the next ``sent`` (else AssertionError); its ``reply`` (if not
    None) becomes readable. ``(None, reply)`` provides a reply with no write before it.
    Call :meth:`assert_all_used` at the end of the test.
    """

    def __init__(self, script: Iterable[tuple[str | None, str | None]],
                 resource: str = "SCRIPTED::INSTR") -> None:
        super().__init__(resource, retry_timeouts=False)
        self.script: deque[tuple[str | None, str | None]] = deque(script)
        self.sent: list[str] = []
        self._replies: deque[str] = deque()
        self._is_open = True

    def _open(self) -> None:
        pass

    def _close(self) -> None:
        pass

    def write(self, command: str) -> None:
        self.sent.append(command)
        self._sent()
        if not self.script:
            raise AssertionError(f"unexpected write {command!r}: script exhausted")
        expected, reply = self.script.popleft()
        if expected != command:
            raise AssertionError(f"unexpected write {command!r}, script expected {expected!r}")
        if reply is not None:
            self._replies.append(reply)

    def read(self) -> str:
        if not self._replies and self.script and self.script[0][0] is None:
            _, reply = self.script.popleft()
            if reply is not None:
                self._replies.append(reply)
        if not self._replies:
            raise AssertionError("read with no scripted reply pending")
        return self._replies.popleft()

    def query(self, command: str) -> str:
        self.write(command)
        return self.read()

    def _send(self, data: bytes) -> None:  # pragma: no cover - write() is overridden
        raise NotImplementedError

    def _receive(self) -> bytes:  # pragma: no cover - read() is overridden
        raise NotImplementedError

    def assert_all_used(self) -> None:
        if self.script or self._replies:
            raise AssertionError(
                f"script not fully used: pending {list(self.script)!r}, "
                f"unread replies {list(self._replies)!r}"
            )


# ---------------------------------------------------------------------------------------
# Factory and worker
# ---------------------------------------------------------------------------------------

_SERIAL_PATH = re.compile(r"^(/dev/|COM\d+$)", re.IGNORECASE)


def open_transport(resource: str, *, connect: bool = True, **opts: Any) -> Transport:
    """Build (and open, unless ``connect=False``) the transport a resource string names.

    ``serial://<port>[?baudrate=..]`` or a plain ``/dev/...`` / ``COMn`` path -> pyserial;
    anything else -> pyvisa-py. Common options: ``read_termination``,
    ``write_termination``, ``timeout_s``, ``encoding``; ``baudrate``/``baud_rate`` work
    for both kinds.
    """
    transport: Transport
    if resource.startswith("serial://") or _SERIAL_PATH.match(resource):
        port = resource
        if resource.startswith("serial://"):
            parts = urlsplit(resource)
            port = parts.netloc + parts.path if parts.netloc else parts.path
            for key, value in parse_qsl(parts.query):
                opts.setdefault(key, value)
        if "baud_rate" in opts:
            opts.setdefault("baudrate", opts.pop("baud_rate"))
        for key in ("baudrate", "bytesize"):
            if key in opts:
                opts[key] = int(opts[key])
        if "timeout_s" in opts:
            opts["timeout_s"] = float(opts["timeout_s"])
        transport = SerialTransport(port, **opts)
    else:
        if "baudrate" in opts:
            opts.setdefault("baud_rate", int(opts.pop("baudrate")))
        transport = VisaTransport(resource, **opts)
    if connect:
        transport.open()
    return transport


class InstrumentWorker:
    """One worker thread per instrument: blocking I/O runs off the event loop, in order.

    ``await worker.call(transport.query, "*IDN?")``. Calls submitted from one coroutine
    or several are executed strictly one at a time in submission order.
    """

    def __init__(self, name: str = "instrument") -> None:
        self.name = name
        self._executor = ThreadPoolExecutor(max_workers=1,
                                            thread_name_prefix=f"labdaq-{name}")

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor,
                                          functools.partial(fn, *args, **kwargs))

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> Any:
        """Thread-side submission (returns a concurrent.futures.Future)."""
        return self._executor.submit(fn, *args, **kwargs)

    def shutdown(self, wait: bool = True) -> None:
        self._executor.shutdown(wait=wait, cancel_futures=not wait)

    async def __aenter__(self) -> InstrumentWorker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.shutdown(wait=True)
