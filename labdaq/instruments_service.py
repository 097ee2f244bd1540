"""Instrument configuration in the database: list, and configure from a document or entry.

The acquisition node reads instruments from the database when it (re)starts, so a change
takes effect at the next engine start; the audit event says who changed what. Changes go
through labdaq.instruments_apply (one transaction, refusals naming the run in the way);
when the lab is configured by an instruments file, that file is the source of truth and
changes through the API are refused, naming it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.errors import Conflict
from labdaq.instruments_apply import ApplyResult, apply_instruments, document, single_instrument
from labdaq.instruments_config import InstrumentConfig, InstrumentsConfig
from labdaq.storage import models as m


async def list_instruments(session: AsyncSession) -> list[dict[str, Any]]:
    rows = (await session.scalars(select(m.Instrument).order_by(m.Instrument.id))).all()
    chans = (await session.scalars(select(m.Channel).order_by(m.Channel.id))).all()
    return [
        {
            "id": r.id,
            "name": r.name,
            "driver": r.driver,
            "resource": r.resource,
            "options": r.options or {},
            "channels": [c.name for c in chans if c.instrument_id == r.id],
        }
        for r in rows
    ]


def refuse_if_file_configured(instruments_file: Path | None) -> None:
    """Conflict naming the file when the lab's instruments come from one."""
    if instruments_file is not None:
        raise Conflict(
            f"instruments are configured by the file {instruments_file} "
            "(setting instruments_file / LABDAQ_INSTRUMENTS_FILE), which is the source of "
            f"truth: edit it and run `labdaq instruments apply {instruments_file}` (or "
            "restart `labdaq serve`)"
        )


async def configure_instrument(
    session: AsyncSession, cfg: InstrumentConfig, actor: str, *, dry_run: bool = False
) -> dict[str, Any]:
    """Create or update one instrument (others are left as they are)."""
    await apply_instruments(session, single_instrument(cfg), actor=actor, dry_run=dry_run,
                            partial=True)
    out = [x for x in await list_instruments(session) if x["name"] == cfg.name]
    if dry_run and not out:
        # Nothing written: describe the instrument as it would be.
        return {"id": 0, "name": cfg.name, "driver": cfg.driver, "resource": cfg.resource,
                "options": cfg.options,
                "channels": [ch.name or f"{cfg.name}/{ch.index}" for ch in cfg.channels]}
    return out[0]


async def configure_lab(
    session: AsyncSession, config: InstrumentsConfig, actor: str, *, dry_run: bool = False
) -> ApplyResult:
    """Make the database match a whole instruments document (as `instruments apply`)."""
    return await apply_instruments(session, document(config), actor=actor, dry_run=dry_run)
