"""Instrument resource strings: what a VISA or serial resource names (interface, host,
port, device path), checked before anything is opened, with an error saying what is
expected (:mod:`labdaq.instruments_config` validates every instrument's resource with it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

RESOURCE_EXAMPLES = (
    "TCPIP::<host>::<port>::SOCKET, TCPIP::<host>::INSTR, ASRL/dev/ttyUSB0::INSTR, "
    "ASRLCOM3::INSTR, GPIB0::<address>::INSTR, USB0::<vid>::<pid>::<serial>::INSTR, "
    "serial:///dev/ttyUSB0?baudrate=9600, /dev/ttyUSB0 or COM3"
)

_SERIAL_PATH = re.compile(r"^(/dev/\S+|COM\d+)$", re.IGNORECASE)
_VISA_CLASSES = ("INSTR", "SOCKET", "RAW")


class ResourceError(ValueError):
    """A resource string that cannot name an instrument; the message says what is
    expected."""


@dataclass(frozen=True)
class ResourceInfo:
    """What a resource string names: ``kind`` is ``visa`` or ``serial``; ``interface``
    ``TCPIP``/``ASRL``/``GPIB``/``USB``/``serial``; host/port for TCP, path for serial."""

    resource: str
    kind: str
    interface: str
    host: str | None = None
    port: int | None = None
    path: str | None = None


def parse_resource(resource: str) -> ResourceInfo:
    """Check a resource string's syntax (nothing is opened); ResourceError if malformed.

    Stricter than pyvisa on purpose: the resource class (``::INSTR``/``::SOCKET``) must be
    written out, the way NI-MAX and ``pyvisa-shell`` show it, and TCP ports are checked.
    """
    if not isinstance(resource, str):
        raise ResourceError(f"resource must be a string, got {type(resource).__name__}")
    text = resource.strip()
    if not text:
        raise ResourceError(f"empty resource string; expected one of: {RESOURCE_EXAMPLES}")
    if text != resource or any(ch.isspace() for ch in text):
        raise ResourceError(f"contains whitespace; expected one of: {RESOURCE_EXAMPLES}")
    if text.startswith("serial://"):
        port = text[len("serial://"):].split("?", 1)[0]
        if not port:
            raise ResourceError("names no port; expected serial://<port>[?baudrate=N], "
                                "e.g. serial:///dev/ttyUSB0")
        return ResourceInfo(resource, "serial", "serial", path=port)
    if _SERIAL_PATH.match(text):
        return ResourceInfo(resource, "serial", "serial", path=text)
    from pyvisa import rname

    try:
        parsed: Any = rname.parse_resource_name(text)
    except Exception as exc:  # pyvisa raises InvalidResourceName (and ValueError variants)
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ResourceError(f"malformed resource string ({reason}); "
                            f"expected one of: {RESOURCE_EXAMPLES}") from None
    if text.split("::")[-1].upper() not in _VISA_CLASSES:
        raise ResourceError(
            "malformed resource string (no resource class at the end); expected it to end "
            f"in ::INSTR or ::SOCKET, e.g. {RESOURCE_EXAMPLES}")
    interface = str(getattr(parsed, "interface_type", "")) or text.split("::")[0]
    name = type(parsed).__name__
    if name == "TCPIPSocket":
        host = str(parsed.host_address)
        try:
            port_number = int(str(parsed.port))
        except ValueError:
            port_number = -1
        if not host or not 0 < port_number < 65536:
            raise ResourceError(f"port {parsed.port!r} is not a TCP port; expected "
                                "TCPIP::<host>::<port 1-65535>::SOCKET")
        return ResourceInfo(resource, "visa", "TCPIP", host=host, port=port_number)
    if name == "TCPIPInstr":
        return ResourceInfo(resource, "visa", "TCPIP", host=str(parsed.host_address))
    if name == "ASRLInstr":
        board = str(parsed.board)
        if not board:
            raise ResourceError("names no serial port; expected ASRL<port>::INSTR, "
                                "e.g. ASRL/dev/ttyUSB0::INSTR")
        return ResourceInfo(resource, "visa", "ASRL", path=board)
    if name == "GPIBInstr":
        try:
            primary = int(str(parsed.primary_address))
        except ValueError:
            primary = -1
        if not 0 <= primary <= 30:
            raise ResourceError(f"GPIB address {parsed.primary_address!r} is not 0-30; "
                                "expected GPIB<board>::<0-30>::INSTR")
        return ResourceInfo(resource, "visa", "GPIB")
    return ResourceInfo(resource, "visa", interface.upper().split(".")[-1])
