"""Transports: write/read/query to an instrument over pyvisa, pyserial or asyncio streams.

One job: move command strings to an instrument and replies (text lines or IEEE 488.2
binary blocks) back, with timeouts, terminations, typed errors, reconnection after a
dropped link, and an executor that keeps blocking I/O off the asyncio loop while keeping
commands to one instrument in order. One module per job:

- :mod:`.base` — the :class:`Transport` interface and the behaviour every link shares;
- :mod:`.blocks` — response framing and definite-length blocks (``#<n><len><bytes>``);
- :mod:`.visa` — :class:`VisaTransport` (pyvisa-py: every VISA resource);
- :mod:`.serial` — :class:`SerialTransport` (plain pyserial);
- :mod:`.stream` — :class:`StreamTransport` (asyncio streams, ``TCPIP::...::SOCKET``);
- :mod:`.scripted` — :class:`ScriptedTransport` (byte-exact protocol tests);
- :mod:`.worker` — :class:`InstrumentWorker` (one thread per instrument);
- :mod:`.factory` — :func:`open_transport` (resource string -> transport).

Resource strings are the lab's language (as in NI-MAX / pyvisa-shell):

- ``TCPIP::10.0.0.5::5025::SOCKET``, ``TCPIP::10.0.0.5::INSTR``, ``ASRL/dev/ttyUSB0::INSTR``,
  ``USB0::...::INSTR``, ``GPIB0::24::INSTR`` -> :class:`VisaTransport` (pyvisa-py), or
  for a SOCKET resource with ``stream=True`` -> :class:`StreamTransport`;
- ``serial:///dev/ttyUSB0?baudrate=115200`` or a plain ``/dev/...`` path (``COM3`` on
  Windows) -> :class:`SerialTransport` (plain pyserial).
"""

from .base import Transport, is_idempotent
from .blocks import FramingError, block_payload, format_block, message_end
from .factory import open_transport
from .scripted import ScriptedTransport
from .serial import SerialTransport
from .stream import StreamTransport
from .visa import VisaTransport
from .worker import InstrumentWorker

__all__ = [
    "FramingError",
    "InstrumentWorker",
    "ScriptedTransport",
    "SerialTransport",
    "StreamTransport",
    "Transport",
    "VisaTransport",
    "block_payload",
    "format_block",
    "is_idempotent",
    "message_end",
    "open_transport",
]
