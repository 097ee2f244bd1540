"""`labdaq instruments ...`: probe, list and configure instruments."""

from __future__ import annotations

import typer

instruments_app = typer.Typer(help="Instruments: probe a resource, list configured ones.")
