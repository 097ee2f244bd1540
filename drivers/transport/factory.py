"""Resource string -> transport: the one place that decides which link a resource gets.

One job: :func:`open_transport` — pyserial for serial paths and ``serial://`` URLs,
the asyncio stream transport for ``TCPIP::host::port::SOCKET`` when asked for
(``stream=True``: the engine's hot path), pyvisa-py for everything else (and for
probing).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from .base import Transport
from .serial import SerialTransport
from .stream import StreamTransport, is_socket_resource
from .visa import VisaTransport

_SERIAL_PATH = re.compile(r"^(/dev/|COM\d+$)", re.IGNORECASE)


def open_transport(resource: str, *, connect: bool = True, stream: bool = False,
                   **opts: Any) -> Transport:
    """Build (and open, unless ``connect=False``) the transport a resource string names.

    ``serial://<port>[?baudrate=..]`` or a plain ``/dev/...`` / ``COMn`` path -> pyserial;
    ``TCPIP::host::port::SOCKET`` with ``stream=True`` -> asyncio streams (the engine's
    hot path; other resources ignore ``stream``); anything else -> pyvisa-py. Common
    options: ``read_termination``,
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
    elif stream and is_socket_resource(resource):
        if "timeout_s" in opts:
            opts["timeout_s"] = float(opts["timeout_s"])
        transport = StreamTransport(resource, **opts)
    else:
        if "baudrate" in opts:
            opts.setdefault("baud_rate", int(opts.pop("baudrate")))
        transport = VisaTransport(resource, **opts)
    if connect:
        transport.open()
    return transport
