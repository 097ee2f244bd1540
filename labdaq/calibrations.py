"""Calibration certificates of instruments and channels, and the calibration status of a
run's channel on the day the run started: ``calibrated`` (a certificate in force),
``expired`` (certificates exist, none in force that day) or ``missing`` (none). Admins
record certificates (audited); the evaluation reports the status with every entry and
takes the certified accuracy as the channel's when the caller gives none."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from labdaq.errors import Invalid, NotFound
from labdaq.storage import models as m

__all__ = ["CalibrationIn", "CalibrationStatus", "record_calibration", "list_calibrations",
           "status_of_run", "ACCURACY_KEYS"]

Status = Literal["calibrated", "expired", "missing"]
#: Accuracy per quantity, expanded (k = 2): relative for V and I, absolute °C for T.
ACCURACY_KEYS = ("voltage_rel", "current_rel", "temperature_c")


class Accuracy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    voltage_rel: float | None = Field(default=None, gt=0, le=0.5)
    current_rel: float | None = Field(default=None, gt=0, le=0.5)
    temperature_c: float | None = Field(default=None, gt=0, le=50)


class CalibrationIn(BaseModel):
    """A certificate: of every channel of ``instrument``, or of one ``channel`` of it."""

    model_config = ConfigDict(extra="forbid")

    instrument: str = Field(min_length=1, max_length=100)
    channel: str | None = Field(None, max_length=100)
    certificate_id: str = Field(min_length=1, max_length=100)
    lab: str = Field(min_length=1, max_length=200)
    calibrated_on: date
    due_on: date
    accuracy: Accuracy = Accuracy()
    note: str | None = Field(None, max_length=2000)

    @model_validator(mode="after")
    def _due_after(self) -> CalibrationIn:
        if self.due_on <= self.calibrated_on:
            raise ValueError("due_on must be after calibrated_on")
        return self


@dataclass(frozen=True)
class CalibrationStatus:
    status: Status
    text: str
    calibration_id: int | None = None
    accuracy: dict[str, Any] | None = None


async def record_calibration(session: AsyncSession, body: CalibrationIn,
                             actor: str) -> m.Calibration:
    inst = await session.scalar(select(m.Instrument).where(m.Instrument.name == body.instrument))
    if inst is None:
        raise NotFound(f"no instrument {body.instrument!r}")
    channel_id = None
    if body.channel is not None:
        ch = await session.scalar(select(m.Channel).where(
            m.Channel.name == body.channel, m.Channel.instrument_id == inst.id))
        if ch is None:
            raise Invalid("unknown channel", [
                {"loc": "channel", "msg": f"{body.channel!r} is no channel of {inst.name}"}])
        channel_id = ch.id
    row = m.Calibration(
        instrument_id=inst.id, channel_id=channel_id, certificate_id=body.certificate_id,
        lab=body.lab, calibrated_on=body.calibrated_on, due_on=body.due_on,
        accuracy=body.accuracy.model_dump(exclude_none=True), recorded_by=actor,
        note=body.note)
    session.add(row)
    await session.flush()
    what = inst.name if body.channel is None else body.channel
    session.add(m.Event(
        kind="audit", actor=actor,
        message=f"calibration {body.certificate_id} of {what} recorded "
                f"({body.calibrated_on} to {body.due_on}, {body.lab})",
        data={"calibration_id": row.id, "before": None,
              "after": body.model_dump(mode="json")}))
    await session.flush()
    return row


async def list_calibrations(session: AsyncSession,
                            instrument: str | None = None) -> list[tuple[m.Calibration, str,
                                                                          str | None]]:
    """Every certificate (newest first) with its instrument's and channel's names."""
    stmt = (select(m.Calibration, m.Instrument.name, m.Channel.name)
            .join(m.Instrument, m.Instrument.id == m.Calibration.instrument_id)
            .outerjoin(m.Channel, m.Channel.id == m.Calibration.channel_id)
            .order_by(m.Calibration.calibrated_on.desc(), m.Calibration.id.desc()))
    if instrument is not None:
        stmt = stmt.where(m.Instrument.name == instrument)
    return [(c, i, ch) for c, i, ch in (await session.execute(stmt)).all()]


def status_of_run(session: Session, run: m.Run) -> CalibrationStatus:
    """The calibration status of the run's channel on the day it started (created, for a
    run that never started)."""
    channel = session.get(m.Channel, run.channel_id)
    if channel is None:
        return CalibrationStatus("missing", "not_evaluable: the run has no channel")
    on = (run.started_at or run.created_at).date()
    certs = session.scalars(
        select(m.Calibration)
        .where(m.Calibration.instrument_id == channel.instrument_id,
               or_(m.Calibration.channel_id.is_(None), m.Calibration.channel_id == channel.id))
        .order_by(m.Calibration.calibrated_on.desc(), m.Calibration.id.desc())).all()
    if not certs:
        return CalibrationStatus(
            "missing", "not_evaluable: labdaq holds no calibration records for the channel")
    in_force = [c for c in certs if c.calibrated_on <= on <= c.due_on]
    if in_force:
        # A channel's own certificate beats its instrument's.
        c = next((c for c in in_force if c.channel_id is not None), in_force[0])
        return CalibrationStatus(
            "calibrated", f"calibrated: certificate {c.certificate_id} ({c.lab}, "
                          f"{c.calibrated_on}, due {c.due_on})", c.id, dict(c.accuracy or {}))
    last = max(certs, key=lambda c: c.due_on)
    why = (f"was due {last.due_on}" if last.due_on < on
           else f"is valid only from {last.calibrated_on}")
    return CalibrationStatus(
        "expired", f"not_evaluable: calibration expired: certificate {last.certificate_id} "
                   f"({last.lab}) {why}; the run started {on}", last.id)
