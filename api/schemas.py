"""Pydantic response schemas of the HTTP API (kept apart from the ORM models)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field


def _utc(value: datetime | None) -> datetime | None:
    # SQLite stores timestamps without their zone; every timestamp labdaq writes is UTC.
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


class Health(BaseModel):
    status: str
    version: str
    database: str


class ChannelOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    instrument: str
    driver: str
    resource: str
    index: int
    max_current_a: float | None
    max_voltage_v: float | None
    active_run_id: int | None
    state: str


class RunOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    channel_id: int
    cell_id: int
    protocol_id: int
    state: str = Field(description="the run's state; node_down (shown, never stored) for a "
                       "running or paused run whose acquisition node is down")
    node: str | None = Field(default=None, description="the acquisition node that runs it")
    requested_action: str | None
    sample_period_s: float
    created_at: UtcDatetime
    started_at: UtcDatetime | None
    ended_at: UtcDatetime | None
    end_reason: str | None
    step_index: int
    step_count: int
    cycle_index: int
    elapsed_s: float
    last_seq: int
    missed_periods: int = Field(
        description="sample periods the engine could not sample (lost samples); each gap "
        "is also an event of kind missed_periods")
    # The run queue (labdaq/run_queue.py): its place while it waits (1 = next), when it
    # may start at the earliest, and why an awaiting_cell run waits for a technician.
    queue_position: int | None = None
    not_before: UtcDatetime | None = None
    waiting_reason: str | None = None


class SamplesOut(BaseModel):
    """Column-oriented: one array per quantity, units in the names."""

    run_id: int
    count: int
    next_after_seq: int
    seq: list[int]
    t_s: list[float]
    ts_utc: list[float]
    step_index: list[int]
    cycle_index: list[int]
    voltage_v: list[float]
    current_a: list[float]
    temperature_c: list[float | None]
    step_capacity_ah: list[float]
    step_energy_wh: list[float]
    flags: list[int]


class CycleOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    cycle_index: int
    start_t_s: float
    end_t_s: float
    charge_capacity_ah: float
    discharge_capacity_ah: float
    charge_energy_wh: float
    discharge_energy_wh: float
    coulombic_efficiency: float | None
    energy_efficiency: float | None
    mean_charge_voltage_v: float | None
    mean_discharge_voltage_v: float | None


class StepOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    step_number: int
    step_index: int
    cycle_index: int
    kind: str
    start_t_s: float
    end_t_s: float
    end_reason: str
    capacity_ah: float
    energy_wh: float
    end_voltage_v: float | None
    dcir_ohm: float | None
    end_crossing_t_s: float | None = None


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    run_id: int | None
    ts: UtcDatetime
    kind: str
    severity: str
    message: str
    data: dict[str, object]
    actor: str | None


class EisOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    step_index: int
    cycle_index: int
    t_s: float
    instrument: str
    dc_voltage_v: float | None
    frequency_hz: list[float]
    z_real_ohm: list[float]
    z_imag_ohm: list[float]


class TemplateOut(BaseModel):
    name: str
    description: str
    content_hash: str
    document: dict[str, object]


class InstrumentOut(BaseModel):
    id: int
    name: str
    driver: str
    resource: str
    options: dict[str, object]
    channels: list[str]
