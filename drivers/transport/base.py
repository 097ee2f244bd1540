"""The transport interface: write/read/query (text lines or binary blocks) with timeouts
and reconnection.

One job: the behaviour every link to an instrument shares — encoding and termination,
typed errors, resynchronisation after a timeout (a late reply is never taken for the
next answer), reconnection with exponential backoff, the retry policy of a query, and
the marked send that times a safety interlock's output-off command. The links
themselves (pyvisa-py, pyserial, asyncio streams) implement four small primitives.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from abc import ABC, abstractmethod

from ..errors import ConnectionFailed, GarbledReply, InstrumentError, InstrumentTimeout

log = logging.getLogger(__name__)

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
        """One whole response message, termination included (framed by
        :func:`~labdaq.drivers.transport.blocks.message_end`: a text line or a binary
        block); raise InstrumentTimeout / ConnectionFailed / GarbledReply."""

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
            return self._decode(self._strip_term(raw), command="")

    def query(self, command: str) -> str:
        """Write ``command`` and read its reply.

        Retries once after reconnecting when the connection broke; a timeout is retried
        once only for idempotent queries (never for read-and-clear ones like SYST:ERR?).
        """
        return self._decode(self.query_raw(command), command=command)

    def query_raw(self, command: str) -> bytes:
        """:meth:`query`, returning the reply's bytes without the termination and
        undecoded: for binary block replies (``FORM:DATA REAL,32``), same retry policy."""
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

    def mark_out_of_step(self) -> None:
        """A reply could not be understood, so it may have been cut at a wrong place (a
        garbled block can hold termination bytes): reconnect before the next exchange so
        the rest of it is never read as the next reply."""
        self._stale = True

    def mark_next_send(self) -> None:
        """Record in ``marked_send_s`` the moment the next command has been sent."""
        self._mark_next = True
        self.marked_send_s = math.nan

    def _sent(self) -> None:
        """A command has just gone out: stamp it if mark_next_send() asked for it."""
        if self._mark_next:
            self.marked_send_s = time.perf_counter()
            self._mark_next = False

    def _prepare(self, command: str) -> bytes:
        """Open (or resynchronise) the link, look before sending, and encode ``command``."""
        self._ensure_open()
        self._preflight()
        try:
            return (command + self.write_termination).encode(self.encoding)
        except UnicodeEncodeError as exc:
            raise InstrumentError(f"cannot encode command: {exc}", instrument=self.resource,
                                  command=command) from exc

    def _write_once(self, command: str) -> None:
        data = self._prepare(command)
        try:
            self._send(data)
            self._sent()
        except InstrumentError as exc:
            exc.command = exc.command or command
            raise

    def _exchange(self, data: bytes) -> bytes:
        """Send one query and receive its whole reply. A link whose I/O runs on another
        thread (StreamTransport) does both in one hand-off."""
        self._send(data)
        self._sent()
        return self._receive()

    def _query_once(self, command: str) -> bytes:
        data = self._prepare(command)
        try:
            raw = self._exchange(data)
        except InstrumentTimeout as exc:
            self._stale = True
            exc.command = command
            exc.args = (exc._message(),)
            raise
        except InstrumentError as exc:
            if isinstance(exc, GarbledReply):
                self._stale = True  # a misframed reply leaves the link out of step
            exc.command = command
            exc.args = (exc._message(),)
            raise
        return self._strip_term(raw)

    def _strip_term(self, raw: bytes) -> bytes:
        term = self.read_termination.encode(self.encoding)
        if term and raw.endswith(term):
            return raw[: -len(term)]
        if term and raw.endswith(term[-1:]):
            return raw[:-1]
        return raw

    def _decode(self, raw: bytes, *, command: str) -> str:
        """Text of a reply whose termination is already removed."""
        try:
            text = raw.decode(self.encoding)
        except UnicodeDecodeError as exc:
            raise GarbledReply(f"undecodable bytes ({exc.reason})", reply=raw,
                               instrument=self.resource, command=command,
                               expected=f"{self.encoding} text") from exc
        return text.strip()
