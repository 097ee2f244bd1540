"""asyncio stream links for ``TCPIP::host::port::SOCKET`` resources: the engine's hot path.

One job: :class:`StreamTransport` — a raw-socket instrument link on
``asyncio.open_connection`` whose asynchronous query (:meth:`~StreamTransport.aquery`)
runs on the engine's own event loop with no thread hand-off, while the blocking methods
every driver uses (``write``, ``query`` from the instrument's worker thread) run the same
coroutines on that loop. Framing (terminations, binary blocks), timeouts, stale-reply
resynchronisation and reconnection with backoff are those of :class:`Transport` and the
pyvisa path, so a driver cannot tell the two apart.

Which loop a connection lives on: the loop of the last asynchronous query, while that
loop runs; otherwise (before the engine starts, after it stops, for a CLI) one
background I/O thread's loop shared by every stream transport of the process. Moving
from one to the other reconnects. A blocking call made on the thread of the loop that
holds the connection would deadlock, so it raises instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import re
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ..errors import ConnectionFailed, GarbledReply, InstrumentTimeout
from .base import Transport, is_idempotent
from .blocks import FramingError, message_end

log = logging.getLogger(__name__)

T = TypeVar("T")

_SOCKET_RESOURCE = re.compile(r"^TCPIP\d*::([^:]+|\[[^\]]+\])::(\d+)::SOCKET$", re.IGNORECASE)
# How much longer than the transport's own timeout a blocking call waits for the loop
# that runs its coroutine (a busy engine tick) before giving up on it.
_LOOP_GRACE_S = 5.0
_READ_CHUNK = 65536

_io_lock = threading.Lock()
_io_loop: asyncio.AbstractEventLoop | None = None


def is_socket_resource(resource: str) -> bool:
    """True for ``TCPIP[n]::host::port::SOCKET``."""
    return _SOCKET_RESOURCE.match(resource.strip()) is not None


def _background_loop() -> asyncio.AbstractEventLoop:
    """The process's shared I/O loop for stream transports used outside an engine."""
    global _io_loop
    with _io_lock:
        if _io_loop is None or _io_loop.is_closed():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="labdaq-stream-io",
                             daemon=True).start()
            _io_loop = loop
        return _io_loop


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class StreamTransport(Transport):
    """A ``TCPIP::host::port::SOCKET`` instrument over asyncio streams."""

    def __init__(
        self,
        resource: str,
        read_termination: str = "\n",
        write_termination: str = "\n",
        timeout_s: float = 2.0,
        *,
        encoding: str = "ascii",
        reconnect_attempts: int = 5,
        backoff_initial_s: float = 0.05,
        backoff_max_s: float = 2.0,
        retry_timeouts: bool = True,
    ) -> None:
        m = _SOCKET_RESOURCE.match(resource.strip())
        if m is None:
            raise ValueError(f"{resource!r} is not a TCPIP::<host>::<port>::SOCKET resource")
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
        self.host = m.group(1).strip("[]")
        self.port = int(m.group(2))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._buf = bytearray()  # bytes received and not yet handed out
        # Two coroutines of one loop thread would both pass the (reentrant) transport
        # lock: this plain lock keeps the asynchronous path to one exchange at a time.
        self._async_busy = threading.Lock()

    # -- coroutines (run on the connection's loop) --------------------------------------
    async def _aconnect(self) -> None:
        async with asyncio.timeout(self.timeout_s):
            reader, writer = await asyncio.open_connection(self.host, self.port,
                                                           limit=_READ_CHUNK)
        # asyncio sets TCP_NODELAY on TCP streams: a command and the SYST:ERR? behind it
        # do not wait for the peer's delayed ACK.
        self._loop = asyncio.get_running_loop()
        self._reader, self._writer = reader, writer
        self._buf.clear()

    async def _asend(self, data: bytes) -> None:
        writer = self._writer
        if writer is None:
            raise ConnectionFailed("not connected", instrument=self.resource,
                                   expected="an open connection")
        try:
            async with asyncio.timeout(self.timeout_s):
                writer.write(data)  # hands the bytes to the socket at once when it can
                self._sent()
                await writer.drain()
        except TimeoutError as exc:
            raise InstrumentTimeout(f"write not accepted within {self.timeout_s:g} s",
                                    instrument=self.resource, expected="write") from exc
        except (OSError, RuntimeError) as exc:
            raise ConnectionFailed(f"write failed: {exc}", instrument=self.resource,
                                   expected="an open connection") from exc

    async def _areceive(self) -> bytes:
        """One whole response message (termination included); bytes behind it stay in
        ``_buf``."""
        reader = self._reader
        if reader is None:
            raise ConnectionFailed("not connected", instrument=self.resource,
                                   expected="a reply")
        term = self.read_termination.encode(self.encoding)
        buf = self._buf
        try:
            async with asyncio.timeout(self.timeout_s):
                while (end := message_end(buf, term)) < 0:
                    chunk = await reader.read(_READ_CHUNK)
                    if not chunk:
                        raise ConnectionFailed("connection closed by the instrument",
                                               instrument=self.resource, expected="a reply")
                    buf += chunk
        except TimeoutError as exc:
            raise InstrumentTimeout(
                f"no reply within {self.timeout_s:g} s"
                + (f" (got {bytes(buf)!r})" if buf else ""),
                instrument=self.resource, expected="a reply") from exc
        except FramingError as exc:
            buf.clear()  # the rest of a misframed block is stale: drop it
            raise GarbledReply(str(exc), instrument=self.resource,
                               expected="a block as long as its header says") from exc
        except OSError as exc:
            raise ConnectionFailed(f"read failed: {exc}", instrument=self.resource,
                                   expected="a reply") from exc
        message = bytes(buf[:end])
        del buf[:end]
        return message

    def _drop_connection(self) -> None:
        """Forget the connection, closing it on its own loop where that loop still runs."""
        writer, loop = self._writer, self._loop
        self._reader = self._writer = None
        self._buf.clear()
        if writer is None:
            return
        if loop is not None and loop.is_running() and loop is not _running_loop():
            loop.call_soon_threadsafe(writer.close)
        else:
            # The loop's own thread, or a loop that has stopped (closing may then fail;
            # the socket is released with the transport object).
            with contextlib.suppress(Exception):
                writer.close()

    # -- running coroutines from blocking callers ----------------------------------------
    def _home_loop(self) -> asyncio.AbstractEventLoop:
        loop = self._loop
        if loop is not None and loop.is_running():
            return loop
        return _background_loop()

    def _run(self, make: Callable[[], Awaitable[T]]) -> T:
        loop = self._home_loop()
        if loop is _running_loop():
            raise RuntimeError(f"{self.resource}: a blocking call on the event loop that "
                               "holds the connection would deadlock; await aquery() or "
                               "call from the instrument's worker thread")

        async def run() -> T:
            return await make()

        future = asyncio.run_coroutine_threadsafe(run(), loop)
        try:
            return future.result(self.timeout_s + _LOOP_GRACE_S)
        except concurrent.futures.TimeoutError as exc:
            future.cancel()
            raise InstrumentTimeout(f"the I/O loop did not run the exchange within "
                                    f"{self.timeout_s + _LOOP_GRACE_S:g} s",
                                    instrument=self.resource, expected="a reply") from exc
        except concurrent.futures.CancelledError as exc:
            raise ConnectionFailed("the event loop holding the connection stopped",
                                   instrument=self.resource,
                                   expected="an open connection") from exc

    # -- Transport primitives (blocking callers) ------------------------------------------
    def _open(self) -> None:
        try:
            self._run(self._aconnect)
        except TimeoutError as exc:
            raise ConnectionFailed(f"connect timed out after {self.timeout_s:g} s",
                                   instrument=self.resource,
                                   expected="the instrument to accept a connection") from exc

    def _close(self) -> None:
        self._drop_connection()

    def _preflight(self) -> None:
        loop = self._loop
        if loop is None or not loop.is_running() or self._reader is None:
            # The loop the connection lived on has stopped (an engine ended): reconnect on
            # the background loop.
            raise ConnectionFailed("the event loop holding the connection stopped",
                                   instrument=self.resource, expected="an open connection")
        if self._reader.at_eof():
            raise ConnectionFailed("connection closed by the instrument",
                                   instrument=self.resource, expected="an open connection")
        if self._buf:
            log.warning("%s: discarding %d stale bytes", self.resource, len(self._buf))
            self._buf.clear()

    def _send(self, data: bytes) -> None:
        self._run(lambda: self._asend(data))

    def _receive(self) -> bytes:
        return self._run(self._areceive)

    def _exchange(self, data: bytes) -> bytes:
        async def exchange() -> bytes:
            await self._asend(data)
            return await self._areceive()

        # One hand-off to the connection's loop and back for the whole query, not one
        # for the send and one for the reply.
        return self._run(exchange)

    # -- the hot path -----------------------------------------------------------------------
    async def aquery(self, command: str, *, repeatable: bool = False) -> str | None:
        """:meth:`query` on the running loop with no thread hand-off (the engine's
        per-tick read). Returns None, exactly as :meth:`VisaTransport.aquery`, when it
        cannot be done that way (not an idempotent query, busy in another thread or
        coroutine, not open, out of step) or when the exchange failed (timeout, connection
        lost, misframed reply): the caller then asks through :meth:`query` in the worker
        thread, which reconnects and retries; a timeout here counts as that query's
        first try. Undecodable text is raised."""
        raw = await self.aquery_raw(command, repeatable=repeatable)
        return None if raw is None else self._decode(raw, command=command)

    async def aquery_raw(self, command: str, *, repeatable: bool = False) -> bytes | None:
        """:meth:`aquery` returning the reply's bytes without the termination.
        ``repeatable``: the caller vouches that sending ``command`` again (through the
        worker thread, after None) does no harm although it is not a pure query, such as
        an output switched off followed by the error query."""
        if not (repeatable or is_idempotent(command)) \
                or not self._async_busy.acquire(blocking=False):
            return None
        try:
            if not self._lock.acquire(blocking=False):
                return None
            try:
                return await self._aquery_locked(command)
            finally:
                self._lock.release()
        finally:
            self._async_busy.release()

    async def _aquery_locked(self, command: str) -> bytes | None:
        if not self._is_open or self._stale:
            return None
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # First query from this loop: move the connection here once (the blocking
            # path then runs its coroutines on this loop too).
            self._drop_connection()
            try:
                await self._aconnect()
            except (OSError, TimeoutError):
                self._stale = True
                return None
        reader = self._reader
        if reader is None or reader.at_eof() or self._buf:
            self._stale = True  # closed or out of step: the worker path resynchronises
            return None
        writer = self._writer
        assert writer is not None
        data = (command + self.write_termination).encode(self.encoding)
        term = self.read_termination.encode(self.encoding)
        buf = self._buf
        try:
            # One timeout for the whole exchange, and no drain() while the socket took
            # every byte at once: this runs for every cabinet up to 100 times a second.
            async with asyncio.timeout(self.timeout_s):
                writer.write(data)
                self._sent()
                if writer.transport.get_write_buffer_size():
                    await writer.drain()
                while (end := message_end(buf, term)) < 0:
                    chunk = await reader.read(_READ_CHUNK)
                    if not chunk:
                        raise ConnectionResetError("closed by the instrument")
                    buf += chunk
        except TimeoutError:
            self._stale = True
            self._async_timed_out = True
            return None
        except (OSError, RuntimeError, FramingError):
            self._stale = True
            return None
        except BaseException:  # cancelled mid-exchange: the reply may still come
            self._stale = True
            raise
        if end != len(buf):
            self._stale = True  # a second message behind the reply: out of step
            return None
        message = bytes(buf)
        buf.clear()
        return self._strip_term(message)
