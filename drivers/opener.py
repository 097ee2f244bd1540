"""The one way to open an instrument: its driver, its declared framing, its configuration.

The acquisition engine (instrument rows), ``labdaq instruments probe|check`` and the
configuration loader all open and identify instruments here, so an instrument is framed
the same way wherever it is opened. Drivers resolve by name through the
``labdaq.drivers`` entry-point group (a lab's own driver package registers there).

Transport options are merged in this order, later wins:

1. the driver's declared framing: ``read_termination`` / ``write_termination`` class
   attributes (Hioki BT4560: CR+LF) and a ``transport_options`` class dict (ESPEC);
2. the configuration's ``options.transport`` table (file, API or database row);
3. keyword overrides of the caller (tests' short timeouts, a probe's single attempt).

Every other key of ``options`` is a keyword argument of the driver's constructor.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from .base import Instrument, get_driver, load_entry_point_drivers, match_driver
from .errors import InstrumentError, UnknownInstrument
from .transport import Transport, open_transport

# Framing keys a driver may declare as class attributes.
_FRAMING_ATTRIBUTES = ("read_termination", "write_termination")


class InstrumentSpec(Protocol):
    """What opening needs: an ``[[instruments]]`` entry and an instruments row both fit."""

    @property
    def name(self) -> str: ...

    @property
    def driver(self) -> str: ...

    @property
    def resource(self) -> str: ...

    @property
    def options(self) -> Mapping[str, Any] | None: ...


def available_drivers() -> dict[str, type[Instrument]]:
    """Every installed driver by name (registered classes and entry points)."""
    return load_entry_point_drivers()


def resolve_driver(name: str) -> type[Instrument]:
    """The driver class called ``name``; UnknownInstrument lists the installed ones."""
    load_entry_point_drivers()
    return get_driver(name)


def declared_transport_options(cls: type) -> dict[str, Any]:
    """The framing a driver class declares (attributes first, then its options dict)."""
    declared: dict[str, Any] = {}
    for key in _FRAMING_ATTRIBUTES:
        value = getattr(cls, key, None)
        if isinstance(value, str) and value:
            declared[key] = value
    declared.update(getattr(cls, "transport_options", None) or {})
    return declared


def transport_options_for(cls: type, configured: Mapping[str, Any] | None = None,
                          **overrides: Any) -> dict[str, Any]:
    """Declared framing, then the configuration's ``options.transport``, then overrides."""
    merged = declared_transport_options(cls)
    merged.update(configured or {})
    merged.update(overrides)
    return merged


def split_options(options: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``options`` -> (transport options, driver keyword arguments)."""
    opts = dict(options or {})
    transport = opts.pop("transport", None) or {}
    if not isinstance(transport, Mapping):
        raise ValueError("options.transport must be a table of transport settings")
    return dict(transport), opts


def open_driver(driver: str, resource: str, *, name: str | None = None,
                options: Mapping[str, Any] | None = None,
                **transport_overrides: Any) -> Instrument:
    """Open ``resource`` with driver ``driver``, framed as the driver declares.

    ``options`` is the configuration's table: ``transport`` for the link, every other key
    a keyword of the driver's constructor. The transport is closed again if the driver
    cannot be built.
    """
    cls = resolve_driver(driver)
    transport_opts, driver_kwargs = split_options(options)
    transport = open_transport(resource,
                               **transport_options_for(cls, transport_opts, **transport_overrides))
    try:
        return cls(transport, name or resource, **driver_kwargs)
    except Exception:
        transport.close()
        raise


def open_configured(spec: InstrumentSpec, **transport_overrides: Any) -> Instrument:
    """Open a configured instrument (an ``[[instruments]]`` entry or an instruments row)."""
    return open_driver(spec.driver, spec.resource, name=spec.name, options=spec.options,
                       **transport_overrides)


# ---------------------------------------------------------------------------------------
# Identification
# ---------------------------------------------------------------------------------------


@dataclass
class Identification:
    """What answered: ``driver`` is None when no installed driver claims the reply."""

    idn: str
    driver: str | None
    identified_by: str = "*IDN?"
    replies: dict[str, str] = field(default_factory=dict)


def looks_like_idn(reply: str) -> bool:
    """IEEE 488.2 ``*IDN?`` reply: four comma-separated fields, a maker first."""
    fields = [f.strip() for f in reply.split(",")]
    return len(fields) == 4 and bool(fields[0]) and ":" not in fields[0]


def identify(transport: Transport) -> Identification:
    """Ask ``*IDN?`` and find the driver whose ``idn_patterns`` match.

    Instruments outside IEEE 488.2 (an ESPEC controller answers ``NA:CMD ERR``) are
    identified by the queries their drivers declare in ``identify_queries``, each asked
    once, in a stable order; a proper identification line is not asked further. Errors
    of the ``*IDN?`` exchange itself propagate (the caller words them).
    """
    idn = transport.query("*IDN?")
    replies = {"*IDN?": idn}
    drivers = available_drivers()
    if idn.strip():
        try:
            return Identification(idn, match_driver(idn), replies=replies)
        except UnknownInstrument:
            pass
    candidates = [] if looks_like_idn(idn) else sorted(drivers)
    for name in candidates:
        for query, pattern in getattr(drivers[name], "identify_queries", None) or []:
            if query not in replies:
                try:
                    replies[query] = transport.query(query)
                except InstrumentError:
                    replies[query] = ""
                    continue
            if replies[query] and re.search(pattern, replies[query], re.IGNORECASE):
                return Identification(replies[query], name, identified_by=query,
                                      replies=replies)
    return Identification(idn, None, replies=replies)


def identify_by_own_protocol(resource: str, timeout_s: float) -> Identification | None:
    """Ask the drivers whose instruments do not answer a line-framed ``*IDN?`` at all
    (a Neware BTS server) to identify ``resource`` in their own protocol, each declaring
    a classmethod ``identify_resource(resource, timeout_s) -> str | None``; in a stable
    order, the first that answers wins. None: none of them recognises it."""
    drivers = available_drivers()
    for name in sorted(drivers):
        ask = getattr(drivers[name], "identify_resource", None)
        if ask is None:
            continue
        try:
            idn = ask(resource, timeout_s)
        except InstrumentError:
            continue
        if idn:
            return Identification(idn, name, identified_by=f"{name} protocol")
    return None


def open_instrument(resource: str, name: str | None = None, *, driver: str | None = None,
                    **transport_opts: Any) -> Instrument:
    """Open ``resource`` and return its driver: ``driver`` if given, else the one that
    identifies it. The link ends up framed as that driver declares unless
    ``transport_opts`` say otherwise (an identified instrument whose driver declares
    other framing than the probe used is reopened with it)."""
    if driver is not None:
        return open_driver(driver, resource, name=name, **transport_opts)
    transport = open_transport(resource, **transport_opts)
    try:
        found = identify(transport)
        if found.driver is None:
            raise UnknownInstrument(
                f"no driver matches *IDN? {found.idn!r}; known: {sorted(available_drivers())}",
                command="*IDN?", expected="a registered driver's idn_patterns")
        cls = resolve_driver(found.driver)
        wanted = transport_options_for(cls, **transport_opts)
        if any(getattr(transport, k, None) != v for k, v in wanted.items()
               if k in _FRAMING_ATTRIBUTES):
            transport.close()
            transport = open_transport(resource, **wanted)
        return cls(transport, name or resource, idn=found.idn)
    except Exception:
        transport.close()
        raise
