"""Instrument configuration in the database: list, and create/update from a validated config.

The acquisition node reads instruments from the database when it (re)starts, so a change
takes effect at the next engine start; the audit event says who changed what.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.channels import upsert_instrument
from labdaq.errors import Invalid
from labdaq.instruments_config import InstrumentConfig, InstrumentsConfig, check_driver_names
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


async def configure_instrument(
    session: AsyncSession, cfg: InstrumentConfig, actor: str
) -> dict[str, Any]:
    problems = check_driver_names(InstrumentsConfig(instruments=[cfg]))
    if problems:
        raise Invalid(
            "instrument configuration is not usable",
            [{"loc": "driver" if "'driver'" in p else "options", "msg": p} for p in problems],
        )
    inst = await upsert_instrument(
        session,
        cfg.name,
        cfg.driver,
        cfg.resource,
        [
            {
                "index": ch.index,
                "name": ch.name or f"{cfg.name}/{ch.index}",
                "max_current_a": ch.max_current_a,
                "max_voltage_v": ch.max_voltage_v,
            }
            for ch in cfg.channels
        ],
        options=cfg.options,
    )
    session.add(
        m.Event(
            kind="audit",
            message=f"instrument {cfg.name} configured ({cfg.driver} at {cfg.resource})",
            data={"config": cfg.model_dump(mode="json")},
            actor=actor,
        )
    )
    await session.flush()
    out = [x for x in await list_instruments(session) if x["id"] == inst.id]
    return out[0]
