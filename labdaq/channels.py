"""Channel queries and registration of instruments with their channels."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from labdaq.storage import models as m


async def list_channels(session: AsyncSession) -> list[dict[str, Any]]:
    # The run holding a channel, else the first of its queue (labdaq/run_queue.py).
    holding = {s.value for s in m.HOLDING_STATES}
    active: dict[int, int] = {}
    for run_id, ch_id, state in (
        await session.execute(
            select(m.Run.id, m.Run.channel_id, m.Run.state)
            .where(m.Run.state.in_([s.value for s in m.ACTIVE_STATES]))
            .order_by(m.Run.queue_order, m.Run.id)
        )
    ).all():
        if ch_id not in active or state in holding:
            active[ch_id] = run_id
    rows = (
        await session.execute(
            select(m.Channel, m.Instrument)
            .join(m.Instrument, m.Instrument.id == m.Channel.instrument_id)
            .where(m.Channel.enabled)
            .order_by(m.Channel.id)
        )
    ).all()
    return [
        {
            "id": ch.id,
            "name": ch.name,
            "instrument": inst.name,
            "driver": inst.driver,
            "resource": inst.resource,
            "index": ch.index,
            "max_current_a": ch.max_current_a,
            "max_voltage_v": ch.max_voltage_v,
            "active_run_id": active.get(ch.id),
            "state": "busy" if ch.id in active else "idle",
        }
        for ch, inst in rows
    ]


async def upsert_instrument(
    session: AsyncSession,
    name: str,
    driver: str,
    resource: str,
    channels: list[dict[str, Any]],
    options: dict[str, Any] | None = None,
    node: str | None = None,
) -> m.Instrument:
    """Create or update an instrument and its channels (by name); returns the instrument.
    ``node``: the acquisition node that drives it (labdaq.nodes; None: unassigned)."""
    inst = await session.scalar(select(m.Instrument).where(m.Instrument.name == name))
    if inst is None:
        inst = m.Instrument(name=name, driver=driver, resource=resource, options=options or {},
                            node=node)
        session.add(inst)
        await session.flush()
    else:
        inst.driver, inst.resource, inst.options = driver, resource, options or {}
        inst.node = node
    for ch in channels:
        row = await session.scalar(
            select(m.Channel).where(
                m.Channel.instrument_id == inst.id, m.Channel.index == ch["index"]
            )
        )
        if row is None:
            session.add(m.Channel(instrument_id=inst.id, **ch))
        else:
            for k, v in ch.items():
                setattr(row, k, v)
    await session.flush()
    return inst
