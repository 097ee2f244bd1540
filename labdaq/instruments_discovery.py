"""An instruments-file table for an instrument found at a resource, with the channels it
reports itself.

One job: turn what a probe found (driver, resource) into an ``[[instruments]]`` table a
technician can put into the instruments file. A driver that can list its instrument's
channels declares a classmethod ``list_channels(resource, timeout_s)`` returning
``[[instruments.channels]]`` entries (the Neware BTS driver asks the server's
``getdevinfo``); each becomes a channel named ``<instrument>/<its own name>``, so every
channel the instrument reports is in the file. Drivers without it give no channels (the
technician writes them, as before).
"""

from __future__ import annotations

from typing import Any


def instrument_table(name: str, driver: str, resource: str, *, timeout_s: float = 2.0,
                     description: str | None = None,
                     options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``[[instruments]]`` table for ``resource`` (see labdaq.instruments_toml)."""
    from labdaq.drivers.opener import resolve_driver

    table: dict[str, Any] = {"name": name, "driver": driver, "resource": resource}
    if description:
        table["description"] = description
    if options:
        table["options"] = dict(options)
    list_channels = getattr(resolve_driver(driver), "list_channels", None)
    if list_channels is not None:
        table["channels"] = [{**ch, "name": f"{name}/{ch['name']}"}
                             for ch in list_channels(resource, timeout_s)]
    return table
