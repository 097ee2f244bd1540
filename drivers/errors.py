"""Typed exceptions raised by labdaq transports and drivers.

One job: give the engine errors it can act on (retry, reconnect, pause the run) and a
message a technician can read: which instrument, which command, what was expected.
"""

from __future__ import annotations


class InstrumentError(Exception):
    """Base class. ``instrument`` is the resource string or name; ``command`` what was sent;
    ``expected`` what a correct answer/state would have been; ``detail`` what happened."""

    def __init__(
        self,
        detail: str = "",
        *,
        instrument: str = "",
        command: str = "",
        expected: str = "",
    ) -> None:
        self.instrument = instrument
        self.command = command
        self.expected = expected
        self.detail = detail
        super().__init__(self._message())

    def _message(self) -> str:
        parts = [f"instrument {self.instrument or '?'}"]
        if self.command:
            parts.append(f"command {self.command!r}")
        if self.expected:
            parts.append(f"expected {self.expected}")
        text = ", ".join(parts)
        return f"{text}: {self.detail}" if self.detail else text


class ConnectionFailed(InstrumentError):
    """The transport could not be opened or was lost and could not be re-established."""


class InstrumentTimeout(InstrumentError):
    """No (complete) reply within the transport timeout."""


class InstrumentValueError(InstrumentError, ValueError):
    """A value failed validation; raised before anything is sent, instrument unchanged."""


class InstrumentReportedError(InstrumentError):
    """The instrument reported an error (error queue / ESR) after a command."""

    def __init__(
        self,
        detail: str = "",
        *,
        code: int = 0,
        text: str = "",
        instrument: str = "",
        command: str = "",
        expected: str = "no error in the instrument's error queue",
        others: list[tuple[int, str]] | None = None,
    ) -> None:
        self.code = code
        self.text = text
        self.others = others or []  # further queued errors drained after the first
        super().__init__(
            detail or f'instrument reported {code},"{text}"',
            instrument=instrument,
            command=command,
            expected=expected,
        )


class GarbledReply(InstrumentError):
    """A reply arrived but could not be decoded or parsed."""

    def __init__(self, detail: str = "", *, reply: str | bytes = "", instrument: str = "",
                 command: str = "", expected: str = "") -> None:
        self.reply = reply
        super().__init__(detail or f"unparseable reply {reply!r}", instrument=instrument,
                         command=command, expected=expected)


class UnknownInstrument(InstrumentError):
    """No registered driver matches the instrument's identification."""
