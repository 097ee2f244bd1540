"""pyvisa-py links: every VISA resource (TCPIP SOCKET/INSTR, ASRL, USB, GPIB).

One job: :class:`VisaTransport` — the transport for any resource string a lab copies
from NI-MAX or ``pyvisa-shell``, with the workarounds pyvisa-py needs (terminations set
for SOCKET sessions, a refused connect detected, a closed peer told apart from a
timeout), plus an asynchronous query on the event loop's thread for SOCKET sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from typing import Any

from ..errors import ConnectionFailed, GarbledReply, InstrumentError, InstrumentTimeout
from .base import Transport, is_idempotent
from .blocks import FramingError, message_end

log = logging.getLogger(__name__)

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

        term = self.read_termination.encode(self.encoding)
        deadline = time.monotonic() + self.timeout_s
        data = b""
        # pyvisa-py may hand back a partial line when a reply arrives in pieces, and stops
        # at every termination byte inside a binary block; keep reading until the whole
        # message (message_end) or the deadline.
        while True:
            try:
                data += bytes(self._inst.read_raw())
            except VisaIOError as exc:
                raise self._map_visa_error(exc, "read", partial=data) from exc
            except OSError as exc:
                raise ConnectionFailed(f"read failed: {exc}", instrument=self.resource,
                                       expected="a reply") from exc
            try:
                end = message_end(data, term)
            except FramingError as exc:
                raise GarbledReply(str(exc), reply=data, instrument=self.resource,
                                   expected="a block as long as its header says") from exc
            if end == len(data):
                return data
            if end > 0:
                # A second message behind this one: the link is out of step.
                raise GarbledReply("more than one reply", reply=data,
                                   instrument=self.resource, expected="one reply")
            if time.monotonic() >= deadline:
                raise InstrumentTimeout(
                    f"incomplete reply {data!r} after {self.timeout_s:g} s",
                    instrument=self.resource, expected="a terminated reply")
            self._check_eof()

    async def aquery(self, command: str, *, repeatable: bool = False) -> str | None:
        """:meth:`query` on the event loop's own thread, for a TCPIP SOCKET session and
        an idempotent query: no hand-off to the instrument's worker thread and back per
        reply (an engine reads every cabinet up to 100 times a second; the hand-offs
        cost more than the query).

        Returns None when it cannot be done that way — not a socket session, not open,
        bytes pending in pyvisa-py's buffer, the peer gone, the link busy in another
        thread — or when the exchange failed (timeout, connection closed, more
        than one line came back, a block of the wrong length): the caller then asks
        through :meth:`query` in the worker thread, which resynchronises (the link is
        marked stale), reconnects and retries as usual — except after a timeout here,
        which counts as the first try, so a dead instrument is given up on after as many
        timeouts as before. Only for idempotent queries (or ``repeatable`` commands),
        since the command may then be sent twice. Errors of the reply itself
        (undecodable) are raised.
        """
        raw = await self.aquery_raw(command, repeatable=repeatable)
        return None if raw is None else self._decode(raw, command=command)

    async def aquery_raw(self, command: str, *, repeatable: bool = False) -> bytes | None:
        """:meth:`aquery` returning the reply's bytes without the termination (binary
        blocks); None in the same cases. ``repeatable``: as
        :meth:`StreamTransport.aquery_raw`."""
        if not (repeatable or is_idempotent(command)) \
                or not self._lock.acquire(blocking=False):
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
                    while (end := message_end(buf, term)) < 0:
                        chunk = await loop.sock_recv(sock, 65536)
                        if not chunk:
                            raise ConnectionResetError("closed by the instrument")
                        buf += chunk
            except TimeoutError:
                self._stale = True
                self._async_timed_out = True
                return None
            except (OSError, FramingError):
                self._stale = True
                return None
            except BaseException:  # cancelled mid-exchange: the reply may still come
                self._stale = True
                raise
            finally:
                with contextlib.suppress(OSError):
                    sock.setblocking(True)
            if end != len(buf):
                # A second line: the link is out of step; resynchronise in the worker.
                self._stale = True
                return None
            return self._strip_term(bytes(buf))
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
