"""Test-side probes into a running simulator server, so tests wait for what the server
has done (a command taken, a reply prepared, bytes read, a connection gone) instead of
sleeping. They reach into SimServer's internals on purpose: the server keeps no
counters of its own for tests."""

from __future__ import annotations

import fcntl
import struct
import termios
import time
from collections.abc import Callable

from labdaq.sims.server import PtySimServer, SimServer, TcpSimServer


class ServerProbe:
    """Records every command line a server takes and every reply it prepares (after
    any injected delay; the server writes it right after), in order."""

    def __init__(self, server: SimServer) -> None:
        self.received: list[str] = []
        self.replies: list[bytes | None] = []
        process = server._process

        def spy(line: str) -> bytes | None:
            self.received.append(line)
            reply = process(line)
            self.replies.append(reply)
            return reply

        server._process = spy  # type: ignore[method-assign]


def open_connections(server: TcpSimServer) -> int:
    """Client connections the TCP server is serving now."""
    with server._conn_lock:
        return len(server._connections)


def _fionread(fd: int | None) -> int:
    assert fd is not None
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def pty_unread_by_server(server: PtySimServer) -> int:
    """Bytes a client wrote that the pty server has not read yet."""
    return _fionread(server._master)


def pty_unread_by_client(server: PtySimServer) -> int:
    """Bytes the pty server wrote that the client has not read yet."""
    return _fionread(server._slave)


def until(pred: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    """Poll ``pred`` until true; the timeout is generous, only a hang reaches it."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
