"""A scripted transport for byte-exact protocol tests (like PyMeasure's expected_protocol).

One job: replay ``(sent, reply)`` pairs and fail on any write the script did not expect,
so a driver's exact command sequence is tested without an instrument.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

from .base import Transport


class ScriptedTransport(Transport):
    """Replays ``[(sent, reply_or_None), ...]`` exactly, like PyMeasure's expected_protocol.

    Each write must equal the next ``sent`` (else AssertionError); its ``reply`` (if not
    None) becomes readable: text, or bytes for a binary reply (read back through
    :meth:`query_raw`; text replies are latin-1 both ways). ``(None, reply)``
    provides a reply with no write before it. Call :meth:`assert_all_used` at the end of the test.
    """

    def __init__(self, script: Iterable[tuple[str | None, str | bytes | None]],
                 resource: str = "SCRIPTED::INSTR") -> None:
        super().__init__(resource, retry_timeouts=False)
        self.script: deque[tuple[str | None, str | bytes | None]] = deque(script)
        self.sent: list[str] = []
        self._replies: deque[str | bytes] = deque()
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

    def _next_reply(self) -> str | bytes:
        if not self._replies and self.script and self.script[0][0] is None:
            _, reply = self.script.popleft()
            if reply is not None:
                self._replies.append(reply)
        if not self._replies:
            raise AssertionError("read with no scripted reply pending")
        return self._replies.popleft()

    def read(self) -> str:
        reply = self._next_reply()
        return reply.decode("latin-1") if isinstance(reply, bytes) else reply

    def query(self, command: str) -> str:
        self.write(command)
        return self.read()

    def query_raw(self, command: str) -> bytes:
        self.write(command)
        reply = self._next_reply()
        return reply if isinstance(reply, bytes) else reply.encode("latin-1")

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
