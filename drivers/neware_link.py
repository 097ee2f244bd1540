"""The TCP link to a Neware BTS 8.0 server: its message framing, timeouts and reconnects.

One job: carry one XML request and its reply over TCP. The framing is Empa's
aurora-neware client's (PyPI ``aurora-neware`` 0.2.3, ``aurora_neware/neware.py``,
``NewareAPI.command``, MIT): ``<?xml version="1.0" encoding="UTF-8" ?><bts version="1.0">``
... ``</bts>`` followed by ``\\n\\n#\\r\\n``, both ways. Unlike that client's socket, every
exchange has a timeout, a broken connection is reopened with backoff (labdaq's
:class:`~labdaq.drivers.transport.Transport`), and a request is repeated after a
reconnect only when it is idempotent.
"""

from __future__ import annotations

import socket

from .errors import ConnectionFailed, InstrumentTimeout
from .transport import Transport

TERMINATION = "\n\n#\r\n"
HEADER = '<?xml version="1.0" encoding="UTF-8" ?><bts version="1.0">'
FOOTER = "</bts>"


class BtsLink(Transport):
    """A TCP socket to the BTS server, framed by ``\\n\\n#\\r\\n`` (messages may hold
    newlines, so the shared line framing does not fit)."""

    def __init__(self, host: str, port: int, *, timeout_s: float = 5.0,
                 reconnect_attempts: int = 5, backoff_initial_s: float = 0.05,
                 backoff_max_s: float = 2.0) -> None:
        super().__init__(f"TCPIP::{host}::{port}::SOCKET", read_termination=TERMINATION,
                         write_termination=TERMINATION, timeout_s=timeout_s,
                         encoding="utf-8", reconnect_attempts=reconnect_attempts,
                         backoff_initial_s=backoff_initial_s, backoff_max_s=backoff_max_s,
                         retry_timeouts=False)
        self.host, self.port = host, port
        self._sock: socket.socket | None = None
        self._buf = b""

    def _open(self) -> None:
        self._sock = socket.create_connection((self.host, self.port), timeout=self.timeout_s)
        self._sock.settimeout(self.timeout_s)
        self._buf = b""

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _apply_timeout(self) -> None:
        if self._sock is not None:
            self._sock.settimeout(self.timeout_s)

    def _send(self, data: bytes) -> None:
        if self._sock is None:
            raise ConnectionFailed("not connected", instrument=self.resource)
        try:
            self._sock.sendall(data)
        except TimeoutError as exc:
            raise InstrumentTimeout("send timed out", instrument=self.resource) from exc
        except OSError as exc:
            raise ConnectionFailed(f"send failed: {exc}", instrument=self.resource) from exc

    def _receive(self) -> bytes:
        if self._sock is None:
            raise ConnectionFailed("not connected", instrument=self.resource)
        term = TERMINATION.encode()
        while (cut := self._buf.find(term)) < 0:
            try:
                chunk = self._sock.recv(65536)
            except TimeoutError as exc:
                raise InstrumentTimeout(f"no reply within {self.timeout_s:g} s",
                                        instrument=self.resource) from exc
            except OSError as exc:
                raise ConnectionFailed(f"read failed: {exc}", instrument=self.resource) from exc
            if not chunk:
                raise ConnectionFailed("connection closed by the BTS server",
                                       instrument=self.resource, expected="a reply")
            self._buf += chunk
        msg, self._buf = self._buf[: cut + len(term)], self._buf[cut + len(term):]
        return msg

    def _preflight(self) -> None:
        self._buf = b""  # anything unread belongs to an abandoned exchange

    def exchange(self, body: str, *, idempotent: bool) -> str:
        """Send ``HEADER + body + FOOTER`` and return the reply without its termination.

        A broken connection is reopened and the request repeated only when it is
        idempotent (getdevinfo, inquire, download ...): a ``start`` lost with the link
        may have run, so it is never sent twice.
        """
        command = HEADER + body + FOOTER
        with self._lock:
            try:
                return self._decode(self._query_once(command), command=body)
            except ConnectionFailed:
                self.reconnect()
                if not idempotent:
                    raise
                return self._decode(self._query_once(command), command=body)
